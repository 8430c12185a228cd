//! The distinguished name of a peer's certificate as GnuTLS writes it for
//! QEMU, which compares `authz-simple` identities with it: the parts in
//! the certificate's order (most general first), `TYPE=value` joined by
//! commas, several values of one part joined by `+`, the characters RFC
//! 4514 reserves escaped; a value not of the string type its attribute
//! calls for (a country not a PrintableString, an unknown attribute) is
//! written `#` and the hex of its DER encoding.

use x509_parser::der_parser::asn1_rs::{Any, Tag};
use x509_parser::objects::{oid_registry, oid2abbrev};
use x509_parser::oid_registry::{OID_PKCS9_EMAIL_ADDRESS, OID_X509_COUNTRY_NAME};

/// The subject of the DER certificate `der`, or `None` if it does not
/// parse.
pub(crate) fn distinguished_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let registry = oid_registry();
    let parts: Vec<String> = cert
        .subject()
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|attribute| {
                    let oid = attribute.attr_type();
                    let known = if *oid == OID_PKCS9_EMAIL_ADDRESS {
                        Some("EMAIL")
                    } else {
                        oid2abbrev(oid, registry).ok()
                    };
                    let kind = known.map_or_else(|| oid.to_id_string(), str::to_owned);
                    let as_called_for = known.is_some()
                        && (*oid != OID_X509_COUNTRY_NAME
                            || attribute.attr_value().tag() == Tag::PrintableString);
                    let value = match attribute.as_str() {
                        Ok(text) if as_called_for => escape(text),
                        _ => der_hex(attribute.attr_value()),
                    };
                    format!("{kind}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Some(parts.join(","))
}

/// `#` and the hex of `value`'s DER encoding.
fn der_hex(value: &Any<'_>) -> String {
    let mut der = Vec::new();
    let tag = value.tag().0;
    let identifier =
        ((value.class() as u8) << 6) | if value.header.constructed() { 0x20 } else { 0 };
    if tag < 31 {
        der.push(identifier | tag as u8);
    } else {
        der.push(identifier | 0x1f);
        let mut groups = Vec::new();
        let mut rest = tag;
        loop {
            groups.push((rest & 0x7f) as u8);
            rest >>= 7;
            if rest == 0 {
                break;
            }
        }
        for (i, group) in groups.iter().rev().enumerate() {
            let more = if i + 1 < groups.len() { 0x80 } else { 0 };
            der.push(group | more);
        }
    }
    let len = value.data.len();
    if len < 128 {
        der.push(len as u8);
    } else {
        let bytes = (len as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        der.push(0x80 | (bytes.len() - skip) as u8);
        der.extend_from_slice(&bytes[skip..]);
    }
    der.extend_from_slice(value.data);
    let mut hex = String::from("#");
    for byte in der {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// `value` with the characters RFC 4514 reserves escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_characters_are_escaped_where_rfc_4514_says() {
        assert_eq!(escape("Example Org"), "Example Org");
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape(" lead"), "\\ lead");
        assert_eq!(escape("trail "), "trail\\ ");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(escape("R'lyeh"), "R'lyeh");
    }
}
