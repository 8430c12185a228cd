//! Opening images from storage the caller supplies (a VMM's own block
//! backends, object stores, memory) rather than by path: the files an
//! image names — backing files, external data files — come from a
//! [`Resolver`] the caller writes, under the same [`OpenOptions`] policy as
//! [`crate::open`] (what may be followed, formats, depth, snapshot,
//! writability). No file locking: the caller owns the storage.
//!
//! ```
//! use std::sync::Arc;
//! use qcow::{BlockDevice, CreateOptions, OpenOptions, Qcow2Image};
//! use qcow::io::{MemStorage, Storage};
//! use qcow::resolve::{NoFiles, open_storage};
//!
//! let file = Arc::new(MemStorage::new());
//! Qcow2Image::create(&*file, &CreateOptions::new(1 << 20))?;
//! let image = open_storage("disk.qcow2", file, &OpenOptions::default().writable(true), &NoFiles)?;
//! image.write_at(&[7; 512], 0)?;
//! assert!(image.is_writable());
//! image.close()?;
//! # Ok::<(), qcow::Error>(())
//! ```

use std::collections::HashSet;
use std::sync::Arc;

use qcow_io::Storage;

use crate::device::ImageFormat;
use crate::open::{Image, Layer, probe_storage};
use crate::options::OpenOptions;
use crate::{Error, Result};

/// Supplies the files images name, for [`open_storage`].
pub trait Resolver {
    /// The storage of the file `name`, as the image `image` records it (a
    /// backing file, or an external data file when `data_file`), opened for
    /// writing when `writable` (only a writable image's data file is).
    fn resolve(
        &self,
        image: &str,
        name: &str,
        data_file: bool,
        writable: bool,
    ) -> Result<Arc<dyn Storage>>;
}

/// A resolver that has no files: every name is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFiles;

impl Resolver for NoFiles {
    fn resolve(
        &self,
        image: &str,
        name: &str,
        data_file: bool,
        _writable: bool,
    ) -> Result<Arc<dyn Storage>> {
        Err(Error::NotOpened {
            image: image.to_owned(),
            what: if data_file {
                "external data file"
            } else {
                "backing file"
            },
            name: name.to_owned(),
        })
    }
}

/// Opens the image in `storage` (`name` is how messages call it) under
/// `options`, the files it names coming from `resolver`.
pub fn open_storage(
    name: &str,
    storage: Arc<dyn Storage>,
    options: &OpenOptions,
    resolver: &dyn Resolver,
) -> Result<Image> {
    let mut seen = HashSet::new();
    open_layer(
        name,
        storage,
        options.format,
        options,
        resolver,
        &mut seen,
        0,
    )
}

fn open_layer(
    name: &str,
    storage: Arc<dyn Storage>,
    format: Option<ImageFormat>,
    options: &OpenOptions,
    resolver: &dyn Resolver,
    seen: &mut HashSet<String>,
    depth: usize,
) -> Result<Image> {
    if depth > options.max_chain_depth {
        return Err(Error::BackingTooDeep {
            image: name.to_owned(),
            limit: options.max_chain_depth,
        });
    }
    seen.insert(name.to_owned());
    let top = depth == 0;
    let writable = (top && options.writable) || options.writable_backing == Some(depth);
    let format = match format {
        Some(f) => f,
        None => probe_storage(name, &*storage)?,
    };
    let layer = Layer {
        name,
        format,
        writable,
        top,
        depth,
        options,
    };
    layer.assemble(
        storage,
        |data_name, _given| {
            Ok((
                resolver.resolve(name, data_name, true, writable)?,
                data_name.to_owned(),
            ))
        },
        |backing, backing_format| {
            let format = backing_format.ok_or_else(|| Error::BackingFormatUnknown {
                image: name.to_owned(),
                backing: backing.to_owned(),
            })?;
            if seen.contains(backing) {
                return Err(Error::BackingLoop {
                    image: name.to_owned(),
                    backing: backing.to_owned(),
                });
            }
            let file = resolver.resolve(name, backing, false, false)?;
            open_layer(
                backing,
                file,
                Some(format),
                options,
                resolver,
                seen,
                depth + 1,
            )
        },
    )
}
