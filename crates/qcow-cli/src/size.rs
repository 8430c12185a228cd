//! Sizes as qemu-img reads them: a number with an optional binary suffix
//! (k, M, G, T, P, E; `b` for bytes), fractions allowed ("1.5G").

use anyhow::{Result, bail};

/// Parses a size such as `1G`, `512M`, `64k`, `1.5G` or `1048576`.
pub(crate) fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => bail!("invalid size {text:?}: unknown suffix {suffix:?}"),
    };
    if number.is_empty() {
        bail!("invalid size {text:?}");
    }
    let size = if number.contains('.') {
        let value: f64 = number
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid size {text:?}"))?;
        let bytes = value * (1u64 << shift) as f64;
        if !(0.0..1.8e19).contains(&bytes) {
            bail!("size {text:?} is out of range");
        }
        bytes as u64
    } else {
        let value: u64 = number
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid size {text:?}"))?;
        value
            .checked_mul(1u64 << shift)
            .ok_or_else(|| anyhow::anyhow!("size {text:?} is out of range"))?
    };
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn qemu_img_sizes() {
        assert_eq!(parse_size("1048576").ok(), Some(1 << 20));
        assert_eq!(parse_size("64k").ok(), Some(65536));
        assert_eq!(parse_size("512M").ok(), Some(512 << 20));
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("1.5G").ok(), Some(3 << 29));
        assert_eq!(parse_size("2T").ok(), Some(2 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999E").is_err());
    }
}
