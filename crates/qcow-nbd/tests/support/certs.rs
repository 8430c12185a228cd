//! Test credentials laid out as QEMU's `tls-creds-x509` objects read them
//! (and as QEMU's iotest 233 makes them): two authorities, a server
//! certificate for `iotests.qemu.org`, 127.0.0.1 and ::1 signed by the
//! first, clients signed by either.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, PrintableString, RevokedCertParams, SanType, SerialNumber, date_time_ymd,
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

/// The serial number of the trusted client's certificate.
pub(crate) const CLIENT_SERIAL: u64 = 7;

/// The serial number of the other trusted client's certificate.
pub(crate) const OTHER_SERIAL: u64 = 5;

/// Writes `dir/{ca-cert,<role>-cert,<role>-key}.pem`: a certificate for
/// `role` ("server" or "client") signed by `ca`, with serial number
/// `serial`.
fn leaf(dir: &Path, ca: &Authority, role: &str, serial: u64) {
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
    // Written most general first, as QEMU's iotests write theirs. The
    // country is a PrintableString as X.520 calls for, except in the
    // other client's, where it is UTF-8 (GnuTLS then writes it in hex).
    params.distinguished_name = DistinguishedName::new();
    let country = if serial == OTHER_SERIAL {
        DnValue::Utf8String("GB".into())
    } else {
        DnValue::PrintableString(PrintableString::try_from("GB").expect("printable"))
    };
    params.distinguished_name.push(DnType::CountryName, country);
    params
        .distinguished_name
        .push(DnType::LocalityName, "R'lyeh");
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("qcow tests {serial}"));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("qcow test {role}"));
    params.serial_number = Some(SerialNumber::from(serial));
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

/// The distinguished name of the certificate of serial number `serial`
/// made here for `role`, as GnuTLS writes it.
pub(crate) fn identity(role: &str, serial: u64) -> String {
    let country = if serial == OTHER_SERIAL {
        "#0c024742"
    } else {
        "GB"
    };
    format!("C={country},L=R'lyeh,O=qcow tests {serial},CN=qcow test {role}")
}

/// The credential directories under one root (and the authorities, for
/// revocation lists).
pub(crate) struct Credentials {
    authorities: [Authority; 2],
    /// The server's, signed by authority 1.
    pub(crate) server: PathBuf,
    /// A client's, signed by authority 1 (trusted by the server).
    pub(crate) client: PathBuf,
    /// Another client's, signed by authority 1, under another name.
    pub(crate) other: PathBuf,
    /// A client's, signed by authority 2 (trusted by nobody; it also
    /// trusts only authority 2).
    pub(crate) stranger: PathBuf,
}

/// Makes the credentials under `root`.
pub(crate) fn make(root: &Path) -> Credentials {
    let (ca1, ca2) = (authority("1"), authority("2"));
    leaf(&root.join("server"), &ca1, "server", 1);
    leaf(&root.join("client"), &ca1, "client", CLIENT_SERIAL);
    leaf(&root.join("other"), &ca1, "client", OTHER_SERIAL);
    leaf(&root.join("stranger"), &ca2, "client", 3);
    Credentials {
        authorities: [ca1, ca2],
        server: root.join("server"),
        client: root.join("client"),
        other: root.join("other"),
        stranger: root.join("stranger"),
    }
}

impl Credentials {
    /// A revocation list in PEM, signed by authority `which` (1 or 2),
    /// revoking the trusted client's certificate when `revoke_client`.
    pub(crate) fn revocation_list(&self, which: usize, revoke_client: bool) -> String {
        let ca = &self.authorities[which - 1];
        let revoked = if revoke_client {
            vec![RevokedCertParams {
                serial_number: SerialNumber::from(CLIENT_SERIAL),
                revocation_time: date_time_ymd(2024, 1, 1),
                reason_code: None,
                invalidity_date: None,
            }]
        } else {
            Vec::new()
        };
        CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2999, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca.cert, &ca.key)
        .expect("revocation list")
        .pem()
        .expect("PEM")
    }
}
