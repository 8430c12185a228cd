//! Loading the bitmap directory of a QCOW2 image.

use qcow_format::bitmap::{BitmapEntry, parse_directory};
use qcow_format::limits::MAX_BITMAP_DIRECTORY_BYTES;

use super::Qcow2Image;
use crate::{Error, Result};

impl Qcow2Image {
    /// Reads the bitmap directory named by the bitmaps extension, if any.
    pub(super) fn load_bitmaps(&self) -> Result<Vec<BitmapEntry>> {
        let Some(ext) = self.header.bitmaps() else {
            return Ok(Vec::new());
        };
        let size = ext.directory_size;
        let offset = ext.directory_offset;
        if size > MAX_BITMAP_DIRECTORY_BYTES || offset.saturating_add(size) > self.file_len() {
            return Err(Error::format(
                &self.name,
                qcow_format::FormatError::PastEnd {
                    structure: "bitmap directory",
                    offset,
                    size,
                    file_len: self.file_len(),
                },
            ));
        }
        // Bounded just above.
        let mut bytes = vec![0u8; size as usize];
        self.file
            .read_at(&mut bytes, offset)
            .map_err(|e| Error::io(&self.name, "reading the bitmap directory", offset, e))?;
        parse_directory(&bytes, ext.nb_bitmaps).map_err(|e| Error::format(&self.name, e))
    }
}
