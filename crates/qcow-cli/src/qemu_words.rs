//! qemu-img's words for why an image cannot be opened. The library's
//! errors name the structure and the bad value in its own words; scripts
//! and QEMU's test suite match on qemu-img's ("Could not open 'x': Image is
//! not in qcow2 format"), so the command line speaks those where qemu-img
//! has words for the same failure.

/// "Could not open 'IMAGE': WORDS" for an error qemu-img reports when it
/// opens an image, `None` for any other error.
pub(crate) fn open_failure(error: &qcow::Error) -> Option<String> {
    let (image, words) = open_failure_words(error)?;
    // An image given by options is named by them, as qemu-img names it.
    let image = crate::open::given_name(image).unwrap_or_else(|| image.to_owned());
    Some(format!("Could not open '{image}': {words}"))
}

/// The image and qemu-img's words for why it cannot be opened, `None` for
/// an error qemu-img has no words for.
pub(crate) fn open_failure_words(error: &qcow::Error) -> Option<(&str, String)> {
    let (image, words) = match error {
        qcow::Error::Format { image, source } => (image.as_str(), source.qemu_words()?),
        qcow::Error::UnsupportedVersion { image, version } => (
            image.as_str(),
            format!("Unsupported qcow2 version {version}"),
        ),
        qcow::Error::Crypto { image, source } => (image.as_str(), source.to_string()),
        // The question names the file, whatever the image was named by.
        qcow::Error::Locked {
            path,
            conflict,
            creating: false,
        } => {
            let image = path.to_str()?;
            (
                image,
                format!("{conflict}\nIs another process using the image [{image}]?"),
            )
        }
        _ => return None,
    };
    Some((image, words))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow::format::FormatError;

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
    fn a_lock_conflict_names_the_image_as_it_was_given() {
        let error = qcow::Error::Locked {
            path: "/tmp/locked-words-test.qcow2".into(),
            conflict: qcow_io::LockError::Conflict {
                perm: qcow_io::Perms::WRITE,
                shared: true,
            },
            creating: false,
        };
        // Without options, as the library says it.
        assert_eq!(open_failure(&error), Some(error.to_string()));
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
