//! Header extensions ("Header extensions" in the specification).
//!
//! Extensions follow the header, each an 8-byte type/length pair and data
//! padded to a multiple of 8 bytes, until an end marker or the end of the
//! area (the backing file name, or the end of the header cluster).

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::FormatError;

/// End of the header extension area.
pub const EXT_END: u32 = 0x0000_0000;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Longest backing format name QEMU accepts (its buffer holds 16 bytes with NUL).
const MAX_BACKING_FORMAT: u32 = 15;

/// The type/length pair in front of every extension.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtensionHeader {
    /// Extension type.
    pub kind: U32,
    /// Length of the data, without padding.
    pub len: U32,
}

/// The data of the bitmaps extension.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Size of the bitmap directory in bytes.
    pub bitmap_directory_size: U64,
    /// Offset of the bitmap directory.
    pub bitmap_directory_offset: U64,
}

/// The data of the full disk encryption extension.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawEncryptionExtension {
    /// Offset of the encryption header.
    pub offset: U64,
    /// Length of the encryption header.
    pub length: U64,
}

/// One entry of the feature name table, as stored.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawFeatureName {
    /// 0: incompatible, 1: compatible, 2: autoclear.
    pub kind: u8,
    /// Bit number within its field.
    pub bit: u8,
    /// NUL-padded name.
    pub name: [u8; 46],
}

const _: () = assert!(size_of::<RawExtensionHeader>() == 8);
const _: () = assert!(size_of::<RawBitmapsExtension>() == 24);
const _: () = assert!(size_of::<RawEncryptionExtension>() == 16);
const _: () = assert!(size_of::<RawFeatureName>() == 48);

/// Which feature field a named feature belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Incompatible features.
    Incompatible,
    /// Compatible features.
    Compatible,
    /// Autoclear features.
    Autoclear,
    /// A kind the specification does not define.
    Other(u8),
}

/// A named feature bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// The field it belongs to.
    pub kind: FeatureKind,
    /// Its bit number.
    pub bit: u8,
    /// Its name (lossily decoded).
    pub name: String,
}

/// The bitmaps extension, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
    /// The reserved field, which must be zero.
    pub reserved: u32,
}

/// A decoded header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// The backing file's format name.
    BackingFormat(String),
    /// The feature name table.
    FeatureNames(Vec<FeatureName>),
    /// The bitmaps extension.
    Bitmaps(BitmapsExtension),
    /// Where the encryption header lives.
    FullDiskEncryption {
        /// Offset of the encryption header.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// The external data file's name.
    ExternalDataFile(String),
    /// An extension this implementation does not know, kept as bytes.
    Unknown {
        /// Its type.
        kind: u32,
        /// Its data, unpadded.
        data: Vec<u8>,
    },
}

/// Parses the extensions in `cluster[start..end]`.
///
/// Bytes past the end of `cluster` (a file shorter than its header cluster)
/// read as zero, which is an end marker.
pub fn parse_extensions(
    cluster: &[u8],
    start: u64,
    end: u64,
) -> Result<Vec<HeaderExtension>, FormatError> {
    let mut extensions = Vec::new();
    let mut offset = start;
    // Each step advances by at least 8 bytes within a bounded area, so the
    // loop ends.
    while offset.saturating_add(8) <= end {
        let Some(raw) =
            slice_at(cluster, offset, 8).and_then(|b| RawExtensionHeader::read_from_bytes(b).ok())
        else {
            break;
        };
        let kind = raw.kind.get();
        let len = raw.len.get();
        if kind == EXT_END {
            break;
        }
        let data_start = offset + 8;
        if u64::from(len) > end - data_start {
            return Err(FormatError::ExtensionPastEnd {
                kind,
                offset,
                length: len,
                end,
            });
        }
        let data = zero_extended(cluster, data_start, len as usize);
        extensions.push(decode(kind, len, data)?);
        offset = data_start + u64::from(len).next_multiple_of(8);
    }
    Ok(extensions)
}

fn slice_at(bytes: &[u8], offset: u64, len: usize) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    bytes.get(start..start.checked_add(len)?)
}

/// Copies `len` bytes at `offset`, reading zeros past the end of `bytes`.
fn zero_extended(bytes: &[u8], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    if let Ok(start) = usize::try_from(offset) {
        if let Some(avail) = bytes.get(start..) {
            let n = avail.len().min(len);
            out[..n].copy_from_slice(&avail[..n]);
        }
    }
    out
}

impl HeaderExtension {
    /// The extension's type code.
    pub fn kind(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNames(_) => EXT_FEATURE_NAMES,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::FullDiskEncryption { .. } => EXT_FULL_DISK_ENCRYPTION,
            HeaderExtension::ExternalDataFile(_) => EXT_DATA_FILE,
            HeaderExtension::Unknown { kind, .. } => *kind,
        }
    }

    /// The extension's data, unpadded.
    pub fn data(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(s) | HeaderExtension::ExternalDataFile(s) => {
                s.as_bytes().to_vec()
            }
            HeaderExtension::FeatureNames(names) => {
                let mut out = Vec::with_capacity(names.len() * 48);
                for f in names {
                    let mut raw = RawFeatureName {
                        kind: match f.kind {
                            FeatureKind::Incompatible => 0,
                            FeatureKind::Compatible => 1,
                            FeatureKind::Autoclear => 2,
                            FeatureKind::Other(k) => k,
                        },
                        bit: f.bit,
                        name: [0; 46],
                    };
                    let n = f.name.len().min(46);
                    raw.name[..n].copy_from_slice(&f.name.as_bytes()[..n]);
                    out.extend_from_slice(raw.as_bytes());
                }
                out
            }
            HeaderExtension::Bitmaps(b) => RawBitmapsExtension {
                nb_bitmaps: b.nb_bitmaps.into(),
                reserved: 0.into(),
                bitmap_directory_size: b.directory_size.into(),
                bitmap_directory_offset: b.directory_offset.into(),
            }
            .as_bytes()
            .to_vec(),
            HeaderExtension::FullDiskEncryption { offset, length } => RawEncryptionExtension {
                offset: (*offset).into(),
                length: (*length).into(),
            }
            .as_bytes()
            .to_vec(),
            HeaderExtension::Unknown { data, .. } => data.clone(),
        }
    }
}

/// Encodes extensions, each padded to 8 bytes, followed by the end marker.
pub fn encode_extensions(extensions: &[HeaderExtension]) -> Vec<u8> {
    let mut out = Vec::new();
    for ext in extensions {
        let data = ext.data();
        out.extend_from_slice(&ext.kind().to_be_bytes());
        // Extension data lives inside one cluster (at most 2 MiB).
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0; 8]);
    out
}

/// The feature name table QEMU writes into version 3 images.
pub fn standard_feature_names() -> Vec<FeatureName> {
    let entry = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_owned(),
    };
    vec![
        entry(FeatureKind::Incompatible, 0, "dirty bit"),
        entry(FeatureKind::Incompatible, 1, "corrupt bit"),
        entry(FeatureKind::Incompatible, 2, "external data file"),
        entry(FeatureKind::Incompatible, 3, "compression type"),
        entry(FeatureKind::Incompatible, 4, "extended L2 entries"),
        entry(FeatureKind::Compatible, 0, "lazy refcounts"),
        entry(FeatureKind::Autoclear, 0, "bitmaps"),
        entry(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

fn decode(kind: u32, len: u32, data: Vec<u8>) -> Result<HeaderExtension, FormatError> {
    let bad_len = FormatError::ExtensionLength { kind, length: len };
    Ok(match kind {
        EXT_BACKING_FORMAT => {
            if len > MAX_BACKING_FORMAT {
                return Err(bad_len);
            }
            HeaderExtension::BackingFormat(utf8(data, "backing format extension")?)
        }
        EXT_DATA_FILE => {
            HeaderExtension::ExternalDataFile(utf8(data, "external data file extension")?)
        }
        EXT_FEATURE_NAMES => {
            // A last entry cut short reads as if padded with zeros, as QEMU
            // reads it.
            let entry = size_of::<RawFeatureName>();
            let mut padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(entry), 0);
            let names = padded
                .chunks_exact(entry)
                .filter_map(|c| RawFeatureName::read_from_bytes(c).ok())
                .map(|raw| {
                    let name_len = raw.name.iter().position(|&b| b == 0).unwrap_or(46);
                    FeatureName {
                        kind: match raw.kind {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            other => FeatureKind::Other(other),
                        },
                        bit: raw.bit,
                        name: String::from_utf8_lossy(&raw.name[..name_len]).into_owned(),
                    }
                })
                .collect();
            HeaderExtension::FeatureNames(names)
        }
        EXT_BITMAPS => {
            let raw = RawBitmapsExtension::read_from_bytes(&data).map_err(|_| bad_len)?;
            HeaderExtension::Bitmaps(BitmapsExtension {
                nb_bitmaps: raw.nb_bitmaps.get(),
                directory_size: raw.bitmap_directory_size.get(),
                directory_offset: raw.bitmap_directory_offset.get(),
                reserved: raw.reserved.get(),
            })
        }
        EXT_FULL_DISK_ENCRYPTION => {
            let raw = RawEncryptionExtension::read_from_bytes(&data).map_err(|_| bad_len)?;
            HeaderExtension::FullDiskEncryption {
                offset: raw.offset.get(),
                length: raw.length.get(),
            }
        }
        _ => HeaderExtension::Unknown { kind, data },
    })
}

fn utf8(data: Vec<u8>, structure: &'static str) -> Result<String, FormatError> {
    // Names are sometimes stored with trailing NULs.
    let mut data = data;
    while data.last() == Some(&0) {
        data.pop();
    }
    String::from_utf8(data).map_err(|_| FormatError::NotUtf8 { structure })
}
