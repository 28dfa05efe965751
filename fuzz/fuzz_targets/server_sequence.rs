//! The server core driven by an arbitrary sequence of events in virtual
//! time: raw datagrams and frames, well-formed signed requests with fuzzed
//! parameters (so allocations, permissions, channels and RFC 6062
//! connections really exist), peer datagrams, ICMP errors, closed
//! connections, relay bind failures and jumps in time. Nothing may panic,
//! the gauges must agree with the allocations the core reports, and once
//! every lifetime has passed everything must be gone, every relay socket
//! the driver bound closed again.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use turnstile::testing::{Creds, Harness, REALM};
use turnstile::proto::server::{
    BindResult, ClientKey, ClientOutcome, Credentials, Input, ListenerId, Output, OwnRelays, PEER_HEADROOM,
    PEER_TAILROOM, PeerPolicy, Quotas, Rate, RelayId, ServerConfig,
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
    /// The core's test harness: the driver, in virtual time.
    h: Harness,
    keys: [ClientKey; 4],
    creds: Creds,
}

impl World {
    /// What the core sent since the last look: every message is well-formed
    /// STUN, and a fresh nonce is kept for the signed requests.
    fn look(&mut self) {
        for (_, bytes) in self.h.sent.drain(..) {
            let m = Message::parse(&bytes).expect("the server's message parses");
            if let Some(n) = m.nonce().ok().flatten() {
                if n.starts_with("obMatJos2") {
                    self.creds.nonce = n.to_owned();
                }
            }
        }
        self.h.events.clear();
        // A driver closes what the core closes, and says so.
        let closing: Vec<ClientKey> = self
            .h
            .commands
            .drain(..)
            .filter_map(|c| match c {
                Output::CloseClient { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        for key in closing {
            self.h.input(Input::ClientClosed { key });
            self.look();
        }
    }

    /// A datagram or frame from client `who`; relay binds succeed, meet
    /// EADDRINUSE or fail as the input's bytes say.
    fn client_packet(&mut self, who: usize, packet: &[u8], bind: &mut Bytes<'_>) {
        self.h.key = self.keys[who % 4];
        let outcome = self.h.send_with(packet, |_, _, _| match bind.byte().unwrap_or(2) % 8 {
            0 => BindResult::InUse,
            1 => BindResult::Failed,
            _ => BindResult::Bound,
        });
        match outcome {
            ClientOutcome::Reply { len } | ClientOutcome::ConnectionBound { len, .. } => {
                assert!(len <= self.h.out.len());
                // Every answer the server writes is well-formed STUN.
                let m = Message::parse(&self.h.out[..len]).expect("the server's answer parses");
                if let Some(n) = m.nonce().ok().flatten() {
                    if n.starts_with("obMatJos2") {
                        self.creds.nonce = n.to_owned();
                    }
                }
            }
            ClientOutcome::Forward { start, end, .. } => assert!(start <= end && end <= packet.len()),
            _ => {}
        }
        self.look();
    }

    fn input(&mut self, input: Input) {
        self.h.input(input);
        self.look();
    }

    fn signed(&mut self, method: Method, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        let c = self.creds.clone();
        self.h.signed(method, &c, f)
    }

    fn check(&self) {
        let g = self.h.server.gauges(self.h.now);
        let total: u64 = g.allocations.iter().flatten().sum();
        let info = self.h.server.allocations_info(self.h.now);
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
    let Ok(creds) = Credentials::new(REALM, [("user", "pass")], &["secret".to_owned()], &[1; 32], 600) else {
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
    let mut h = Harness::with_credentials(config, creds, policy, Quotas::new(6, 10));
    let (udp, stream) = (ListenerId(0), ListenerId(1));
    let key = |l: ListenerId, a: &str| ClientKey {
        listener: l,
        client: a.parse().unwrap(),
    };
    let keys = [
        key(udp, "192.0.2.1:4000"),
        key(udp, "192.0.2.1:4001"),
        key(stream, "192.0.2.2:5000"),
        key(udp, "[2001:db8:1::1]:6000"),
    ];
    h.key = keys[0];
    h.input(Input::StreamOpened { key: keys[2] });
    // A first challenge, for the nonce the signed requests use.
    let creds = h.creds("user", "pass");
    let mut w = World { h, keys, creds };

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
                    .h
                    .server
                    .handle_peer_packet(w.h.now.instant, relay, peer, &mut peer_buf, PEER_HEADROOM, len);
                if let turnstile::proto::server::PeerOutcome::ToClient { start, end, .. } = out {
                    assert!(start <= end && end <= peer_buf.len());
                }
            }
            8 => {
                let relay = RelayId(u32::from(input.byte().unwrap_or(0) % 16));
                w.input(Input::RelayIcmp {
                    relay,
                    peer,
                    icmp_type: 3,
                    icmp_code: arg,
                    info: u32::from(arg),
                });
            }
            9 => {
                let key = w.keys[who];
                w.input(Input::ClientClosed { key });
            }
            10 => {
                // TCP relay events: a connection attempt completes, a peer connects, one closes.
                let connection = w.h.tcp_connections.iter().next().copied();
                match (arg & 3, connection) {
                    (0, Some(c)) => w.input(Input::TcpConnected {
                        connection: c,
                        connected: arg & 4 != 0,
                    }),
                    (1, _) => {
                        let relay = RelayId(u32::from(arg >> 2) % 16);
                        w.input(Input::TcpPeerAccepted { relay, peer });
                    }
                    (2, Some(c)) => w.input(Input::TcpConnectionClosed { connection: c }),
                    (3, _) => {
                        // What the stream driver reports about a read.
                        let key = w.keys[who];
                        w.input(Input::StreamProgress {
                            key,
                            completed: arg & 4 != 0,
                            partial: arg & 8 != 0,
                        });
                    }
                    _ => {}
                }
            }
            _ => {
                // Time passes: up to ~4 minutes, or a nonce lifetime.
                let secs = u64::from(input.byte().unwrap_or(0));
                let secs = if arg & 1 == 0 { secs } else { secs * 4 };
                w.h.advance(secs);
                w.look();
            }
        }
        w.check();
    }
    // Once every lifetime has passed, nothing is left.
    w.h.advance(7200);
    w.look();
    let g = w.h.server.gauges(w.h.now);
    let total: u64 = g.allocations.iter().flatten().sum();
    assert_eq!(total, 0, "allocations outlived their lifetime");
    assert_eq!((g.permissions, g.channels), (0, 0));
    assert!(w.h.open_relays.is_empty(), "relays never closed: {:?}", w.h.open_relays);
    // Every deadline was acted on (the stream client was closed as idle).
    assert_eq!(w.h.server.pending_timers(), 0, "deadlines left after everything ended");
});
