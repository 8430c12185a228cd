//! The buffer a chunk is read into: page-aligned, because the kernel
//! copies between the page cache and memory that shares its alignment at
//! about twice the speed of memory off by a few bytes (what `malloc` gives).

use std::ops::{Deref, DerefMut};

/// Alignment of a [`ChunkBuffer`]'s bytes.
const ALIGN: usize = 4096;

/// `len` zeroed bytes starting on a page boundary.
#[derive(Debug, Default)]
pub(super) struct ChunkBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl ChunkBuffer {
    /// A zeroed buffer of `len` bytes.
    pub(super) fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let misalignment = storage.as_ptr() as usize % ALIGN;
        let start = (ALIGN - misalignment) % ALIGN;
        Self {
            storage,
            start,
            len,
        }
    }
}

impl Deref for ChunkBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for ChunkBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_page_and_holds_what_was_asked() {
        for len in [0, 1, 4096, 65536 + 17] {
            let mut buf = ChunkBuffer::new(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
            assert!(buf.iter().all(|&b| b == 0));
            if len > 0 {
                buf[len - 1] = 7;
                assert_eq!(buf[len - 1], 7);
            }
        }
    }
}
