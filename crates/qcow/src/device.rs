//! The one interface every readable disk offers: [`BlockDevice`].
//!
//! qcow2, qcow version 1 and raw images all implement it, so that convert,
//! compare, map and (later) serve work on any of them.

use crate::Result;

/// An image format the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// QCOW2, versions 2 and 3.
    Qcow2,
    /// QCOW version 1.
    Qcow,
    /// A plain file.
    Raw,
    /// A LUKS volume (an encrypted disk behind a LUKS header).
    Luks,
}

impl ImageFormat {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qcow => "qcow",
            ImageFormat::Raw => "raw",
            ImageFormat::Luks => "luks",
        }
    }

    /// Parses a qemu-img format name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "qcow2" => Ok(ImageFormat::Qcow2),
            "qcow" => Ok(ImageFormat::Qcow),
            "raw" => Ok(ImageFormat::Raw),
            "luks" => Ok(ImageFormat::Luks),
            other => Err(crate::Error::UnknownFormat(other.to_owned())),
        }
    }
}

/// How a range of a disk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in the image at `depth` of the chain (0 is the image itself).
    Data {
        /// Chain depth of the layer holding it.
        depth: u32,
        /// Host offset in that layer's data file, when known (not for
        /// compressed clusters).
        offset: Option<u64>,
        /// Whether the data is compressed.
        compressed: bool,
        /// Whether the data's host space is a hole in its file, so that it
        /// reads as zeros (qemu-img map's `"zero": true, "data": true`).
        zero: bool,
    },
    /// Reads as zeros, recorded as such at `depth` of the chain.
    Zero {
        /// Chain depth of the layer saying so.
        depth: u32,
        /// Host space that layer keeps reserved for the range, if any.
        offset: Option<u64>,
    },
    /// Stored nowhere in the chain: reads as zeros.
    Unallocated {
        /// Depth of the last layer of the chain looked at.
        depth: u32,
        /// Host space that layer keeps reserved for the range, if any.
        offset: Option<u64>,
    },
    /// Not allocated, as the layer at `depth` says, yet not said to read as
    /// zeros (an NBD export's hole without the zero flag): its bytes must
    /// be read to be known (qemu-img map's `"present": false, "zero":
    /// false, "data": false`).
    Unknown {
        /// Chain depth of the layer saying so.
        depth: u32,
    },
}

/// The allocation of a run of bytes at the start of a queried range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes (at least 1 for a non-empty query).
    pub len: u64,
    /// How the run is stored.
    pub allocation: Allocation,
}

/// A disk image that can be read (and, for some, written) at any byte offset.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// The image's format.
    fn format(&self) -> ImageFormat;

    /// The size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buf` with the disk's bytes from `offset`. The range must lie
    /// within the virtual size.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// How the bytes from `offset` are stored, for a run of at most `len`
    /// bytes, looking through the backing chain.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;

    /// The image's name as it was opened (a path), used in messages.
    fn name(&self) -> &str;

    /// Writes `buf` at `offset`; the range must lie within the virtual size.
    /// The default refuses: the image is read-only.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(crate::Error::ReadOnly {
            image: self.name().to_owned(),
        })
    }

    /// Makes the range read as zeros (`unmap`: its space may be released).
    /// The default writes zeros.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let _ = unmap;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 20);
            // n <= 1 MiB.
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Says the range's contents are no longer needed; it may read back as
    /// zeros or as before. The default does nothing.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Makes every completed write durable. The default has nothing to do.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The name of the file holding this image's data: the external data
    /// file where there is one, else the image itself.
    fn data_name(&self) -> &str {
        self.name()
    }

    /// The backing image, when one is open.
    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }

    /// What repairing the image took when it was opened (a qcow2 image
    /// left dirty by a crash with lazy refcounts is checked and repaired
    /// when opened for writing): QEMU's check lines, which qemu-img prints
    /// on standard error. The default: nothing was repaired.
    fn repairs_on_open(&self) -> &[String] {
        &[]
    }

    /// Whether the image takes writes (it was opened for writing).
    fn is_writable(&self) -> bool {
        false
    }

    /// Lays out now, in this call's order, the space the range will take,
    /// for a caller that writes the whole range next (from any thread)
    /// before anything reads it: a copy that wants the file laid out in the
    /// disk's order while its data is written in parallel. The default does
    /// nothing (formats without allocation).
    ///
    /// Returns what was laid out: should the writes not all happen (one
    /// failed, the copy stopped), hand it to [`BlockDevice::release`], or
    /// the image keeps space mapped that was never written.
    fn reserve(&self, offset: u64, len: u64) -> Result<Reservation> {
        let _ = (offset, len);
        Ok(Reservation::default())
    }

    /// Unmaps and frees what `reservation` laid out and writes have not
    /// replaced since (those parts read as unallocated again), once the
    /// tables that stopped pointing at it are on disk. The default does
    /// nothing (formats without allocation).
    fn release(&self, reservation: Reservation) -> Result<()> {
        let _ = reservation;
        Ok(())
    }

    /// The unit the image allocates in (its cluster size), for formats that
    /// have one; writes of part of a unit allocate all of it.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// The smallest unit a write allocates (a subcluster of an image with
    /// extended L2 entries, else the cluster).
    fn subcluster_size(&self) -> Option<u64> {
        self.cluster_size()
    }

    /// Whether making a range read as zeros writes zeros into clusters
    /// (a format version without a zero flag over a backing file, or a
    /// raw external data file) rather than only changing metadata: a copy
    /// then lays those clusters out in order as it does data.
    fn zeroing_allocates(&self) -> bool {
        false
    }

    /// Compressed writes, for images whose format stores compressed
    /// clusters (and that are open for writing).
    fn compressed_writes(&self) -> Option<&dyn CompressedWrites> {
        None
    }

    /// Whether a read does work of its own on the processor (decryption,
    /// here or in a backing layer) that several threads can share. A copy
    /// from it then reads with all its workers and hands the chunks on to
    /// be written in order; from other sources its workers read and write
    /// by turns. (Compressed clusters are found by their block status.)
    fn reads_use_cpu(&self) -> bool {
        false
    }

    /// Whether a write does work of its own on the processor (encryption)
    /// that several threads can share. A copy then writes from several
    /// threads; otherwise from one, since the host file system takes a
    /// file's writes one at a time and more writers only contend for its
    /// lock.
    fn writes_use_cpu(&self) -> bool {
        false
    }
}

/// Space [`BlockDevice::reserve`] laid out: runs of guest clusters mapped
/// to new host clusters.
#[derive(Debug, Default)]
#[must_use = "a reservation whose writes fail must be released"]
pub struct Reservation {
    runs: Vec<ReservedRun>,
}

/// `clusters` guest clusters from guest byte `guest`, mapped to as many
/// host clusters from host byte `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReservedRun {
    pub(crate) guest: u64,
    pub(crate) host: u64,
    pub(crate) clusters: u64,
}

impl Reservation {
    /// Whether nothing was laid out.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Adds the runs of `other`.
    pub fn append(&mut self, mut other: Reservation) {
        self.runs.append(&mut other.runs);
    }

    pub(crate) fn push(&mut self, run: ReservedRun) {
        self.runs.push(run);
    }

    pub(crate) fn runs(&self) -> &[ReservedRun] {
        &self.runs
    }
}

/// Writing compressed clusters in two steps, so that many threads can
/// compress while one writer stores the results in guest order, packed
/// back to back (as `qemu-img convert -c` lays them out).
pub trait CompressedWrites: Sync {
    /// Compresses one whole cluster (the disk's last, partial cluster padded
    /// with zeros) as the image stores it; `None` when it would not shrink,
    /// and the cluster is to be written plain. Runs on any thread.
    fn compress_cluster(&self, cluster: &[u8]) -> Option<Vec<u8>>;

    /// Stores clusters from [`CompressedWrites::compress_cluster`], as
    /// (guest offset, compressed bytes), packed back to back in their order.
    /// The clusters must not be allocated yet.
    fn write_compressed(&self, clusters: &[(u64, &[u8])]) -> Result<()>;
}
