//! RFC 5780 NAT behaviour discovery in the core: CHANGE-REQUEST answered
//! from the matching listener, RESPONSE-ORIGIN and OTHER-ADDRESS, answers
//! to RESPONSE-PORT, PADDING that never makes an answer longer than its
//! request, the per-source budget on every answer, and 420 where the server
//! does not offer it.

use std::net::SocketAddr;

use turnstile::proto::server::{
    ClientKey, ClientOutcome, ListenerId, ListenerKind, NatDiscovery, Quotas, Rate, ServerConfig,
};
use turnstile::proto::stun::{Class, Message, Method, TransactionId, kind};
use turnstile::testing::{self, Harness, build, sa};

const A: &str = "192.0.2.1:3478";
const B: &str = "192.0.2.2:3478";
const A2: &str = "192.0.2.1:3479";
const B2: &str = "192.0.2.2:3479";

/// Listener 0 (UDP) is A:P; listeners 2, 3 and 4 are B:P, A:P', B:P'.
fn harness(config: ServerConfig) -> Harness {
    let mut h = Harness::with(config, testing::policy(&[]), Quotas::new(10, 0));
    for _ in 0..3 {
        h.server.add_listener(ListenerKind::Udp, "udp");
    }
    h.server.set_nat_discovery(
        ListenerId(0),
        NatDiscovery {
            local: sa(A),
            change_ip: (ListenerId(2), sa(B)),
            change_port: (ListenerId(3), sa(A2)),
            change_both: (ListenerId(4), sa(B2)),
        },
    );
    h
}

fn request(change: Option<(bool, bool)>, response_port: Option<u16>, padding: Option<usize>) -> Vec<u8> {
    build(Class::Request, Method::BINDING, TransactionId([5; 12]), |w| {
        if let Some((ip, port)) = change {
            w.change_request(ip, port).unwrap();
        }
        if let Some(p) = response_port {
            w.response_port(p).unwrap();
        }
        if let Some(n) = padding {
            w.padding(n).unwrap();
        }
        w.fingerprint().unwrap();
    })
}

/// Where the answer went (listener, destination) and what it was.
fn answer(h: &mut Harness, packet: &[u8]) -> (ListenerId, SocketAddr, Vec<u8>) {
    h.sent.clear();
    match h.server.handle_client_packet(h.now, h.key, packet, &mut h.out) {
        ClientOutcome::Reply { len } => (h.key.listener, h.key.client, h.out[..len].to_vec()),
        ClientOutcome::Consumed => {
            h.drain();
            let (key, bytes) = h.sent.pop().expect("an answer from another socket");
            (key.listener, key.client, bytes)
        }
        other => panic!("no answer: {other:?}"),
    }
}

fn origin_and_other(resp: &[u8]) -> (SocketAddr, SocketAddr) {
    let m = Message::parse(resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    let addr = |k| match m.get(k).unwrap() {
        Some(turnstile::proto::stun::Attribute::ResponseOrigin(a)) => a,
        Some(turnstile::proto::stun::Attribute::OtherAddress(a)) => a,
        other => panic!("{other:?}"),
    };
    (addr(kind::RESPONSE_ORIGIN), addr(kind::OTHER_ADDRESS))
}

#[test]
fn each_change_request_is_answered_from_the_matching_socket() {
    let mut h = harness(testing::config());
    let client = h.key.client;
    for (change, listener, origin) in [
        (None, ListenerId(0), A),
        (Some((false, false)), ListenerId(0), A),
        (Some((true, false)), ListenerId(2), B),
        (Some((false, true)), ListenerId(3), A2),
        (Some((true, true)), ListenerId(4), B2),
    ] {
        let (from, to, resp) = answer(&mut h, &request(change, None, None));
        assert_eq!((from, to), (listener, client), "{change:?}");
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.xor_mapped_address().unwrap(), Some(client));
        assert!(m.verify_fingerprint().is_ok());
        // OTHER-ADDRESS: the address that differs in both IP and port from
        // the one the request came to.
        assert_eq!(origin_and_other(&resp), (sa(origin), sa(B2)), "{change:?}");
    }
}

#[test]
fn response_port_sends_the_answer_to_another_port_of_the_same_address() {
    let mut h = harness(testing::config());
    let (from, to, _) = answer(&mut h, &request(None, Some(61000), None));
    assert_eq!(from, ListenerId(0));
    assert_eq!(to, SocketAddr::new(h.key.client.ip(), 61000));
    let (from, to, resp) = answer(&mut h, &request(Some((true, true)), Some(61001), None));
    assert_eq!((from, to.port()), (ListenerId(4), 61001));
    assert_eq!(origin_and_other(&resp).0, sa(B2));
}

#[test]
fn padding_is_answered_but_never_makes_an_answer_longer_than_its_request() {
    let mut h = harness(testing::config());
    let (_, _, unpadded) = answer(&mut h, &request(None, None, None));
    for n in [4, 64, 1200] {
        let req = request(None, None, Some(n));
        let (_, _, resp) = answer(&mut h, &req);
        assert!(
            resp.len() <= req.len().max(unpadded.len()),
            "{} > {}",
            resp.len(),
            req.len()
        );
        let m = Message::parse(&resp).unwrap();
        let pad = m.find(kind::PADDING).map(<[u8]>::len).unwrap_or(0);
        assert!(n < 64 || pad + 64 >= n, "padding {pad} for a request's {n}");
    }
}

#[test]
fn answers_from_other_sockets_are_paid_from_the_source_budget() {
    let config = ServerConfig {
        unauthenticated: Rate {
            bytes_per_second: 1,
            burst: 400,
        },
        ..testing::config()
    };
    let mut h = harness(config);
    let req = request(Some((true, true)), None, None);
    let mut answered = 0;
    for _ in 0..50 {
        match h.server.handle_client_packet(h.now, h.key, &req, &mut h.out) {
            ClientOutcome::Consumed => answered += 1,
            ClientOutcome::Drop(_) => {}
            other => panic!("{other:?}"),
        }
    }
    h.drain();
    assert!((1..10).contains(&answered), "{answered} answers from a 400-byte budget");
    assert_eq!(h.sent.len(), answered);
    assert!(h.server.stats().responses_suppressed >= 40);
}

#[test]
fn without_rfc5780_or_over_tcp_its_attributes_get_420() {
    let mut plain = Harness::new();
    let req = request(Some((true, false)), None, None);
    let resp = plain.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 420);
    assert!(m.find(kind::UNKNOWN_ATTRIBUTES).is_some());
    // A plain Binding is answered as always, without RFC 5780's attributes.
    let resp = plain.exchange(&request(None, None, None));
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert!(m.find(kind::OTHER_ADDRESS).is_none() && m.find(kind::RESPONSE_ORIGIN).is_none());

    let mut h = harness(testing::config());
    h.key = ClientKey {
        listener: ListenerId(1),
        client: h.key.client,
    };
    let resp = h.exchange(&request(None, Some(5000), None));
    assert_eq!(testing::code(&resp), 420, "RESPONSE-PORT over TCP");
}
