//! Opening an image by path: probing its format, and opening the backing
//! chain and external data file it names under the caller's policy.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow_format::Probe;
use qcow_io::{CreateError, FileStorage, LockError, Perms, Storage};

use crate::device::{BlockDevice, Extent, ImageFormat};
use crate::options::OpenOptions;
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::v1::QcowImage;
use crate::{Error, Result};

/// An open image of any format the engine reads.
#[derive(Debug)]
pub enum Image {
    /// A QCOW2 image.
    Qcow2(Box<Qcow2Image>),
    /// A QCOW version 1 image.
    Qcow(Box<QcowImage>),
    /// A raw image.
    Raw(RawImage),
    /// A LUKS volume.
    Luks(Box<crate::LuksImage>),
}

impl Image {
    fn device(&self) -> &dyn BlockDevice {
        match self {
            Image::Qcow2(i) => i.as_ref(),
            Image::Qcow(i) => i.as_ref(),
            Image::Raw(i) => i,
            Image::Luks(i) => i.as_ref(),
        }
    }
}

impl BlockDevice for Image {
    fn format(&self) -> ImageFormat {
        self.device().format()
    }
    fn virtual_size(&self) -> u64 {
        self.device().virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.device().read_at(buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.device().block_status(offset, len)
    }
    fn name(&self) -> &str {
        self.device().name()
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.device().backing()
    }
    fn data_name(&self) -> &str {
        self.device().data_name()
    }
    fn repairs_on_open(&self) -> &[String] {
        self.device().repairs_on_open()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.device().write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.device().flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.device().write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.device().discard(offset, len)
    }
    fn cluster_size(&self) -> Option<u64> {
        self.device().cluster_size()
    }
    fn subcluster_size(&self) -> Option<u64> {
        self.device().subcluster_size()
    }
    fn zeroing_allocates(&self) -> bool {
        self.device().zeroing_allocates()
    }
    fn compressed_writes(&self) -> Option<&dyn crate::device::CompressedWrites> {
        self.device().compressed_writes()
    }
    fn reads_use_cpu(&self) -> bool {
        self.device().reads_use_cpu()
    }
    fn writes_use_cpu(&self) -> bool {
        self.device().writes_use_cpu()
    }
    fn is_writable(&self) -> bool {
        self.device().is_writable()
    }
    fn reserve(&self, offset: u64, len: u64) -> Result<crate::Reservation> {
        self.device().reserve(offset, len)
    }
    fn release(&self, reservation: crate::Reservation) -> Result<()> {
        self.device().release(reservation)
    }
}

impl Image {
    /// Flushes and closes the image, reporting any error (dropping it does
    /// the same, but cannot report): a QCOW2 image's dirty bit is cleared.
    pub fn close(self) -> Result<()> {
        match self {
            Image::Qcow2(image) => image.close(),
            other => other.flush(),
        }
    }

    /// Changes the virtual disk's size, as the format allows (see
    /// [`Qcow2Image::resize`] and [`RawImage::resize`]); qcow version 1
    /// images cannot be resized.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        match self {
            Image::Qcow2(image) => image.resize(new_size),
            Image::Raw(image) => image.resize(new_size),
            Image::Qcow(image) => Err(Error::Unsupported {
                image: image.name().to_owned(),
                what: "resizing a qcow version 1 image".into(),
            }),
            Image::Luks(image) => Err(Error::Unsupported {
                image: image.name().to_owned(),
                what: "resizing a LUKS volume".into(),
            }),
        }
    }
}

/// Says what format the file at `path` holds, by its magic: a qcow magic
/// with an unknown version is an error, and a file without one is raw.
pub fn probe(path: &Path) -> Result<ImageFormat> {
    let storage = open_storage(path)?;
    probe_storage(&path.display().to_string(), &*storage)
}

pub(crate) fn probe_storage(name: &str, storage: &dyn Storage) -> Result<ImageFormat> {
    let mut prefix = [0u8; 8];
    storage
        .read_at(&mut prefix, 0)
        .map_err(|e| Error::io(name, "reading the magic", 0, e))?;
    if prefix[..6] == qcow_format::luks::LUKS_MAGIC {
        return Ok(ImageFormat::Luks);
    }
    match qcow_format::probe(&prefix) {
        Probe::Qcow { version: 1 } => Ok(ImageFormat::Qcow),
        Probe::Qcow { version: 2 | 3 } => Ok(ImageFormat::Qcow2),
        Probe::Qcow { version } => Err(Error::UnsupportedVersion {
            image: name.to_owned(),
            version,
        }),
        Probe::NotQcow => Ok(ImageFormat::Raw),
    }
}

fn open_storage(path: &Path) -> Result<Arc<dyn Storage>> {
    let file = FileStorage::open(path, false).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(Arc::new(file))
}

/// What a file is to the image being opened, which decides the locks
/// QEMU takes on it (and so the ones taken here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The image file itself, of this format.
    Image(ImageFormat),
    /// An external data file.
    DataFile,
}

/// The permissions held and shared on a file of `role` (`top`: the named
/// image, not a backing file).
fn perms(role: Role, writable: bool, top: bool, options: &OpenOptions) -> (Perms, Perms) {
    if options.force_share && !writable {
        return Perms::shared_reader();
    }
    match (role, writable) {
        (Role::DataFile, w) => Perms::data_file(w),
        (Role::Image(ImageFormat::Raw), true) => Perms::raw_writer(),
        // A raw image passes its user's permissions through: qemu-img's
        // info, map and compare share everything; backing files and copy
        // sources do not share writes.
        (Role::Image(ImageFormat::Raw), false) if top && !options.copy_source => {
            Perms::shared_reader()
        }
        (Role::Image(_), true) => Perms::writer(),
        (Role::Image(_), false) => Perms::reader(),
    }
}

/// Opens a file of an image (the image, a backing file or a data file).
/// Directories are refused, as QEMU refuses them.
fn open_file(path: &Path, writable: bool, options: &OpenOptions) -> Result<FileStorage> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(Error::Open {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory"),
        });
    }
    let file = FileStorage::open(path, writable).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(if writable && !options.sync {
        file.without_sync()
    } else {
        file
    })
}

/// Takes QEMU's locks for `perms` on `file`, or says who is in the way.
pub(crate) fn lock_storage(file: &FileStorage, path: &Path, perms: (Perms, Perms)) -> Result<()> {
    file.lock(perms.0, perms.1).map_err(|e| match e {
        LockError::Io(source) => Error::Open {
            path: path.to_owned(),
            source,
        },
        conflict => Error::Locked {
            path: path.to_owned(),
            conflict,
            creating: false,
        },
    })
}

/// Creates (or truncates) a file at `path` for writing an image into,
/// locked as QEMU locks the files it creates: a file another process uses
/// is refused before anything in it changes.
pub fn create_file(path: &Path) -> Result<FileStorage> {
    FileStorage::create(path).map_err(|e| match e {
        CreateError::Io(source) => Error::Open {
            path: path.to_owned(),
            source,
        },
        CreateError::Lock(LockError::Io(source)) => Error::Open {
            path: path.to_owned(),
            source,
        },
        CreateError::Lock(conflict) => Error::Locked {
            path: path.to_owned(),
            conflict,
            creating: true,
        },
    })
}

/// Opens the image at `path` under `options`.
///
/// ```no_run
/// use qcow::{BlockDevice, OpenOptions};
/// // Follow the backing chain and data file the image names.
/// let disk = qcow::open("vm.qcow2".as_ref(), &OpenOptions::trusted())?;
/// let mut sector = [0u8; 512];
/// disk.read_at(&mut sector, 0)?;
/// println!("{} is {} bytes", disk.name(), disk.virtual_size());
/// # Ok::<(), qcow::Error>(())
/// ```
pub fn open(path: &Path, options: &OpenOptions) -> Result<Image> {
    let mut seen = HashSet::new();
    open_layer(path, options.format, options, &mut seen, 0, true)
}

fn open_layer(
    path: &Path,
    format: Option<ImageFormat>,
    options: &OpenOptions,
    seen: &mut HashSet<PathBuf>,
    depth: usize,
    top: bool,
) -> Result<Image> {
    let name = path.display().to_string();
    if depth > options.max_chain_depth {
        return Err(Error::BackingTooDeep {
            image: name,
            limit: options.max_chain_depth,
        });
    }
    // Only the named image is opened for writing, and the backing layer
    // a commit writes into.
    let writable = (top && options.writable) || options.writable_backing == Some(depth);
    // The file of an image opened for check's repairs is written, and
    // locked as written, without the engine's write state.
    let file_writable = writable || (top && options.repair);
    if file_writable && options.force_share {
        return Err(Error::InvalidOptions(format!(
            "{name}: force-share (-U) can only be used with read-only images"
        )));
    }
    let file = open_file(path, file_writable, options)?;
    if let Ok(canonical) = path.canonicalize() {
        seen.insert(canonical);
    }
    let format = match format {
        Some(f) => f,
        None => probe_storage(&name, &file)?,
    };
    if options.lock {
        let perms = perms(Role::Image(format), file_writable, top, options);
        lock_storage(&file, path, perms)?;
    }
    let storage: Arc<dyn Storage> = Arc::new(file);
    let layer = Layer {
        name: &name,
        format,
        writable,
        top,
        depth,
        options,
    };
    layer.assemble(
        storage,
        |data_name, given| {
            // A name the caller gave is the caller's, not the image's.
            let data_path = if given {
                PathBuf::from(data_name)
            } else {
                relative_to(path, data_name)
            };
            let data = open_file(&data_path, writable, options)?;
            if options.lock {
                lock_storage(
                    &data,
                    &data_path,
                    perms(Role::DataFile, writable, top, options),
                )?;
            }
            Ok((Arc::new(data), data_path.display().to_string()))
        },
        |backing, backing_format| {
            open_backing(path, &name, backing, backing_format, options, seen, depth)
        },
    )
}

/// One image of a chain being opened: what it is and how.
pub(crate) struct Layer<'a> {
    pub(crate) name: &'a str,
    pub(crate) format: ImageFormat,
    pub(crate) writable: bool,
    pub(crate) top: bool,
    /// Depth in the chain: 0 for the named image.
    pub(crate) depth: usize,
    pub(crate) options: &'a OpenOptions,
}

impl Layer<'_> {
    /// The password for this layer, if the options give one: the named
    /// image's, or its backing layer's at this depth.
    /// Unlocks the encrypted layer `name` with `unlock` and its secret.
    /// Without one it opens locked only where no key is asked for (the
    /// caller said so, or the top layer is opened for `check`).
    fn unlock(
        &self,
        name: &str,
        unlock: impl FnOnce(&crate::crypto::Secret) -> Result<()>,
    ) -> Result<()> {
        match self.secret() {
            Some(secret) => unlock(secret),
            None if self.options.without_key || (self.top && self.options.check) => Ok(()),
            None => Err(Error::Crypto {
                image: name.to_owned(),
                source: crate::crypto::CryptoError::KeyRequired,
            }),
        }
    }

    fn secret(&self) -> Option<&crate::crypto::Secret> {
        if self.top {
            self.options.key_secret.as_ref()
        } else {
            self.options
                .backing_key_secrets
                .get(self.depth.saturating_sub(1))
                .and_then(Option::as_ref)
        }
    }

    /// Opens the image in `storage` as its format says, with the data file
    /// `data_file(name, given)` supplies (`given`: the name is the caller's
    /// [`OpenOptions::data_file`], not the image's) and the backing layer
    /// `backing(name, format)` opens, as the options allow.
    pub(crate) fn assemble(
        &self,
        storage: Arc<dyn Storage>,
        mut data_file: impl FnMut(&str, bool) -> Result<(Arc<dyn Storage>, String)>,
        mut backing: impl FnMut(&str, Option<ImageFormat>) -> Result<Image>,
    ) -> Result<Image> {
        let (name, options, writable, top) = (self.name, self.options, self.writable, self.top);
        let cache = options.cache_bytes;
        let image = match self.format {
            ImageFormat::Raw => Image::Raw(RawImage::open(name, storage)?.with_writes(writable)),
            ImageFormat::Luks => {
                let secret = self.secret();
                if secret.is_none() && !options.without_key {
                    return Err(Error::Crypto {
                        image: name.to_owned(),
                        source: crate::crypto::CryptoError::VolumeKeyRequired,
                    });
                }
                Image::Luks(Box::new(
                    crate::LuksImage::open(name, storage, secret)?.with_writes(writable),
                ))
            }
            ImageFormat::Qcow2 => {
                let mut image = if writable {
                    Qcow2Image::open_writable(name, storage, cache)?
                } else if top && options.check {
                    Qcow2Image::open_for_check(name, storage, cache)?
                } else {
                    Qcow2Image::open(name, storage, cache)?
                };
                if top {
                    if let Some(snapshot) = &options.snapshot {
                        image.select_snapshot(snapshot)?;
                    }
                }
                if image.encryption().is_some() {
                    self.unlock(name, |secret| image.unlock(secret))?;
                }
                let given = options.data_file.as_ref().filter(|_| top);
                if given.is_some() && !image.header().has_data_file() {
                    return Err(Error::InvalidOptions(format!(
                        "{name}: 'data-file' can only be set for images with an external data file"
                    )));
                }
                if options.open_data_file && image.header().has_data_file() {
                    let (data, shown) = match given {
                        Some(given) => data_file(given, true)?,
                        None => {
                            let data_name = image.header().data_file_name().ok_or_else(|| {
                                Error::InvalidOptions(format!(
                                    "{name}: 'data-file' is required for this image"
                                ))
                            })?;
                            data_file(data_name, false)?
                        }
                    };
                    image.attach_data_file(data, shown);
                }
                if let Some(named) = image.header().backing_file.clone() {
                    if options.follow_backing {
                        let backing_format = match image.header().backing_format() {
                            Some(f) => Some(ImageFormat::from_name(f)?),
                            None => options.assume_backing_format,
                        };
                        image.attach_backing(Box::new(backing(&named, backing_format)?));
                    }
                }
                Image::Qcow2(Box::new(image))
            }
            ImageFormat::Qcow => {
                let mut image = if writable {
                    QcowImage::open_writable(name, storage, cache)?
                } else {
                    QcowImage::open(name, storage, cache)?
                };
                if image.is_encrypted() {
                    self.unlock(name, |secret| image.unlock(secret))?;
                }
                if let Some(named) = image.header().backing_file.clone() {
                    if options.follow_backing {
                        image.attach_backing(Box::new(backing(
                            &named,
                            options.assume_backing_format,
                        )?));
                    }
                }
                Image::Qcow(Box::new(image))
            }
        };
        Ok(image)
    }
}

fn open_backing(
    path: &Path,
    name: &str,
    backing: &str,
    format: Option<ImageFormat>,
    options: &OpenOptions,
    seen: &mut HashSet<PathBuf>,
    depth: usize,
) -> Result<Image> {
    let format = format.ok_or_else(|| Error::BackingFormatUnknown {
        image: name.to_owned(),
        backing: backing.to_owned(),
    })?;
    let backing_path = relative_to(path, backing);
    if let Ok(canonical) = backing_path.canonicalize() {
        if seen.contains(&canonical) {
            return Err(Error::BackingLoop {
                image: name.to_owned(),
                backing: backing.to_owned(),
            });
        }
    }
    open_layer(&backing_path, Some(format), options, seen, depth + 1, false)
}

/// Creates a new QCOW2 image at `path` (replacing any file there), with
/// its preallocation mode applied (an external data file must exist).
///
/// The options are checked first: a refused image leaves an existing file
/// as it was. A file in use by another process is refused before it is
/// truncated; a creation that fails after that removes the file, as
/// qemu-img does.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("new.qcow2");
/// use qcow::{BlockDevice, CreateOptions, OpenOptions};
/// let mut options = CreateOptions::new(1 << 30);
/// options.cluster_size = 1 << 16;
/// qcow::create(&path, &options)?;
/// let image = qcow::open(&path, &OpenOptions::default().writable(true))?;
/// image.write_at(b"boot", 0)?;
/// image.close()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn create(path: &Path, options: &crate::CreateOptions) -> Result<()> {
    options.validate()?;
    let file = create_file(path)?;
    let made = Qcow2Image::create_layout(&file, options).and_then(|()| {
        drop(file);
        if options.preallocation == crate::Preallocation::Off && options.encryption.is_none() {
            return Ok(());
        }
        let image = open(
            path,
            &OpenOptions {
                writable: true,
                open_data_file: true,
                format: Some(ImageFormat::Qcow2),
                ..OpenOptions::default()
            },
        )?;
        if let Image::Qcow2(mut image) = image {
            image.preallocate(options.preallocation)?;
            // Last, as QEMU sets it up after the size and backing file.
            if let Some(encryption) = &options.encryption {
                image.set_up_encryption(encryption)?;
            }
            image.close()?;
        }
        Ok(())
    });
    remove_on_error(path, made)
}

/// Creates a new QCOW version 1 image at `path` (replacing any file
/// there) of `options.size` bytes, with `options.backing_file` if set;
/// checked, locked and cleaned up as [`create`] does.
pub fn create_qcow(path: &Path, options: &crate::CreateOptions) -> Result<()> {
    QcowImage::validate_create(options)?;
    let file = create_file(path)?;
    let made = QcowImage::create(&file, options);
    remove_on_error(path, made)
}

/// Removes the half-made file at `path` when its creation failed.
fn remove_on_error(path: &Path, result: Result<()>) -> Result<()> {
    if result.is_err() && std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        // The creation error is the one to report.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Resolves a file name stored in the image at `image`: absolute names stay,
/// relative ones are taken from the image's directory.
pub fn relative_to(image: &Path, named: &str) -> PathBuf {
    let named = Path::new(named);
    if named.is_absolute() {
        return named.to_owned();
    }
    match image.parent() {
        Some(dir) => dir.join(named),
        None => named.to_owned(),
    }
}
