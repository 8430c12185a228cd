//! Sizes as qemu-img reads them (QEMU's `qemu_strtosz`): a decimal number
//! with an optional one-letter binary suffix (b, k, M, G, T, P, E, either
//! case), or a bare hexadecimal number. A fraction needs a suffix other
//! than `b` ("1.5k" is 1536 bytes, "1.5" is refused: there are no half
//! bytes) and is rounded half up as QEMU rounds it.

use std::fmt;

/// Why a size was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeError {
    /// Not a size at all.
    Syntax,
    /// A size, but at least 2^64 bytes, or negative.
    Range,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Syntax => f.write_str("invalid size"),
            SizeError::Range => f.write_str("size out of range"),
        }
    }
}

impl std::error::Error for SizeError {}

/// A new image's size (`qemu-img create FILE SIZE`), refused with
/// qemu-img's messages.
pub(crate) fn image_size(text: &str) -> anyhow::Result<u64> {
    cvtnum("image size", text)
}

/// A size or offset named `what` on qemu-img's command line, refused with
/// its messages (qemu-img's `cvtnum`).
pub(crate) fn cvtnum(what: &str, text: &str) -> anyhow::Result<u64> {
    match parse_size(text) {
        Ok(n) if i64::try_from(n).is_ok() => Ok(n),
        Ok(_) | Err(SizeError::Range) => {
            anyhow::bail!("Invalid {what} specified. Must be between 0 and 9223372036854775807.")
        }
        Err(SizeError::Syntax) => anyhow::bail!("Invalid {what} specified: '{text}'."),
    }
}

/// A size given as an option value (`-o size=...`, resize's size),
/// refused with the messages of QEMU's option parser.
pub(crate) fn option_size(name: &str, text: &str) -> anyhow::Result<u64> {
    match parse_size(text) {
        Ok(n) => Ok(n),
        Err(SizeError::Range) => {
            anyhow::bail!("Value '{text}' is out of range for parameter '{name}'")
        }
        Err(SizeError::Syntax) => anyhow::bail!(
            "Parameter '{name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        ),
    }
}

/// Parses a size such as `1G`, `512M`, `1.5k`, `0x1000` or `1048576`.
pub(crate) fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim_start();
    if let Some(rest) = text.strip_prefix('-') {
        // A negative integer is out of range; anything else is no number.
        return if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            Err(SizeError::Range)
        } else {
            Err(SizeError::Syntax)
        };
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SizeError::Syntax);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Range);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (whole, rest) = text.split_at(digits_end);
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let end = after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len());
            (Some(&after[..end]), &after[end..])
        }
        None => (None, rest),
    };
    if whole.is_empty() && fraction.is_none_or(str::is_empty) {
        return Err(SizeError::Syntax);
    }
    let shift = match rest {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(SizeError::Syntax),
    };
    let multiplier: u128 = 1 << shift;
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        // More digits than u64 holds are out of range, not malformed.
        whole.parse::<u64>().map_err(|_| SizeError::Range)?.into()
    };
    let mut bytes = whole * multiplier;
    if let Some(fraction) = fraction.filter(|f| f.bytes().any(|b| b != b'0')) {
        if shift == 0 {
            // A fraction of a byte.
            return Err(SizeError::Syntax);
        }
        // As QEMU: the fraction as a 64-bit binary fraction (from the
        // double strtod gives), times the multiplier, rounded half up.
        let value: f64 = format!("0.{fraction}")
            .parse()
            .map_err(|_| SizeError::Syntax)?;
        // value < 1, so the product fits (the cast saturates at the top).
        let fixed = (value * 18_446_744_073_709_551_616.0) as u64;
        let product = u128::from(fixed) * multiplier;
        bytes += (product >> 64) + ((product >> 63) & 1);
    }
    u64::try_from(bytes).map_err(|_| SizeError::Range)
}

#[cfg(test)]
mod tests {
    use super::{SizeError, parse_size};

    #[test]
    fn qemu_img_sizes() {
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("64k", 65536),
            ("512M", 512 << 20),
            ("1G", 1 << 30),
            ("1.5G", 3 << 29),
            ("2T", 2 << 40),
            ("1.5k", 1536),
            ("1.1k", 1126),
            ("0.1k", 102),
            ("1.1M", 1_153_434),
            (".5k", 512),
            ("1.k", 1024),
            ("1.0", 1),
            ("1.0b", 1),
            ("01000", 1000),
            ("0x10", 16),
            ("  +1k", 1024),
            ("1e", 1 << 60),
            ("15E", 15 << 60),
            ("0.00000000000000000001k", 0),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
        for text in [
            "", "1.5", "0.5", "1.5b", "1x", "12Q", "1kb", "1KiB", "1 k", "1k ", "1e3", "0x10k",
            "0x", "-1k", "1..5k", "nan", "inf", ".",
        ] {
            assert_eq!(parse_size(text), Err(SizeError::Syntax), "{text:?}");
        }
        for text in ["16E", "99999E", "99999999999999999999", "-1", "-0"] {
            assert_eq!(parse_size(text), Err(SizeError::Range), "{text:?}");
        }
    }
}
