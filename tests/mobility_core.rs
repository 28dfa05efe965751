//! RFC 8016 mobility in the core: a ticket with the allocation, the move to
//! a new 5-tuple (relayed address, permissions and channels kept, a fresh
//! ticket, the old 5-tuple forgotten), a spent, forged or stolen ticket
//! refused, 405 when mobility is off, and a ticket of another worker's
//! allocation fetched from that worker.

use std::net::SocketAddr;

use turnstile::proto::server::{ClientOutcome, PEER_HEADROOM, PEER_TAILROOM, PeerOutcome, Quotas, ServerConfig};
use turnstile::proto::stun::{Class, Message, Method, kind};
use turnstile::testing::{self, Creds, Harness, code, sa};

fn config(mobility: bool, worker: u8) -> ServerConfig {
    ServerConfig {
        mobility,
        worker_index: worker,
        ..testing::config()
    }
}

fn harness(mobility: bool) -> Harness {
    Harness::with(
        config(mobility, 0),
        testing::policy(&["203.0.113.0/24"]),
        Quotas::new(10, 0),
    )
}

/// Allocates for `h.key` asking for mobility; the relayed address and ticket.
fn allocate_with_ticket(h: &mut Harness, c: &Creds) -> (SocketAddr, Vec<u8>) {
    let req = h.signed(Method::ALLOCATE, c, |w| {
        w.requested_transport(17).unwrap();
        w.mobility_ticket(&[]).unwrap();
    });
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success, "{:?}", m.error_code());
    let ticket = m.find(kind::MOBILITY_TICKET).expect("a ticket").to_vec();
    (m.xor_relayed_address().unwrap().unwrap(), ticket)
}

fn refresh_with(h: &mut Harness, c: &Creds, ticket: &[u8]) -> Vec<u8> {
    let req = h.signed(Method::REFRESH, c, |w| {
        w.lifetime(600).unwrap();
        w.mobility_ticket(ticket).unwrap();
    });
    match h.send(&req) {
        ClientOutcome::Reply { len } => h.out[..len].to_vec(),
        other => panic!("{other:?}"),
    }
}

fn peer_sends(h: &mut Harness, relay: turnstile::proto::server::RelayId, peer: SocketAddr) -> PeerOutcome {
    let mut buf = vec![0u8; PEER_HEADROOM + 4 + PEER_TAILROOM];
    let now = h.now.instant;
    h.server
        .handle_peer_packet(now, relay, peer, &mut buf, PEER_HEADROOM, 4)
}

#[test]
fn a_ticket_moves_the_allocation_to_a_new_5_tuple_with_its_relay_permissions_and_channels() {
    let mut h = harness(true);
    let old = h.key;
    let c = h.creds("alice", "secret");
    let (relayed, ticket) = allocate_with_ticket(&mut h, &c);
    assert!(
        ticket
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    );
    let peer = sa("203.0.113.5:5000");
    assert_eq!(code(&h.permit(&c, peer)), 0);
    assert_eq!(code(&h.bind_channel(&c, 0x4001, peer)), 0);

    // The phone moves: a new address, a new nonce, the same user.
    h.key.client = sa("198.51.100.77:41000");
    let c2 = h.creds("alice", "secret");
    let resp = refresh_with(&mut h, &c2, &ticket);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success, "{:?}", m.error_code());
    let fresh = m.find(kind::MOBILITY_TICKET).expect("a fresh ticket").to_vec();
    assert_ne!(fresh, ticket);
    assert_eq!(h.server.stats().allocations_moved, 1);

    // Same relayed address; the peer's data reaches the new 5-tuple.
    let info = h.server.allocations_info(h.now);
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].client, h.key.client);
    assert_eq!(info[0].relays, vec![relayed]);
    let relay = turnstile::proto::server::RelayId(0);
    match peer_sends(&mut h, relay, peer) {
        PeerOutcome::ToClient { key, .. } => assert_eq!(key, h.key),
        other => panic!("{other:?}"),
    }
    // The channel came along: ChannelData from the new 5-tuple relays.
    let packet = [0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4];
    assert!(matches!(h.send(&packet), ClientOutcome::Forward { peer: p, .. } if p == peer));

    // The old 5-tuple has nothing any more; the spent ticket names nothing.
    let moved_to = h.key;
    h.key = old;
    let c_old = h.creds("alice", "secret");
    let req = h.signed(Method::REFRESH, &c_old, |w| w.lifetime(600).unwrap());
    assert_eq!(code(&h.exchange(&req)), 437);
    h.key.client = sa("198.51.100.78:41001");
    let c3 = h.creds("alice", "secret");
    assert_eq!(code(&refresh_with(&mut h, &c3, &ticket)), 437, "a spent ticket");
    h.key = moved_to;
    assert_eq!(
        code(&h.permit(&c2, peer)),
        0,
        "the allocation lives on at the new 5-tuple"
    );
}

#[test]
fn a_stolen_or_forged_ticket_is_refused() {
    let mut h = harness(true);
    let c = h.creds("alice", "secret");
    let (_, ticket) = allocate_with_ticket(&mut h, &c);
    // Bob has credentials of his own, and alice's ticket.
    h.key.client = sa("198.51.100.9:5000");
    let bob = h.creds("bob", "hunter2");
    assert_eq!(code(&refresh_with(&mut h, &bob, &ticket)), 441);
    let mut forged = ticket.clone();
    forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
    let alice = h.creds("alice", "secret");
    assert_eq!(code(&refresh_with(&mut h, &alice, &forged)), 441);
    assert_eq!(code(&refresh_with(&mut h, &alice, b"short")), 441);
    assert_eq!(h.server.stats().allocations_moved, 0);
}

#[test]
fn off_by_default_a_ticket_request_gets_405_and_allocate_takes_no_ticket_value() {
    let mut h = harness(false);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.mobility_ticket(&[]).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 405);
    // Without the attribute, Allocate and Refresh carry no ticket.
    let relayed = h.allocate(&c);
    assert!(relayed.port() > 0);
    let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(600).unwrap());
    let resp = h.exchange(&req);
    assert!(Message::parse(&resp).unwrap().find(kind::MOBILITY_TICKET).is_none());

    let mut on = harness(true);
    let c = on.creds("alice", "secret");
    let req = on.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.mobility_ticket(b"not-empty").unwrap();
    });
    assert_eq!(code(&on.exchange(&req)), 400);
}

#[test]
fn a_ticket_of_another_worker_fetches_the_allocation_from_it() {
    // Worker 0 holds the allocation; the new 5-tuple reaches worker 1.
    let mut w0 = harness(true);
    let c = w0.creds("alice", "secret");
    let (relayed, ticket) = allocate_with_ticket(&mut w0, &c);
    let peer = sa("203.0.113.5:5000");
    assert_eq!(code(&w0.permit(&c, peer)), 0);
    let mut w1 = Harness::with(
        config(true, 1),
        testing::policy(&["203.0.113.0/24"]),
        Quotas::new(10, 0),
    );
    w1.now = w0.now;
    w1.key.client = sa("198.51.100.77:41000");
    let c1 = w1.creds("alice", "secret");
    let req = w1.signed(Method::REFRESH, &c1, |w| {
        w.lifetime(600).unwrap();
        w.mobility_ticket(&ticket).unwrap();
    });
    let key = w1.key;
    let ClientOutcome::AllocationElsewhere { worker, mobility } =
        w1.server.handle_client_packet(w1.now, key, &req, &mut w1.out)
    else {
        panic!("worker 1 does not hold it")
    };
    assert_eq!(worker, 0);
    // The driver: worker 0 lends it (its sockets go along), worker 1 adopts it.
    let now = w0.now;
    let lent = w0
        .server
        .lend(mobility, now.instant, now.unix * 1000)
        .expect("worker 0 holds it");
    w0.drain();
    assert_eq!(w0.server.allocation_count(), 0);
    assert!(
        w0.server.lend(mobility, now.instant, now.unix * 1000).is_none(),
        "lent once"
    );
    let pairs = w1.server.adopt(lent, now.instant, now.unix * 1000);
    assert_eq!(pairs.len(), 1);
    w1.open_relays.extend(pairs.iter().map(|(_, ours)| *ours));
    w1.drain();
    // …and the same request again.
    let resp = w1.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success, "{:?}", m.error_code());
    assert!(m.find(kind::MOBILITY_TICKET).is_some());
    let info = w1.server.allocations_info(w1.now);
    assert_eq!((info[0].client, info[0].relays.clone()), (key.client, vec![relayed]));
    assert_eq!(info[0].permissions, 1, "its permission came along");
}
