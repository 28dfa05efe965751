//! The TURN server core in virtual time: every success and error path of
//! RFC 8656 over UDP, authentication, quotas and the peer policy. Lifetimes
//! of minutes pass in microseconds.

use turnstile::proto::auth::rest;
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm, userhash};
use turnstile::proto::channel_data;
use turnstile::proto::server::{
    BindResult, ClientKey, ClientOutcome, CloseReason, DropReason, Input, ListenerId, Output, PEER_HEADROOM,
    PeerOutcome, QuotaLimits, Quotas, RelayAddress, RelayId, ServerConfig,
};
use turnstile::proto::stun::attr::password_algorithm;
use turnstile::proto::stun::{AddressFamily, Attribute, Class, Message, Method, kind};
use turnstile::testing::*;

#[test]
fn allocate_challenges_then_succeeds_with_signed_response() {
    let mut h = Harness::new();
    let tid = h.tid();
    let req = build(Class::Request, Method::ALLOCATE, tid, |w| {
        w.requested_transport(17).unwrap()
    });
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 401);
    assert_eq!(m.realm().unwrap(), Some(REALM));
    let nonce = m.nonce().unwrap().unwrap();
    assert!(
        nonce.starts_with("obMatJos2"),
        "nonce cookie advertises the new features: {nonce}"
    );
    assert!(m.find(kind::PASSWORD_ALGORITHMS).is_some());
    assert!(!m.has_integrity(), "a challenge is not signed");

    let c = Creds {
        user: "alice".into(),
        key: key_for("alice", "secret"),
        nonce: nonce.to_owned(),
    };
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    let relayed = m.xor_relayed_address().unwrap().unwrap();
    assert_eq!(relayed.ip(), ip(EXTERNAL), "the external address is advertised");
    assert!((50000..=50999).contains(&relayed.port()));
    assert_eq!(
        h.bind_requests.last().unwrap().ip(),
        ip("127.0.0.1"),
        "the socket binds the internal address"
    );
    assert_eq!(m.lifetime().unwrap(), Some(600));
    assert_eq!(m.xor_mapped_address().unwrap(), Some(h.key.client));
    assert!(verify_sha1(&resp, &c.key));
    assert!(m.verify_fingerprint().is_ok());
    assert_eq!(m.software().unwrap(), Some("turnstile-test"));
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn lifetimes_are_clamped_refreshed_and_expire() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.lifetime(100_000).unwrap();
    });
    let m = h.exchange(&req);
    assert_eq!(
        Message::parse(&m).unwrap().lifetime().unwrap(),
        Some(3600),
        "capped by max_lifetime"
    );

    let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(5).unwrap());
    let m = h.exchange(&req);
    assert_eq!(code(&m), 0);
    assert_eq!(
        Message::parse(&m).unwrap().lifetime().unwrap(),
        Some(600),
        "raised to the default"
    );

    h.advance(599);
    assert_eq!(h.server.allocation_count(), 1);
    let req = h.signed(Method::REFRESH, &c, |_| {});
    assert_eq!(code(&h.exchange(&req)), 0);
    h.advance(599);
    assert_eq!(h.server.allocation_count(), 1, "refresh extended the lifetime");
    h.advance(2);
    assert_eq!(h.server.allocation_count(), 0, "expired");
    assert!(
        matches!(h.commands.as_slice(), [Output::CloseRelay(_)]),
        "{:?}",
        h.commands
    );
    assert_eq!(h.server.stats().allocations_expired, 1);
}

#[test]
fn a_stream_client_is_closed_when_its_allocation_expires_or_is_kicked_not_when_it_deletes_it() {
    let stream = ListenerId(1);
    let mut h = Harness::new();
    h.key.listener = stream;
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let client = h.key;
    h.advance(601);
    assert_eq!(h.server.allocation_count(), 0, "expired");
    assert!(
        h.commands.contains(&Output::CloseClient {
            key: client,
            reason: CloseReason::AllocationEnded
        }),
        "expiry closes the connection: {:?}",
        h.commands
    );

    h.commands.clear();
    h.key.client.set_port(40001);
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    assert_eq!(h.server.kick(Some("alice"), None, None), 1);
    h.drain();
    assert!(
        h.commands.contains(&Output::CloseClient {
            key: h.key,
            reason: CloseReason::AllocationEnded
        }),
        "{:?}",
        h.commands
    );

    // Refresh 0: the client keeps its connection (and may allocate again).
    h.commands.clear();
    h.key.client.set_port(40002);
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    assert!(
        !h.commands.iter().any(|c| matches!(c, Output::CloseClient { .. })),
        "{:?}",
        h.commands
    );

    // Over UDP there is no connection to close.
    h.commands.clear();
    h.key = ClientKey {
        listener: ListenerId(0),
        client: sa("192.0.2.10:40003"),
    };
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    h.advance(601);
    assert!(
        !h.commands.iter().any(|c| matches!(c, Output::CloseClient { .. })),
        "{:?}",
        h.commands
    );
}

#[test]
fn refresh_with_zero_deletes() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(0).unwrap());
    let m = h.exchange(&req);
    assert_eq!(code(&m), 0);
    assert_eq!(Message::parse(&m).unwrap().lifetime().unwrap(), Some(0));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.commands.len(), 1);
    // Now there is nothing to refresh.
    let req = h.signed(Method::REFRESH, &c, |_| {});
    assert_eq!(code(&h.exchange(&req)), 437);
}

#[test]
fn second_allocate_is_437_and_a_retransmission_gets_the_same_success() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    let first = h.exchange(&req);
    let again = h.exchange(&req);
    assert_eq!(code(&again), 0);
    assert_eq!(
        Message::parse(&first).unwrap().xor_relayed_address().unwrap(),
        Message::parse(&again).unwrap().xor_relayed_address().unwrap()
    );
    assert_eq!(h.server.allocation_count(), 1);
    let other = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&other)), 437);
}

#[test]
fn allocate_attribute_errors() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    type Fill = Box<dyn Fn(&mut turnstile::proto::stun::MessageWriter<'_>)>;
    let cases: Vec<(u16, Fill)> = vec![
        (400, Box::new(|_| {})),
        (442, Box::new(|w| w.requested_transport(6).unwrap())),
        (442, Box::new(|w| w.requested_transport(99).unwrap())),
        (
            440,
            Box::new(|w| {
                w.requested_transport(17).unwrap();
                w.requested_address_family(AddressFamily::V6).unwrap();
            }),
        ),
        (
            400,
            Box::new(|w| {
                w.requested_transport(17).unwrap();
                w.even_port(false).unwrap();
                w.reservation_token(&[0; 8]).unwrap();
            }),
        ),
        (
            400,
            Box::new(|w| {
                w.requested_transport(17).unwrap();
                w.requested_address_family(AddressFamily::V4).unwrap();
                w.additional_address_family(AddressFamily::V6).unwrap();
            }),
        ),
        (
            400,
            Box::new(|w| {
                w.requested_transport(17).unwrap();
                w.additional_address_family(AddressFamily::V4).unwrap();
            }),
        ),
        (
            508,
            Box::new(|w| {
                w.requested_transport(17).unwrap();
                w.reservation_token(&[1; 8]).unwrap();
            }),
        ),
    ];
    for (want, f) in cases {
        let req = h.signed(Method::ALLOCATE, &c, |w| f(w));
        let resp = h.exchange(&req);
        assert_eq!(code(&resp), want);
        assert!(verify_sha1(&resp, &c.key), "errors after authentication are signed");
    }
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn dual_allocation_with_and_without_ipv6() {
    // No IPv6 relay: IPv4 is allocated, IPv6 reported with ADDRESS-ERROR-CODE 440.
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.additional_address_family(AddressFamily::V6).unwrap();
    });
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    match m.get(kind::ADDRESS_ERROR_CODE).unwrap() {
        Some(Attribute::AddressErrorCode { family, error }) => {
            assert_eq!(family, AddressFamily::V6);
            assert_eq!(error.code, 440);
        }
        other => panic!("{other:?}"),
    }

    let mut config = config();
    config.relay_v6 = Some(RelayAddress {
        bind: ip("::1"),
        external: None,
    });
    let mut h = Harness::with(config, policy(&[]), Quotas::new(10, 0));
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.additional_address_family(AddressFamily::V6).unwrap();
    });
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    let relayed: Vec<_> = m
        .raw_attributes()
        .filter(|a| a.kind == kind::XOR_RELAYED_ADDRESS)
        .map(|a| a.value.len())
        .collect();
    assert_eq!(relayed, vec![8, 20], "an IPv4 and an IPv6 relayed address");
    // A v6-only allocation, and 443 for a v4 peer on it.
    let mut h2 = Harness::with(
        {
            let mut c = turnstile::testing::config();
            c.relay_v6 = Some(RelayAddress {
                bind: ip("::1"),
                external: None,
            });
            c
        },
        policy(&[]),
        Quotas::new(10, 0),
    );
    let c = h2.creds("alice", "secret");
    let req = h2.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.requested_address_family(AddressFamily::V6).unwrap();
    });
    assert_eq!(code(&h2.exchange(&req)), 0);
    assert_eq!(code(&h2.permit(&c, sa("8.8.8.8:1"))), 443);
    assert_eq!(code(&h2.permit(&c, sa("[2606:4700::1]:1"))), 0);
}

#[test]
fn authentication_failures() {
    let mut h = Harness::new();
    let bad = Creds {
        user: "alice".into(),
        key: key_for("alice", "wrong"),
        nonce: h.nonce(),
    };
    let req = h.signed(Method::ALLOCATE, &bad, |w| w.requested_transport(17).unwrap());
    let resp = h.exchange(&req);
    assert_eq!(code(&resp), 401);
    assert!(
        Message::parse(&resp).unwrap().nonce().unwrap().is_some(),
        "401 carries a fresh nonce"
    );

    let nobody = Creds {
        user: "mallory".into(),
        key: key_for("mallory", "x"),
        nonce: h.nonce(),
    };
    let req = h.signed(Method::ALLOCATE, &nobody, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&req)), 401);

    // MESSAGE-INTEGRITY without NONCE: 400.
    let tid = h.tid();
    let key = key_for("alice", "secret");
    let req = build(Class::Request, Method::ALLOCATE, tid, |w| {
        w.requested_transport(17).unwrap();
        w.username("alice").unwrap();
        w.realm(REALM).unwrap();
        w.message_integrity(key.hmac_sha1()).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 400);

    // A nonce that is not ours: 438 with a new one.
    let forged = Creds {
        user: "alice".into(),
        key: key_for("alice", "secret"),
        nonce: "abcdefghijklmnopqrstuvwxyz0".into(),
    };
    let req = h.signed(Method::ALLOCATE, &forged, |w| w.requested_transport(17).unwrap());
    let resp = h.exchange(&req);
    assert_eq!(code(&resp), 438);
    assert!(Message::parse(&resp).unwrap().nonce().unwrap().is_some());
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.stats().auth_bad_integrity, 1);
    assert_eq!(h.server.stats().auth_unknown_user, 1);
}

#[test]
fn stale_nonce_is_438_and_the_new_nonce_works() {
    let mut h = Harness::new();
    let mut c = h.creds("alice", "secret");
    h.allocate(&c);
    h.now.unix += 601; // nonce lifetime 600 s; the allocation itself is still alive
    let req = h.signed(Method::REFRESH, &c, |_| {});
    let resp = h.exchange(&req);
    assert_eq!(code(&resp), 438);
    c.nonce = Message::parse(&resp).unwrap().nonce().unwrap().unwrap().to_owned();
    let req = h.signed(Method::REFRESH, &c, |_| {});
    assert_eq!(code(&h.exchange(&req)), 0);
}

#[test]
fn another_users_credentials_on_an_allocation_are_441() {
    let mut h = Harness::new();
    let alice = h.creds("alice", "secret");
    h.allocate(&alice);
    let bob = Creds {
        user: "bob".into(),
        key: key_for("bob", "hunter2"),
        nonce: alice.nonce.clone(),
    };
    let req = h.signed(Method::REFRESH, &bob, |_| {});
    let resp = h.exchange(&req);
    assert_eq!(code(&resp), 441);
    assert!(verify_sha1(&resp, &bob.key));
    assert_eq!(code(&h.permit(&bob, sa("8.8.8.8:1"))), 441);
}

#[test]
fn rest_credentials_expiry_and_rotation() {
    let mut h = Harness::new();
    let nonce = h.nonce();
    let user = format!("{}:@alice:example.org", h.now.unix + 120);
    for secret in [SECRET, OLD_SECRET] {
        let password = rest::password(secret.as_bytes(), &user);
        let c = Creds {
            user: user.clone(),
            key: key_for(&user, &password),
            nonce: nonce.clone(),
        };
        let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
        let resp = h.exchange(&req);
        assert_eq!(code(&resp), 0, "secret {secret} verifies");
        let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(0).unwrap());
        assert_eq!(code(&h.exchange(&req)), 0);
    }
    // A password from an unknown secret: 401.
    let password = rest::password(b"not-ours", &user);
    let c = Creds {
        user: user.clone(),
        key: key_for(&user, &password),
        nonce: nonce.clone(),
    };
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&req)), 401);

    // Valid now; the expiry is enforced on every Refresh.
    let password = rest::password(SECRET.as_bytes(), &user);
    let mut c = Creds {
        user: user.clone(),
        key: key_for(&user, &password),
        nonce,
    };
    h.allocate(&c);
    h.now.unix += 121;
    h.now.instant += std::time::Duration::from_secs(121);
    c.nonce = h.nonce();
    let req = h.signed(Method::REFRESH, &c, |_| {});
    assert_eq!(code(&h.exchange(&req)), 401, "expired REST credential");
    assert_eq!(h.server.stats().auth_expired, 1);
}

#[test]
fn sha256_suite_with_userhash_and_bid_down_protection() {
    let mut h = Harness::new();
    let nonce = h.nonce();
    let key256 = LongTermKey::derive(PasswordAlgorithm::Sha256, "alice", REALM, "secret");
    let offered: [(u16, &[u8]); 2] = [(password_algorithm::SHA256, &[]), (password_algorithm::MD5, &[])];
    let tid = h.tid();
    let req = build(Class::Request, Method::ALLOCATE, tid, |w| {
        w.requested_transport(17).unwrap();
        w.userhash(&userhash("alice", REALM)).unwrap();
        w.realm(REALM).unwrap();
        w.nonce(&nonce).unwrap();
        w.password_algorithms(&offered).unwrap();
        w.password_algorithm(password_algorithm::SHA256, &[]).unwrap();
        w.message_integrity_sha256(key256.hmac_sha256()).unwrap();
    });
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success, "{:?}", m.error_code());
    assert!(
        m.has_integrity_sha256() && !m.has_integrity(),
        "the response uses the request's suite"
    );
    assert!(m.verify_integrity_sha256_with(key256.hmac_sha256()).is_ok());

    // A man in the middle strips SHA-256 from PASSWORD-ALGORITHMS: 400.
    let mut h = Harness::new();
    let nonce = h.nonce();
    let key_md5 = key_for("alice", "secret");
    let tid = h.tid();
    let req = build(Class::Request, Method::ALLOCATE, tid, |w| {
        w.requested_transport(17).unwrap();
        w.username("alice").unwrap();
        w.realm(REALM).unwrap();
        w.nonce(&nonce).unwrap();
        w.password_algorithms(&[(password_algorithm::MD5, &[])]).unwrap();
        w.password_algorithm(password_algorithm::MD5, &[]).unwrap();
        w.message_integrity(key_md5.hmac_sha1()).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 400);
    // PASSWORD-ALGORITHM without PASSWORD-ALGORITHMS: 400.
    let tid = h.tid();
    let req = build(Class::Request, Method::ALLOCATE, tid, |w| {
        w.requested_transport(17).unwrap();
        w.username("alice").unwrap();
        w.realm(REALM).unwrap();
        w.nonce(&nonce).unwrap();
        w.password_algorithm(password_algorithm::MD5, &[]).unwrap();
        w.message_integrity(key_md5.hmac_sha1()).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 400);
    assert_eq!(h.server.stats().auth_bid_down, 2);
}

#[test]
fn allocations_per_ip_are_capped_whatever_the_user() {
    let mut h = Harness::with(
        config(),
        policy(&[]),
        Quotas::with_limits(QuotaLimits {
            per_user: 0,
            total: 0,
            per_ip: 2,
        }),
    );
    for (i, (user, password)) in [("alice", "secret"), ("bob", "hunter2"), ("alice", "secret")]
        .into_iter()
        .enumerate()
    {
        h.key.client.set_port(43000 + i as u16);
        let c = h.creds(user, password);
        let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
        assert_eq!(code(&h.exchange(&req)), if i < 2 { 0 } else { 486 }, "allocation {i}");
    }
    assert_eq!(h.server.stats().quota_refusals, [0, 1, 0, 0]);
    // Another address is not affected; one released makes room again.
    h.key.client = sa("192.0.2.11:43000");
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    h.key.client = sa("192.0.2.10:43000");
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    h.key.client.set_port(43005);
    let c = h.creds("alice", "secret");
    h.allocate(&c);
}

#[test]
fn quotas_per_user_and_total() {
    let mut h = Harness::with(config(), policy(&[]), Quotas::new(2, 3));
    for i in 0..3 {
        h.key.client.set_port(41000 + i);
        let alice = h.creds("alice", "secret");
        let req = h.signed(Method::ALLOCATE, &alice, |w| w.requested_transport(17).unwrap());
        assert_eq!(code(&h.exchange(&req)), if i < 2 { 0 } else { 486 });
    }
    h.key.client.set_port(42000);
    let bob = h.creds("bob", "hunter2");
    h.allocate(&bob);
    h.key.client.set_port(42001);
    let bob = h.creds("bob", "hunter2");
    let req = h.signed(Method::ALLOCATE, &bob, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&req)), 508, "total quota");
    // Freeing one makes room again.
    h.key.client.set_port(41000);
    let alice = h.creds("alice", "secret");
    let req = h.signed(Method::REFRESH, &alice, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    h.key.client.set_port(42001);
    let req = h.signed(Method::ALLOCATE, &bob, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
}

#[test]
fn relay_ports_exhausted_is_508_and_busy_ports_are_skipped() {
    let mut cfg = config();
    cfg.ports = (50000, 50001);
    let mut h = Harness::with(cfg, policy(&[]), Quotas::new(0, 0));
    let c = h.creds("alice", "secret");
    // The kernel says the first port is taken: the core tries the other.
    h.bind_script = vec![BindResult::InUse];
    let first = h.allocate(&c);
    assert_eq!(h.bind_requests.len(), 2);
    assert_ne!(h.bind_requests[0].port(), h.bind_requests[1].port());
    assert_eq!(first.port(), h.bind_requests[1].port());
    // The other port is held as busy: nothing is left.
    h.key.client.set_port(40001);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&req)), 508);
    // After the busy hold expires the port is offered again.
    h.advance(61);
    let fresh = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &fresh, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    // A hard bind failure is 508 and leaves nothing behind.
    let before = h.server.allocation_count();
    h.key.client.set_port(40002);
    h.bind_script = vec![BindResult::Failed];
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&h.exchange(&req)), 508);
    assert_eq!(h.server.allocation_count(), before);
}

#[test]
fn permissions_policy_family_and_expiry() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    for peer in [
        "10.0.0.1:1",
        "127.0.0.2:1",
        "169.254.169.254:80",
        "[::ffff:127.0.0.1]:1",
        "[64:ff9b::a9fe:a9fe]:80",
        "[2002:7f00:1::]:1",
        "0.0.0.0:1",
        "100.64.0.1:1",
    ] {
        let resp = h.permit(&c, sa(peer));
        // IPv6 forms of IPv4 addresses on an IPv4-only allocation are 443 before policy.
        let want = if peer.starts_with('[') { 443 } else { 403 };
        assert_eq!(code(&resp), want, "{peer}");
    }
    assert_eq!(code(&h.permit(&c, sa("[2606:4700::1]:1"))), 443);
    // The relay's own address may hold a permission (another allocation on this
    // server), but data may only go to its relay ports.
    assert_eq!(code(&h.permit(&c, sa("127.0.0.1:1"))), 0);
    assert_eq!(code(&h.bind_channel(&c, 0x4000, sa("127.0.0.1:1"))), 403);
    // Several peers in one request, all or nothing.
    let req = h.signed(Method::CREATE_PERMISSION, &c, |w| {
        w.xor_peer_address(&sa("8.8.8.8:1")).unwrap();
        w.xor_peer_address(&sa("10.1.1.1:1")).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 403);
    let relay = RelayId(0);
    let mut buf = vec![0u8; PEER_HEADROOM + 100];
    assert_eq!(
        h.server
            .handle_peer_packet(h.now.instant, relay, sa("8.8.8.8:9"), &mut buf, PEER_HEADROOM, 10),
        PeerOutcome::Drop(DropReason::NoPermission)
    );
    let req = h.signed(Method::CREATE_PERMISSION, &c, |w| {
        w.xor_peer_address(&sa("8.8.8.8:1")).unwrap();
        w.xor_peer_address(&sa("1.1.1.1:1")).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 0);
    assert!(matches!(
        h.server
            .handle_peer_packet(h.now.instant, relay, sa("8.8.8.8:9"), &mut buf, PEER_HEADROOM, 10),
        PeerOutcome::ToClient { .. }
    ));
    h.advance(299);
    assert!(matches!(
        h.server
            .handle_peer_packet(h.now.instant, relay, sa("1.1.1.1:9"), &mut buf, PEER_HEADROOM, 10),
        PeerOutcome::ToClient { .. }
    ));
    h.advance(1);
    assert_eq!(
        h.server
            .handle_peer_packet(h.now.instant, relay, sa("1.1.1.1:9"), &mut buf, PEER_HEADROOM, 10),
        PeerOutcome::Drop(DropReason::NoPermission),
        "permissions last 300 s"
    );
    // The per-allocation cap (8 in this config).
    let req = h.signed(Method::CREATE_PERMISSION, &c, |w| {
        for i in 1..=9u8 {
            w.xor_peer_address(&std::net::SocketAddr::from(([9, 9, 9, i], 1)))
                .unwrap();
        }
    });
    assert_eq!(code(&h.exchange(&req)), 508);
    assert!(h.server.stats().peer_special_purpose >= 5);
}

#[test]
fn channel_bind_rules() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let p1 = sa("8.8.8.8:1000");
    let p2 = sa("8.8.4.4:2000");
    assert_eq!(code(&h.bind_channel(&c, 0x3FFF, p1)), 400);
    assert_eq!(code(&h.bind_channel(&c, 0x5000, p1)), 400);
    assert_eq!(code(&h.bind_channel(&c, 0x4000, sa("10.0.0.1:1"))), 403);
    assert_eq!(
        code(&h.bind_channel(&c, 0x4000, sa("127.0.0.1:3478"))),
        403,
        "the server's own listener"
    );
    assert_eq!(code(&h.bind_channel(&c, 0x4000, p1)), 0);
    assert_eq!(code(&h.bind_channel(&c, 0x4000, p1)), 0, "refresh by re-binding");
    assert_eq!(
        code(&h.bind_channel(&c, 0x4000, p2)),
        400,
        "number bound to another peer"
    );
    assert_eq!(
        code(&h.bind_channel(&c, 0x4001, p1)),
        400,
        "peer bound to another number"
    );
    assert_eq!(code(&h.bind_channel(&c, 0x4001, p2)), 0);
    // No ChannelBind without CHANNEL-NUMBER, or with two peers.
    let req = h.signed(Method::CHANNEL_BIND, &c, |w| w.xor_peer_address(&p1).unwrap());
    assert_eq!(code(&h.exchange(&req)), 400);

    // The binding installed a permission: the peer reaches the client as ChannelData.
    let mut buf = vec![0u8; PEER_HEADROOM + 64];
    buf[PEER_HEADROOM..PEER_HEADROOM + 5].copy_from_slice(b"hello");
    let out = h
        .server
        .handle_peer_packet(h.now.instant, RelayId(0), p1, &mut buf, PEER_HEADROOM, 5);
    let PeerOutcome::ToClient { key, start, end } = out else {
        panic!("{out:?}")
    };
    assert_eq!(key, h.key);
    assert_eq!(
        start,
        PEER_HEADROOM - 4,
        "the header is written in place, in front of the data"
    );
    let cd = channel_data::ChannelData::parse(&buf[start..end]).unwrap();
    assert_eq!((cd.channel, cd.data), (0x4000, &b"hello"[..]));

    // Channels last 600 s; after that, the number stays reserved to its peer.
    let refresh = h.signed(Method::REFRESH, &c, |w| w.lifetime(3600).unwrap());
    assert_eq!(code(&h.exchange(&refresh)), 0);
    h.advance(300);
    assert_eq!(code(&h.permit(&c, p2)), 0); // keep p2's permission alive
    h.advance(301);
    let c = h.creds("alice", "secret"); // the nonce is older than its 600 s lifetime
    let cdm = [&channel_data::header(0x4000, 3)[..], b"abc"].concat();
    assert_eq!(h.send(&cdm), ClientOutcome::Drop(DropReason::UnboundChannel));
    assert_eq!(code(&h.bind_channel(&c, 0x4000, p2)), 400, "quarantined for 5 minutes");
    h.advance(300);
    assert_eq!(
        code(&h.bind_channel(&c, 0x4001, p1)),
        0,
        "after quarantine the pair may change"
    );
}

#[test]
fn relayed_data_both_ways_without_copies() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let peer = sa("8.8.8.8:5004");
    assert_eq!(code(&h.bind_channel(&c, 0x4010, peer)), 0);
    // Client → peer over a channel: a range of the caller's own packet.
    let mut cdm = channel_data::header(0x4010, 6).to_vec();
    cdm.extend_from_slice(b"rtp!!!\0\0");
    match h.send(&cdm) {
        ClientOutcome::Forward {
            relay,
            peer: to,
            start,
            end,
        } => {
            assert_eq!((relay, to), (RelayId(0), peer));
            assert_eq!(&cdm[start..end], b"rtp!!!");
        }
        other => panic!("{other:?}"),
    }
    // Client → peer with a Send indication.
    let other = sa("1.1.1.1:53");
    assert_eq!(code(&h.permit(&c, other)), 0);
    let tid = h.tid();
    let send = build(Class::Indication, Method::SEND, tid, |w| {
        w.xor_peer_address(&other).unwrap();
        w.data(b"payload").unwrap();
    });
    match h.send(&send) {
        ClientOutcome::Forward {
            peer: to, start, end, ..
        } => {
            assert_eq!(to, other);
            assert_eq!(&send[start..end], b"payload");
        }
        o => panic!("{o:?}"),
    }
    // Send without permission, without DATA, or without an allocation: dropped.
    let tid = h.tid();
    let send = build(Class::Indication, Method::SEND, tid, |w| {
        w.xor_peer_address(&sa("9.9.9.9:1")).unwrap();
        w.data(b"x").unwrap();
    });
    assert_eq!(h.send(&send), ClientOutcome::Drop(DropReason::NoPermission));
    let tid = h.tid();
    let send = build(Class::Indication, Method::SEND, tid, |w| {
        w.xor_peer_address(&other).unwrap()
    });
    assert_eq!(h.send(&send), ClientOutcome::Drop(DropReason::BadIndication));
    let saved = h.key;
    h.key.client.set_port(1);
    assert_eq!(h.send(&cdm), ClientOutcome::Drop(DropReason::NoAllocation));
    h.key = saved;

    // Peer → client without a channel: a Data indication built around the data.
    let mut buf = vec![0xEEu8; PEER_HEADROOM + 16];
    buf[PEER_HEADROOM..PEER_HEADROOM + 5].copy_from_slice(b"reply");
    let PeerOutcome::ToClient { start, end, .. } =
        h.server
            .handle_peer_packet(h.now.instant, RelayId(0), other, &mut buf, PEER_HEADROOM, 5)
    else {
        panic!()
    };
    let m = Message::parse(&buf[start..end]).unwrap();
    assert_eq!((m.class(), m.method()), (Class::Indication, Method::DATA));
    assert_eq!(m.xor_peer_addresses().next().unwrap().unwrap(), other);
    assert_eq!(m.data().unwrap(), Some(&b"reply"[..]));

    // On a stream transport ChannelData is padded to 4 bytes, with zeros.
    let mut s = Harness::new();
    s.key.listener = ListenerId(1);
    let c = s.creds("alice", "secret");
    s.allocate(&c);
    assert_eq!(code(&s.bind_channel(&c, 0x4020, peer)), 0);
    let mut buf = vec![0xEEu8; PEER_HEADROOM + 16];
    let PeerOutcome::ToClient { start, end, .. } =
        s.server
            .handle_peer_packet(s.now.instant, RelayId(0), peer, &mut buf, PEER_HEADROOM, 5)
    else {
        panic!()
    };
    assert_eq!(end - start, 12);
    assert_eq!(&buf[end - 3..end], &[0, 0, 0]);
    assert_eq!(s.server.stats().peer_to_client_packets, 1);
}

#[test]
fn allocations_on_this_server_reach_each_other_without_hairpinning() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    let relayed = h.allocate(&c);
    // The other party's relayed address is EXTERNAL:port in range: allowed
    // although 198.51.100.0/24 is a documentation range.
    let other = sa(&format!("{EXTERNAL}:{}", relayed.port() + 1));
    assert_eq!(code(&h.bind_channel(&c, 0x4000, other)), 0);
    let mut cdm = channel_data::header(0x4000, 1).to_vec();
    cdm.push(7);
    match h.send(&cdm) {
        ClientOutcome::Forward { peer, .. } => assert_eq!(peer, sa(&format!("127.0.0.1:{}", other.port()))),
        o => panic!("{o:?}"),
    }
    // Outside the relay range the server's own address is refused.
    assert_eq!(code(&h.bind_channel(&c, 0x4001, sa(&format!("{EXTERNAL}:22")))), 403);
}

#[test]
fn even_port_and_reservation_token() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.even_port(true).unwrap();
    });
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    let port = m.xor_relayed_address().unwrap().unwrap().port();
    assert_eq!(port % 2, 0);
    let Some(Attribute::ReservationToken(token)) = m.get(kind::RESERVATION_TOKEN).unwrap() else {
        panic!()
    };
    let token = *token;
    h.key.client.set_port(40001);
    let c = h.creds("alice", "secret"); // nonces are bound to the client's address
    let req = h.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.reservation_token(&token).unwrap();
    });
    let resp = h.exchange(&req);
    assert_eq!(
        Message::parse(&resp)
            .unwrap()
            .xor_relayed_address()
            .unwrap()
            .unwrap()
            .port(),
        port + 1
    );
}

#[test]
fn icmp_errors_reach_the_client_as_data_indications() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let peer = sa("8.8.8.8:9");
    assert_eq!(code(&h.permit(&c, peer)), 0);
    let (key, out) = h.icmp(RelayId(0), peer, (3, 3, 0)).unwrap();
    assert_eq!(key, h.key);
    let m = Message::parse(&out).unwrap();
    assert_eq!(m.method(), Method::DATA);
    assert_eq!(
        m.get(kind::ICMP).unwrap(),
        Some(Attribute::Icmp {
            icmp_type: 3,
            icmp_code: 3,
            error_data: 0
        })
    );
    assert!(h.icmp(RelayId(0), sa("1.2.3.4:1"), (3, 3, 0)).is_none());
}

#[test]
fn unknown_comprehension_required_attribute_is_420() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| {
        w.requested_transport(17).unwrap();
        w.attribute(0x0077, b"?").unwrap();
    });
    let resp = h.exchange(&req);
    assert_eq!(code(&resp), 420);
    let Some(Attribute::UnknownAttributes(u)) = Message::parse(&resp).unwrap().get(kind::UNKNOWN_ATTRIBUTES).unwrap()
    else {
        panic!()
    };
    assert_eq!(u.iter().collect::<Vec<_>>(), vec![0x0077]);
}

#[test]
fn other_five_tuples_do_not_share_an_allocation() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    // Same client address on another listener is another 5-tuple.
    h.key = ClientKey {
        listener: ListenerId(1),
        client: h.key.client,
    };
    // The first 5-tuple's nonce is no good here.
    let req = h.signed(Method::REFRESH, &c, |_| {});
    assert_eq!(code(&h.exchange(&req)), 438);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::REFRESH, &c, |_| {});
    assert_eq!(code(&h.exchange(&req)), 437);
    let req = h.signed(Method::CREATE_PERMISSION, &c, |w| {
        w.xor_peer_address(&sa("8.8.8.8:1")).unwrap()
    });
    assert_eq!(code(&h.exchange(&req)), 437);
}

#[test]
fn tcp_allocations_connect_and_connection_bind() {
    use turnstile::proto::server::{CONNECTION_BIND_TIMEOUT, connection_owner};

    let mut h = Harness::new();
    // Over UDP a TCP relay is refused.
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(6).unwrap());
    assert_eq!(code(&h.exchange(&req)), 442);

    // Over a stream listener (ListenerId(1)) it is granted.
    h.key.listener = ListenerId(1);
    let control = h.key;
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(6).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    h.key.client.set_port(40100);
    let other = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &other, |w| {
        w.requested_transport(6).unwrap();
        w.even_port(false).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 400, "EVEN-PORT makes no sense for TCP");
    h.key = control;

    // Connect: policy first, then a request for the driver.
    let req = h.signed(Method::CONNECT, &c, |w| w.xor_peer_address(&sa("10.0.0.1:80")).unwrap());
    assert_eq!(code(&h.exchange(&req)), 403);
    let peer = sa("8.8.8.8:443");
    let (relay, to, connection) = h.connect(&c, peer);
    assert_eq!((relay, to), (RelayId(0), peer));
    assert_eq!(connection_owner(connection), 0);
    let req2 = h.signed(Method::CONNECT, &c, |w| w.xor_peer_address(&peer).unwrap());
    assert_eq!(code(&h.exchange(&req2)), 446, "one connection per peer");
    let (key, answer) = h.tcp_connected(connection, true).unwrap();
    assert_eq!(key, control);
    let m = Message::parse(&answer).unwrap();
    assert_eq!((m.class(), m.method()), (Class::Success, Method::CONNECT));
    assert_eq!(m.connection_id().unwrap(), Some(connection));
    assert!(verify_sha1(&answer, &c.key));

    // ConnectionBind on a new data connection.
    h.key = ClientKey {
        listener: ListenerId(1),
        client: sa("192.0.2.10:40200"),
    };
    let bind = h.signed(Method::CONNECTION_BIND, &c, |w| w.connection_id(connection).unwrap());
    let ClientOutcome::ConnectionBound { connection: bound, len } = h.send(&bind) else {
        panic!()
    };
    assert_eq!(bound, connection);
    assert_eq!(code(&h.out[..len]), 0);
    // A second bind of the same id, or an unknown id, is 400.
    h.key.client.set_port(40201);
    assert_eq!(code(&h.exchange(&bind)), 400);
    let unknown = h.signed(Method::CONNECTION_BIND, &c, |w| w.connection_id(12345).unwrap());
    assert_eq!(code(&h.exchange(&unknown)), 400);

    // A failed Connect is 447.
    h.key = control;
    let other = sa("1.1.1.1:443");
    let (_, _, failed) = h.connect(&c, other);
    let (_, answer) = h.tcp_connected(failed, false).unwrap();
    assert_eq!(code(&answer), 447);

    // Incoming peers: a ConnectionAttempt with a permission, nothing without.
    assert!(h.peer_accepted(RelayId(0), sa("9.9.9.9:5000")).is_err());
    assert_eq!(code(&h.permit(&c, sa("9.9.9.9:1"))), 0);
    let (key, incoming, attempt) = h.peer_accepted(RelayId(0), sa("9.9.9.9:5000")).unwrap();
    assert_eq!(key, control);
    let m = Message::parse(&attempt).unwrap();
    assert_eq!((m.class(), m.method()), (Class::Indication, Method::CONNECTION_ATTEMPT));
    assert_eq!(m.connection_id().unwrap(), Some(incoming));
    // Not bound within 30 s: closed.
    h.commands.clear();
    h.advance(CONNECTION_BIND_TIMEOUT.as_secs() + 1);
    assert!(
        h.commands.contains(&Output::CloseConnection(incoming)),
        "{:?}",
        h.commands
    );
    // Channels and Send make no sense on a TCP allocation.
    let c = h.creds("alice", "secret");
    assert_eq!(code(&h.bind_channel(&c, 0x4000, sa("8.8.8.8:1"))), 400);
    // Closing the control connection deletes the allocation and its connections.
    h.commands.clear();
    h.input(Input::ClientClosed { key: control });
    assert_eq!(h.server.allocation_count(), 0);
    assert!(
        h.commands.contains(&Output::CloseConnection(connection)),
        "{:?}",
        h.commands
    );
}

#[test]
fn peer_connections_per_allocation_are_capped_both_ways() {
    let mut h = Harness::with(
        ServerConfig {
            max_connections: 2,
            ..config()
        },
        policy(&[]),
        Quotas::new(10, 0),
    );
    h.key.listener = ListenerId(1);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(6).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    assert_eq!(code(&h.permit(&c, sa("9.9.9.9:1"))), 0);
    let (_, _, connection) = h.connect(&c, sa("8.8.8.8:443"));
    h.tcp_connected(connection, true).unwrap();
    let (_, incoming, _) = h.peer_accepted(RelayId(0), sa("9.9.9.9:5000")).unwrap();
    // Full: a third connection either way is refused.
    assert_eq!(
        h.peer_accepted(RelayId(0), sa("9.9.9.9:5001")).map(|_| ()),
        Err(DropReason::ConnectionLimit)
    );
    let req = h.signed(Method::CONNECT, &c, |w| w.xor_peer_address(&sa("8.8.4.4:443")).unwrap());
    assert_eq!(code(&h.exchange(&req)), 508);
    // One closes: room again.
    h.input(Input::TcpConnectionClosed { connection: incoming });
    assert!(h.peer_accepted(RelayId(0), sa("9.9.9.9:5002")).is_ok());
}

#[test]
fn a_reservation_token_is_the_users_own_and_ends_with_the_reservation() {
    let mut h = Harness::new();
    let mut port = 40100;
    // Allocates with EVEN-PORT R=1 as `user`; returns the token.
    let reserve = |h: &mut Harness, port: &mut u16| -> [u8; 8] {
        *port += 1;
        h.key.client.set_port(*port);
        let c = h.creds("alice", "secret");
        let req = h.signed(Method::ALLOCATE, &c, |w| {
            w.requested_transport(17).unwrap();
            w.even_port(true).unwrap();
        });
        let resp = h.exchange(&req);
        let Some(Attribute::ReservationToken(token)) =
            Message::parse(&resp).unwrap().get(kind::RESERVATION_TOKEN).unwrap()
        else {
            panic!("no token")
        };
        *token
    };
    let redeem = |h: &mut Harness, port: &mut u16, user: &str, password: &str, token: [u8; 8]| -> u16 {
        *port += 1;
        h.key.client.set_port(*port);
        let c = h.creds(user, password);
        let req = h.signed(Method::ALLOCATE, &c, |w| {
            w.requested_transport(17).unwrap();
            w.reservation_token(&token).unwrap();
        });
        code(&h.exchange(&req))
    };
    let token = reserve(&mut h, &mut port);
    assert_eq!(
        redeem(&mut h, &mut port, "bob", "hunter2", token),
        508,
        "another user's token"
    );
    h.advance(31);
    assert_eq!(
        redeem(&mut h, &mut port, "alice", "secret", token),
        508,
        "after the reservation ended"
    );
    let token = reserve(&mut h, &mut port);
    h.advance(29);
    assert_eq!(
        redeem(&mut h, &mut port, "alice", "secret", token),
        0,
        "within the reservation"
    );
}

#[test]
fn a_connect_that_takes_too_long_is_447_at_the_cores_deadline() {
    use turnstile::proto::server::CONNECT_TIMEOUT;
    let mut h = Harness::new();
    h.key.listener = ListenerId(1);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(6).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    let (_, _, connection) = h.connect(&c, sa("8.8.8.8:443"));
    assert!(h.server.poll_timeout().is_some());
    let before = h.sent.len();
    h.commands.clear();
    h.advance(CONNECT_TIMEOUT.as_secs() - 1);
    assert_eq!(h.sent.len(), before, "not yet");
    h.advance(2);
    let (key, answer) = h.sent.last().cloned().expect("447 sent");
    assert_eq!(key, h.key);
    assert_eq!(code(&answer), 447);
    assert!(
        h.commands.contains(&Output::CloseConnection(connection)),
        "{:?}",
        h.commands
    );
    // The connection the driver makes after all is closed on the core's word.
    h.commands.clear();
    assert!(h.tcp_connected(connection, true).is_none());
    assert!(
        h.commands.contains(&Output::CloseConnection(connection)),
        "{:?}",
        h.commands
    );
}

/// SOFTWARE goes on every success response and on no error response, be
/// it written at once, after relay binds, or after an RFC 6062 Connect.
#[test]
fn software_is_on_successes_and_never_on_errors() {
    let software = |resp: &[u8]| Message::parse(resp).unwrap().software().unwrap().is_some();
    let mut h = Harness::new();
    let binding = build(Class::Request, Method::BINDING, h.tid(), |_| {});
    assert!(software(&h.exchange(&binding)), "Binding success");
    let c = h.creds("alice", "secret");
    let challenge = build(Class::Request, Method::ALLOCATE, h.tid(), |w| {
        w.requested_transport(17).unwrap()
    });
    assert!(!software(&h.exchange(&challenge)), "401");

    // 508 once the driver cannot bind a relay socket.
    h.bind_script = vec![BindResult::Failed];
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    let failed = h.exchange(&req);
    assert_eq!((code(&failed), software(&failed)), (508, false));
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(17).unwrap());
    let granted = h.exchange(&req);
    assert_eq!((code(&granted), software(&granted)), (0, true));
    let forbidden = h.permit(&c, sa("10.0.0.1:1"));
    assert_eq!((code(&forbidden), software(&forbidden)), (403, false));

    // RFC 6062: the Connect answers come later.
    h.key = ClientKey {
        listener: ListenerId(1),
        client: sa("192.0.2.10:41000"),
    };
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(6).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    let (_, _, ok) = h.connect(&c, sa("8.8.8.8:443"));
    let (_, answer) = h.tcp_connected(ok, true).unwrap();
    assert_eq!((code(&answer), software(&answer)), (0, true));
    let (_, _, refused) = h.connect(&c, sa("1.1.1.1:443"));
    let (_, answer) = h.tcp_connected(refused, false).unwrap();
    assert_eq!((code(&answer), software(&answer)), (447, false));

    // Draining with an alternate server: 300.
    h.server.set_draining(Some(sa("198.51.100.9:3478")));
    h.key.client.set_port(41001);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::ALLOCATE, &c, |w| w.requested_transport(6).unwrap());
    let moved = h.exchange(&req);
    assert_eq!((code(&moved), software(&moved)), (300, false));
}
