//! qemu-img's words for why an image cannot be opened. The library's
//! errors name the structure and the bad value in its own words; scripts
//! and QEMU's test suite match on qemu-img's ("Could not open 'x': Image is
//! not in qcow2 format"), so the command line speaks those where qemu-img
//! has words for the same failure.

use qcow::format::FormatError;

/// "Could not open 'IMAGE': WORDS" for an error qemu-img reports when it
/// opens an image, `None` for any other error.
pub(crate) fn open_failure(error: &qcow::Error) -> Option<String> {
    let (image, words) = match error {
        qcow::Error::Format { image, source } => (image, header_words(source)?),
        qcow::Error::UnsupportedVersion { image, version } => {
            (image, format!("Unsupported qcow2 version {version}"))
        }
        _ => return None,
    };
    Some(format!("Could not open '{image}': {words}"))
}

/// qemu-img's words for a header it refuses.
fn header_words(error: &FormatError) -> Option<String> {
    Some(match error {
        FormatError::BadMagic { .. } => "Image is not in qcow2 format".to_owned(),
        FormatError::UnsupportedVersion(version) => format!("Unsupported qcow2 version {version}"),
        FormatError::ClusterBits(bits) => format!("Unsupported cluster size: 2^{bits}"),
        FormatError::HeaderLength { length, .. } if *length < 104 => {
            "qcow2 header too short".to_owned()
        }
        FormatError::HeaderLength { .. } => "qcow2 header exceeds cluster size".to_owned(),
        FormatError::RefcountOrder(_) => {
            "Reference count entry width too large; may not exceed 64 bits".to_owned()
        }
        FormatError::CompressionType(kind) => format!("qcow2: unknown compression type: {kind}"),
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
        FormatError::NoRefcountTable => "Image does not contain a reference count table".to_owned(),
        // QEMU refuses an L1 table of more than INT_MAX entries as too big
        // before it compares the table with the size.
        FormatError::L1TooSmall { needed, .. } if *needed > i32::MAX as u64 => {
            "Image is too big".to_owned()
        }
        FormatError::VirtualSize(_) => "Image is too big".to_owned(),
        FormatError::L1TooSmall { .. } => "L1 table is too small".to_owned(),
        FormatError::TooLarge { structure, .. } => format!("{} too large", table_name(structure)?),
        FormatError::Misaligned { structure, .. } => {
            format!("{} offset invalid", table_name(structure)?)
        }
        FormatError::TooManySnapshots { .. } => "Snapshot table too large".to_owned(),
        FormatError::Snapshot { index, reason } if reason.contains("extra metadata") => format!(
            "Too much extra metadata in snapshot table entry {index}\n\
             You can force-remove this extra metadata with qemu-img check -r all"
        ),
        _ => return None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn format(source: FormatError) -> String {
        let error = qcow::Error::Format {
            image: "t.qcow2".into(),
            source,
        };
        open_failure(&error).unwrap_or_default()
    }

    #[test]
    fn unsupported_features_are_listed_as_qemu_lists_them() {
        let error = FormatError::UnknownIncompatibleFeatures {
            bits: 0xe000_0000_0000_0000,
            names: vec!["test2".into()],
            unnamed: 0xa000_0000_0000_0000,
        };
        assert_eq!(
            format(error),
            "Could not open 't.qcow2': Unsupported qcow2 feature(s): test2, \
             Unknown incompatible feature: a000000000000000"
        );
    }

    #[test]
    fn l1_sizes_qemu_cannot_hold_are_too_big() {
        let small = |needed| FormatError::L1TooSmall {
            l1_size: 8,
            virtual_size: 1 << 60,
            needed,
        };
        assert!(format(small(1 << 31)).ends_with(": Image is too big"));
        assert!(format(small(9)).ends_with(": L1 table is too small"));
    }

    #[test]
    fn errors_qemu_has_no_words_for_keep_the_library_s() {
        let error = qcow::Error::Format {
            image: "t.qcow2".into(),
            source: FormatError::NotUtf8 {
                structure: "backing file name",
            },
        };
        assert_eq!(open_failure(&error), None);
    }
}
