//! Relaying into places a public TURN server must never reach: every
//! encoding of loopback, unspecified, link-local, metadata, private,
//! multicast and other special addresses, through CreatePermission,
//! ChannelBind, Send and (RFC 6062) Connect, against the running server
//! with its default peer policy. All refused.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::raw::RawClient;
use common::{TestServer, loopback_config};
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// Addresses and what they are. The relay itself is on 127.0.0.2 and ::1.
const FORBIDDEN: &[(&str, &str)] = &[
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback, top of the range"),
    ("10.0.0.1", "private 10/8"),
    ("172.16.5.4", "private 172.16/12"),
    ("172.31.255.254", "private 172.16/12, top"),
    ("192.168.1.1", "private 192.168/16"),
    ("100.64.0.1", "shared address space 100.64/10"),
    ("100.127.255.254", "shared address space, top"),
    ("169.254.169.254", "cloud metadata (link-local)"),
    ("169.254.1.1", "link-local"),
    ("192.0.0.1", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast (SSDP)"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "limited broadcast"),
    ("::", "IPv6 unspecified"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("::ffff:0:127.0.0.1", "IPv4-translated (SIIT) loopback"),
    ("::ffff:0:169.254.169.254", "IPv4-translated (SIIT) metadata"),
    ("64:ff9b:1:7f00:1::", "local-use NAT64, /48 embedding of 127.0.0.1"),
    ("2001:db9::5efe:a9fe:a9fe", "ISATAP interface id around 169.254.169.254"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("::a9fe:a9fe", "IPv4-compatible metadata"),
    ("2002:7f00:1::", "6to4 of 127.0.0.1"),
    ("2002:a9fe:a9fe::1", "6to4 of 169.254.169.254"),
    ("2002:c0a8:101::1", "6to4 of 192.168.1.1"),
    ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"),
    ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
    ("64:ff9b:1::a00:1", "local-use NAT64 prefix"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo, client 127.0.0.1"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo, client 169.254.169.254"),
    ("fe80::1", "IPv6 link-local"),
    ("febf::1", "IPv6 link-local, top"),
    ("fec0::1", "site-local (deprecated)"),
    ("fc00::1", "unique local"),
    ("fd00:ec2::254", "unique local (cloud metadata over IPv6)"),
    ("ff02::1", "IPv6 multicast"),
    ("ff05::2", "IPv6 multicast, site"),
    ("100::1", "discard-only"),
    ("2001:db8::1", "IPv6 documentation"),
    ("2001:2::1", "IPv6 benchmarking"),
];

/// Send indications to a peer without a permission (none can exist here).
const NO_PERMISSION: &str = r#"turnstile_dropped_packets_total{reason="no_permission"}"#;

fn is_forbidden_answer(resp: &[u8]) -> bool {
    let m = Message::parse(resp).unwrap();
    m.class() == Class::Error && m.error_code().unwrap().unwrap().code == 403
}

#[test]
fn every_encoding_of_a_forbidden_peer_is_refused() {
    let server = TestServer::start(&loopback_config(
        r#"
[[listen]]
transport = "tcp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.2"
ipv6_address = "::1"
ports = "61400-61499"

[auth]
users = { alice = "secret" }

[limits]
user_quota = 0
"#,
    ));
    let udp = server.udp[0];

    // A dual-stack allocation, so IPv6 peers meet the policy rather than a family mismatch.
    let mut c = RawClient::connect(udp);
    let r = c.request(Method::ALLOCATE, true, |w| {
        w.requested_transport(17).unwrap();
        w.additional_address_family(turnstile::proto::stun::address::AddressFamily::V6)
            .unwrap();
    });
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class(), Class::Success, "dual-stack allocate: {:?}", m.error_code());

    let refused_before = server.counter(NO_PERMISSION);
    for (channel, (addr, what)) in (0x4000u16..).zip(FORBIDDEN) {
        let ip: IpAddr = addr.parse().unwrap();
        let peer = SocketAddr::new(ip, 3478);
        let r = c.request(Method::CREATE_PERMISSION, true, |w| w.xor_peer_address(&peer).unwrap());
        assert!(is_forbidden_answer(&r), "CreatePermission {addr} ({what}) not refused");
        let r = c.request(Method::CHANNEL_BIND, true, |w| {
            w.channel_number(channel).unwrap();
            w.xor_peer_address(&peer).unwrap();
        });
        assert!(is_forbidden_answer(&r), "ChannelBind {addr} ({what}) not refused");
        c.indication(Method::SEND, |w| {
            w.xor_peer_address(&peer).unwrap();
            w.data(b"should never leave").unwrap();
        });
    }
    // Every Send was dropped (no permission could exist), and counted.
    assert!(
        server.wait_counter(NO_PERMISSION, refused_before + FORBIDDEN.len() as f64),
        "the Send indications were not all counted as dropped"
    );
    // The policy's own counters saw every refusal (two per address).
    assert!(
        server.wait_counter(
            r#"turnstile_peer_refused_total{reason="special_purpose"}"#,
            2.0 * FORBIDDEN.len() as f64
        ),
        "peer refusals not counted: {}",
        server.scrape()
    );

    // RFC 6062 Connect from a TCP allocation.
    let mut tcp = TcpClient::connect(server.tcp[0]);
    let r = tcp.request(Method::ALLOCATE, |w| w.requested_transport(6).unwrap());
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success, "TCP allocate");
    for (addr, what) in FORBIDDEN.iter().filter(|(a, _)| a.parse::<IpAddr>().unwrap().is_ipv4()) {
        let peer = SocketAddr::new(addr.parse().unwrap(), 80);
        let r = tcp.request(Method::CONNECT, |w| w.xor_peer_address(&peer).unwrap());
        assert!(is_forbidden_answer(&r), "Connect {addr} ({what}) not refused");
    }
}

/// A TURN client over TCP (control connection), signing with alice's key.
struct TcpClient {
    stream: TcpStream,
    key: LongTermKey,
    nonce: String,
    tid: u8,
}

impl TcpClient {
    fn connect(addr: SocketAddr) -> TcpClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = TcpClient {
            stream,
            key: LongTermKey::derive(PasswordAlgorithm::Md5, "alice", "test.local", "secret"),
            nonce: String::new(),
            tid: 100,
        };
        let r = c.request(Method::ALLOCATE, |w| w.requested_transport(6).unwrap());
        c.nonce = Message::parse(&r).unwrap().nonce().unwrap().unwrap().to_owned();
        c
    }

    fn request(&mut self, method: Method, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.tid += 1;
        let mut buf = [0u8; 1024];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, TransactionId([self.tid; 12])).unwrap();
        f(&mut w);
        if !self.nonce.is_empty() {
            w.username("alice").unwrap();
            w.realm("test.local").unwrap();
            w.nonce(&self.nonce).unwrap();
            w.message_integrity(self.key.hmac_sha1()).unwrap();
        }
        let n = w.finish();
        self.stream.write_all(&buf[..n]).unwrap();
        let mut head = [0u8; 20];
        self.stream.read_exact(&mut head).unwrap();
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let mut m = head.to_vec();
        m.resize(20 + len, 0);
        self.stream.read_exact(&mut m[20..]).unwrap();
        m
    }
}
