//! Test credentials laid out as QEMU's `tls-creds-x509` objects read them
//! (and as QEMU's iotest 233 makes them): two authorities, a server
//! certificate for `iotests.qemu.org`, 127.0.0.1 and ::1 signed by the
//! first, clients signed by either.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// One authority: its certificate and key.
struct Authority {
    cert: Certificate,
    key: KeyPair,
}

fn authority(name: &str) -> Authority {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("qcow test authority {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("CA certificate");
    Authority { cert, key }
}

/// Writes `dir/{ca-cert,<role>-cert,<role>-key}.pem`: a certificate for
/// `role` ("server" or "client") signed by `ca`.
fn leaf(dir: &Path, ca: &Authority, role: &str) {
    std::fs::create_dir_all(dir).expect("credentials directory");
    let key = KeyPair::generate().expect("key");
    let mut params = if role == "server" {
        let mut p = CertificateParams::new(vec!["iotests.qemu.org".to_owned()]).expect("params");
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p
    } else {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p
    };
    params
        .distinguished_name
        .push(DnType::CommonName, format!("qcow test {role}"));
    // QEMU checks for both usages (its templates ask for them).
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .expect("certificate");
    std::fs::write(dir.join("ca-cert.pem"), ca.cert.pem()).expect("write");
    std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem()).expect("write");
    std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem()).expect("write");
}

/// The credential directories under one root.
pub(crate) struct Credentials {
    /// The server's, signed by authority 1.
    pub(crate) server: PathBuf,
    /// A client's, signed by authority 1 (trusted by the server).
    pub(crate) client: PathBuf,
    /// A client's, signed by authority 2 (trusted by nobody; it also
    /// trusts only authority 2).
    pub(crate) stranger: PathBuf,
}

/// Makes the credentials under `root`.
pub(crate) fn make(root: &Path) -> Credentials {
    let (ca1, ca2) = (authority("1"), authority("2"));
    let creds = Credentials {
        server: root.join("server"),
        client: root.join("client"),
        stranger: root.join("stranger"),
    };
    leaf(&creds.server, &ca1, "server");
    leaf(&creds.client, &ca1, "client");
    leaf(&creds.stranger, &ca2, "client");
    creds
}
