//! TLS end to end in one process: the server with its credentials, the
//! client with its own, over TCP and a Unix socket; what each side
//! refuses, in the words QEMU uses; data crossing both ways at once.

mod support {
    pub(crate) mod certs;
}

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use qcow::{BlockDevice, RawImage};
use qcow_io::{MemStorage, Storage};
use qcow_nbd::client::{Address, NbdClient, Target, TargetTls};
use qcow_nbd::{Export, Listener, ServerOptions, TlsClient, TlsServer};

const SIZE: u64 = 32 << 20;

/// A server running on its own thread until dropped.
struct Server {
    address: Address,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    log: Arc<Mutex<Vec<String>>>,
    device: Arc<dyn BlockDevice>,
}

impl Server {
    fn start(unix: Option<&std::path::Path>, tls: Option<TlsServer>) -> Server {
        let storage = Arc::new(MemStorage::from_bytes(vec![0u8; SIZE as usize]));
        let device: Arc<dyn BlockDevice> =
            Arc::new(RawImage::open_sized("mem.raw", storage, SIZE).with_writes(true));
        let (listener, address) = match unix {
            Some(path) => (
                Listener::Unix(UnixListener::bind(path).expect("bind")),
                Address::Unix(path.to_string_lossy().into_owned()),
            ),
            None => {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind");
                let port = l.local_addr().expect("address").port();
                (Listener::Tcp(l), Address::Tcp("127.0.0.1".into(), port))
            }
        };
        let export = Arc::new(Export::new("", device.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let options = ServerOptions::default().shared(8).persistent(true).tls(tls);
            qcow_nbd::serve(listener, vec![export], &options, &stop2, &|e| {
                log2.lock().expect("log").push(e.to_owned())
            })
        });
        Server {
            address,
            stop,
            thread: Some(thread),
            log,
            device,
        }
    }

    fn target(&self, tls: Option<(TlsClient, Option<&str>)>) -> Target {
        Target {
            address: self.address.clone(),
            export: String::new(),
            context: None,
            tls: tls.map(|(credentials, hostname)| TargetTls {
                credentials,
                hostname: hostname.map(str::to_owned),
            }),
        }
    }

    fn stop(&mut self) -> std::io::Result<()> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .map_or(Ok(()), |t| t.join().expect("join"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn data_crosses_tls_both_ways_at_once_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = support::certs::make(dir.path());
    let server = Server::start(
        None,
        Some(TlsServer::from_x509_dir(&creds.server, true).expect("server credentials")),
    );
    let client_creds = TlsClient::from_x509_dir(&creds.client, true).expect("client credentials");
    let client = Arc::new(
        NbdClient::connect(&server.target(Some((client_creds, None)))).expect("TLS connect"),
    );
    assert_eq!(client.len().expect("size"), SIZE);
    // Four threads write and read back their own quarter at once, in
    // pieces larger than a TLS record and than the pump's buffers.
    let quarter = (SIZE / 4) as usize;
    let workers: Vec<_> = (0..4u8)
        .map(|n| {
            let client = client.clone();
            std::thread::spawn(move || {
                let data = pattern(n, quarter);
                let base = u64::from(n) * quarter as u64;
                for (i, piece) in data.chunks(3 << 20).enumerate() {
                    client
                        .write_at(piece, base + (i * (3 << 20)) as u64)
                        .expect("write");
                }
                let mut back = vec![0u8; quarter];
                client.read_at(&mut back, base).expect("read");
                assert!(back == data, "quarter {n} read back differs");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    client.flush().expect("flush");
    // What the server's disk holds is what was written.
    let mut disk = vec![0u8; SIZE as usize];
    server.device.read_at(&mut disk, 0).expect("disk");
    for n in 0..4u8 {
        let at = usize::from(n) * quarter;
        assert!(disk[at..at + quarter] == pattern(n, quarter), "quarter {n}");
    }
    drop(client);
    let log = server.log.lock().expect("log").clone();
    assert!(log.is_empty(), "server log: {log:?}");
}

#[test]
fn a_tls_server_refuses_plain_clients_and_unknown_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = support::certs::make(dir.path());
    let server = Server::start(
        None,
        Some(TlsServer::from_x509_dir(&creds.server, true).expect("server credentials")),
    );
    let plain = NbdClient::connect(&server.target(None)).expect_err("plain client");
    assert_eq!(
        plain.to_string(),
        "TLS negotiation required before option 7 (go)\nDid you forget a valid tls-creds?\n\
         server reported: Option 0x7 not permitted before TLS"
    );
    // A client whose authority is another: it does not trust the server.
    let stranger = TlsClient::from_x509_dir(&creds.stranger, true).expect("credentials");
    let e = NbdClient::connect(&server.target(Some((stranger, None)))).expect_err("stranger");
    assert_eq!(e.to_string(), "The certificate hasn't got a known issuer");
    // Trusting the server without checking it does not help: the server
    // checks the client's certificate.
    let careless = TlsClient::from_x509_dir(&creds.stranger, false).expect("credentials");
    assert!(NbdClient::connect(&server.target(Some((careless, None)))).is_err());
    // Nor does having no certificate at all.
    let anonymous_dir = dir.path().join("anonymous");
    std::fs::create_dir(&anonymous_dir).expect("mkdir");
    std::fs::copy(
        creds.client.join("ca-cert.pem"),
        anonymous_dir.join("ca-cert.pem"),
    )
    .expect("copy");
    let anonymous = TlsClient::from_x509_dir(&anonymous_dir, true).expect("credentials");
    assert!(NbdClient::connect(&server.target(Some((anonymous, None)))).is_err());
    // The server goes on serving the ones it trusts.
    let good = TlsClient::from_x509_dir(&creds.client, true).expect("credentials");
    let client = NbdClient::connect(&server.target(Some((good, None)))).expect("connect");
    let mut buf = vec![1u8; 4096];
    client.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn the_client_checks_the_server_name_and_asks_plain_servers_in_vain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = support::certs::make(dir.path());
    let server_creds = TlsServer::from_x509_dir(&creds.server, true).expect("server credentials");
    let client_creds = TlsClient::from_x509_dir(&creds.client, true).expect("client credentials");
    let tcp = Server::start(None, Some(server_creds.clone()));
    // The certificate names 127.0.0.1, not localhost.
    let Address::Tcp(_, port) = tcp.address.clone() else {
        unreachable!()
    };
    let mut by_name = tcp.target(Some((client_creds.clone(), None)));
    by_name.address = Address::Tcp("localhost".into(), port);
    let e = NbdClient::connect(&by_name).expect_err("wrong name");
    assert_eq!(
        e.to_string(),
        "Certificate does not match the hostname localhost"
    );
    // ... unless another name is given to check.
    let mut overridden = tcp.target(Some((client_creds.clone(), Some("127.0.0.1"))));
    overridden.address = Address::Tcp("localhost".into(), port);
    NbdClient::connect(&overridden).expect("name given");

    // A Unix socket has no host name: one must be given.
    let unix = Server::start(Some(&dir.path().join("sock")), Some(server_creds));
    let e =
        NbdClient::connect(&unix.target(Some((client_creds.clone(), None)))).expect_err("no name");
    assert_eq!(e.to_string(), "No hostname for certificate validation");
    let client =
        NbdClient::connect(&unix.target(Some((client_creds.clone(), Some("iotests.qemu.org")))))
            .expect("unix with a name");
    client.write_at(&[7u8; 512], 512).expect("write");
    drop(client);
    // A client that does not verify the server needs no name (as in QEMU).
    let trusting = TlsClient::from_x509_dir(&creds.client, false).expect("credentials");
    NbdClient::connect(&unix.target(Some((trusting, None)))).expect("unix, no check");

    // A server without TLS says so.
    let plain = Server::start(None, None);
    let e = NbdClient::connect(&plain.target(Some((client_creds, None)))).expect_err("plain");
    assert_eq!(
        e.to_string(),
        "Denied by server for option 5 (starttls)\nserver reported: TLS not configured"
    );
}

#[test]
fn stopping_the_server_ends_tls_connections_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = support::certs::make(dir.path());
    let mut server = Server::start(
        None,
        Some(TlsServer::from_x509_dir(&creds.server, true).expect("server credentials")),
    );
    let client_creds = TlsClient::from_x509_dir(&creds.client, true).expect("client credentials");
    let client = NbdClient::connect(&server.target(Some((client_creds, None)))).expect("connect");
    client.write_at(&[9u8; 65536], 0).expect("write");
    server.stop().expect("the server stops");
    // The connection is gone, and says so instead of hanging.
    let mut buf = vec![0u8; 4096];
    assert!(client.read_at(&mut buf, 0).is_err());
    let mut disk = vec![0u8; 65536];
    server.device.read_at(&mut disk, 0).expect("disk");
    assert!(disk.iter().all(|&b| b == 9));
}

#[test]
fn missing_and_malformed_credentials_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = TlsServer::from_x509_dir(dir.path(), true).expect_err("empty directory");
    assert_eq!(
        e.to_string(),
        format!(
            "Unable to access credentials {}: No such file or directory (os error 2)",
            dir.path().join("ca-cert.pem").display()
        )
    );
    std::fs::write(dir.path().join("ca-cert.pem"), "not a certificate").expect("write");
    let e = TlsClient::from_x509_dir(dir.path(), true).expect_err("malformed");
    assert!(
        e.to_string().starts_with(&format!(
            "Unable to load credentials {}",
            dir.path().join("ca-cert.pem").display()
        )),
        "{e}"
    );
}

/// A client speaking the handshake by hand on a raw TCP socket.
struct RawClient(std::net::TcpStream);

impl RawClient {
    /// Connects and reads the greeting, answering with fixed newstyle.
    fn connect(server: &Server) -> RawClient {
        use std::io::{Read, Write};
        let Address::Tcp(host, port) = &server.address else {
            panic!("a TCP server")
        };
        let mut s = std::net::TcpStream::connect((host.as_str(), *port)).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .expect("timeout");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        RawClient(s)
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        use std::io::Write;
        let mut out = qcow_nbd::protocol::IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.0.write_all(&out).expect("option");
    }

    /// The next option reply: its kind and data; `None` once the server
    /// has hung up.
    fn reply(&mut self) -> Option<(u32, Vec<u8>)> {
        use std::io::Read;
        let mut head = [0u8; 20];
        self.0.read_exact(&mut head).ok()?;
        let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).ok()?;
        Some((kind, data))
    }

    /// Whether the server closes the connection, after at most a few
    /// bytes (a TLS alert).
    fn closed(&mut self) -> bool {
        use std::io::Read;
        let mut buf = [0u8; 256];
        for _ in 0..16 {
            match self.0.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
            }
        }
        false
    }
}

#[test]
fn clients_that_break_the_tls_rules_are_refused_and_the_server_serves_on() {
    use qcow_nbd::protocol::{opt, rep};
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = support::certs::make(dir.path());
    let server = Server::start(
        None,
        Some(TlsServer::from_x509_dir(&creds.server, true).expect("server credentials")),
    );

    // Options before STARTTLS are refused, and the connection stays: LIST,
    // then STARTTLS is still accepted.
    let mut c = RawClient::connect(&server);
    c.option(opt::LIST, &[]);
    let (kind, text) = c.reply().expect("a reply");
    assert_eq!(kind, rep::ERR_TLS_REQD);
    assert_eq!(text, b"Option 0x3 not permitted before TLS");
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.reply().expect("a reply").0, rep::ACK);
    // ... then garbage where the TLS handshake should be.
    c.0.write_all(&[0x55; 512]).expect("garbage");
    assert!(c.closed(), "the server kept a connection that sent garbage");

    // STARTTLS with data: told why, then hung up on; EXPORT_NAME before
    // TLS (which has no error reply): hung up on.
    let mut c = RawClient::connect(&server);
    c.option(opt::STARTTLS, b"x");
    let (kind, text) = c.reply().expect("a reply");
    assert_eq!(kind, rep::ERR_INVALID);
    assert_eq!(text, b"option 'starttls' has unexpected length");
    assert!(c.closed());
    let mut c = RawClient::connect(&server);
    c.option(opt::EXPORT_NAME, b"");
    assert!(c.reply().is_none() && c.closed());

    // A client that leaves in the middle of the TLS handshake.
    let mut c = RawClient::connect(&server);
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.reply().expect("a reply").0, rep::ACK);
    drop(c);

    // Through all of it the server serves a client that follows the rules.
    let good = TlsClient::from_x509_dir(&creds.client, true).expect("credentials");
    let client = NbdClient::connect(&server.target(Some((good, None)))).expect("connect");
    client.write_at(&[3u8; 4096], 8192).expect("write");
    let mut back = [0u8; 4096];
    client.read_at(&mut back, 8192).expect("read");
    assert_eq!(back, [3u8; 4096]);
}

#[test]
fn revocation_lists_refuse_revoked_certificates_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = support::certs::make(dir.path());
    let connect = |crl: Option<String>| {
        if let Some(crl) = crl {
            std::fs::write(creds.server.join("ca-crl.pem"), crl).expect("write");
        }
        let server = Server::start(
            None,
            Some(TlsServer::from_x509_dir(&creds.server, true).expect("server credentials")),
        );
        let client = TlsClient::from_x509_dir(&creds.client, true).expect("credentials");
        NbdClient::connect(&server.target(Some((client, None)))).map(drop)
    };
    // A list that revokes nothing, and one from another authority (which
    // says nothing of this client's): the client is let in.
    connect(Some(creds.revocation_list(1, false))).expect("nothing revoked");
    connect(Some(creds.revocation_list(2, true))).expect("another authority's list");
    // Its own authority revoked it: refused.
    assert!(connect(Some(creds.revocation_list(1, true))).is_err());
}

#[test]
fn an_authorized_identity_lets_in_that_client_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = support::certs::make(dir.path());
    let identity = support::certs::identity("client", support::certs::CLIENT_SERIAL);
    let server = Server::start(
        None,
        Some(
            TlsServer::from_x509_dir(&creds.server, true)
                .expect("server credentials")
                .authorize_only(&identity),
        ),
    );
    let client = TlsClient::from_x509_dir(&creds.client, true).expect("credentials");
    NbdClient::connect(&server.target(Some((client, None)))).expect("the named client");
    let other = TlsClient::from_x509_dir(&creds.other, true).expect("credentials");
    assert!(NbdClient::connect(&server.target(Some((other, None)))).is_err());
    let log = server.log.lock().expect("log").clone();
    let other_name = support::certs::identity("client", support::certs::OTHER_SERIAL);
    assert!(
        log.iter()
            .any(|l| l == &format!("TLS x509 authz check for {other_name} is denied")),
        "{log:?}"
    );
}
