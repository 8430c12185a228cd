//! QEMU's TLS credential objects (`--object tls-creds-x509,id=ID,
//! dir=DIR,endpoint=server|client,verify-peer=on|off`), looked up by the id
//! `qcow serve --tls-creds ID` or an NBD image's `tls-creds=ID` names.
//! Only x509 credentials are supported: `tls-creds-psk` and
//! `tls-creds-anon` are refused by name. Also the `authz-simple` objects
//! `--tls-authz ID` names (`--object authz-simple,id=ID,identity=DN`).

use std::path::Path;

use anyhow::{Result, bail};
use qcow_nbd::{TlsClient, TlsServer};

use crate::create_opts::OptionList;

/// Which side of a connection credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// A server's (`qcow serve`).
    Server,
    /// A client's (an NBD image).
    Client,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }
}

/// The `--object` argument with id `id`: its type (its first item, bare as
/// in `tls-creds-x509,...`, or named as in `qom-type=tls-creds-x509,...`)
/// and its options.
fn object_with_id(objects: &[String], id: &str) -> Result<Option<(Option<String>, OptionList)>> {
    for object in objects {
        let list = OptionList::parse(std::slice::from_ref(object))?;
        if list.get("id") != Some(id) {
            continue;
        }
        let kind = list.get("qom-type").map(str::to_owned).or_else(|| {
            list.pairs()
                .first()
                .filter(|(_, v)| v == "on")
                .map(|(k, _)| k.clone())
        });
        return Ok(Some((kind, list)));
    }
    Ok(None)
}

/// The directory and verification setting of the `tls-creds-x509` object
/// with id `id` among the `--object` arguments, checked to be for
/// `endpoint`.
fn find(objects: &[String], id: &str, endpoint: Endpoint) -> Result<(String, bool)> {
    if let Some((kind, list)) = object_with_id(objects, id)? {
        match kind.as_deref() {
            Some("tls-creds-x509") => {}
            Some(other @ ("tls-creds-psk" | "tls-creds-anon")) => {
                bail!("TLS credentials of type '{other}' are not supported (only tls-creds-x509)")
            }
            _ => bail!("Object with id '{id}' is not TLS credentials"),
        }
        let wanted = match list.get("endpoint").unwrap_or("client") {
            "server" => Endpoint::Server,
            "client" => Endpoint::Client,
            other => bail!("Parameter 'endpoint' does not accept value '{other}'"),
        };
        if wanted != endpoint {
            bail!(
                "Expected TLS credentials for a {} endpoint",
                endpoint.name()
            );
        }
        let verify_peer = match list.get("verify-peer").unwrap_or("on") {
            "on" | "yes" | "true" => true,
            "off" | "no" | "false" => false,
            other => bail!("Parameter 'verify-peer' expects 'on' or 'off', not '{other}'"),
        };
        let Some(dir) = list.get("dir") else {
            bail!("Parameter 'dir' is missing for TLS credentials '{id}'");
        };
        return Ok((dir.to_owned(), verify_peer));
    }
    bail!("No TLS credentials with id '{id}'")
}

/// The server credentials with id `id`, loaded; errors in qemu-nbd's
/// words.
pub(crate) fn server(objects: &[String], id: &str) -> Result<TlsServer> {
    let (dir, verify_peer) = find(objects, id, Endpoint::Server)
        .map_err(|e| anyhow::anyhow!("Failed to get TLS creds: {e}"))?;
    Ok(TlsServer::from_x509_dir(Path::new(&dir), verify_peer)?)
}

/// The client credentials with id `id`, loaded, for the image `name`;
/// errors in qemu-img's words (a credential file that cannot be used is
/// no fault of the image's).
pub(crate) fn client(objects: &[String], id: &str, name: &str) -> Result<TlsClient> {
    let (dir, verify_peer) = find(objects, id, Endpoint::Client)
        .map_err(|e| anyhow::anyhow!("Could not open '{name}': {e}"))?;
    Ok(TlsClient::from_x509_dir(Path::new(&dir), verify_peer)?)
}

/// The identity the `authz-simple` object with id `id` lets in (QEMU's
/// other authorization objects, lists and PAM, are refused by name).
pub(crate) fn authorized_identity(objects: &[String], id: &str) -> Result<String> {
    if let Some((kind, list)) = object_with_id(objects, id)? {
        return match kind.as_deref() {
            Some("authz-simple") => list
                .get("identity")
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("Parameter 'identity' is missing")),
            Some(other @ ("authz-list" | "authz-listfile" | "authz-pam")) => Err(anyhow::anyhow!(
                "authorization objects of type '{other}' are not supported (only authz-simple)"
            )),
            _ => Err(anyhow::anyhow!(
                "Object with id '{id}' is not an authorization object"
            )),
        };
    }
    bail!("No authorization object with id '{id}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_found_by_id_and_checked_for_their_side() {
        let objects = vec![
            "secret,id=s,data=x".to_owned(),
            "tls-creds-x509,id=srv,dir=/a,endpoint=server".to_owned(),
            "qom-type=tls-creds-x509,id=cli,dir=/b,verify-peer=off".to_owned(),
            "tls-creds-psk,id=psk,dir=/c,endpoint=server".to_owned(),
        ];
        assert_eq!(
            find(&objects, "srv", Endpoint::Server).unwrap(),
            ("/a".to_owned(), true)
        );
        assert_eq!(
            find(&objects, "cli", Endpoint::Client).unwrap(),
            ("/b".to_owned(), false)
        );
        let wrong_side = find(&objects, "srv", Endpoint::Client).unwrap_err();
        assert_eq!(
            wrong_side.to_string(),
            "Expected TLS credentials for a client endpoint"
        );
        assert!(
            find(&objects, "psk", Endpoint::Server)
                .unwrap_err()
                .to_string()
                .contains("'tls-creds-psk' are not supported")
        );
        assert!(
            find(&objects, "s", Endpoint::Client)
                .unwrap_err()
                .to_string()
                .contains("is not TLS credentials")
        );
        let authz = vec![
            "authz-simple,id=a,identity=CN=x,,O=y".to_owned(),
            "authz-pam,id=p,service=login".to_owned(),
        ];
        assert_eq!(authorized_identity(&authz, "a").unwrap(), "CN=x,O=y");
        assert!(
            authorized_identity(&authz, "p")
                .unwrap_err()
                .to_string()
                .contains("'authz-pam' are not supported")
        );
        assert!(authorized_identity(&authz, "q").is_err());
        assert_eq!(
            find(&objects, "nope", Endpoint::Client)
                .unwrap_err()
                .to_string(),
            "No TLS credentials with id 'nope'"
        );
    }
}
