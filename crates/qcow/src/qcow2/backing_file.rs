//! Changing the backing file an image names (`rebase`'s last step, all of
//! `rebase -u`): the header cluster is rewritten in one write with the new
//! name and backing format extension, everything else as it was.

use qcow_format::extension::HeaderExtension;
use qcow_format::header::Header;

use super::Qcow2Image;
use crate::{Error, Result};

impl Qcow2Image {
    /// The header as it would be with `backing` as (file name, format) or
    /// no backing file, refused when it does not fit in the header cluster.
    /// Changes nothing: [`Qcow2Image::set_backing_file`] writes it.
    pub fn header_with_backing(&self, backing: Option<(&str, &str)>) -> Result<Header> {
        let mut header = self.current_header();
        header
            .extensions
            .retain(|e| !matches!(e, HeaderExtension::BackingFormat(_)));
        header.backing_file = None;
        if let Some((name, format)) = backing {
            if name.is_empty() {
                return Err(Error::InvalidOptions(format!(
                    "{}: a backing file needs a name",
                    self.name
                )));
            }
            header.backing_file = Some(name.to_owned());
            header
                .extensions
                .insert(0, HeaderExtension::BackingFormat(format.to_owned()));
        }
        header.encode().map_err(|_| Error::NoSpace {
            image: self.name.clone(),
            what: "the header with the backing file name",
            limit: self.header.cluster_size(),
        })?;
        Ok(header)
    }

    /// Names `backing` (file name, format), or no backing file, in the
    /// header. The guest's view changes to the new backing file's: keeping
    /// it is the caller's job (a safe `rebase` copies the differences
    /// first). The open backing layer is detached.
    pub fn set_backing_file(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        self.check_writable()?;
        // Bitmaps are stored before the header is built (see
        // `rewrite_header`).
        self.flush()?;
        let wanted = self.header_with_backing(backing)?;
        self.rewrite_header(|h| {
            h.backing_file = wanted.backing_file;
            h.extensions = wanted.extensions;
        })?;
        self.backing = None;
        Ok(())
    }
}
