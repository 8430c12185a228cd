//! TLS for NBD connections (`NBD_OPT_STARTTLS`), with credentials laid out
//! as QEMU's `tls-creds-x509` objects lay them out in their directory:
//!
//! - `ca-cert.pem`: the authorities that sign the peer's certificate;
//! - `server-cert.pem` and `server-key.pem` (a server), or
//!   `client-cert.pem` and `client-key.pem` (a client; optional, needed
//!   when the server verifies its clients);
//! - `ca-crl.pem` (optional): certificates revoked.
//!
//! As with QEMU, both sides verify their peer by default (`verify-peer`):
//! a client checks the server's certificate against the host name it
//! connected to (or the one given instead), a server asks every client for
//! a certificate its authorities signed.
//!
//! The reader and writer threads of a connection share the session as
//! they share a plain socket ([`session`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};

use crate::socket::Stream;

mod identity;
mod session;

/// The test credentials the integration tests make too.
#[cfg(test)]
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/certs.rs"]
mod test_certs;

pub(crate) use session::Session;

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file of the credentials could not be read.
    #[error("Unable to access credentials {}: {error}", path.display())]
    Access {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not a source: the message says it all).
        error: io::Error,
    },
    /// A file holds no certificate or key, or a malformed one.
    #[error("Unable to load credentials {}: {why}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The credentials do not go together (a key that is not the
    /// certificate's, an authority that is no CA, ...).
    #[error("Unable to use the TLS credentials in {}: {why}", dir.display())]
    Unusable {
        /// The credentials' directory.
        dir: PathBuf,
        /// Why.
        why: String,
    },
}

/// The cryptography every session uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of the PEM file `path` (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Malformed {
            path: path.to_owned(),
            why: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// The private key of the PEM file `path` (PKCS #1, PKCS #8 or SEC1).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| malformed(path, e))
}

/// The revocation lists in `dir/ca-crl.pem`, if that file exists.
fn revocations(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let path = dir.join("ca-crl.pem");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = read(&path)?;
    CertificateRevocationListDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(&path, e))
}

/// The authorities of `dir/ca-cert.pem`.
fn authorities(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let path = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for cert in certificates(&path)? {
        roots.add(cert).map_err(|e| malformed(&path, e))?;
    }
    Ok(Arc::new(roots))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Access {
        path: path.to_owned(),
        error,
    })
}

fn malformed(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Malformed {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

fn unusable(dir: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Unusable {
        dir: dir.to_owned(),
        why: why.to_string(),
    }
}

/// A server's TLS credentials.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    /// The one client identity let in, when set (QEMU's `authz-simple`).
    identity: Option<String>,
}

impl TlsServer {
    /// Loads the server credentials of the directory `dir`
    /// (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`); with
    /// `verify_peer`, clients must show a certificate those authorities
    /// signed.
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> Result<TlsServer, TlsError> {
        let provider = provider();
        // The authorities first, needed or not, as QEMU reads them.
        let roots = authorities(dir)?;
        let chain = certificates(&dir.join("server-cert.pem"))?;
        let key = private_key(&dir.join("server-key.pem"))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable(dir, e))?;
        let builder = if verify_peer {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .with_crls(revocations(dir)?)
                // A certificate whose authority has no list here is not
                // taken for revoked, as GnuTLS takes it.
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| unusable(dir, e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| unusable(dir, e))?;
        Ok(TlsServer {
            config: Arc::new(config),
            identity: None,
        })
    }

    /// Lets in only clients whose certificate's distinguished name is
    /// `identity`, written as GnuTLS writes it
    /// (`CN=name,O=organization,C=country`: the most specific part first),
    /// as QEMU's `authz-simple` objects do.
    pub fn authorize_only(mut self, identity: &str) -> TlsServer {
        self.identity = Some(identity.to_owned());
        self
    }

    /// Runs the server side of the TLS handshake over `net`, and returns
    /// the plaintext stream of the session.
    pub(crate) fn accept(&self, net: Stream) -> Result<Stream, String> {
        let session = rustls::ServerConnection::new(self.config.clone())
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let stream = Session::start(session.into(), net).map_err(|e| describe(&e.0, None))?;
        if let (Some(wanted), Stream::Tls(session)) = (&self.identity, &stream) {
            let name = session.peer_name();
            if name.as_deref() != Some(wanted.as_str()) {
                stream.shutdown(std::net::Shutdown::Both);
                return Err(format!(
                    "TLS x509 authz check for {} is denied",
                    name.unwrap_or_else(|| "a client without a certificate".into())
                ));
            }
        }
        Ok(stream)
    }
}

/// A client's TLS credentials.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    /// Whether the server's certificate is checked (QEMU's `verify-peer`).
    verify_peer: bool,
}

impl TlsClient {
    /// Loads the client credentials of the directory `dir`: `ca-cert.pem`
    /// (required, as QEMU requires it) to verify the server with (when
    /// `verify_peer`), and
    /// `client-cert.pem` with `client-key.pem` to show the server, when
    /// both are there.
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> Result<TlsClient, TlsError> {
        let provider = provider();
        // The authorities first, needed or not, as QEMU reads them.
        let roots = authorities(dir)?;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable(dir, e))?;
        let builder = if verify_peer {
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .with_crls(revocations(dir)?)
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| unusable(dir, e))?;
            builder.with_webpki_verifier(verifier)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        };
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let config = if cert.exists() && key.exists() {
            builder
                .with_client_auth_cert(certificates(&cert)?, private_key(&key)?)
                .map_err(|e| unusable(dir, e))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(TlsClient {
            config: Arc::new(config),
            verify_peer,
        })
    }

    /// Whether the server's certificate is checked (so a name to check it
    /// against is needed).
    pub fn verifies_peer(&self) -> bool {
        self.verify_peer
    }

    /// Whether both are the same credentials (loaded once).
    pub(crate) fn same_as(&self, other: &TlsClient) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }

    /// Runs the client side of the TLS handshake over `net`, the server's
    /// certificate checked against `hostname`, and returns the plaintext
    /// stream of the session.
    pub(crate) fn connect(&self, net: Stream, hostname: &str) -> Result<Stream, String> {
        let name = ServerName::try_from(hostname.to_owned())
            .map_err(|_| format!("Invalid hostname for certificate validation: {hostname}"))?;
        let session = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        Session::start(session.into(), net).map_err(|e| describe(&e.0, Some(hostname)))
    }
}

/// A failed handshake in the words QEMU (GnuTLS) uses for the common
/// cases, so that scripts matching them keep working.
fn describe(e: &io::Error, hostname: Option<&str>) -> String {
    let inner = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "Certificate does not match the hostname {}",
            hostname.unwrap_or_default()
        ),
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "The certificate hasn't got a known issuer".into()
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            "Verify failed: No certificate was found.".into()
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            "TLS handshake failed: The TLS connection was non-properly terminated.".into()
        }
        None => format!("TLS handshake failed: {e}"),
    }
}

/// A verifier for `verify-peer=off` clients: any certificate the server
/// shows is taken, but its handshake signatures are still checked.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
