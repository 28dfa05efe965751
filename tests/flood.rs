//! An unauthenticated Allocate flood against the running server, with its
//! default amplification budget, from 200 source ports of another address:
//! the flood gets back far fewer bytes than it sends, and a legitimate
//! client keeps allocating and relaying throughout. Bounded: 3 s of flood
//! at TURNSTILE_FLOOD_PPS packets per second (default 50 000; 0 = as fast
//! as one thread can send, which on a 2-core machine also overflows the
//! server's socket buffers: docs/SECURITY.md has both).

mod common;

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::raw::RawClient;

/// The tests here load the machine on purpose: one at a time, so that none
/// measures another's load.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
use common::{TestServer, loopback_config};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

#[test]
fn a_flood_is_not_amplified_and_does_not_starve_a_real_client() {
    let _one = exclusive();
    let server = TestServer::start(&loopback_config(
        r#"
[relay]
address = "127.0.0.1"
ports = "61800-61999"

[auth]
users = { alice = "secret" }

[peers]
allow = ["127.0.0.0/8"]

[limits]
user_quota = 0
"#,
    ));
    let target = server.udp[0];
    let pps: u64 = std::env::var("TURNSTILE_FLOOD_PPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let stop = Arc::new(AtomicBool::new(false));
    let (sent_bytes, sent_packets, back_bytes) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    // The flood: 200 sockets on 127.0.0.2, each sending unauthenticated
    // Allocates in turn as fast as one thread can.
    let sockets: Vec<UdpSocket> = (0..200)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.2:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let flood = {
        let (stop, sent_bytes, sent_packets, back_bytes) = (
            stop.clone(),
            sent_bytes.clone(),
            sent_packets.clone(),
            back_bytes.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut answer = [0u8; 1500];
            let mut i: u32 = 0;
            let begin = Instant::now();
            let deadline = begin + Duration::from_secs(3);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if pps > 0 && u128::from(i) * 1_000_000 > begin.elapsed().as_micros() * u128::from(pps) {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let mut tid = [0u8; 12];
                tid[..4].copy_from_slice(&i.to_be_bytes());
                let n = {
                    let mut w =
                        MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId(tid)).unwrap();
                    w.requested_transport(17).unwrap();
                    w.finish()
                };
                let s = &sockets[i as usize % sockets.len()];
                if s.send_to(&buf[..n], target).is_ok() {
                    sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    sent_packets.fetch_add(1, Ordering::Relaxed);
                }
                while let Ok(m) = s.recv(&mut answer) {
                    back_bytes.fetch_add(m as u64, Ordering::Relaxed);
                }
                i = i.wrapping_add(1);
            }
            // Late answers.
            std::thread::sleep(Duration::from_millis(200));
            for s in &sockets {
                while let Ok(m) = s.recv(&mut answer) {
                    back_bytes.fetch_add(m as u64, Ordering::Relaxed);
                }
            }
        })
    };

    // The real client, from 127.0.0.1: a new allocation, a channel and a
    // round trip through it, again and again while the flood lasts.
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let started = Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < Duration::from_millis(2500) {
        let t = Instant::now();
        let mut c = RawClient::connect(target);
        let r = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
        assert_eq!(
            Message::parse(&r).unwrap().class(),
            Class::Success,
            "allocate during the flood"
        );
        let r = c.request(Method::CHANNEL_BIND, true, |w| {
            w.channel_number(0x4000).unwrap();
            w.xor_peer_address(&echo_addr).unwrap();
        });
        assert_eq!(
            Message::parse(&r).unwrap().class(),
            Class::Success,
            "channel bind during the flood"
        );
        let mut cd = vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4];
        c.socket.send_to(&cd, target).unwrap();
        let back = c.try_recv().expect("relayed data came back during the flood");
        assert_eq!(back, cd);
        cd.clear();
        c.request(Method::REFRESH, true, |w| w.lifetime(0).unwrap());
        latencies.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();

    let (sent, packets, back) = (
        sent_bytes.load(Ordering::Relaxed),
        sent_packets.load(Ordering::Relaxed),
        back_bytes.load(Ordering::Relaxed),
    );
    latencies.sort();
    let ratio = back as f64 / sent.max(1) as f64;
    eprintln!(
        "flood: {packets} Allocates ({sent} bytes) from 200 ports, {back} bytes answered, out/in = {ratio:.4}; \
         real client: {} cycles (allocate, channel, round trip, release), all succeeded, \
         p50 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(packets > 10_000, "the flood ran ({packets} packets)");
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!("real client cycle p99 {p99:?}");
    assert!(ratio <= 1.0, "amplification: {ratio:.3} bytes out per byte in");
    assert!(
        latencies.len() >= 10,
        "the real client kept going ({} cycles)",
        latencies.len()
    );
    assert!(
        server.wait_counter("turnstile_unauthenticated_responses_suppressed_total", 1.0),
        "suppressed answers are counted"
    );
}

/// The configuration as shipped: one worker per core, every limit default.
fn default_limits_config(ports: &str) -> String {
    format!(
        r#"realm = "test.local"

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "{ports}"

[auth]
users = {{ alice = "secret" }}

[metrics]
listen = "127.0.0.1:0"
"#
    )
}

fn allocate_request(tid: u64, signed: Option<&str>) -> Vec<u8> {
    let key = turnstile::proto::auth::LongTermKey::derive(
        turnstile::proto::auth::PasswordAlgorithm::Md5,
        "alice",
        "test.local",
        "secret",
    );
    let mut id = [0u8; 12];
    id[..8].copy_from_slice(&tid.to_be_bytes());
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId(id)).unwrap();
    w.requested_transport(17).unwrap();
    if let Some(nonce) = signed {
        w.username("alice").unwrap();
        w.realm("test.local").unwrap();
        w.nonce(nonce).unwrap();
        w.message_integrity(key.hmac_sha1()).unwrap();
    }
    let n = w.finish();
    buf[..n].to_vec()
}

/// An office or carrier-grade NAT: 300 new clients from one address arrive
/// within one second (each meeting a 401 first) and all hold allocations
/// within 2 s, on the default unauthenticated-answer budget.
#[test]
fn three_hundred_new_clients_behind_one_address_all_allocate_within_two_seconds() {
    const CLIENTS: usize = 300;
    let _one = exclusive();
    let server = TestServer::start(&default_limits_config("60000-60999"));
    let target = server.udp[0];
    let sockets: Vec<UdpSocket> = (0..CLIENTS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.3:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    // Per client: the message it last sent, when, and when it got its allocation.
    let mut last: Vec<Option<(Vec<u8>, Instant)>> = vec![None; CLIENTS];
    let mut done: Vec<Option<Duration>> = vec![None; CLIENTS];
    let mut retransmissions = 0;
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    while start.elapsed() < Duration::from_secs(3) && done.iter().any(Option::is_none) {
        let now = start.elapsed();
        for i in 0..CLIENTS {
            if done[i].is_some() {
                continue;
            }
            // Arrivals spread over the first second.
            if last[i].is_none() && now >= Duration::from_micros(i as u64 * 1_000_000 / CLIENTS as u64) {
                let m = allocate_request(i as u64, None);
                sockets[i].send_to(&m, target).unwrap();
                last[i] = Some((m, Instant::now()));
            }
            while let Ok((n, _)) = sockets[i].recv_from(&mut buf) {
                let m = Message::parse(&buf[..n]).unwrap();
                match (m.class(), m.error_code().ok().flatten().map(|e| e.code)) {
                    (Class::Success, _) => done[i] = Some(start.elapsed()),
                    (_, Some(401)) => {
                        let nonce = m.nonce().unwrap().unwrap().to_owned();
                        let signed = allocate_request(1_000_000 + i as u64, Some(&nonce));
                        sockets[i].send_to(&signed, target).unwrap();
                        last[i] = Some((signed, Instant::now()));
                    }
                    other => panic!("client {i}: {other:?}"),
                }
            }
            // A client retransmits after 500 ms without an answer (RFC 8489's RTO).
            if done[i].is_none()
                && let Some((m, at)) = &mut last[i]
                && at.elapsed() > Duration::from_millis(500)
            {
                sockets[i].send_to(m, target).unwrap();
                *at = Instant::now();
                retransmissions += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let allocated = done.iter().filter(|d| d.is_some()).count();
    let slowest = done.iter().flatten().max().copied().unwrap_or_default();
    eprintln!("{allocated}/{CLIENTS} allocated, the last after {slowest:?}, {retransmissions} retransmissions");
    assert_eq!(allocated, CLIENTS, "{retransmissions} retransmissions");
    assert!(
        slowest <= Duration::from_secs(2),
        "the last allocation after {slowest:?}"
    );
}

/// A spoofed source (it never sees the 401s, so it never authenticates)
/// sending 3,000 unauthenticated Allocates a second gets at most one byte
/// back per byte it sends, on the default budget.
#[test]
fn a_spoofed_flood_from_one_source_gets_less_than_it_sends() {
    let _one = exclusive();
    let server = TestServer::start(&default_limits_config("60000-60999"));
    let target = server.udp[0];
    let socket = UdpSocket::bind("127.0.0.4:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let (mut sent, mut back) = (0u64, 0u64);
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    for i in 0..6_000u64 {
        // 3,000 a second, for 2 s.
        let due = Duration::from_micros(i * 1_000_000 / 3_000);
        while start.elapsed() < due {
            while let Ok((n, _)) = socket.recv_from(&mut buf) {
                back += n as u64;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let m = allocate_request(i, None);
        socket.send_to(&m, target).unwrap();
        sent += m.len() as u64;
    }
    std::thread::sleep(Duration::from_millis(300));
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        back += n as u64;
    }
    let ratio = back as f64 / sent as f64;
    eprintln!("spoofed flood: {sent} bytes sent, {back} back: {ratio:.3} bytes out per byte in");
    assert!(back > 0, "the budget answers some");
    assert!(ratio <= 1.0, "{ratio:.3} bytes out per byte in");
}

/// With RFC 5780 on, Binding requests can ask for answers from the other
/// address and port and to another port of the sender: the same per-source
/// budget bounds them. A flood from 200 ports of 127.0.0.2, each request
/// asking for both changes and its answer at one listening port.
#[test]
fn an_rfc5780_binding_flood_is_not_amplified() {
    let _one = exclusive();
    let port = common::free_port_pair();
    let server = TestServer::start(&common::rfc5780_config(port, true));
    let target = server.udp[0];
    let answers = UdpSocket::bind("127.0.0.2:0").unwrap();
    answers.set_nonblocking(true).unwrap();
    let answer_port = answers.local_addr().unwrap().port();
    let sockets: Vec<UdpSocket> = (0..200)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.2:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let (mut sent, mut packets, mut back) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; 128];
    let mut answer = [0u8; 1500];
    let begin = Instant::now();
    let mut i: u32 = 0;
    while begin.elapsed() < Duration::from_secs(2) {
        if u128::from(i) * 1_000_000 > begin.elapsed().as_micros() * 50_000 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&i.to_be_bytes());
        let n = {
            let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId(tid)).unwrap();
            w.change_request(true, true).unwrap();
            w.response_port(answer_port).unwrap();
            w.finish()
        };
        if sockets[i as usize % sockets.len()].send_to(&buf[..n], target).is_ok() {
            sent += n as u64;
            packets += 1;
        }
        while let Ok(m) = answers.recv(&mut answer) {
            back += m as u64;
        }
        i = i.wrapping_add(1);
    }
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(m) = answers.recv(&mut answer) {
        back += m as u64;
    }
    let ratio = back as f64 / sent.max(1) as f64;
    eprintln!("rfc5780 flood: {packets} Bindings ({sent} bytes), {back} bytes answered, out/in = {ratio:.4}");
    assert!(packets > 10_000, "the flood ran ({packets} packets)");
    assert!(back > 0, "some answers came (the budget's burst)");
    assert!(ratio <= 1.0, "amplification: {ratio:.3} bytes out per byte in");
    assert!(server.wait_counter("turnstile_unauthenticated_responses_suppressed_total", 1.0));
}
