//! Running out of things, against the real binary: relay ports (508, and
//! allocations again once one is freed), file descriptors (508 and refused
//! connections, never a crash, recovery when descriptors come back), and
//! slow clients that trickle bytes to hold connections open.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::TestServer;
use common::raw::{RawClient, code};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

fn config(ports: &str, extra: &str) -> String {
    format!(
        r#"realm = "test.local"
workers = 1

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[[listen]]
transport = "tcp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "{ports}"

[auth]
users = {{ alice = "secret" }}

[limits]
user_quota = 0
{extra}
"#
    )
}

fn allocate(c: &mut RawClient) -> u16 {
    code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap()))
}

fn binding_answered(server: std::net::SocketAddr) -> bool {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    let n = {
        let w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([7; 12])).unwrap();
        w.finish()
    };
    s.send_to(&buf[..n], server).unwrap();
    let mut answer = [0u8; 512];
    s.recv(&mut answer).is_ok()
}

#[test]
fn relay_ports_run_out_with_508_and_come_back() {
    let server = TestServer::start(&config("61600-61603", ""));
    let udp = server.udp[0];
    let mut clients: Vec<RawClient> = (0..4).map(|_| RawClient::connect(udp)).collect();
    for c in clients.iter_mut() {
        assert_eq!(allocate(c), 0);
    }
    let mut late = RawClient::connect(udp);
    assert_eq!(allocate(&mut late), 508, "a fifth allocation with four relay ports");
    // Free one: the port is usable again at once.
    let r = clients[0].request(Method::REFRESH, true, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&r), 0);
    assert_eq!(allocate(&mut late), 0, "allocation after a port was freed");
}

#[test]
fn running_out_of_descriptors_gives_508_and_never_a_crash() {
    // 40 descriptors: the listeners, the runtime and a few relays.
    let mut server = TestServer::start_with_fd_limit(&config("61610-61699", ""), 40);
    let udp = server.udp[0];
    let mut clients = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        let mut c = RawClient::connect(udp);
        match allocate(&mut c) {
            0 => clients.push(c),
            508 => refused += 1,
            other => panic!("allocate answered {other}"),
        }
    }
    assert!(!clients.is_empty(), "some allocations fit");
    assert!(
        refused > 0,
        "the descriptor limit was reached ({} allocations)",
        clients.len()
    );
    // TCP connections meet a full table too: accepted later, not dropped on the floor by a crash.
    let mut waiting = TcpStream::connect(server.tcp[0]).unwrap();
    assert!(binding_answered(udp), "the server still answers");
    assert!(
        server.wait_exit(Duration::from_millis(500)).is_none(),
        "the server is alive"
    );

    // Descriptors come back: the queued TCP client is served, and Allocate works again.
    for c in clients.iter_mut().take(5) {
        let r = c.request(Method::REFRESH, true, |w| w.lifetime(0).unwrap());
        assert_eq!(code(&r), 0);
    }
    let mut buf = [0u8; 64];
    let n = {
        let w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([8; 12])).unwrap();
        w.finish()
    };
    waiting.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    waiting.write_all(&buf[..n]).unwrap();
    let mut head = [0u8; 20];
    waiting
        .read_exact(&mut head)
        .expect("the TCP client queued at the limit is served once descriptors are free");
    let mut again = RawClient::connect(udp);
    assert_eq!(allocate(&mut again), 0, "allocation after descriptors were freed");
}

/// Sends `bytes` one at a time every `gap`; returns how many went out
/// before the server closed the connection (and when), or None if it never did.
fn trickle(stream: &mut TcpStream, bytes: &[u8], gap: Duration) -> Option<(usize, Duration)> {
    let start = Instant::now();
    stream.set_read_timeout(Some(gap)).unwrap();
    for (i, b) in bytes.iter().enumerate() {
        if stream.write_all(&[*b]).is_err() {
            return Some((i, start.elapsed()));
        }
        let mut probe = [0u8; 1];
        match stream.read(&mut probe) {
            Ok(0) => return Some((i + 1, start.elapsed())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some((i + 1, start.elapsed())),
        }
    }
    None
}

#[test]
fn trickling_bytes_does_not_keep_a_connection_open() {
    let server = TestServer::start(&config("61700-61709", "idle_timeout = 2"));
    let mut buf = [0u8; 64];
    let n = {
        let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([9; 12])).unwrap();
        w.software("a slow client, one byte at a time").unwrap();
        w.finish()
    };
    // Without an allocation: one byte every 400 ms never completes a message in 2 s.
    let mut slow = TcpStream::connect(server.tcp[0]).unwrap();
    let (sent, after) = trickle(&mut slow, &buf[..n], Duration::from_millis(400)).expect("connection closed");
    assert!(sent >= 4 && sent < n, "{sent} bytes trickled before the close");
    assert!(after < Duration::from_secs(4), "closed after {after:?}");

    // With an allocation, a message that is started must also be finished in time.
    let c = TcpStream::connect(server.tcp[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut alloc_client = StreamClient {
        s: c,
        nonce: String::new(),
    };
    let r = alloc_client.request(Method::ALLOCATE);
    alloc_client.nonce = Message::parse(&r).unwrap().nonce().unwrap().unwrap().to_owned();
    assert_eq!(code(&alloc_client.request(Method::ALLOCATE)), 0);
    let (sent, after) = trickle(&mut alloc_client.s, &buf[..n], Duration::from_millis(400)).expect("connection closed");
    assert!(sent < n && after < Duration::from_secs(4), "{sent} bytes, {after:?}");
}

struct StreamClient {
    s: TcpStream,
    nonce: String,
}

impl StreamClient {
    fn request(&mut self, method: Method) -> Vec<u8> {
        let key = turnstile::proto::auth::LongTermKey::derive(
            turnstile::proto::auth::PasswordAlgorithm::Md5,
            "alice",
            "test.local",
            "secret",
        );
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, TransactionId([1; 12])).unwrap();
        w.requested_transport(17).unwrap();
        if !self.nonce.is_empty() {
            w.username("alice").unwrap();
            w.realm("test.local").unwrap();
            w.nonce(&self.nonce).unwrap();
            w.message_integrity(key.hmac_sha1()).unwrap();
        }
        let n = w.finish();
        self.s.write_all(&buf[..n]).unwrap();
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let mut m = head.to_vec();
        m.resize(20 + len, 0);
        self.s.read_exact(&mut m[20..]).unwrap();
        m
    }
}
