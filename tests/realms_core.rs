//! Realms in the core: two tenants with the same user name and different
//! passwords, each found by listener or ORIGIN; quotas, REST secrets,
//! peers and bandwidth per realm; a reload that reorders or removes realms;
//! a live upgrade's snapshot carrying the realm.

use std::sync::Arc;

use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm, rest};
use turnstile::proto::server::{
    ClientKey, ClientOutcome, Credentials, DropReason, ListenerId, QuotaLimits, Quotas, Rate, Realm, Realms,
};
use turnstile::proto::stun::attr::kind;
use turnstile::proto::stun::{Class, Message, Method};
use turnstile::testing::{self, Creds, Harness, REALM, SECRET, code, sa};

const GAMES: &str = "games.example";
const GAMES_SECRET: &str = "games-secret";
const GAMES_ORIGIN: &str = "https://games.example";

/// The default realm (alice/secret, REST SECRET) and games.example
/// (alice/arcade, REST GAMES_SECRET), which listener 1 serves and its
/// origin selects anywhere.
fn realms(games_bandwidth: Rate, default_bandwidth: Rate) -> Realms {
    let games = Credentials::new(GAMES, [("alice", "arcade")], &[GAMES_SECRET.to_owned()], &[9; 32], 600).unwrap();
    Realms::new(
        Realm {
            credentials: Arc::new(testing::credentials()),
            policy: testing::policy(&[]),
            allocation_bandwidth: default_bandwidth,
        },
        vec![Realm {
            credentials: Arc::new(games),
            // This tenant may reach its private network; the default may not.
            policy: testing::policy(&["10.0.0.0/8"]),
            allocation_bandwidth: games_bandwidth,
        }],
        &[None, Some(GAMES)],
        &[(GAMES_ORIGIN, GAMES)],
    )
}

fn games_quotas(per_user: u32, total: u32) -> Arc<Quotas> {
    let q = Quotas::new(0, 0);
    q.set_realms(
        REALM,
        vec![(
            GAMES.to_owned(),
            QuotaLimits {
                per_user,
                total,
                per_ip: 0,
            },
        )],
    );
    Arc::new(q)
}

fn harness() -> Harness {
    Harness::with_realms(testing::config(), realms(Rate::OFF, Rate::OFF), games_quotas(0, 0))
}

fn key(listener: u16, client: &str) -> ClientKey {
    ClientKey {
        listener: ListenerId(listener),
        client: sa(client),
    }
}

/// The REALM and NONCE of a 401 to an unsigned Allocate, with ORIGIN if given.
fn challenge(h: &mut Harness, origin: Option<&str>) -> (String, String) {
    let tid = h.tid();
    let req = testing::build(Class::Request, Method::ALLOCATE, tid, |w| {
        w.requested_transport(17).unwrap();
        if let Some(o) = origin {
            w.attribute(kind::ORIGIN, o.as_bytes()).unwrap();
        }
    });
    let resp = h.exchange(&req);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 401);
    (
        m.realm().unwrap().unwrap().to_owned(),
        m.nonce().unwrap().unwrap().to_owned(),
    )
}

fn creds_in(h: &mut Harness, realm: &str, user: &str, password: &str, origin: Option<&str>) -> Creds {
    let (offered, nonce) = challenge(h, origin);
    assert_eq!(offered, realm, "the 401 names the realm the request belongs to");
    Creds {
        user: user.to_owned(),
        key: LongTermKey::derive(PasswordAlgorithm::Md5, user, realm, password),
        nonce,
    }
}

fn allocate_in(h: &mut Harness, realm: &str, c: &Creds, origin: Option<&str>) -> u16 {
    let req = h.signed_in(Method::ALLOCATE, realm, c, |w| {
        w.requested_transport(17).unwrap();
        if let Some(o) = origin {
            w.attribute(kind::ORIGIN, o.as_bytes()).unwrap();
        }
    });
    code(&h.exchange(&req))
}

#[test]
fn the_same_user_name_authenticates_only_against_its_own_realm() {
    let mut h = harness();
    // Listener 0: the default realm.
    h.key = key(0, "192.0.2.10:40000");
    let wrong = creds_in(&mut h, REALM, "alice", "arcade", None);
    assert_eq!(
        allocate_in(&mut h, REALM, &wrong, None),
        401,
        "games' password in the default realm"
    );
    let games_here = Creds {
        key: LongTermKey::derive(PasswordAlgorithm::Md5, "alice", GAMES, "arcade"),
        ..wrong.clone()
    };
    assert_eq!(
        allocate_in(&mut h, GAMES, &games_here, None),
        401,
        "another realm's REALM on the default realm's listener"
    );
    let right = creds_in(&mut h, REALM, "alice", "secret", None);
    assert_eq!(allocate_in(&mut h, REALM, &right, None), 0);

    // Listener 1: games.example.
    h.key = key(1, "192.0.2.11:40000");
    let wrong = creds_in(&mut h, GAMES, "alice", "secret", None);
    assert_eq!(
        allocate_in(&mut h, GAMES, &wrong, None),
        401,
        "the default realm's password in games"
    );
    let right = creds_in(&mut h, GAMES, "alice", "arcade", None);
    assert_eq!(allocate_in(&mut h, GAMES, &right, None), 0);

    // Listener 0 with games' ORIGIN: games.example (case and a trailing
    // slash do not matter); an unknown origin leaves the listener's realm.
    h.key = key(0, "192.0.2.12:40000");
    let (realm, _) = challenge(&mut h, Some("https://unknown.example"));
    assert_eq!(realm, REALM);
    let c = creds_in(&mut h, GAMES, "alice", "arcade", Some("HTTPS://Games.Example/"));
    assert_eq!(allocate_in(&mut h, GAMES, &c, Some(GAMES_ORIGIN)), 0);

    // The allocation stays in its realm: a Refresh without ORIGIN still
    // authenticates against games.example.
    let req = h.signed_in(Method::REFRESH, GAMES, &c, |_| {});
    assert_eq!(code(&h.exchange(&req)), 0);
    let realms: Vec<String> = h.server.allocations_info(h.now).into_iter().map(|a| a.realm).collect();
    assert_eq!(realms.iter().filter(|r| *r == GAMES).count(), 2);
    assert_eq!(realms.iter().filter(|r| *r == REALM).count(), 1);
}

#[test]
fn rest_secrets_are_per_realm() {
    let mut h = harness();
    let user = format!("{}:player", h.now.unix + 3600);
    for (listener, realm, secret, expected) in [
        (0, REALM, GAMES_SECRET, 401),
        (1, GAMES, SECRET, 401),
        (0, REALM, SECRET, 0),
        (1, GAMES, GAMES_SECRET, 0),
    ] {
        h.key = key(listener, &format!("192.0.2.20:{}", 41000 + expected + listener));
        let password = rest::password(secret.as_bytes(), &user);
        let c = creds_in(&mut h, realm, &user, &password, None);
        assert_eq!(allocate_in(&mut h, realm, &c, None), expected, "{realm} with {secret}");
    }
}

#[test]
fn quotas_are_per_realm() {
    // games.example: one allocation per user, two in all; the default
    // realm: no quota.
    let quotas = games_quotas(1, 2);
    let mut h = Harness::with_realms(testing::config(), realms(Rate::OFF, Rate::OFF), quotas.clone());
    let games = |h: &mut Harness, client: &str, user: &str| {
        h.key = key(1, client);
        let password = rest::password(GAMES_SECRET.as_bytes(), user);
        let c = creds_in(h, GAMES, user, &password, None);
        allocate_in(h, GAMES, &c, None)
    };
    let a = format!("{}:a", h.now.unix + 3600);
    let b = format!("{}:b", h.now.unix + 3600);
    let c = format!("{}:c", h.now.unix + 3600);
    assert_eq!(games(&mut h, "192.0.2.30:1000", &a), 0);
    assert_eq!(games(&mut h, "192.0.2.30:1001", &a), 486, "user quota of the realm");
    assert_eq!(games(&mut h, "192.0.2.30:1002", &b), 0);
    assert_eq!(games(&mut h, "192.0.2.30:1003", &c), 486, "the realm's total");
    // The default realm's alice is not limited by games' quotas.
    for port in 0..3 {
        h.key = key(0, &format!("192.0.2.31:{}", 2000 + port));
        let c = creds_in(&mut h, REALM, "alice", "secret", None);
        assert_eq!(allocate_in(&mut h, REALM, &c, None), 0);
    }
    let counts: Vec<(String, u32, u64, u64)> = quotas
        .realms()
        .into_iter()
        .map(|(n, c)| (n, c.allocations, c.granted, c.refused))
        .collect();
    assert_eq!(
        counts,
        vec![(REALM.to_owned(), 3, 3, 0), (GAMES.to_owned(), 2, 2, 2)],
        "per-realm counts for the metrics"
    );
    assert_eq!(h.server.stats().quota_refusals, [1, 0, 0, 1]);
}

#[test]
fn peers_and_bandwidth_are_per_realm() {
    // The default realm: 1000 bytes a second per allocation, no more at
    // once; games.example: no limit.
    let slow = Rate {
        bytes_per_second: 1000,
        burst: 1000,
    };
    let mut h = Harness::with_realms(testing::config(), realms(Rate::OFF, slow), games_quotas(0, 0));
    let private = sa("10.1.2.3:5000");

    h.key = key(0, "192.0.2.40:1000");
    let d = creds_in(&mut h, REALM, "alice", "secret", None);
    assert_eq!(allocate_in(&mut h, REALM, &d, None), 0);
    let req = h.signed_in(Method::CREATE_PERMISSION, REALM, &d, |w| {
        w.xor_peer_address(&private).unwrap()
    });
    assert_eq!(code(&h.exchange(&req)), 403, "the default realm may not reach 10/8");
    let public = sa("9.9.9.9:5000");
    let req = h.signed_in(Method::CHANNEL_BIND, REALM, &d, |w| {
        w.channel_number(0x4001).unwrap();
        w.xor_peer_address(&public).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 0);
    let default_key = h.key;

    h.key = key(1, "192.0.2.41:1000");
    let g = creds_in(&mut h, GAMES, "alice", "arcade", None);
    assert_eq!(allocate_in(&mut h, GAMES, &g, None), 0);
    let req = h.signed_in(Method::CHANNEL_BIND, GAMES, &g, |w| {
        w.channel_number(0x4001).unwrap();
        w.xor_peer_address(&private).unwrap();
    });
    assert_eq!(code(&h.exchange(&req)), 0, "games.example may reach 10/8");
    let games_key = h.key;

    // The second and third 800-byte packets in the same instant are over
    // the default realm's limit, never over games'.
    let mut packet = vec![0x40, 0x01, 0x03, 0x20];
    packet.resize(4 + 800, 7);
    let mut dropped = [0, 0];
    for (i, k) in [default_key, games_key].into_iter().enumerate() {
        h.key = k;
        for _ in 0..3 {
            if matches!(h.send(&packet), ClientOutcome::Drop(DropReason::BandwidthLimit)) {
                dropped[i] += 1;
            }
        }
    }
    assert_eq!(dropped, [2, 0]);
}

#[test]
fn a_reload_keeps_allocations_of_realms_that_stay_and_ends_those_of_a_removed_realm() {
    use turnstile::proto::server::Reconfiguration;
    let mut h = harness();
    h.key = key(0, "192.0.2.50:1000");
    let d = creds_in(&mut h, REALM, "alice", "secret", None);
    assert_eq!(allocate_in(&mut h, REALM, &d, None), 0);
    h.key = key(1, "192.0.2.51:1000");
    let g = creds_in(&mut h, GAMES, "alice", "arcade", None);
    assert_eq!(allocate_in(&mut h, GAMES, &g, None), 0);
    let limits = testing::allocation_limits();

    // A third realm first, then games: indexes move, realms stay.
    let arcade = Credentials::new("arcade.example", [("bob", "x")], &[], &[9; 32], 600).unwrap();
    let games = Credentials::new(GAMES, [("alice", "arcade")], &[], &[9; 32], 600).unwrap();
    let realm = |c: Credentials| Realm {
        credentials: Arc::new(c),
        policy: testing::policy(&[]),
        allocation_bandwidth: Rate::OFF,
    };
    let reordered = Realms::new(
        realm(testing::credentials()),
        vec![realm(arcade), realm(games)],
        &[None, Some(GAMES)],
        &[],
    );
    let ended = h.server.reconfigure(Reconfiguration {
        realms: Arc::new(reordered),
        revoke: true,
        limits,
        rates: [Rate::OFF; 2],
    });
    assert_eq!(ended, 0);
    let req = h.signed_in(Method::REFRESH, GAMES, &g, |_| {});
    assert_eq!(
        code(&h.exchange(&req)),
        0,
        "games' allocation found its realm at its new index"
    );

    // games.example removed: its allocation ends, the default realm's stays.
    let ended = h.server.reconfigure(Reconfiguration {
        realms: Arc::new(Realms::single(realm(testing::credentials()))),
        revoke: false,
        limits,
        rates: [Rate::OFF; 2],
    });
    assert_eq!(ended, 1);
    let left: Vec<String> = h.server.allocations_info(h.now).into_iter().map(|a| a.realm).collect();
    assert_eq!(left, vec![REALM.to_owned()]);
    h.key = key(0, "192.0.2.50:1000");
    let req = h.signed_in(Method::REFRESH, REALM, &d, |_| {});
    assert_eq!(code(&h.exchange(&req)), 0);
}

#[test]
fn a_snapshot_carries_each_allocations_realm() {
    let mut h = harness();
    h.key = key(1, "192.0.2.60:1000");
    let g = creds_in(&mut h, GAMES, "alice", "arcade", None);
    assert_eq!(allocate_in(&mut h, GAMES, &g, None), 0);
    h.key = key(0, "192.0.2.61:1000");
    let d = creds_in(&mut h, REALM, "alice", "secret", None);
    assert_eq!(allocate_in(&mut h, REALM, &d, None), 0);
    let snapshot = h.server.export(h.now.instant, h.now.unix * 1000, |_| true);
    let bytes = snapshot.to_bytes();
    let back = turnstile::proto::server::snapshot::Snapshot::from_bytes(&bytes).unwrap();
    assert_eq!(back.realms.len(), 2);

    // A new process with both realms: each allocation in its own.
    let mut fresh = harness();
    fresh.now = h.now;
    let relays = fresh
        .server
        .restore(back.clone(), h.now.instant, h.now.unix * 1000, Some, false)
        .unwrap();
    assert_eq!(relays.len(), 2);
    fresh.open_relays.extend(relays);
    fresh.drain();
    fresh.key = key(1, "192.0.2.60:1000");
    let req = fresh.signed_in(Method::REFRESH, GAMES, &g, |_| {});
    assert_eq!(code(&fresh.exchange(&req)), 0);

    // A new process without games.example takes only the default realm's.
    let mut single = Harness::new();
    single.now = h.now;
    let relays = single
        .server
        .restore(back, h.now.instant, h.now.unix * 1000, Some, false)
        .unwrap();
    assert_eq!(relays.len(), 1);
    let left: Vec<String> = single
        .server
        .allocations_info(h.now)
        .into_iter()
        .map(|a| a.realm)
        .collect();
    assert_eq!(left, vec![REALM.to_owned()]);
}

#[test]
fn a_format_2_snapshot_still_restores_into_the_default_realm() {
    use turnstile::proto::server::snapshot::{Snapshot, VERSION};
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let mut snapshot = h.server.export(h.now.instant, h.now.unix * 1000, |_| true);
    assert_eq!(snapshot.realms, vec![REALM.to_owned()]);
    // Format 2 is format 3 without the trailing realm names: the version
    // (one varint byte) says 2 and the empty list's length byte goes.
    snapshot.realms.clear();
    let mut bytes = snapshot.to_bytes();
    assert_eq!((bytes[0], bytes.last()), (3, Some(&0)));
    bytes[0] = 2;
    bytes.pop();
    let back = Snapshot::from_bytes(&bytes).unwrap();
    assert_eq!(back.version, VERSION);
    assert_eq!(back.allocations.len(), 1);
    let mut fresh = harness();
    fresh.now = h.now;
    let relays = fresh
        .server
        .restore(back, h.now.instant, h.now.unix * 1000, Some, false)
        .unwrap();
    assert_eq!(relays.len(), 1);
    let realms: Vec<String> = fresh
        .server
        .allocations_info(h.now)
        .into_iter()
        .map(|a| a.realm)
        .collect();
    assert_eq!(realms, vec![REALM.to_owned()]);
    // Any other version is refused by name.
    bytes[0] = 1;
    assert!(
        Snapshot::from_bytes(&bytes)
            .unwrap_err()
            .to_string()
            .contains("format 1")
    );
}
