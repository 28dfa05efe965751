//! The core's state survives a live upgrade: a core exported at any point
//! of a random TURN session and restored into a fresh core (through the
//! serialized bytes) behaves exactly as the original on the same events
//! from then on — the same responses byte for byte, the same relaying, the
//! same expiries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use turnstile::proto::server::snapshot::{Snapshot, SnapshotError, VERSION};
use turnstile::proto::server::{
    ClientKey, ClientOutcome, ListenerId, Output, PEER_HEADROOM, PEER_TAILROOM, PeerOutcome, Quotas, RelayId,
};
use turnstile::proto::stun::{Class, Message, Method, TransactionId};
use turnstile::testing::{self, Harness, build, key_for};

const CLIENTS: [&str; 3] = ["192.0.2.10:40000", "192.0.2.11:40001", "192.0.2.12:40002"];
const USERS: [(&str, &str); 3] = [("alice", "secret"), ("alice", "secret"), ("bob", "hunter2")];
const PEERS: [&str; 3] = ["203.0.113.5:5000", "203.0.113.6:5001", "203.0.113.5:5002"];
const NUMBERS: [u16; 3] = [0x4000, 0x4001, 0x7ffe];

#[derive(Debug, Clone)]
enum Op {
    Nonce(usize),
    Allocate(usize, bool),
    Refresh(usize, u32),
    Permit(usize, usize),
    Bind(usize, usize, usize),
    ChannelData(usize, usize, u8),
    Send(usize, usize),
    FromPeer(usize, usize, u8),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS.len();
    let p = 0..PEERS.len();
    prop_oneof![
        c.clone().prop_map(Op::Nonce),
        (c.clone(), any::<bool>()).prop_map(|(c, even)| Op::Allocate(c, even)),
        (c.clone(), prop_oneof![Just(0u32), Just(600), Just(3000)]).prop_map(|(c, l)| Op::Refresh(c, l)),
        (c.clone(), p.clone()).prop_map(|(c, p)| Op::Permit(c, p)),
        (c.clone(), 0..NUMBERS.len(), p.clone()).prop_map(|(c, n, p)| Op::Bind(c, n, p)),
        (c.clone(), 0..NUMBERS.len(), any::<u8>()).prop_map(|(c, n, l)| Op::ChannelData(c, n, l)),
        (c.clone(), p.clone()).prop_map(|(c, p)| Op::Send(c, p)),
        (c, p, any::<u8>()).prop_map(|(c, p, l)| Op::FromPeer(c, p, l)),
        prop_oneof![Just(1u64), Just(30), Just(290), Just(310), Just(590), Just(700)].prop_map(Op::Advance),
    ]
}

/// One core under test, with what a driver would know of it: each
/// client's relays (from the core's events) and each client's nonce.
struct Side {
    h: Harness,
    relays: BTreeMap<RelayId, SocketAddr>,
    by_client: BTreeMap<SocketAddr, Vec<RelayId>>,
}

impl Side {
    fn new() -> Side {
        let h = Harness::with(
            testing::config(),
            testing::policy(&["203.0.113.0/24"]),
            Quotas::new(10, 0),
        );
        Side {
            h,
            relays: BTreeMap::new(),
            by_client: BTreeMap::new(),
        }
    }

    /// Whatever came out since the last look, with relay ids replaced by
    /// where the relays are bound (ids are the core's own business).
    fn observe(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        for o in self.h.events.drain(..).chain(self.h.commands.drain(..)) {
            match &o {
                Output::AllocationCreated { key, relays, .. } => {
                    let ids: Vec<RelayId> = relays.iter().flatten().map(|(id, _)| *id).collect();
                    for (id, addr) in relays.iter().flatten() {
                        self.relays.insert(*id, *addr);
                    }
                    self.by_client.insert(key.client, ids);
                }
                Output::AllocationEnded { key, .. } => {
                    self.by_client.remove(&key.client);
                }
                _ => {}
            }
            let mut line = format!("{o:?}");
            for (id, addr) in &self.relays {
                line = line.replace(&format!("{id:?}"), &addr.to_string());
            }
            seen.push(line);
        }
        for (key, bytes) in self.h.sent.drain(..) {
            seen.push(format!("sent {key:?} {bytes:?}"));
        }
        // Things that happen at one instant to different allocations come
        // in no defined order.
        seen.sort();
        seen
    }

    fn relay_name(&self, id: RelayId) -> String {
        self.relays.get(&id).map(|a| a.to_string()).unwrap_or_default()
    }

    fn send(&mut self, client: usize, packet: &[u8]) -> String {
        self.h.key = ClientKey {
            listener: ListenerId(0),
            client: CLIENTS[client].parse().unwrap(),
        };
        match self.h.send(packet) {
            ClientOutcome::Reply { len } => format!("reply {:?}", &self.h.out[..len]),
            ClientOutcome::Forward {
                relay,
                peer,
                start,
                end,
            } => format!("forward via {} to {peer} [{start}..{end}]", self.relay_name(relay)),
            other => format!("{other:?}"),
        }
    }

    fn peer_sends(&mut self, client: usize, peer: usize, len: u8) -> String {
        let client: SocketAddr = CLIENTS[client].parse().unwrap();
        let Some(relay) = self.by_client.get(&client).and_then(|r| r.first()).copied() else {
            return "no relay".into();
        };
        let mut buf = vec![0u8; PEER_HEADROOM + usize::from(len) + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + usize::from(len)].fill(len);
        let now = self.h.now.instant;
        let outcome = self.h.server.handle_peer_packet(
            now,
            relay,
            PEERS[peer].parse().unwrap(),
            &mut buf,
            PEER_HEADROOM,
            usize::from(len),
        );
        match outcome {
            PeerOutcome::ToClient { key, start, end } => format!("to {key:?} {:?}", &buf[start..end]),
            PeerOutcome::Drop(r) => format!("drop {r:?}"),
        }
    }
}

/// Requests are built once and sent to both cores, byte for byte.
struct Client {
    nonce: [Option<String>; 3],
    next_tid: u64,
}

impl Client {
    fn tid(&mut self) -> TransactionId {
        self.next_tid += 1;
        let mut t = [0xab; 12];
        t[4..].copy_from_slice(&self.next_tid.to_be_bytes());
        TransactionId(t)
    }

    fn signed(
        &mut self,
        client: usize,
        method: Method,
        f: impl FnOnce(&mut turnstile::proto::stun::MessageWriter<'_>),
    ) -> Vec<u8> {
        let (user, password) = USERS[client];
        let nonce = self.nonce[client].clone().unwrap_or_else(|| "none".into());
        let tid = self.tid();
        build(Class::Request, method, tid, |w| {
            f(w);
            w.username(user).unwrap();
            w.realm(testing::REALM).unwrap();
            w.nonce(&nonce).unwrap();
            w.message_integrity(key_for(user, password).hmac_sha1()).unwrap();
            w.fingerprint().unwrap();
        })
    }

    /// The request of `op`, if it is one.
    fn request(&mut self, op: &Op) -> Option<(usize, Vec<u8>)> {
        let peer = |p: usize| -> SocketAddr { PEERS[p].parse().unwrap() };
        Some(match *op {
            Op::Nonce(c) => {
                let tid = self.tid();
                (
                    c,
                    build(Class::Request, Method::ALLOCATE, tid, |w| {
                        w.requested_transport(17).unwrap()
                    }),
                )
            }
            Op::Allocate(c, even) => (
                c,
                self.signed(c, Method::ALLOCATE, |w| {
                    w.requested_transport(17).unwrap();
                    if even {
                        w.even_port(true).unwrap();
                    }
                }),
            ),
            Op::Refresh(c, l) => (c, self.signed(c, Method::REFRESH, |w| w.lifetime(l).unwrap())),
            Op::Permit(c, p) => (
                c,
                self.signed(c, Method::CREATE_PERMISSION, |w| w.xor_peer_address(&peer(p)).unwrap()),
            ),
            Op::Bind(c, n, p) => (
                c,
                self.signed(c, Method::CHANNEL_BIND, |w| {
                    w.channel_number(NUMBERS[n]).unwrap();
                    w.xor_peer_address(&peer(p)).unwrap();
                }),
            ),
            Op::ChannelData(c, n, len) => {
                let mut packet = NUMBERS[n].to_be_bytes().to_vec();
                packet.extend_from_slice(&u16::from(len).to_be_bytes());
                packet.extend(std::iter::repeat_n(len, usize::from(len)));
                (c, packet)
            }
            Op::Send(c, p) => {
                let tid = self.tid();
                (
                    c,
                    build(Class::Indication, Method::SEND, tid, |w| {
                        w.xor_peer_address(&peer(p)).unwrap();
                        w.data(b"hello").unwrap();
                    }),
                )
            }
            Op::FromPeer(..) | Op::Advance(_) => return None,
        })
    }

    /// Learns a nonce from a 401 or 438 answer.
    fn learn(&mut self, client: usize, reply: &[u8]) {
        if let Ok(m) = Message::parse(reply)
            && let Ok(Some(n)) = m.nonce()
        {
            self.nonce[client] = Some(n.to_owned());
        }
    }
}

/// Runs `op` on one side; what it observably did.
fn run(side: &mut Side, op: &Op, request: Option<&(usize, Vec<u8>)>) -> Vec<String> {
    let mut seen = Vec::new();
    match (op, request) {
        (Op::Advance(s), _) => side.h.advance_by(Duration::from_secs(*s)),
        (Op::FromPeer(c, p, l), _) => seen.push(side.peer_sends(*c, *p, *l)),
        (_, Some((c, packet))) => seen.push(side.send(*c, packet)),
        _ => {}
    }
    seen.extend(side.observe());
    seen
}

fn reply_of(seen: &[String]) -> Option<Vec<u8>> {
    let body = seen.first()?.strip_prefix("reply ")?;
    let inner = body.trim_start_matches('[').trim_end_matches(']');
    inner.split(", ").map(|b| b.parse().ok()).collect()
}

fn round_trip(side: &Side) -> Side {
    let now = side.h.now;
    let snapshot = side.h.server.export(now.instant, now.unix * 1000, |_| true);
    let bytes = snapshot.to_bytes();
    let decoded = Snapshot::from_bytes(&bytes).expect("decodes");
    assert_eq!(decoded, snapshot);
    let mut fresh = Side::new();
    fresh.h.now = now;
    fresh.h.base = side.h.base;
    let relays = fresh
        .h
        .server
        .restore(decoded, now.instant, now.unix * 1000, Some, false)
        .expect("restores");
    // The driver holds the handed-over sockets.
    fresh.h.open_relays.extend(relays);
    fresh.h.drain();
    // What the restore announced (the allocations, permissions, channels)
    // teaches the driver its relays; it is not part of the comparison.
    fresh.observe();
    fresh
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_restored_core_behaves_as_the_original(
        before in prop::collection::vec(op(), 0..30),
        after in prop::collection::vec(op(), 1..30),
    ) {
        let mut client = Client { nonce: [None, None, None], next_tid: 0 };
        let mut original = Side::new();
        for op in &before {
            let req = client.request(op);
            let seen = run(&mut original, op, req.as_ref());
            if let (Some((c, _)), Some(reply)) = (&req, reply_of(&seen)) {
                client.learn(*c, &reply);
            }
        }
        let mut restored = round_trip(&original);
        prop_assert_eq!(original.h.server.allocation_count(), restored.h.server.allocation_count());
        for op in &after {
            let req = client.request(op);
            let a = run(&mut original, op, req.as_ref());
            let b = run(&mut restored, op, req.as_ref());
            prop_assert_eq!(&a, &b, "after {:?}", op);
            if let (Some((c, _)), Some(reply)) = (&req, reply_of(&a)) {
                client.learn(*c, &reply);
            }
        }
        prop_assert_eq!(original.h.server.allocation_count(), restored.h.server.allocation_count());
    }
}

#[test]
fn a_snapshot_of_another_version_is_refused_by_name() {
    let h = Harness::new();
    let mut snapshot = h.server.export(h.now.instant, h.now.unix * 1000, |_| true);
    snapshot.version = VERSION + 1;
    assert_eq!(
        Snapshot::from_bytes(&snapshot.to_bytes()),
        Err(SnapshotError::Version(VERSION + 1))
    );
    assert!(matches!(
        Snapshot::from_bytes(&[1, 2]),
        Err(SnapshotError::Malformed(_) | SnapshotError::Version(_))
    ));
}

/// A core with one allocation of `user`'s, and its snapshot.
fn one_allocation(user: &str, password: &str) -> (Harness, Snapshot) {
    let mut h = Harness::new();
    let c = h.creds(user, password);
    h.allocate(&c);
    let now = h.now;
    let snapshot = h.server.export(now.instant, now.unix * 1000, |_| true);
    (h, snapshot)
}

#[test]
fn time_spent_in_the_hand_over_counts_against_every_lifetime() {
    let (h, snapshot) = one_allocation("alice", "secret");
    let now = h.now;
    // The new process restores it 100 s of wall clock later.
    let mut fresh = Harness::new();
    fresh.now = now;
    let restored = fresh
        .server
        .restore(snapshot, now.instant, now.unix * 1000 + 100_000, Some, false)
        .unwrap();
    assert_eq!(restored.len(), 1);
    fresh.open_relays.extend(restored);
    fresh.drain();
    fresh.advance(499);
    assert_eq!(fresh.server.allocation_count(), 1);
    fresh.advance(2);
    assert_eq!(
        fresh.server.allocation_count(),
        0,
        "600 s lifetime, 100 s spent in transit"
    );
}

#[test]
fn an_allocation_whose_listener_is_gone_is_left_out_with_its_relay() {
    let (h, snapshot) = one_allocation("alice", "secret");
    let now = h.now;
    let mut fresh = Harness::new();
    let restored = fresh
        .server
        .restore(snapshot, now.instant, now.unix * 1000, |_| None, false)
        .unwrap();
    assert!(restored.is_empty());
    assert_eq!(fresh.server.allocation_count(), 0);
}

#[test]
fn a_user_the_new_configuration_removed_is_revoked_as_a_reload_would() {
    let (h, snapshot) = one_allocation("bob", "hunter2");
    let now = h.now;
    let creds =
        turnstile::proto::server::Credentials::new(testing::REALM, [("alice", "secret")], &[], &[9; 32], 600).unwrap();
    let mut fresh = Harness::with_credentials(testing::config(), creds, testing::policy(&[]), Quotas::new(10, 0));
    let relays = fresh
        .server
        .restore(snapshot, now.instant, now.unix * 1000, Some, true)
        .unwrap();
    fresh.open_relays.extend(relays);
    fresh.drain();
    assert_eq!(fresh.server.allocation_count(), 0);
    assert!(
        fresh
            .events
            .iter()
            .any(|e| matches!(e, Output::AllocationEnded { reason, .. } if reason.label() == "revoked"))
    );
}

/// A TCP allocation for alice on the stream listener, with one peer
/// connection made and waiting for its data connection.
fn tcp_allocation_with_a_waiting_peer(h: &mut Harness) -> (testing::Creds, u32) {
    h.key.listener = ListenerId(1);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(6).unwrap());
    assert_eq!(testing::code(&h.exchange(&req)), 0);
    let (_, _, waiting) = h.connect(&c, testing::sa("8.8.8.8:443"));
    h.tcp_connected(waiting, true).unwrap();
    (c, waiting)
}

/// A fresh core at `snapshot`'s moment with it restored, its driver
/// holding the handed-over relays and these peer connections.
fn restored(h: &Harness, snapshot: Snapshot, connections: &[u32]) -> Harness {
    let now = h.now;
    let mut fresh = Harness::new();
    fresh.now = now;
    fresh.base = h.base;
    let relays = fresh
        .server
        .restore(snapshot, now.instant, now.unix * 1000, Some, false)
        .unwrap();
    fresh.open_relays.extend(relays);
    fresh.tcp_connections.extend(connections.iter().copied());
    fresh.drain();
    fresh
}

#[test]
fn rfc6062_connections_cross_with_their_state_and_a_connect_under_way_keeps_its_allocation() {
    use turnstile::testing::sa;
    let mut h = Harness::new();
    let (c, waiting) = tcp_allocation_with_a_waiting_peer(&mut h);
    let control = h.key;
    // A second client's allocation has a Connect under way: it cannot move.
    h.key.client.set_port(41000);
    let busy = h.key;
    let c2 = h.creds("bob", "hunter2");
    let req = h.signed(Method::ALLOCATE, &c2, |w| w.requested_transport(6).unwrap());
    assert_eq!(testing::code(&h.exchange(&req)), 0);
    h.connect(&c2, sa("8.8.4.4:443"));
    assert!(h.server.can_hand_over(&control));
    assert!(!h.server.can_hand_over(&busy));

    h.advance(10);
    let now = h.now;
    let snapshot = h.server.export(now.instant, now.unix * 1000, |_| true);
    assert_eq!(
        snapshot.allocations.len(),
        1,
        "the allocation with a Connect under way stays"
    );
    assert_eq!(snapshot.allocations[0].connections.len(), 1);
    let snapshot = Snapshot::from_bytes(&snapshot.to_bytes()).unwrap();
    let mut fresh = restored(&h, snapshot, &[waiting]);
    assert!(fresh.server.knows_connection(waiting));
    // The data connection binds on the new core…
    fresh.key = ClientKey {
        listener: ListenerId(1),
        client: "192.0.2.10:40200".parse().unwrap(),
    };
    let bind = build(Class::Request, Method::CONNECTION_BIND, TransactionId([7; 12]), |w| {
        w.connection_id(waiting).unwrap();
        w.username("alice").unwrap();
        w.realm(testing::REALM).unwrap();
        w.nonce(&c.nonce).unwrap();
        w.message_integrity(c.key.hmac_sha1()).unwrap();
    });
    let ClientOutcome::ConnectionBound { connection, .. } = fresh.send(&bind) else {
        panic!("ConnectionBind refused after the restore")
    };
    assert_eq!(connection, waiting);
    // …and the old one lets go of what it exported, not of the busy one.
    assert_eq!(h.server.release_handed_over(|_| true), 1);
    h.drain();
    assert!(h.commands.contains(&Output::CloseConnection(waiting)));
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn an_unbound_peer_connection_keeps_its_bind_deadline_across() {
    use turnstile::proto::server::CONNECTION_BIND_TIMEOUT;
    let mut h = Harness::new();
    let (_, waiting) = tcp_allocation_with_a_waiting_peer(&mut h);
    h.advance(20);
    let now = h.now;
    let snapshot = h.server.export(now.instant, now.unix * 1000, |_| true);
    let mut fresh = restored(&h, snapshot, &[waiting]);
    fresh.commands.clear();
    // 30 s from its connection: 10 s are left after the 20 spent.
    fresh.advance(CONNECTION_BIND_TIMEOUT.as_secs() - 21);
    assert!(!fresh.commands.contains(&Output::CloseConnection(waiting)));
    fresh.advance(2);
    assert!(
        fresh.commands.contains(&Output::CloseConnection(waiting)),
        "{:?}",
        fresh.commands
    );
}
