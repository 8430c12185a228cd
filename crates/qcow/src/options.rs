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
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Format of the named image; `None` probes by magic (raw when there is none).
    pub format: Option<ImageFormat>,
    /// Open backing files named by images.
    pub follow_backing: bool,
    /// Open external data files named by images.
    pub open_data_file: bool,
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
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            follow_backing: false,
            open_data_file: false,
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
