//! Several disks read as one, end to end (`convert` with several sources).

use crate::device::{Allocation, BlockDevice, Extent, ImageFormat};
use crate::{Error, Result};

/// Disks read one after another as a single disk: its size is the sum of
/// theirs, and each byte comes from the disk it falls in.
#[derive(Debug)]
pub struct Concat {
    parts: Vec<Box<dyn BlockDevice>>,
    /// Where each part starts.
    starts: Vec<u64>,
    size: u64,
    name: String,
}

impl Concat {
    /// The disks `parts`, in order. Refused when there is none or their
    /// sizes add up past `u64::MAX`.
    pub fn new(parts: Vec<Box<dyn BlockDevice>>) -> Result<Self> {
        let mut starts = Vec::with_capacity(parts.len());
        let mut size = 0u64;
        for part in &parts {
            starts.push(size);
            size = size
                .checked_add(part.virtual_size())
                .ok_or_else(|| Error::InvalidOptions("the disks together are too large".into()))?;
        }
        let name = parts
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(" + ");
        if parts.is_empty() {
            return Err(Error::InvalidOptions("no disk to concatenate".into()));
        }
        Ok(Concat {
            parts,
            starts,
            size,
            name,
        })
    }

    /// The part holding byte `offset` (below the size), and where it starts.
    fn part(&self, offset: u64) -> (&dyn BlockDevice, u64) {
        // starts[0] == 0 <= offset, so the index is at least 0.
        let i = self.starts.partition_point(|&s| s <= offset) - 1;
        // Skip empty parts: the last part starting at or before offset
        // with bytes past it.
        let mut i = i;
        while i + 1 < self.parts.len() && self.starts[i] + self.parts[i].virtual_size() <= offset {
            i += 1;
        }
        (&*self.parts[i], self.starts[i])
    }
}

impl BlockDevice for Concat {
    fn format(&self) -> ImageFormat {
        self.parts[0].format()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (part, start) = self.part(at);
            let inside = at - start;
            // At most what is left of buf.
            let n = (part.virtual_size() - inside).min((buf.len() - done) as u64) as usize;
            part.read_at(&mut buf[done..done + n], inside)?;
            done += n;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        crate::check_range(&self.name, offset, len, self.size)?;
        let (part, start) = self.part(offset);
        let inside = offset - start;
        let n = (part.virtual_size() - inside).min(len);
        let extent = part.block_status(inside, n)?;
        // Host offsets are the part's own; they mean nothing here.
        let allocation = match extent.allocation {
            Allocation::Data {
                depth,
                compressed,
                zero,
                ..
            } => Allocation::Data {
                depth,
                offset: None,
                compressed,
                zero,
            },
            Allocation::Zero { depth, .. } => Allocation::Zero {
                depth,
                offset: None,
            },
            Allocation::Unallocated { depth, .. } => Allocation::Unallocated {
                depth,
                offset: None,
            },
            Allocation::Unknown { depth } => Allocation::Unknown { depth },
        };
        Ok(Extent {
            len: extent.len,
            allocation,
        })
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn reads_use_cpu(&self) -> bool {
        self.parts.iter().any(|p| p.reads_use_cpu())
    }
}
