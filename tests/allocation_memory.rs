//! Heap held per idle allocation in the running server: the server is
//! started in this process, and the live heap bytes (all threads) are
//! compared before and after 2 000 allocations are opened with requests
//! built on the stack, so only the server's own allocations count.

mod counting_alloc;

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::Duration;

use counting_alloc::LIVE;
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

const CONFIG: &str = r#"
realm = "test.local"
workers = 1

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "10000-14999"

[auth]
users = { alice = "secret" }

[limits]
user_quota = 0
# Two thousand clients on one address, each meeting its 401 first.
unauthenticated_rate = 0

[log]
level = "error"
"#;

const ALLOCATIONS: usize = 2000;

#[test]
fn an_idle_allocation_holds_little_heap() {
    let config = turnstile::config::Config::from_toml(CONFIG, "test").unwrap();
    let started = turnstile::io::start(&config, &[]).unwrap();
    let server = started.udp[0];
    let key = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", "test.local", "secret");
    let sockets: Vec<UdpSocket> = (0..ALLOCATIONS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.connect(server).unwrap();
            s
        })
        .collect();
    let mut buf = [0u8; 512];
    let mut answer = [0u8; 1500];
    // Each client's nonce, from its own challenge (a nonce is good on its 5-tuple only).
    let challenge = |s: &UdpSocket, buf: &mut [u8], answer: &mut [u8]| -> String {
        let n = {
            let mut w = MessageWriter::new(buf, Class::Request, Method::ALLOCATE, TransactionId([1; 12])).unwrap();
            w.requested_transport(17).unwrap();
            w.finish()
        };
        s.send(&buf[..n]).unwrap();
        let len = s.recv(answer).unwrap();
        Message::parse(&answer[..len])
            .unwrap()
            .nonce()
            .unwrap()
            .unwrap()
            .to_owned()
    };

    let allocate = |s: &UdpSocket, i: usize, buf: &mut [u8], answer: &mut [u8]| {
        let nonce = challenge(s, buf, answer);
        let mut tid = [2u8; 12];
        tid[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let mut w = MessageWriter::new(buf, Class::Request, Method::ALLOCATE, TransactionId(tid)).unwrap();
        w.requested_transport(17).unwrap();
        w.username("alice").unwrap();
        w.realm("test.local").unwrap();
        w.nonce(&nonce).unwrap();
        w.message_integrity(key.hmac_sha1()).unwrap();
        let n = w.finish();
        s.send(&buf[..n]).unwrap();
        let len = s.recv(answer).unwrap();
        Message::parse(&answer[..len]).unwrap().class() == Class::Success
    };
    // Warm-up: the first allocations size the worker's tables and buffers.
    for (i, s) in sockets.iter().enumerate().take(100) {
        assert!(allocate(s, i, &mut buf, &mut answer));
    }
    std::thread::sleep(Duration::from_millis(1100));
    let before = LIVE.load(Ordering::SeqCst);
    for (i, s) in sockets.iter().enumerate().skip(100) {
        assert!(allocate(s, i, &mut buf, &mut answer), "allocation {i}");
    }
    // Past the next once-a-second statistics export.
    std::thread::sleep(Duration::from_millis(1100));
    let after = LIVE.load(Ordering::SeqCst);
    let per = (after - before) as f64 / (ALLOCATIONS - 100) as f64;
    eprintln!("live heap per idle allocation: {per:.0} bytes");
    assert!(per < 1024.0, "{per:.0} bytes of heap per idle allocation");
}
