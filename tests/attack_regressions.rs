//! Findings of an attack on the running server, each pinned by a test that
//! failed before its fix (docs/SECURITY.md, "Findings of the attack on the
//! running server"). Where the finding is about the running server, the
//! test drives the real binary on loopback.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::TestServer;
use common::raw::{RawClient, code};
use turnstile::proto::auth::rest;
use turnstile::proto::stun::{Class, Method};

const REST_SECRET: &str = "attack-test-secret";
const ADMIN_TOKEN: &str = "an-admin-token-for-tests";

fn config(extra: &str) -> String {
    format!(
        r#"realm = "test.local"
workers = 1

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[[listen]]
transport = "tcp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "62700-62799"

[auth]
users = {{ alice = "secret" }}
secrets = ["{REST_SECRET}"]

[peers]
allow = ["127.0.0.0/8"]

[metrics]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

{extra}
"#
    )
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn allocate(c: &mut RawClient) -> u16 {
    code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap()))
}

/// Item 1: a UDP listener that has been idle must judge a request by the
/// time it arrives, not by when the listener began to wait.
#[test]
fn an_idle_udp_listener_judges_requests_by_their_arrival_time() {
    let server = TestServer::start(&config(""));
    let udp = server.udp[0];

    // A REST credential valid for 2 s; its nonce fetched while it is valid.
    let user = format!("{}:carol", unix_now() + 2);
    let password = rest::password(REST_SECRET.as_bytes(), &user);
    let mut short_lived = RawClient::connect_as(udp, &user, &password);
    // The listener is idle for 7 s; the credential expires meanwhile.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        allocate(&mut short_lived),
        401,
        "a REST credential 5 s past its expiry allocates on an idle UDP listener"
    );
}

/// Item 1, the permission half: after an idle period a permission is born
/// with its full lifetime, so data flows right after CreatePermission.
#[test]
fn an_allocation_made_after_an_idle_period_gets_its_whole_lifetime() {
    let server = TestServer::start(&config(""));
    std::thread::sleep(Duration::from_secs(6));
    let mut c = RawClient::connect(server.udp[0]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(allocate(&mut c), 0);
    let (status, body) = server.admin_request("GET", "/v1/allocations", Some(ADMIN_TOKEN), "");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expires = v["allocations"][0]["expires_in_seconds"].as_u64().unwrap();
    // 600 s granted now; a stale stamp would leave it at 597 or less.
    assert!(expires >= 598, "an allocation granted 600 s expires in {expires} s");
}

/// Waits until the server closes `s` (EOF or reset) or `limit` passes.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// Item 2: a TCP connection whose allocation the operator ended is closed,
/// not left open with no deadline (the idle timeout is 30 s here).
#[test]
fn a_tcp_connection_goes_with_its_allocation() {
    let server = TestServer::start(&config(""));
    let mut c = RawClient::connect_tcp(server.tcp[0], "alice", "secret");
    assert_eq!(allocate(&mut c), 0);
    let (status, body) = server.admin_request("DELETE", "/v1/allocations?user=alice", Some(ADMIN_TOKEN), "");
    assert_eq!((status, body.as_str()), (200, r#"{"deleted":1}"#));
    let mut tcp = c.tcp.take().unwrap();
    let closed = closed_within(&mut tcp, Duration::from_secs(5));
    assert!(
        closed.is_some(),
        "the connection of a kicked allocation is still open after 5 s"
    );
    assert!(server.wait_counter("turnstile_connections_closed_total{reason=\"allocation_ended\"}", 1.0));

    // A Refresh 0 leaves the connection to the client (it may allocate
    // again), under the idle timeout.
    let mut c = RawClient::connect_tcp(server.tcp[0], "alice", "secret");
    assert_eq!(allocate(&mut c), 0);
    let r = c.request(Method::REFRESH, true, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&r), 0);
    assert_eq!(allocate(&mut c), 0, "allocate again on the same connection");
}

/// One GET with a deadline; None when it went unanswered.
fn try_get(addr: std::net::SocketAddr, path: &str, wait: Duration) -> Option<u16> {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, wait).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split(' ').nth(1)?.parse().ok()
}

/// Item 3: running out of descriptors once must not stop the metrics and
/// admin listeners for good.
#[test]
fn the_http_listeners_survive_a_descriptor_shortage() {
    let server = TestServer::start_with_fd_limit(&config(""), 64);
    let metrics = server.metrics.unwrap();
    assert_eq!(try_get(metrics, "/healthz", Duration::from_secs(5)), Some(200));
    // Idle TCP connections to the TURN listener take every descriptor left.
    let mut hogs = Vec::new();
    for _ in 0..80 {
        hogs.push(TcpStream::connect(server.tcp[0]).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    // Accepting these fails while no descriptor is free.
    let pending_metrics = std::thread::spawn(move || try_get(metrics, "/healthz", Duration::from_secs(8)));
    let admin = server.admin.unwrap();
    let pending_admin = std::thread::spawn(move || try_get(admin, "/v1/allocations", Duration::from_secs(8)));
    std::thread::sleep(Duration::from_secs(1));
    drop(hogs);
    assert_eq!(
        pending_metrics.join().unwrap(),
        Some(200),
        "the metrics listener serves again once descriptors are back"
    );
    assert_eq!(pending_admin.join().unwrap(), Some(401), "so does the admin listener");
    assert_eq!(try_get(metrics, "/healthz", Duration::from_secs(5)), Some(200));
    assert!(server.counter("turnstile_http_connections_refused_total{reason=\"accept_error\"}") >= 1.0);
}

/// Item 4: one TCP allocation may hold only so many RFC 6062 peer
/// connections (64 by default); Connects beyond are 508.
#[test]
fn connects_per_allocation_are_capped() {
    let server = TestServer::start(&config(""));
    // One listener on every loopback address: each Connect names another peer.
    let peers = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = peers.local_addr().unwrap().port();
    let mut c = RawClient::connect_tcp(server.tcp[0], "alice", "secret");
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(6).unwrap())),
        0
    );
    let mut codes = Vec::new();
    for i in 0..70u8 {
        let peer: std::net::SocketAddr = format!("127.0.1.{}:{port}", i + 1).parse().unwrap();
        codes.push(code(
            &c.request(Method::CONNECT, true, |w| w.xor_peer_address(&peer).unwrap()),
        ));
    }
    assert!(codes[..64].iter().all(|&c| c == 0), "{codes:?}");
    assert!(codes[64..].iter().all(|&c| c == 508), "{codes:?}");
    assert!(server.wait_counter("turnstile_error_responses_total{code=\"508\"}", 6.0));
}

/// Item 6: the credential API's `ttl` is a positive whole number within the
/// maximum, or the request is refused; it never falls back to a day.
#[test]
fn a_credential_ttl_that_is_not_a_whole_number_in_range_is_refused() {
    let server = TestServer::start(&config(""));
    let post = |body: &str| server.admin_request("POST", "/v1/ice-servers", Some(ADMIN_TOKEN), body);
    for bad in [
        r#"{"ttl":"300"}"#,
        r#"{"ttl":300.0}"#,
        r#"{"ttl":300.5}"#,
        r#"{"ttl":-300}"#,
        r#"{"ttl":0}"#,
        r#"{"ttl":null}"#,
        r#"{"ttl":604801}"#,
        r#"{"ttl":18446744073709551616}"#,
        r#"{"user":42}"#,
        r#"[300]"#,
    ] {
        let (status, body) = post(bad);
        assert_eq!(status, 400, "{bad} → {body}");
    }
    for bad in ["ttl=abc", "ttl=300.0", "ttl=-300", "ttl=+300", "ttl=", "ttl=0"] {
        let (status, body) = server.admin_request("GET", &format!("/v1/ice-servers?{bad}"), Some(ADMIN_TOKEN), "");
        assert_eq!(status, 400, "{bad} → {body}");
    }
    let before = unix_now();
    let (status, body) = post(r#"{"ttl":300,"user":"phone-42"}"#);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ttl"], 300);
    let username = v["iceServers"][0]["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    let expiry: u64 = expiry.parse().unwrap();
    assert!((before + 300..=unix_now() + 300).contains(&expiry), "{username}");
    assert_eq!(user, "phone-42");
    let (status, _) = server.admin_request("GET", "/v1/ice-servers?ttl=60", Some(ADMIN_TOKEN), "");
    assert_eq!(status, 200);
}

/// Item 8: names with `+ % & #` (and spaces, non-ASCII) can be kicked, by
/// the admin API with percent-encoding and by `turnstile kick`.
#[test]
fn odd_user_names_can_be_kicked() {
    let server = TestServer::start(&config(""));
    // The CLI reads the admin address from the configuration: write the real port.
    let text = std::fs::read_to_string(server.config_path()).unwrap();
    std::fs::write(
        server.config_path(),
        text.replace(
            "listen = \"127.0.0.1:0\"\ntoken",
            &format!("listen = \"{}\"\ntoken", server.admin.unwrap()),
        ),
    )
    .unwrap();
    let names = [
        "a+b@example.org",
        "100%",
        "x&y=z",
        "#tag",
        "two words",
        "ünïcödé",
        "a%2Bb",
    ];
    let mut clients = Vec::new();
    for name in names {
        let user = format!("1999999999:{name}");
        let mut c = RawClient::connect_as(server.udp[0], &user, &rest::password(REST_SECRET.as_bytes(), &user));
        assert_eq!(allocate(&mut c), 0, "{name}");
        clients.push(c);
    }
    for (i, name) in names.iter().enumerate() {
        let user = format!("1999999999:{name}");
        let out = if i % 2 == 0 {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
                .args(["--config", server.config_path().to_str().unwrap(), "kick", &user])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            let encoded: String = user.bytes().map(|b| format!("%{b:02X}")).collect();
            let (status, body) = server.admin_request(
                "DELETE",
                &format!("/v1/allocations?user={encoded}"),
                Some(ADMIN_TOKEN),
                "",
            );
            assert_eq!(status, 200);
            body
        };
        assert_eq!(out, r#"{"deleted":1}"#, "kick {user:?}");
    }
    for mut c in clients {
        let r = c.request(Method::REFRESH, true, |_| {});
        assert_eq!(code(&r), 437, "the allocation is gone");
    }
}

/// Item 7: an attacker-chosen user name (a REST name a backend signed
/// without filtering) cannot forge a log line, move the cursor or pose as
/// another field, in the text format or in JSON.
#[test]
fn user_names_cannot_forge_log_lines() {
    let forged = "2026-01-01T00:00:00.000000Z  INFO turnstile: allocation created client=6.6.6.6:1";
    let user = format!("1999999999:mallory\n{forged}\r\u{1b}[2K client=6.6.6.6:2");
    for format in ["text", "json"] {
        let server = TestServer::start(&config(&format!("[log]\nformat = \"{format}\"")));
        let mut c = RawClient::connect_as(server.udp[0], &user, &rest::password(REST_SECRET.as_bytes(), &user));
        assert_eq!(allocate(&mut c), 0);
        let line = server.wait_line("mallory").expect("the allocation is logged");
        assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{format}: {line:?}");
        assert!(
            line.contains("6.6.6.6:1"),
            "the whole name is on the one line: {line:?}"
        );
        match format {
            "text" => {
                assert!(line.contains(r#"user="1999999999:mallory\n2026-01-01"#), "{line}");
                // The real client address is a field of its own; the forged one is inside the quotes.
                let client = c.socket.local_addr().unwrap();
                assert!(line.contains(&format!("client={client}")), "{line}");
            }
            _ => {
                let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object a line");
                assert_eq!(v["fields"]["user"], user.as_str(), "{line}");
            }
        }
        // No line of its own starts with the forged text.
        let own_line = server.wait_line_for(
            "INFO turnstile: allocation created client=6.6.6.6",
            Duration::from_secs(2),
        );
        assert!(own_line.is_none(), "{own_line:?}");
    }
}

/// Item 9: a signed Allocate captured on the wire and replayed byte for
/// byte from another port or transport of the same address (another user
/// behind the same NAT) is refused with 438, not charged to the victim.
#[test]
fn a_captured_signed_request_replayed_from_another_port_is_stale() {
    use std::io::Write;
    use turnstile::proto::stun::{MessageWriter, TransactionId};
    let server = TestServer::start(&config(""));
    let victim = RawClient::connect(server.udp[0]);
    let mut buf = [0u8; 512];
    let n = {
        let mut w = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId([7; 12])).unwrap();
        w.requested_transport(17).unwrap();
        w.username("alice").unwrap();
        w.realm("test.local").unwrap();
        w.nonce(&victim.nonce).unwrap();
        w.message_integrity(victim.key.hmac_sha1()).unwrap();
        w.finish()
    };
    let captured = buf[..n].to_vec();

    let attacker = common::udp_client();
    attacker.send_to(&captured, server.udp[0]).unwrap();
    let mut answer = [0u8; 1500];
    let len = attacker.recv(&mut answer).unwrap();
    assert_eq!(code(&answer[..len]), 438, "replayed from another UDP port");

    let mut tcp = TcpStream::connect(server.tcp[0]).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(&captured).unwrap();
    let mut head = [0u8; 20];
    tcp.read_exact(&mut head).unwrap();
    let mut m = head.to_vec();
    m.resize(20 + u16::from_be_bytes([head[2], head[3]]) as usize, 0);
    tcp.read_exact(&mut m[20..]).unwrap();
    assert_eq!(code(&m), 438, "replayed over TCP");

    // On its own 5-tuple the request is good.
    victim.socket.send_to(&captured, server.udp[0]).unwrap();
    let len = victim.socket.recv(&mut answer).unwrap();
    assert_eq!(code(&answer[..len]), 0);
    let (_, body) = server.admin_request("GET", "/v1/allocations", Some(ADMIN_TOKEN), "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v["allocations"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0]["client"], victim.socket.local_addr().unwrap().to_string());
}

/// Item 10: with `revoke_on_reload`, a reload ends the allocations of a
/// removed user, a changed password and a withdrawn REST secret, and keeps
/// the rest; without it (the default) they all live on, as in coturn.
#[test]
fn a_reload_can_revoke_allocations_whose_credentials_are_gone() {
    for revoke in [true, false] {
        let before = config("").replace(
            r#"users = { alice = "secret" }"#,
            &format!(
                "users = {{ alice = \"secret\", bob = \"pw-bob\", carol = \"pw-carol\" }}\nrevoke_on_reload = {revoke}"
            ),
        );
        let server = TestServer::start(&before);
        let rest_user = format!("{}:dave", unix_now() + 3600);
        let mut clients = vec![
            RawClient::connect_as(server.udp[0], "alice", "secret"),
            RawClient::connect_as(server.udp[0], "bob", "pw-bob"),
            RawClient::connect_as(server.udp[0], "carol", "pw-carol"),
            RawClient::connect_as(
                server.udp[0],
                &rest_user,
                &rest::password(REST_SECRET.as_bytes(), &rest_user),
            ),
        ];
        for c in &mut clients {
            assert_eq!(allocate(c), 0);
        }
        // bob removed, carol's password changed, the REST secret replaced.
        let after = before
            .replace(r#", bob = "pw-bob""#, "")
            .replace("pw-carol", "new-carol")
            .replace(REST_SECRET, "a-new-rest-secret");
        std::fs::write(server.config_path(), after).unwrap();
        server.signal("HUP");
        assert!(server.wait_log("configuration reloaded"));
        let (_, body) = server.admin_request("GET", "/v1/allocations", Some(ADMIN_TOKEN), "");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut users: Vec<String> = v["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["user"].as_str().unwrap().to_owned())
            .collect();
        users.sort();
        if revoke {
            assert_eq!(users, ["alice"], "revoke_on_reload = true");
        } else {
            assert_eq!(users.len(), 4, "revoke_on_reload = false: {users:?}");
        }
    }
}
