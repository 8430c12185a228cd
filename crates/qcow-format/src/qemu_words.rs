//! QEMU's words for the failures it shares with this crate's checks: a
//! program that stands in for qemu-img (or reports as qemu-img's check
//! does) says what QEMU says.

use crate::FormatError;

impl FormatError {
    /// What QEMU says where it refuses the same thing (its message text,
    /// hints on further lines), `None` where it has no words of its own.
    pub fn qemu_words(&self) -> Option<String> {
        Some(match self {
            FormatError::BadMagic { .. } => "Image is not in qcow2 format".to_owned(),
            FormatError::UnsupportedVersion(version) => {
                format!("Unsupported qcow2 version {version}")
            }
            FormatError::ClusterBits(bits) => format!("Unsupported cluster size: 2^{bits}"),
            FormatError::HeaderLength { length, .. } if *length < 104 => {
                "qcow2 header too short".to_owned()
            }
            FormatError::HeaderLength { .. } => "qcow2 header exceeds cluster size".to_owned(),
            FormatError::RefcountOrder(_) => {
                "Reference count entry width too large; may not exceed 64 bits".to_owned()
            }
            FormatError::CompressionType(kind) => {
                format!("qcow2: unknown compression type: {kind}")
            }
            FormatError::CompressionTypeBit { bit_set, .. } => format!(
                "qcow2: Compression type incompatible feature bit must {}be set",
                if *bit_set { "not " } else { "" }
            ),
            FormatError::UnknownIncompatibleFeatures { names, unnamed, .. } => {
                let mut list = names.clone();
                if *unnamed != 0 {
                    list.push(format!("Unknown incompatible feature: {unnamed:x}"));
                }
                format!("Unsupported qcow2 feature(s): {}", list.join(", "))
            }
            FormatError::NoRefcountTable => {
                "Image does not contain a reference count table".to_owned()
            }
            // QEMU refuses an L1 table of more than INT_MAX entries as too big
            // before it compares the table with the size.
            FormatError::L1TooSmall { needed, .. } if *needed > i32::MAX as u64 => {
                "Image is too big".to_owned()
            }
            FormatError::VirtualSize(_) => "Image is too big".to_owned(),
            FormatError::L1TooSmall { .. } => "L1 table is too small".to_owned(),
            FormatError::TooLarge { structure, .. } => {
                format!("{} too large", table_name(structure)?)
            }
            FormatError::Misaligned { structure, .. } => {
                format!("{} offset invalid", table_name(structure)?)
            }
            FormatError::TooManySnapshots { .. } => "Snapshot table too large".to_owned(),
            FormatError::Snapshot { index, reason } if reason.contains("extra metadata") => {
                format!(
                    "Too much extra metadata in snapshot table entry {index}\n\
                 You can force-remove this extra metadata with qemu-img check -r all"
                )
            }
            FormatError::SnapshotTableTooBig { overhanging, .. } => format!(
                "Snapshot table is too big\n\
                 You can force-remove all {overhanging} overhanging snapshots with qemu-img check -r all"
            ),
            _ => return None,
        })
    }
}

/// QEMU's name for a table whose size or offset it checks at open.
fn table_name(structure: &str) -> Option<&'static str> {
    Some(match structure {
        "L1 table" => "Active L1 table",
        "refcount table" => "Reference count table",
        "snapshot table" => "Snapshot table",
        _ => return None,
    })
}
