//! The server core driven by an arbitrary sequence of events in virtual
//! time: raw datagrams and frames, well-formed signed requests with fuzzed
//! parameters (so allocations, permissions, channels and RFC 6062
//! connections really exist), peer datagrams, ICMP errors, closed
//! connections, relay bind failures and jumps in time. Nothing may panic,
//! the gauges must agree with the allocations the core reports, and once
//! every lifetime has passed everything must be gone, every relay socket
//! the driver bound closed again.
#![no_main]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::server::{
    BindResult, ClientKey, ClientOutcome, Credentials, Input, Output, ListenerId, Now, OwnRelays, PEER_HEADROOM,
    PEER_TAILROOM, PeerPolicy, Quotas, Rate, RelayId, Server, ServerConfig, ListenerKind,
};
use turnstile::proto::stun::{AddressFamily, Class, Message, MessageWriter, Method, TransactionId};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

const PEERS: [&str; 4] = ["198.51.100.1:5000", "198.51.100.2:6000", "[2001:db8::1]:7000", "127.0.0.1:9"];

struct World {
    server: Server,
    now: Now,
    out: Vec<u8>,
    keys: [ClientKey; 4],
    nonce: String,
    key: LongTermKey,
    tid: u64,
    /// Relay sockets the driver has bound and not yet been told to close.
    open_relays: HashSet<u32>,
    connections: HashSet<u32>,
}

impl World {
    /// Carries out the server's outputs as a driver would; relay binds
    /// succeed, meet EADDRINUSE or fail as the input's bytes say.
    fn drain(&mut self, bind: &mut Bytes<'_>) {
        let mut binds = 0;
        while let Some(o) = self.server.poll_output() {
            match o {
                Output::BindRelay { relay, .. } => {
                    binds += 1;
                    assert!(binds < 64, "bind retries never end");
                    let result = match bind.byte().unwrap_or(2) % 8 {
                        0 => BindResult::InUse,
                        1 => BindResult::Failed,
                        _ => BindResult::Bound,
                    };
                    if result == BindResult::Bound {
                        assert!(self.open_relays.insert(relay.0), "relay {relay:?} bound twice");
                    }
                    self.server.handle(self.now, Input::RelayBound { relay, result });
                }
                Output::CloseRelay(id) => {
                    assert!(self.open_relays.remove(&id.0), "closing relay {id:?} that is not open");
                }
                Output::TcpConnect { connection, .. } | Output::PeerConnectionAccepted { connection, .. } => {
                    self.connections.insert(connection);
                }
                Output::CloseConnection(id) => {
                    self.connections.remove(&id);
                }
                Output::Transmit { bytes, .. } => {
                    // Every message the server sends is well-formed STUN.
                    let m = Message::parse(&bytes).expect("the server's message parses");
                    if let Some(n) = m.nonce().ok().flatten() {
                        if n.starts_with("obMatJos2") {
                            self.nonce = n.to_owned();
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn client_packet(&mut self, who: usize, packet: &[u8], bind: &mut Bytes<'_>) {
        let key = self.keys[who % 4];
        let outcome = self.server.handle_client_packet(self.now, key, packet, &mut self.out);
        match outcome {
            ClientOutcome::Reply { len } | ClientOutcome::ConnectionBound { len, .. } => {
                assert!(len <= self.out.len());
                // Every answer the server writes is well-formed STUN.
                let m = Message::parse(&self.out[..len]).expect("the server's answer parses");
                if let Some(n) = m.nonce().ok().flatten() {
                    if n.starts_with("obMatJos2") {
                        self.nonce = n.to_owned();
                    }
                }
            }
            ClientOutcome::Forward { start, end, .. } => assert!(start <= end && end <= packet.len()),
            _ => {}
        }
        self.drain(bind);
    }

    fn signed(&mut self, method: Method, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.tid += 1;
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.tid.to_be_bytes());
        let mut buf = vec![0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, TransactionId(t)).unwrap();
        f(&mut w);
        w.username("user").unwrap();
        w.realm("realm").unwrap();
        w.nonce(&self.nonce).unwrap();
        w.message_integrity(self.key.hmac_sha1()).unwrap();
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    fn check(&self) {
        let g = self.server.gauges(self.now.instant);
        let total: u64 = g.allocations.iter().flatten().sum();
        let info = self.server.allocations_info(self.now.instant);
        // The gauge counts relays (a dual-stack allocation has two).
        let relays: usize = info.iter().map(|a| a.relays.len()).sum();
        assert_eq!(total as usize, relays, "gauges agree with the allocations listed");
        // Quota 6 per user, plus a 10 total: never exceeded.
        assert!(info.len() <= 10);
        // Each allocation holds at most its caps.
        assert!(g.permissions <= 8 * info.len() as u64 + 8);
        assert!(g.channels <= 4 * info.len() as u64);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(creds) = Credentials::new("realm", [("user", "pass")], &["secret".to_owned()], &[1; 32], 600) else {
        return;
    };
    let config = ServerConfig {
        ports: (50000, 50063),
        max_lifetime: 3600,
        max_permissions: 8,
        max_channels: 4,
        relay_v6: Some(turnstile::proto::server::RelayAddress {
            bind: "::1".parse().unwrap(),
            external: None,
        }),
        unauthenticated: Rate {
            bytes_per_second: 4096,
            burst: 8192,
        },
        allocation_bandwidth: Rate::from_bits_per_second(1_000_000),
        ..ServerConfig::default()
    };
    let policy = PeerPolicy::new(
        vec!["198.51.100.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()],
        vec![],
        OwnRelays::default(),
    );
    let mut server = Server::new(config, Arc::new(creds), policy, Arc::new(Quotas::new(6, 10)));
    let udp = server.add_listener(ListenerKind::Udp);
    let stream = server.add_listener(ListenerKind::Stream);
    let base = Instant::now();
    let key = |l: ListenerId, a: &str| ClientKey {
        listener: l,
        client: a.parse().unwrap(),
    };
    let mut w = World {
        server,
        now: Now {
            instant: base,
            unix: 1_700_000_000,
        },
        out: vec![0u8; 1500],
        keys: [
            key(udp, "192.0.2.1:4000"),
            key(udp, "192.0.2.1:4001"),
            key(stream, "192.0.2.2:5000"),
            key(udp, "[2001:db8:1::1]:6000"),
        ],
        nonce: String::new(),
        key: LongTermKey::derive(PasswordAlgorithm::Md5, "user", "realm", "pass"),
        tid: 0,
        open_relays: HashSet::new(),
        connections: HashSet::new(),
    };
    // A first challenge, for the nonce the signed requests use.
    let challenge = {
        let mut buf = vec![0u8; 64];
        let mut m = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId([9; 12])).unwrap();
        m.requested_transport(17).unwrap();
        let n = m.finish();
        buf.truncate(n);
        buf
    };
    let mut none = Bytes(&[]);
    w.client_packet(0, &challenge, &mut none);

    let mut input = Bytes(data);
    let mut peer_buf = vec![0u8; PEER_HEADROOM + 1500 + PEER_TAILROOM];
    while let Some(op) = input.byte() {
        let arg = input.byte().unwrap_or(0);
        let who = usize::from(arg >> 6);
        let peer: SocketAddr = PEERS[usize::from(arg & 3)].parse().unwrap();
        match op % 12 {
            0 => {
                // Raw bytes as a client datagram or frame.
                let len = usize::from(input.byte().unwrap_or(0));
                let packet = input.take(len).to_vec();
                w.client_packet(who, &packet, &mut input);
            }
            1 => {
                let transport = if arg & 4 == 0 { 17 } else { 6 };
                let family = arg & 8 != 0;
                let lifetime = u32::from(input.byte().unwrap_or(0)) * 30;
                let m = w.signed(Method::ALLOCATE, |m| {
                    m.requested_transport(transport).unwrap();
                    m.lifetime(lifetime).unwrap();
                    if family {
                        m.additional_address_family(AddressFamily::V6).unwrap();
                    }
                    if arg & 16 != 0 {
                        m.even_port(arg & 32 != 0).unwrap();
                    }
                    if arg & 32 != 0 && arg & 16 == 0 {
                        m.dont_fragment().unwrap();
                    }
                });
                w.client_packet(who, &m, &mut input);
            }
            2 => {
                let lifetime = u32::from(input.byte().unwrap_or(0)) * 30;
                let m = w.signed(Method::REFRESH, |m| m.lifetime(lifetime).unwrap());
                w.client_packet(who, &m, &mut input);
            }
            3 => {
                let m = w.signed(Method::CREATE_PERMISSION, |m| m.xor_peer_address(&peer).unwrap());
                w.client_packet(who, &m, &mut input);
            }
            4 => {
                let channel = 0x4000 + u16::from(input.byte().unwrap_or(0) % 8);
                let m = w.signed(Method::CHANNEL_BIND, |m| {
                    m.channel_number(channel).unwrap();
                    m.xor_peer_address(&peer).unwrap();
                });
                w.client_packet(who, &m, &mut input);
            }
            5 => {
                // Send indication or ChannelData with fuzzed payload.
                let len = usize::from(input.byte().unwrap_or(0));
                let payload = input.take(len).to_vec();
                if arg & 4 == 0 {
                    let mut buf = vec![0u8; 1500];
                    let mut m = MessageWriter::new(&mut buf, Class::Indication, Method::SEND, TransactionId([3; 12])).unwrap();
                    m.xor_peer_address(&peer).unwrap();
                    m.data(&payload).unwrap();
                    let n = m.finish();
                    buf.truncate(n);
                    w.client_packet(who, &buf, &mut input);
                } else {
                    let mut cd = (0x4000 + u16::from(arg & 7)).to_be_bytes().to_vec();
                    cd.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                    cd.extend_from_slice(&payload);
                    w.client_packet(who, &cd, &mut input);
                }
            }
            6 => {
                let m = w.signed(Method::CONNECT, |m| m.xor_peer_address(&peer).unwrap());
                w.client_packet(who, &m, &mut input);
            }
            7 => {
                // A peer datagram on some relay.
                let relay = RelayId(u32::from(input.byte().unwrap_or(0) % 16));
                let len = usize::from(input.byte().unwrap_or(0)).min(1500);
                let out = w
                    .server
                    .handle_peer_packet(w.now.instant, relay, peer, &mut peer_buf, PEER_HEADROOM, len);
                if let turnstile::proto::server::PeerOutcome::ToClient { start, end, .. } = out {
                    assert!(start <= end && end <= peer_buf.len());
                }
            }
            8 => {
                let relay = RelayId(u32::from(input.byte().unwrap_or(0) % 16));
                w.server.handle(
                    w.now,
                    Input::RelayIcmp {
                        relay,
                        peer,
                        icmp_type: 3,
                        icmp_code: arg,
                        info: u32::from(arg),
                    },
                );
                w.drain(&mut Bytes(&[]));
            }
            9 => {
                let key = w.keys[who];
                w.server.handle(w.now, Input::ClientClosed { key });
                w.drain(&mut Bytes(&[]));
            }
            10 => {
                // TCP relay events: a connection attempt completes, a peer connects, one closes.
                let connection = w.connections.iter().next().copied();
                match (arg & 3, connection) {
                    (0, Some(c)) => w.server.handle(
                        w.now,
                        Input::TcpConnected {
                            connection: c,
                            connected: arg & 4 != 0,
                        },
                    ),
                    (1, _) => {
                        let relay = RelayId(u32::from(arg >> 2) % 16);
                        w.server.handle(w.now, Input::TcpPeerAccepted { relay, peer });
                    }
                    (2, Some(c)) => w.server.handle(w.now, Input::TcpConnectionClosed { connection: c }),
                    _ => {}
                }
                w.drain(&mut Bytes(&[]));
            }
            _ => {
                // Time passes: up to ~4 minutes, or a nonce lifetime.
                let secs = u64::from(input.byte().unwrap_or(0));
                let secs = if arg & 1 == 0 { secs } else { secs * 4 };
                w.now.instant += Duration::from_secs(secs);
                w.now.unix += secs;
                if w.server.poll_timeout().is_some_and(|t| t <= w.now.instant) {
                    w.server.handle_timeout(w.now);
                }
                w.drain(&mut Bytes(&[]));
            }
        }
        w.check();
    }
    // Once every lifetime has passed, nothing is left.
    w.now.instant += Duration::from_secs(7200);
    w.now.unix += 7200;
    w.server.handle_timeout(w.now);
    w.drain(&mut Bytes(&[]));
    let g = w.server.gauges(w.now.instant);
    let total: u64 = g.allocations.iter().flatten().sum();
    assert_eq!(total, 0, "allocations outlived their lifetime");
    assert_eq!((g.permissions, g.channels), (0, 0));
    assert!(w.open_relays.is_empty(), "relays never closed: {:?}", w.open_relays);
});
