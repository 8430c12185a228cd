//! How an image is opened: which files it names may be opened, formats,
//! cache size and snapshot.

use crate::device::ImageFormat;

/// Deepest backing chain the engine follows by default.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 64;

/// Largest default L2 cache: the default covers every L2 table of the image
/// up to this many bytes.
pub const DEFAULT_MAX_CACHE_BYTES: u64 = 32 << 20;

/// Options for opening an image.
///
/// The default opens only the named file: no backing file and no external
/// data file is opened unless allowed here, since a crafted image can name
/// any file on the host.
///
/// Options may be added: start from [`OpenOptions::default`] or
/// [`OpenOptions::trusted`] and change what is needed with the setters.
///
/// ```
/// use qcow::{ImageFormat, OpenOptions};
/// let options = OpenOptions::trusted().writable(true).format(Some(ImageFormat::Qcow2));
/// assert!(options.writable && options.follow_backing);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Format of the named image; `None` probes by magic (raw when there is none).
    pub format: Option<ImageFormat>,
    /// Open backing files named by images.
    pub follow_backing: bool,
    /// Open external data files named by images.
    pub open_data_file: bool,
    /// The named image's external data file, opened instead of the one its
    /// header names (QEMU's `data-file` option; with a path, relative to
    /// the current directory, not to the image). Only for an image that
    /// has an external data file; also for one whose header records no
    /// name.
    pub data_file: Option<String>,
    /// Format to assume for a backing file whose format the image does not
    /// record; `None` refuses such backing files (they are never probed).
    pub assume_backing_format: Option<ImageFormat>,
    /// Deepest backing chain accepted.
    pub max_chain_depth: usize,
    /// L2 cache budget in bytes per image; `None` covers all of the image's
    /// L2 tables up to [`DEFAULT_MAX_CACHE_BYTES`].
    pub cache_bytes: Option<u64>,
    /// Internal snapshot (name or ID) to open instead of the active layer.
    pub snapshot: Option<String>,
    /// Open the named image for writing (backing files stay read-only).
    pub writable: bool,
    /// Open the backing layer at this depth of the chain (1 is the named
    /// image's backing file) for writing too, as a commit writes into its
    /// base; the other backing layers stay read-only.
    pub writable_backing: Option<usize>,
    /// Whether flushes reach stable storage; `false` is qemu-img's
    /// `cache=unsafe` (the default of its `convert`), for outputs a crash
    /// may lose.
    pub sync: bool,
    /// Take QEMU's file locks on every file opened (see
    /// [`qcow_io::lock_file`]), so that QEMU processes and other users of
    /// this engine exclude each other as QEMU processes do. On by default.
    pub lock: bool,
    /// Let other processes write to and resize the files while they are
    /// open here (qemu-img's `-U`, `--force-share`). Only for read-only
    /// opens: what is read may be inconsistent.
    pub force_share: bool,
    /// Open the named image's file for writing without making the image
    /// writable through the engine, for [`crate::Qcow2Image::check`]'s
    /// repairs: dirty and corrupt images open as they are.
    pub repair: bool,
    /// Open the named QCOW2 image for [`crate::Qcow2Image::check`]: its
    /// snapshot table is left for the check to read, so that a damaged
    /// table is reported (and with `repair`, repaired) there rather than
    /// refused here, as QEMU opens images for a check.
    pub check: bool,
    /// The image is read to be copied (qemu-img's convert sources; its dd
    /// sources share writes):
    /// nobody may write it meanwhile, even a raw image, which otherwise
    /// shares writes as QEMU's raw format does.
    pub copy_source: bool,
    /// The password of the named image if it is encrypted (QEMU's
    /// `encrypt.key-secret`).
    pub key_secret: Option<crate::crypto::Secret>,
    /// The passwords of encrypted backing layers, by depth: the first is
    /// the named image's backing file's (QEMU's
    /// `backing.encrypt.key-secret`), the next its backing file's.
    pub backing_key_secrets: Vec<Option<crate::crypto::Secret>>,
    /// Open an encrypted image without its password, for its metadata only
    /// (QEMU opens images so for `info`): reading its data then fails.
    /// Without this, an encrypted image opened without its password is
    /// refused.
    pub without_key: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            follow_backing: false,
            open_data_file: false,
            data_file: None,
            assume_backing_format: None,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            cache_bytes: None,
            snapshot: None,
            writable: false,
            writable_backing: None,
            sync: true,
            lock: true,
            force_share: false,
            repair: false,
            check: false,
            copy_source: false,
            key_secret: None,
            backing_key_secrets: Vec::new(),
            without_key: false,
        }
    }
}

impl OpenOptions {
    /// Options that open every file the image names, as qemu-img does.
    pub fn trusted() -> Self {
        OpenOptions {
            follow_backing: true,
            open_data_file: true,
            ..Self::default()
        }
    }
}

/// Setters, one per field (see the fields for what each means).
impl OpenOptions {
    /// Sets [`OpenOptions::format`].
    pub fn format(mut self, format: Option<ImageFormat>) -> Self {
        self.format = format;
        self
    }

    /// Sets [`OpenOptions::follow_backing`].
    pub fn follow_backing(mut self, follow_backing: bool) -> Self {
        self.follow_backing = follow_backing;
        self
    }

    /// Sets [`OpenOptions::open_data_file`].
    pub fn open_data_file(mut self, open_data_file: bool) -> Self {
        self.open_data_file = open_data_file;
        self
    }

    /// Sets [`OpenOptions::data_file`].
    pub fn data_file(mut self, data_file: Option<String>) -> Self {
        self.data_file = data_file;
        self
    }

    /// Sets [`OpenOptions::assume_backing_format`].
    pub fn assume_backing_format(mut self, assume_backing_format: Option<ImageFormat>) -> Self {
        self.assume_backing_format = assume_backing_format;
        self
    }

    /// Sets [`OpenOptions::max_chain_depth`].
    pub fn max_chain_depth(mut self, max_chain_depth: usize) -> Self {
        self.max_chain_depth = max_chain_depth;
        self
    }

    /// Sets [`OpenOptions::cache_bytes`].
    pub fn cache_bytes(mut self, cache_bytes: Option<u64>) -> Self {
        self.cache_bytes = cache_bytes;
        self
    }

    /// Sets [`OpenOptions::snapshot`].
    pub fn snapshot(mut self, snapshot: Option<String>) -> Self {
        self.snapshot = snapshot;
        self
    }

    /// Sets [`OpenOptions::writable`].
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Sets [`OpenOptions::writable_backing`].
    pub fn writable_backing(mut self, writable_backing: Option<usize>) -> Self {
        self.writable_backing = writable_backing;
        self
    }

    /// Sets [`OpenOptions::sync`].
    pub fn sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// Sets [`OpenOptions::lock`].
    pub fn lock(mut self, lock: bool) -> Self {
        self.lock = lock;
        self
    }

    /// Sets [`OpenOptions::force_share`].
    pub fn force_share(mut self, force_share: bool) -> Self {
        self.force_share = force_share;
        self
    }

    /// Sets [`OpenOptions::repair`].
    pub fn repair(mut self, repair: bool) -> Self {
        self.repair = repair;
        self
    }

    /// Sets [`OpenOptions::check`].
    pub fn check(mut self, check: bool) -> Self {
        self.check = check;
        self
    }

    /// Sets [`OpenOptions::copy_source`].
    pub fn copy_source(mut self, copy_source: bool) -> Self {
        self.copy_source = copy_source;
        self
    }

    /// Sets [`OpenOptions::key_secret`].
    pub fn key_secret(mut self, key_secret: Option<crate::crypto::Secret>) -> Self {
        self.key_secret = key_secret;
        self
    }

    /// Sets [`OpenOptions::backing_key_secrets`].
    pub fn backing_key_secrets(
        mut self,
        backing_key_secrets: Vec<Option<crate::crypto::Secret>>,
    ) -> Self {
        self.backing_key_secrets = backing_key_secrets;
        self
    }

    /// Sets [`OpenOptions::without_key`].
    pub fn without_key(mut self, without_key: bool) -> Self {
        self.without_key = without_key;
        self
    }
}
