//! Realms against the real binary with coturn's client: two tenants on two
//! listeners, the same user name with different passwords and different
//! REST secrets, each authenticating only against its own realm; a
//! realm's own quota; ORIGIN selecting a realm on any listener; per-realm
//! metrics; a reload that changes a listener's realm.

mod common;

use std::net::SocketAddr;

use common::raw::{RawClient, code};
use common::uclient::{self, EchoPeer};
use common::{TestServer, free_port_pair};
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::stun::{Message, Method, kind};

/// Listeners on 127.0.0.1:`port` (meet.example, the default) and
/// `port` + 1 (games.example, which holds `games_quota` allocations at most).
fn config(port: u16, games_quota: u32) -> String {
    TEMPLATE
        .replace("{meet}", &port.to_string())
        .replace("{games}", &(port + 1).to_string())
        .replace("{quota}", &games_quota.to_string())
}

const TEMPLATE: &str = r#"
workers = 2

# The default realm: the first one.
[[realm]]
name = "meet.example"
users = { alice = "secret" }
secrets = ["meet-rest-secret"]

[[realm]]
name = "games.example"
users = { alice = "arcade" }
secrets = ["games-rest-secret"]
origins = ["https://games.example"]
total_quota = {quota}

[[listen]]
transport = "udp"
address = "127.0.0.1:{meet}"

[[listen]]
transport = "udp"
address = "127.0.0.1:{games}"
realm = "games.example"

[metrics]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "admin-token-0123456789"

[relay]
address = "127.0.0.1"
ports = "62600-62799"

[peers]
allow = ["127.0.0.0/8"]
"#;

/// coturn's client through `port` with these credential flags; returns
/// whether it relayed everything it sent.
fn relays(port: u16, peer: &EchoPeer, credentials: &[&str]) -> uclient::Report {
    let mut args: Vec<String> = credentials.iter().map(|a| (*a).to_owned()).collect();
    args.extend(
        ["-e", "127.0.0.1", "-r", &peer.port.to_string(), "-p", &port.to_string()]
            .iter()
            .map(|a| (*a).to_owned()),
    );
    args.extend(["-n", "50", "-m", "2", "127.0.0.1"].iter().map(|a| (*a).to_owned()));
    uclient::run_args(&args)
}

#[test]
fn the_same_user_name_and_rest_user_authenticate_only_in_their_own_realm() {
    let server = TestServer::start(&config(free_port_pair(), 100));
    let (meet, games) = (server.udp[0].port(), server.udp[1].port());
    let peer = EchoPeer::start();
    for (port, flags, ok) in [
        (meet, &["-u", "alice", "-w", "secret"][..], true),
        (meet, &["-u", "alice", "-w", "arcade"], false),
        (games, &["-u", "alice", "-w", "arcade"], true),
        (games, &["-u", "alice", "-w", "secret"], false),
        (meet, &["-u", "bob", "-W", "meet-rest-secret"], true),
        (meet, &["-u", "bob", "-W", "games-rest-secret"], false),
        (games, &["-u", "bob", "-W", "games-rest-secret"], true),
        (games, &["-u", "bob", "-W", "meet-rest-secret"], false),
    ] {
        let r = relays(port, &peer, flags);
        if ok {
            assert_eq!(r.lost, Some(0), "{flags:?} on {port}: {}", r.output);
            assert!(
                r.sent >= 100 && r.received == r.sent,
                "{flags:?} on {port}: {}",
                r.output
            );
        } else {
            assert_eq!(r.received, 0, "{flags:?} on {port}: {}", r.output);
            assert!(
                r.output.contains("Cannot complete Allocation"),
                "{flags:?} on {port}: {}",
                r.output
            );
        }
    }
    // Each 401 named the listener's realm; the refusals were counted.
    assert!(server.wait_counter("turnstile_auth_failures_total{reason=\"bad_integrity\"}", 4.0));
    let scrape = server.scrape();
    assert!(
        scrape.contains("turnstile_realm_allocations_granted_total{realm=\"games.example\"}"),
        "{scrape}"
    );
}

#[test]
fn a_realms_own_quota_an_origin_and_a_reload_that_moves_a_listener() {
    let port = free_port_pair();
    let server = TestServer::start(&config(port, 3));
    let (meet, games) = (server.udp[0], server.udp[1]);

    // games.example holds three allocations at most; meet.example has no quota.
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = RawClient::connect_as(games, "alice", "arcade");
        assert_eq!(c.realm, "games.example");
        let r = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
        assert_eq!(code(&r), if i < 3 { 0 } else { 486 }, "allocation {i} in games.example");
        held.push(c);
    }
    for _ in 0..4 {
        let mut c = RawClient::connect_as(meet, "alice", "secret");
        assert_eq!(c.realm, "meet.example");
        let r = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
        assert_eq!(code(&r), 0);
        held.push(c);
    }
    let scrape = server.scrape();
    for line in [
        "turnstile_realm_allocations{realm=\"games.example\"} 3",
        "turnstile_realm_allocations{realm=\"meet.example\"} 4",
        "turnstile_realm_quota_refusals_total{realm=\"games.example\"} 1",
    ] {
        assert!(scrape.lines().any(|l| l == line), "{line} in\n{scrape}");
    }
    // Worker counters are exported once a second.
    assert!(server.wait_counter("turnstile_quota_refusals_total{quota=\"realm\"}", 1.0));

    // games' ORIGIN on meet's listener: games.example answers (and its quota holds).
    let mut c = RawClient::connect_as(meet, "alice", "secret");
    let r = c.request(Method::ALLOCATE, false, |w| {
        w.requested_transport(17).unwrap();
        w.attribute(kind::ORIGIN, b"https://games.example").unwrap();
    });
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 401);
    assert_eq!(m.realm().unwrap(), Some("games.example"));
    c.realm = "games.example".into();
    c.key = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", "games.example", "arcade");
    c.nonce = m.nonce().unwrap().unwrap().to_owned();
    let r = c.request(Method::ALLOCATE, true, |w| {
        w.requested_transport(17).unwrap();
        w.attribute(kind::ORIGIN, b"https://games.example").unwrap();
    });
    assert_eq!(code(&r), 486, "games.example's quota, reached through its origin");

    // A reload gives the first listener to games.example: new clients there
    // get its realm; allocations made before stay in theirs.
    let reloaded = config(port, 3).replacen(
        &format!("address = \"{meet}\"\n"),
        &format!("address = \"{meet}\"\nrealm = \"games.example\"\n"),
        1,
    );
    assert!(reloaded.matches("realm = \"games.example\"").count() == 2);
    std::fs::write(server.config_path(), reloaded).unwrap();
    server.signal("HUP");
    assert!(server.wait_log("configuration reloaded"));
    let c = RawClient::connect_as(meet, "alice", "arcade");
    assert_eq!(c.realm, "games.example");
    let meet_client = &mut held[4];
    let r = meet_client.request(Method::REFRESH, true, |w| w.lifetime(600).unwrap());
    assert_eq!(code(&r), 0, "an allocation keeps its realm across the reload");
}

#[test]
fn the_credential_api_hands_out_each_realms_credentials_with_its_listeners() {
    use turnstile::proto::auth::rest;
    let port = free_port_pair();
    let server = TestServer::start(&config(port, 3));
    let token = Some("admin-token-0123456789");
    for (realm, secret, own, other) in [
        (None, "meet-rest-secret", port, port + 1),
        (Some("meet.example"), "meet-rest-secret", port, port + 1),
        (Some("games.example"), "games-rest-secret", port + 1, port),
    ] {
        let body = match realm {
            Some(r) => format!("{{\"realm\": \"{r}\", \"user\": \"player\"}}"),
            None => "{\"user\": \"player\"}".to_owned(),
        };
        let (status, text) = server.admin_request("POST", "/v1/ice-servers", token, &body);
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let entry = &v["iceServers"][0];
        let username = entry["username"].as_str().unwrap();
        assert_eq!(
            entry["credential"].as_str().unwrap(),
            rest::password(secret.as_bytes(), username)
        );
        let urls: Vec<&str> = entry["urls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        assert!(
            urls.iter().any(|u| u.contains(&format!(":{own}"))),
            "{realm:?}: {urls:?}"
        );
        assert!(
            !urls.iter().any(|u| u.contains(&format!(":{other}"))),
            "{realm:?}: {urls:?}"
        );
        // And the credential works there.
        let mut c = RawClient::connect_as(
            SocketAddr::from(([127, 0, 0, 1], own)),
            username,
            entry["credential"].as_str().unwrap(),
        );
        let r = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
        assert_eq!(code(&r), 0, "{realm:?}");
    }
    let (status, _) = server.admin_request("GET", "/v1/ice-servers?realm=nowhere.example", token, "");
    assert_eq!(status, 404);

    // `turnstile kick alice --realm games.example` ends games' alice only.
    let mut games_alice = RawClient::connect_as(SocketAddr::from(([127, 0, 0, 1], port + 1)), "alice", "arcade");
    let mut meet_alice = RawClient::connect_as(SocketAddr::from(([127, 0, 0, 1], port)), "alice", "secret");
    for c in [&mut games_alice, &mut meet_alice] {
        assert_eq!(
            code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
            0
        );
    }
    // The command finds the admin listener in the configuration: the one
    // the server bound, as an operator's file would name it.
    let cli_config = server.dir().join("cli.toml");
    let admin = server.admin.unwrap();
    std::fs::write(
        &cli_config,
        config(port, 3).replace(
            "listen = \"127.0.0.1:0\"\ntoken",
            &format!("listen = \"{admin}\"\ntoken"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["kick", "alice", "--realm", "games.example", "--config"])
        .arg(&cli_config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"deleted":1}"#);
    assert_eq!(code(&games_alice.request(Method::REFRESH, true, |_| {})), 437);
    assert_eq!(
        code(&meet_alice.request(Method::REFRESH, true, |_| {})),
        0,
        "meet.example's alice is another user"
    );

    // A revocation in games.example refuses games' alice only.
    let (status, body) = server.admin_request(
        "POST",
        "/v1/revocations",
        token,
        r#"{"user": "alice", "realm": "games.example", "ttl": 60}"#,
    );
    assert_eq!(status, 200, "{body}");
    let allocate_at = |port: u16, password: &str| {
        let mut c = RawClient::connect_as(SocketAddr::from(([127, 0, 0, 1], port)), "alice", password);
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap()))
    };
    assert_eq!(allocate_at(port + 1, "arcade"), 401, "revoked in games.example");
    assert_eq!(
        code(&meet_alice.request(Method::REFRESH, true, |_| {})),
        0,
        "not revoked in meet.example"
    );
    assert_eq!(allocate_at(port, "secret"), 0);
    assert!(server.wait_counter("turnstile_auth_failures_total{reason=\"revoked\"}", 1.0));
}
