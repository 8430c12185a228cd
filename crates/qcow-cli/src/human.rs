//! Human-readable sizes as qemu-img prints them.

/// Formats a byte count as qemu-img's `size_to_str` does: three significant
/// digits and a binary unit ("196 KiB", "1.5 GiB", "0 B").
pub(crate) fn size_to_str(value: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut unit = 0;
    // Switch units at 1000 of the smaller one, so no number exceeds 3 digits.
    while unit + 1 < UNITS.len() && value as f64 >= 1000.0 * (1u64 << (10 * unit)) as f64 {
        unit += 1;
    }
    let scaled = value as f64 / (1u64 << (10 * unit)) as f64;
    format!("{} {}B", three_significant(scaled), UNITS[unit])
}

/// Like C's `%0.3g` for values below 1000.
fn three_significant(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::size_to_str;

    #[test]
    fn matches_qemu_img() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(200_704), "196 KiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(393_216), "384 KiB");
    }
}
