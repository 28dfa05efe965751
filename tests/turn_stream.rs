//! TURN over TCP and TLS against the real binary: coturn's client over TCP
//! and TLS, a rustls client (ALPN on and off, certificate swapped under a
//! live allocation), autodetection, PROXY protocol v2, and the robustness
//! rules (garbage, idle connections, connection caps, slow readers).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::uclient::{EchoPeer as Peer, parse_report};
use common::{TestServer, cert, loopback_config, write_cert};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::channel_data;
use turnstile::proto::framer::StreamFramer;
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

fn config(dir: &Path, extra_listen: &str, limits: &str) -> String {
    loopback_config(&format!(
        r#"
[[listen]]
transport = "tcp"
address = "127.0.0.1:0"
{extra_listen}

[[listen]]
transport = "tls"
address = "127.0.0.1:0"

[tls]
certificate = "{cert}"
private_key = "{key}"

[relay]
address = "127.0.0.1"
ports = "63000-63999"

[auth]
users = {{ alice = "secret" }}
secrets = ["stream-rest-secret"]

[peers]
allow = ["127.0.0.0/8"]

[limits]
{limits}
"#,
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
    ))
}

fn uclient(port: u16, peer: &Peer, flags: &[&str]) -> (u64, u64, Option<u64>, String) {
    let out = Command::new("timeout")
        .args([
            "60",
            "turnutils_uclient",
            "-u",
            "alice",
            "-w",
            "secret",
            "-e",
            "127.0.0.1",
            "-z",
            "5",
        ])
        .args(["-r", &peer.port.to_string(), "-p", &port.to_string()])
        .args(flags)
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let r = parse_report(text);
    (r.sent, r.received, r.lost, r.output)
}

#[test]
fn uclient_over_tcp_and_tls_with_zero_loss() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), &cert());
    let server = TestServer::start(&config(dir.path(), "", ""));
    let peer = Peer::start();
    let (sent, recv, lost, out) = uclient(
        server.tcp[0].port(),
        &peer,
        &["-t", "-n", "200", "-l", "120", "-m", "10"],
    );
    assert!(sent >= 800 && recv == sent && lost == Some(0), "TCP:\n{out}");
    let (sent, recv, lost, out) = uclient(
        server.tls[0].port(),
        &peer,
        &["-t", "-S", "-n", "200", "-l", "120", "-m", "10"],
    );
    // uclient picks an OpenSSL context per connection, some of them TLS 1.0/1.1,
    // which rustls refuses: a session may fail to start, but every message of
    // every session that started must come back.
    assert!(sent >= 400 && recv == sent && lost == Some(0), "TLS:\n{out}");
    // Closing the connections deleted their allocations.
    assert!(server.wait_counter("turnstile_allocations_deleted_total", 8.0));
    // Relayed traffic is also counted by the client's transport.
    assert!(server.wait_counter(
        "turnstile_relayed_packets_by_transport_total{direction=\"client_to_peer\",transport=\"stream\"}",
        1600.0
    ));
}

// ----- a small async TURN client over any stream -------------------------

struct StreamClient<S> {
    io: S,
    buf: Vec<u8>,
    key: LongTermKey,
    nonce: String,
    tid: u8,
}

impl<S: AsyncRead + AsyncWrite + Unpin> StreamClient<S> {
    fn new(io: S) -> Self {
        let key = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", "test.local", "secret");
        StreamClient {
            io,
            buf: Vec::new(),
            key,
            nonce: String::new(),
            tid: 0,
        }
    }

    async fn read_frame(&mut self) -> Option<Vec<u8>> {
        let framer = StreamFramer::default();
        loop {
            if let Ok(Some(f)) = framer.next_frame(&self.buf) {
                let frame = self.buf[..f.message_len].to_vec();
                self.buf.drain(..f.frame_len);
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), self.io.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn request(&mut self, method: Method, sign: bool, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.tid += 1;
        let mut buf = [0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, TransactionId([self.tid; 12])).unwrap();
        f(&mut w);
        if sign {
            w.username("alice").unwrap();
            w.realm("test.local").unwrap();
            w.nonce(&self.nonce).unwrap();
            w.message_integrity(self.key.hmac_sha1()).unwrap();
        }
        let n = w.finish();
        self.io.write_all(&buf[..n]).await.unwrap();
        loop {
            let frame = self.read_frame().await.expect("no answer");
            let m = Message::parse(&frame).unwrap();
            if m.class() != Class::Indication {
                return frame;
            }
        }
    }

    /// 401, then an authenticated Allocate; returns the relayed address.
    async fn allocate(&mut self) -> SocketAddr {
        let resp = self
            .request(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap())
            .await;
        self.nonce = Message::parse(&resp).unwrap().nonce().unwrap().unwrap().to_owned();
        let resp = self
            .request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())
            .await;
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.class(), Class::Success, "{:?}", m.error_code());
        m.xor_relayed_address().unwrap().unwrap()
    }

    async fn binding(&mut self) -> SocketAddr {
        let resp = self.request(Method::BINDING, false, |_| {}).await;
        Message::parse(&resp).unwrap().xor_mapped_address().unwrap().unwrap()
    }
}

fn tls_client_config(trusted: &[u8], alpn: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(trusted.to_vec()))
        .unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if alpn {
        c.alpn_protocols = vec![b"stun.turn".to_vec()];
    }
    Arc::new(c)
}

async fn tls_connect(
    addr: SocketAddr,
    trusted: &[u8],
    alpn: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls_client_config(trusted, alpn))
        .connect(name, tcp)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_and_without_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert();
    write_cert(dir.path(), &c);
    let server = TestServer::start(&config(dir.path(), "", ""));
    let tls = tls_connect(server.tls[0], &c.der, true).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"stun.turn"[..]));
    let local = tls.get_ref().0.local_addr().unwrap();
    let mut client = StreamClient::new(tls);
    assert_eq!(client.binding().await, local);
    let tls = tls_connect(server.tls[0], &c.der, false).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut client = StreamClient::new(tls);
    client.allocate().await;
    // A client that does not trust the certificate fails the handshake.
    let other = cert();
    assert!(tls_connect(server.tls[0], &other.der, true).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_swapped_under_a_live_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (cert(), cert());
    write_cert(dir.path(), &a);
    let server = TestServer::start(&config(dir.path(), "", ""));
    let tls = tls_connect(server.tls[0], &a.der, true).await.unwrap();
    let mut old = StreamClient::new(tls);
    old.allocate().await;

    // A broken pair is refused and the old certificate stays.
    std::fs::write(dir.path().join("key.pem"), &b.key).unwrap(); // key of B, certificate of A
    server.signal("HUP");
    assert!(server.wait_log("not reloaded"));
    assert!(tls_connect(server.tls[0], &a.der, true).await.is_ok());

    write_cert(dir.path(), &b);
    server.signal("HUP");
    assert!(server.wait_log("configuration reloaded from"));
    let new = tls_connect(server.tls[0], &b.der, true).await.unwrap();
    let presented = new.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(presented, b.der, "new handshakes get the new certificate");
    assert!(tls_connect(server.tls[0], &a.der, true).await.is_err());
    // The old connection and its allocation carry on.
    let resp = old.request(Method::REFRESH, true, |_| {}).await;
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);

    // Renewal without a signal: the files are watched.
    let c = cert();
    write_cert(dir.path(), &c);
    assert!(server.wait_log("TLS certificate reloaded"));
    assert!(tls_connect(server.tls[0], &c.der, true).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tls_port_also_serves_plain_tcp_when_autodetecting() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert();
    write_cert(dir.path(), &c);
    let cfg = config(dir.path(), "", "").replace(
        "transport = \"tls\"\naddress = \"127.0.0.1:0\"",
        "transport = \"tls\"\naddress = \"127.0.0.1:0\"\nautodetect = true",
    );
    let server = TestServer::start(&cfg);
    let tcp = TcpStream::connect(server.tls[0]).await.unwrap();
    let local = tcp.local_addr().unwrap();
    assert_eq!(StreamClient::new(tcp).binding().await, local);
    let tls = tls_connect(server.tls[0], &c.der, true).await.unwrap();
    StreamClient::new(tls).binding().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_gives_the_client_address() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), &cert());
    let server = TestServer::start(&config(dir.path(), "proxy_protocol = true", ""));
    let mut tcp = TcpStream::connect(server.tcp[0]).await.unwrap();
    let mut header = turnstile::proto::proxy_protocol::SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 9, 127, 0, 0, 1]);
    header.extend_from_slice(&40000u16.to_be_bytes());
    header.extend_from_slice(&3478u16.to_be_bytes());
    tcp.write_all(&header).await.unwrap();
    let mapped = StreamClient::new(tcp).binding().await;
    assert_eq!(mapped, "203.0.113.9:40000".parse().unwrap());
    // Without the header the connection is refused.
    let tcp = TcpStream::connect(server.tcp[0]).await.unwrap();
    let mut c = StreamClient::new(tcp);
    c.io.write_all(&[
        0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ])
    .await
    .unwrap();
    assert!(c.read_frame().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_idle_and_caps_close_only_their_own_connections() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), &cert());
    let server = TestServer::start(&config(dir.path(), "", "idle_timeout = 1\nmax_connections_per_ip = 3"));
    let keep = TcpStream::connect(server.tcp[0]).await.unwrap();
    let mut keep = StreamClient::new(keep);
    keep.allocate().await;

    // Garbage: that connection is closed, the other one is fine.
    let mut bad = StreamClient::new(TcpStream::connect(server.tcp[0]).await.unwrap());
    bad.io.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(bad.read_frame().await.is_none());
    drop(bad);
    // Idle without an allocation: closed after idle_timeout.
    let mut idle = StreamClient::new(TcpStream::connect(server.tcp[0]).await.unwrap());
    let started = std::time::Instant::now();
    assert!(idle.read_frame().await.is_none());
    assert!(started.elapsed() < Duration::from_secs(4));
    drop(idle);
    // Three connections per IP: the fourth is closed at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Make sure both are accepted (workers accept concurrently) before the fourth.
    let mut two = StreamClient::new(TcpStream::connect(server.tcp[0]).await.unwrap());
    two.binding().await;
    let mut three = StreamClient::new(TcpStream::connect(server.tcp[0]).await.unwrap());
    three.binding().await;
    let mut four = StreamClient::new(TcpStream::connect(server.tcp[0]).await.unwrap());
    four.io
        .write_all(&[
            0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ])
        .await
        .ok();
    assert!(four.read_frame().await.is_none());
    assert!(server.counter("turnstile_connections_refused_total{reason=\"limit\"}") >= 1.0);

    drop(four);
    drop(two);
    drop(three);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A truncated TLS record, and a frame that promises more than it sends:
    // each costs only its own connection.
    let mut tls = TcpStream::connect(server.tls[0]).await.unwrap();
    tls.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    drop(tls);
    let mut partial = TcpStream::connect(server.tcp[0]).await.unwrap();
    partial.write_all(&[0x40, 0x00, 0xff, 0xff, 1, 2, 3]).await.unwrap();
    drop(partial);

    let resp = keep.request(Method::REFRESH, true, |_| {}).await;
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_loses_its_own_data_and_nobody_elses() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), &cert());
    let server = TestServer::start(&config(dir.path(), "", "stream_send_buffer = 65536"));
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // The slow client: allocates over TCP, binds a channel, then never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = StreamClient::new(socket.connect(server.tcp[0]).await.unwrap());
    let slow_relay = slow.allocate().await;
    let resp = slow
        .request(Method::CHANNEL_BIND, true, |w| {
            w.channel_number(0x4001).unwrap();
            w.xor_peer_address(&peer_addr).unwrap();
        })
        .await;
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);

    // A healthy client over TCP on the same server.
    let mut fast = StreamClient::new(TcpStream::connect(server.tcp[0]).await.unwrap());
    let fast_relay = fast.allocate().await;
    let resp = fast
        .request(Method::CHANNEL_BIND, true, |w| {
            w.channel_number(0x4002).unwrap();
            w.xor_peer_address(&peer_addr).unwrap();
        })
        .await;
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);

    // Flood the slow client: 30 MB, far more than its queue and the kernel's
    // socket buffers, paced so the relay socket itself does not overflow.
    let flood = vec![0xAB; 1000];
    for i in 0..30_000 {
        let _ = peer.send_to(&flood, slow_relay).await;
        if i % 200 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The healthy client still relays, both ways.
    for i in 0..200u32 {
        let data = i.to_be_bytes();
        peer.send_to(&data, fast_relay).await.unwrap();
        let frame = fast.read_frame().await.expect("fast client starved");
        let cd = channel_data::ChannelData::parse(&frame).unwrap();
        assert_eq!((cd.channel, cd.data), (0x4002, &data[..]));
    }
    assert!(
        server.wait_counter("turnstile_send_dropped_total", 1000.0),
        "the slow client's excess was dropped"
    );
}

#[test]
fn uclient_tcp_relay_rfc6062_with_zero_loss() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), &cert());
    let server = TestServer::start(&config(dir.path(), "", ""));
    // -T: TCP allocations, clients Connect to each other's relayed addresses
    // (Connect, ConnectionAttempt, ConnectionBind, data connections on
    // whichever worker the kernel picks).
    let out = Command::new("timeout")
        .args([
            "60",
            "turnutils_uclient",
            "-T",
            "-u",
            "alice",
            "-w",
            "secret",
            "-z",
            "5",
        ])
        .args([
            "-p",
            &server.tcp[0].port().to_string(),
            "-n",
            "100",
            "-l",
            "120",
            "-m",
            "6",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let r = parse_report(text);
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.sent >= 600 && r.received == r.sent, "{}", r.output);
}
