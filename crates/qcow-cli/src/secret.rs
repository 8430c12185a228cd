//! QEMU's secret objects (`--object secret,id=ID,data=...` or
//! `file=PATH`, raw or base64), looked up by the id an image's
//! `encrypt.key-secret` option names.

use anyhow::{Result, bail};
use base64::Engine;
use qcow::crypto::Secret;

use crate::create_opts::OptionList;

/// The secret with id `id` among the `--object` arguments.
pub(crate) fn find(objects: &[String], id: &str) -> Result<Secret> {
    for object in objects {
        let list = OptionList::parse(std::slice::from_ref(object))?;
        let pairs = list.pairs();
        // The object's type is its first item, bare (`secret,...`) or
        // named (`qom-type=secret,...`).
        let is_secret = list.get("qom-type") == Some("secret")
            || pairs
                .first()
                .is_some_and(|(k, v)| k == "secret" && v == "on");
        if !is_secret || list.get("id") != Some(id) {
            continue;
        }
        if list.get("keyid").is_some() {
            bail!("secret '{id}': secrets encrypted with 'keyid' are not supported");
        }
        let raw = match (list.get("data"), list.get("file")) {
            (Some(_), Some(_)) => bail!("'data' and 'file' are mutually exclusive"),
            (Some(data), None) => data.as_bytes().to_vec(),
            (None, Some(file)) => {
                std::fs::read(file).map_err(|e| anyhow::anyhow!("Unable to read {file}: {e}"))?
            }
            (None, None) => bail!("Either 'data' or 'file' must be provided"),
        };
        let bytes = match list.get("format").unwrap_or("raw") {
            "raw" => raw,
            // The decoder's error would name a byte of the secret.
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(raw.trim_ascii())
                .map_err(|_| anyhow::anyhow!("secret '{id}': invalid base64 data"))?,
            other => bail!("Parameter 'format' does not accept value '{other}'"),
        };
        // As QEMU reads a password: UTF-8, up to its first NUL.
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        if std::str::from_utf8(&bytes[..end]).is_err() {
            bail!("Data from secret {id} is not valid UTF-8");
        }
        return Ok(Secret::new(&bytes[..end]));
    }
    bail!("No secret with id '{id}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_found_by_id_in_every_form() {
        let objects = vec![
            "iothread,id=io0".to_owned(),
            "secret,id=a,data=abc".to_owned(),
            "qom-type=secret,id=b,data=YWJj,format=base64".to_owned(),
            "secret,id=c,data=x,,y".to_owned(),
        ];
        assert_eq!(find(&objects, "a").unwrap(), Secret::new("abc"));
        assert_eq!(find(&objects, "b").unwrap(), Secret::new("abc"));
        assert_eq!(find(&objects, "c").unwrap(), Secret::new("x,y"));
        assert_eq!(
            find(&objects, "d").unwrap_err().to_string(),
            "No secret with id 'd'"
        );
        assert!(find(&["secret,id=e".to_owned()], "e").is_err());
        // QEMU's reading: up to the first NUL, UTF-8 only.
        let nul = vec!["secret,id=n,data=YWIAY2Q=,format=base64".to_owned()];
        assert_eq!(find(&nul, "n").unwrap(), Secret::new("ab"));
        let bad = vec!["secret,id=b,data=/w==,format=base64".to_owned()];
        assert!(
            find(&bad, "b")
                .unwrap_err()
                .to_string()
                .contains("not valid UTF-8")
        );
    }
}
