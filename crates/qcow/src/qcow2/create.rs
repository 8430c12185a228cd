//! Creating QCOW2 images, laid out as qemu-img lays them out: the header
//! cluster, the refcount table, the refcount blocks, then the L1 table, all
//! counted once.

use std::sync::Arc;

use qcow_format::extension::{HeaderExtension, standard_feature_names};
use qcow_format::header::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, CompressionType, Encryption, Header,
    INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTENDED_L2, V2_HEADER_LEN, V3_HEADER_LEN,
};
use qcow_format::limits::{
    MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use qcow_format::table::refcount_set;
use qcow_io::Storage;

use super::Qcow2Image;
use crate::{Error, Result};

/// How much of a new image is allocated up front (qemu-img's `preallocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the metadata every image has.
    #[default]
    Off,
    /// L2 tables and data clusters allocated, not written.
    Metadata,
    /// Like metadata, with the file's space reserved.
    Falloc,
    /// Like metadata, with zeros written to every cluster.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's name for the mode.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            other => Err(Error::InvalidOptions(format!(
                "invalid preallocation mode {other:?} (off, metadata, falloc, full)"
            ))),
        }
    }
}

/// Options for a new QCOW2 image, named after qemu-img's `-o` options.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Cluster size in bytes (`cluster_size`), a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// Format version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// Refcount width in bits (`refcount_bits`): 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// Lazy refcounts (`lazy_refcounts`), version 3 only.
    pub lazy_refcounts: bool,
    /// Extended L2 entries with subclusters (`extended_l2`), version 3 only.
    pub extended_l2: bool,
    /// Compression type of compressed clusters (`compression_type`).
    pub compression_type: CompressionType,
    /// Backing file name as stored in the image (`backing_file`).
    pub backing_file: Option<String>,
    /// Backing file format (`backing_fmt`).
    pub backing_format: Option<String>,
    /// External data file name as stored in the image (`data_file`).
    pub data_file: Option<String>,
    /// The external data file is a valid raw image (`data_file_raw`).
    pub data_file_raw: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Encryption (`encrypt.format` and its options).
    pub encryption: Option<crate::crypto::EncryptionOptions>,
}

impl CreateOptions {
    /// qemu-img's defaults for a disk of `size` bytes: version 3, 64 KiB
    /// clusters, 16-bit refcounts, zlib.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            encryption: None,
        }
    }

    /// The virtual size the image gets: the size asked for, rounded up to
    /// whole 512-byte sectors as qemu-img rounds it.
    pub fn rounded_size(&self) -> u64 {
        self.size.div_ceil(512).saturating_mul(512)
    }

    /// Checks every option and the size against the format's limits, so
    /// that a refused image is refused before any file is touched.
    pub fn validate(&self) -> Result<()> {
        self.check().map(|_| ())
    }

    /// [`CreateOptions::validate`], returning the cluster and refcount
    /// orders.
    fn check(&self) -> Result<(u32, u32)> {
        let bad = |msg: String| Err(Error::InvalidOptions(msg));
        let cluster_bits = self.cluster_size.trailing_zeros();
        if !self.cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
        {
            return bad("Cluster size must be a power of two between 512 and 2048k".into());
        }
        if self.extended_l2 && cluster_bits < 14 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            );
        }
        if self.version != 2 && self.version != 3 {
            return bad(format!("version {} is not 2 or 3", self.version));
        }
        // QEMU's words, in QEMU's order.
        let v3 = "compatibility level 1.1 and above (use version=v3 or greater)";
        if self.version == 2 && self.extended_l2 {
            return bad(format!("Extended L2 entries are only supported with {v3}"));
        }
        if self.version == 2 && self.lazy_refcounts {
            return bad(format!("Lazy refcounts only supported with {v3}"));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits".into());
        }
        let refcount_order = self.refcount_bits.trailing_zeros();
        if self.version == 2 && self.refcount_bits != 16 {
            return bad(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
                    .into(),
            );
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file".into());
        }
        if self.version == 2 && self.data_file.is_some() {
            return bad(format!("External data files are only supported with {v3}"));
        }
        if self.version == 2 && self.compression_type != CompressionType::Zlib {
            return bad(format!(
                "Non-zlib compression type is only supported with {v3}"
            ));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return bad(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                    .into(),
            );
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file".into());
        }
        let too_large = || {
            bad("The image size is too large for file format 'qcow2' (try using a larger cluster size)".into())
        };
        let size = self.rounded_size();
        if size > MAX_VIRTUAL_SIZE {
            return too_large();
        }
        let l2_entries = self.cluster_size / if self.extended_l2 { 16 } else { 8 };
        if size.div_ceil(l2_entries << cluster_bits) * 8 > MAX_L1_BYTES {
            return too_large();
        }
        if let Some(name) = &self.backing_file {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return bad(format!(
                    "backing file name must be 1 to {MAX_BACKING_NAME} bytes long"
                ));
            }
        }
        if let Some(encryption) = &self.encryption {
            if self.data_file.is_some() {
                return bad("an external data file is not supported with encryption".into());
            }
            if let crate::crypto::EncryptionOptions::Luks(luks) = encryption {
                luks.validate()
                    .map_err(|e| Error::InvalidOptions(e.to_string()))?;
            }
        }
        Ok((cluster_bits, refcount_order))
    }
}

impl Qcow2Image {
    /// Writes a new, empty QCOW2 image into `file` (which should be empty).
    /// Only the metadata is written: preallocation is applied by
    /// [`Qcow2Image::create_writable`] and [`crate::create`].
    ///
    /// An encrypted image is refused here (the encryption is set up on
    /// the open image): make one with [`Qcow2Image::create_writable`] or
    /// [`crate::create`].
    pub fn create(file: &dyn Storage, options: &CreateOptions) -> Result<()> {
        if options.encryption.is_some() {
            return Err(Error::InvalidOptions(
                "an encrypted image is made by qcow::create or Qcow2Image::create_writable".into(),
            ));
        }
        Self::create_layout(file, options)
    }

    /// [`Qcow2Image::create`] without the encryption, which the caller
    /// sets up on the open image.
    pub(crate) fn create_layout(file: &dyn Storage, options: &CreateOptions) -> Result<()> {
        let (cluster_bits, refcount_order) = options.check()?;
        let size = options.rounded_size();
        let cs = options.cluster_size;
        let l2_entries = cs / if options.extended_l2 { 16 } else { 8 };
        // Bounded by MAX_L1_BYTES (checked above).
        let l1_size = size.div_ceil(l2_entries << cluster_bits);
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let per_block = cs * 8 / u64::from(options.refcount_bits);
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + table_clusters + blocks + l1_clusters;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        let total = 1 + table_clusters + blocks + l1_clusters;
        let reftable_offset = cs;
        let blocks_offset = (1 + table_clusters) * cs;
        let l1_offset = (1 + table_clusters + blocks) * cs;

        let mut incompatible = 0;
        let mut extensions = Vec::new();
        if let Some(format) = &options.backing_format {
            extensions.push(HeaderExtension::BackingFormat(format.clone()));
        }
        if let Some(data_file) = &options.data_file {
            extensions.push(HeaderExtension::ExternalDataFile(data_file.clone()));
            incompatible |= INCOMPAT_DATA_FILE;
        }
        // QEMU leaves the feature name table out of headers of 4 KiB
        // clusters and smaller (it would crowd out the backing file name).
        if options.version >= 3 && cs > 4096 {
            extensions.push(HeaderExtension::FeatureNames(standard_feature_names()));
        }
        if options.extended_l2 {
            incompatible |= INCOMPAT_EXTENDED_L2;
        }
        if options.compression_type != CompressionType::Zlib {
            incompatible |= INCOMPAT_COMPRESSION;
        }
        let header = Header {
            version: options.version,
            cluster_bits,
            virtual_size: size,
            encryption: Encryption::None,
            // Bounded by MAX_L1_BYTES above.
            l1_size: l1_size as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: reftable_offset,
            // At most a few clusters for any size the L1 bound allows.
            refcount_table_clusters: table_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if options.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: if options.data_file_raw {
                AUTOCLEAR_DATA_FILE_RAW
            } else {
                0
            },
            refcount_order,
            header_length: if options.version >= 3 {
                V3_HEADER_LEN
            } else {
                V2_HEADER_LEN
            },
            compression_type: options.compression_type,
            backing_file: options.backing_file.clone(),
            extensions,
        };
        // The feature name table is a courtesy: like qemu-img, leave it out
        // when it does not fit in a small header cluster.
        let header_bytes = match header.encode() {
            Ok(bytes) => bytes,
            Err(_) if options.version >= 3 => {
                let mut header = header.clone();
                header
                    .extensions
                    .retain(|e| !matches!(e, HeaderExtension::FeatureNames(_)));
                header
                    .encode()
                    .map_err(|e| Error::format("(new image)", e))?
            }
            Err(e) => return Err(Error::format("(new image)", e)),
        };
        let io = |op: &'static str, offset: u64| move |e| Error::io("(new image)", op, offset, e);
        file.set_len(0).map_err(io("truncating", 0))?;
        file.write_at(&header_bytes, 0)
            .map_err(io("writing the header", 0))?;
        let reftable: Vec<u8> = (0..blocks)
            .flat_map(|i| (blocks_offset + i * cs).to_be_bytes())
            .collect();
        file.write_at(&reftable, reftable_offset)
            .map_err(io("writing the refcount table", reftable_offset))?;
        // Blocks are small: a few clusters.
        let mut block_bytes = vec![0u8; (blocks * cs) as usize];
        for cluster in 0..total {
            let block = (cluster / per_block) as usize;
            let at = block * cs as usize;
            refcount_set(
                &mut block_bytes[at..at + cs as usize],
                cluster % per_block,
                refcount_order,
                1,
            )
            .ok_or_else(|| Error::InvalidOptions("refcount layout overflow".into()))?;
        }
        file.write_at(&block_bytes, blocks_offset)
            .map_err(io("writing refcount blocks", blocks_offset))?;
        // The file ends with the L1 table's last entry, as QEMU's does (it
        // writes the table at its size, not a whole cluster).
        let len = if l1_size == 0 {
            total * cs
        } else {
            l1_offset + l1_size * 8
        };
        file.set_len(len).map_err(io("sizing the image", len))?;
        file.flush().map_err(io("flushing", 0))?;
        Ok(())
    }

    /// Creates a new image in `file` and opens it for writing, applying
    /// the preallocation mode (an external data file must be attached for
    /// preallocation, so [`crate::create`] is the way for those).
    pub fn create_writable(
        name: &str,
        file: Arc<dyn Storage>,
        options: &CreateOptions,
    ) -> Result<Self> {
        Self::create_layout(&*file, options)?;
        let mut image = Self::open_writable(name, file, None)?;
        image.preallocate(options.preallocation)?;
        if let Some(encryption) = &options.encryption {
            image.set_up_encryption(encryption)?;
        }
        Ok(image)
    }
}
