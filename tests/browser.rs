//! Real WebRTC calls through turnstile: headless Chromium (Debian's
//! /usr/bin/chromium driven by playwright-core, `tests/browser/call.mjs`)
//! with two relay-only RTCPeerConnections per variant: TURN over UDP, TCP
//! and TLS, static users and REST credentials; data-channel messages both
//! ways, fake camera and microphone decoded at the far end, and the selected
//! candidate pair relay/relay over the expected protocol. Wrong credentials
//! yield no relay candidate; two realms on two listeners each take only
//! their own users. A six-participant full mesh (`mesh.mjs`) on one
//! shared static credential, then on a REST credential each, connects every
//! pair on the default limits.

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{TestServer, loopback_config};
use rcgen::PublicKeyData;
use sha2::{Digest, Sha256};

const REST_SECRET: &str = "browser-rest-secret";

struct Tls {
    _dir: tempfile::TempDir,
    cert: String,
    key: String,
    spki: String,
}

fn tls() -> Tls {
    let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let spki =
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(c.signing_key.subject_public_key_info()));
    Tls {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        spki,
        _dir: dir,
    }
}

fn config(t: &Tls, peers: &str) -> String {
    loopback_config(&format!(
        r#"
[[listen]]
transport = "tcp"
address = "127.0.0.1:0"

[[listen]]
transport = "tls"
address = "127.0.0.1:0"

[tls]
certificate = "{}"
private_key = "{}"

[relay]
address = "127.0.0.1"
ports = "64000-64999"

[auth]
users = {{ alice = "secret" }}
secrets = ["{REST_SECRET}"]

{peers}
"#,
        t.cert, t.key
    ))
}

fn rest(offset: i64) -> (String, String) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let user = format!("{}:browser-user", now + offset);
    let password = turnstile::proto::auth::rest::password(REST_SECRET.as_bytes(), &user);
    (user, password)
}

fn ice(url: &str, user: &str, password: &str) -> serde_json_like::Value {
    serde_json_like::server(url, user, password)
}

/// Just enough JSON for the variant list, without another dependency.
mod serde_json_like {
    pub struct Value(pub String);

    fn esc(s: &str) -> String {
        s.replace('\\', "\\\\").replace('"', "\\\"")
    }

    pub fn server(url: &str, user: &str, password: &str) -> Value {
        Value(format!(
            r#"[{{"urls":["{}"],"username":"{}","credential":"{}"}}]"#,
            esc(url),
            esc(user),
            esc(password)
        ))
    }

    pub fn variant(name: &str, ice: &Value, expect_fail: bool, timeout_ms: u64) -> String {
        format!(
            r#"{{"name":"{}","iceServers":{},"messages":300,"media":true,"expectFail":{},"timeoutMs":{}}}"#,
            esc(name),
            ice.0,
            expect_fail,
            timeout_ms
        )
    }
}

#[derive(Debug)]
struct Outcome {
    name: String,
    json: String,
}

impl Outcome {
    fn field(&self, key: &str) -> Option<String> {
        let at = self.json.find(&format!("\"{key}\":"))? + key.len() + 3;
        let rest = &self.json[at..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"').to_owned())
    }

    fn number(&self, key: &str) -> u64 {
        self.field(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// Runs a script of tests/browser with its JSON input; returns its stdout.
fn node(script: &str, input: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(dir).join("node_modules/playwright-core").exists(),
        "run `npm ci` in tests/browser first (tests/run.sh does)"
    );
    let out = Command::new("timeout")
        .arg("300")
        .arg("node")
        .arg(script)
        .arg(input)
        .current_dir(dir)
        .output()
        .expect("node (and Debian's chromium) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs the page script and splits its JSON array into one object per variant.
fn run(spki: &str, variants: &[String]) -> Vec<Outcome> {
    let input = format!(r#"{{"spki":"{spki}","variants":[{}]}}"#, variants.join(","));
    let stdout = node("call.mjs", &input);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('['))
        .expect("no results")
        .to_owned();
    // Objects are flat except for pc1/pc2; split on the variant boundary.
    line.trim_start_matches('[')
        .trim_end_matches(']')
        .split("},{\"name\":")
        .enumerate()
        .map(|(i, part)| {
            let json = if i == 0 {
                part.to_owned()
            } else {
                format!("{{\"name\":{part}")
            };
            let name = Outcome {
                name: String::new(),
                json: json.clone(),
            }
            .field("name")
            .unwrap_or_default();
            eprintln!("{name}: {json}");
            Outcome { name, json }
        })
        .collect()
}

#[test]
fn chromium_calls_through_turnstile_over_udp_tcp_and_tls() {
    let t = tls();
    let server = TestServer::start(&config(&t, ""));
    let (udp, tcp, tls_addr) = (server.udp[0], server.tcp[0], server.tls[0]);
    let (rest_user, rest_password) = rest(3600);
    let (old_user, old_password) = rest(-60);
    let variants = vec![
        serde_json_like::variant(
            "udp-static",
            &ice(&format!("turn:{udp}?transport=udp"), "alice", "secret"),
            false,
            40_000,
        ),
        serde_json_like::variant(
            "tcp-static",
            &ice(&format!("turn:{tcp}?transport=tcp"), "alice", "secret"),
            false,
            40_000,
        ),
        serde_json_like::variant(
            "tls-rest",
            &ice(&format!("turns:{tls_addr}?transport=tcp"), &rest_user, &rest_password),
            false,
            40_000,
        ),
        serde_json_like::variant(
            "udp-rest",
            &ice(&format!("turn:{udp}?transport=udp"), &rest_user, &rest_password),
            false,
            40_000,
        ),
        serde_json_like::variant(
            "wrong-password",
            &ice(&format!("turn:{udp}?transport=udp"), "alice", "not-the-password"),
            true,
            20_000,
        ),
        serde_json_like::variant(
            "expired-rest",
            &ice(&format!("turn:{udp}?transport=udp"), &old_user, &old_password),
            true,
            20_000,
        ),
    ];
    let results = run(&t.spki, &variants);
    assert_eq!(results.len(), variants.len());
    for (r, protocol) in results.iter().take(4).zip(["udp", "tcp", "tls", "udp"]) {
        assert_eq!(r.field("ok").as_deref(), Some("true"), "{}: {}", r.name, r.json);
        assert_eq!(r.field("intact").as_deref(), Some("true"), "{}", r.name);
        assert_eq!(r.number("messagesReceived"), 600, "{}", r.name);
        assert!(r.number("framesDecoded") >= 30, "{}: {}", r.name, r.json);
        assert!(r.number("audioPackets") >= 50, "{}: {}", r.name, r.json);
        assert!(
            r.json.contains(r#""local":"relay","remote":"relay""#),
            "{}: {}",
            r.name,
            r.json
        );
        assert!(
            r.json.contains(&format!(r#""relayProtocol":"{protocol}""#)),
            "{}: {}",
            r.name,
            r.json
        );
    }
    for r in results.iter().skip(4) {
        assert_eq!(r.field("ok").as_deref(), Some("true"), "{}: {}", r.name, r.json);
        assert_eq!(r.number("relayCandidates"), 0, "{}: {}", r.name, r.json);
    }
    assert!(server.wait_counter("turnstile_error_responses_total{code=\"401\"}", 2.0));
}

/// Two tenants on one server, as a chat server and a game would share it:
/// Chromium relays through games.example's own listener with that realm's
/// static user and REST secret; the same user name with the other realm's
/// password, on either listener, gets no relay candidate.
#[test]
fn chromium_calls_through_a_realms_own_listener() {
    let t = tls();
    let server = TestServer::start(
        r#"workers = 2

[[realm]]
name = "meet.example"
users = { alice = "secret" }

[[realm]]
name = "games.example"
users = { alice = "arcade" }
secrets = ["games-browser-secret"]

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[[listen]]
transport = "udp"
address = "127.0.0.1:0"
realm = "games.example"

[metrics]
listen = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "64000-64999"
"#,
    );
    let (meet, games) = (server.udp[0], server.udp[1]);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let rest_user = format!("{}:player", now + 3600);
    let rest_password = turnstile::proto::auth::rest::password(b"games-browser-secret", &rest_user);
    let variants = vec![
        serde_json_like::variant(
            "games-static",
            &ice(&format!("turn:{games}?transport=udp"), "alice", "arcade"),
            false,
            40_000,
        ),
        serde_json_like::variant(
            "games-rest",
            &ice(&format!("turn:{games}?transport=udp"), &rest_user, &rest_password),
            false,
            40_000,
        ),
        serde_json_like::variant(
            "meet-password-on-games",
            &ice(&format!("turn:{games}?transport=udp"), "alice", "secret"),
            true,
            20_000,
        ),
        serde_json_like::variant(
            "games-password-on-meet",
            &ice(&format!("turn:{meet}?transport=udp"), "alice", "arcade"),
            true,
            20_000,
        ),
    ];
    let results = run(&t.spki, &variants);
    assert_eq!(results.len(), variants.len());
    for r in results.iter().take(2) {
        assert_eq!(r.field("ok").as_deref(), Some("true"), "{}: {}", r.name, r.json);
        assert_eq!(r.number("messagesReceived"), 600, "{}", r.name);
        assert!(
            r.json.contains(r#""local":"relay","remote":"relay""#),
            "{}: {}",
            r.name,
            r.json
        );
    }
    for r in results.iter().skip(2) {
        assert_eq!(r.field("ok").as_deref(), Some("true"), "{}: {}", r.name, r.json);
        assert_eq!(r.number("relayCandidates"), 0, "{}: {}", r.name, r.json);
    }
    assert!(server.wait_counter(
        "turnstile_realm_allocations_granted_total{realm=\"games.example\"}",
        4.0
    ));
}

/// The harness can fail: with a deliberately broken setting — a relay port
/// range of one port, so the second peer gets 508 and no relay candidate —
/// the same call must not connect.
#[test]
fn a_broken_relay_setting_fails_the_call() {
    let t = tls();
    let cfg = config(&t, "").replace("ports = \"64000-64999\"", "ports = \"64500-64500\"\n");
    let cfg = cfg.replace("workers = 2", "workers = 1");
    assert!(cfg.contains("64500-64500"));
    let server = TestServer::start(&cfg);
    let udp = server.udp[0];
    let variants = vec![serde_json_like::variant(
        "udp-one-relay-port",
        &ice(&format!("turn:{udp}?transport=udp"), "alice", "secret"),
        false,
        15_000,
    )];
    let results = run(&t.spki, &variants);
    assert_eq!(results[0].field("ok").as_deref(), Some("false"), "{}", results[0].json);
    assert!(server.wait_counter("turnstile_error_responses_total{code=\"508\"}", 1.0));
}

/// Runs `mesh.mjs` with one `iceServers` list per participant.
fn run_mesh(participants: &[serde_json::Value]) -> serde_json::Value {
    let input = serde_json::json!({"participants": participants, "messages": 40, "timeoutMs": 90_000});
    let stdout = node("mesh.mjs", &input.to_string());
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).expect("no report");
    serde_json::from_str(line).unwrap()
}

/// Every pair of a full mesh connected relay/relay and exchanged its messages.
fn assert_full_mesh(report: &serde_json::Value, what: &str) {
    let pairs = report["pairs"].as_array().unwrap_or_else(|| panic!("{what}: {report}"));
    assert_eq!(pairs.len(), 15, "{what}: {report}");
    assert_eq!(report["peerConnections"], 30, "{what}");
    let failed: Vec<&serde_json::Value> = pairs.iter().filter(|p| p["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of 15 pairs failed: {failed:?}",
        failed.len()
    );
    for p in pairs {
        assert_eq!(p["received"], 80, "{what}: {p}");
        for side in ["a", "b"] {
            assert_eq!(p[side]["local"], "relay", "{what}: {p}");
            assert_eq!(p[side]["remote"], "relay", "{what}: {p}");
        }
    }
}

/// A browser game's room of six, as Foundry VTT, Mattermost and eXo build
/// it: every participant has the same static credential and both a UDP and
/// a TCP TURN URL, and opens one relay-only connection per other
/// participant (15 pairs, 30 peer connections, up to 60 allocations on one
/// user name). On the default `[limits]` every pair connects; then the same
/// room with a REST credential per participant.
#[test]
fn a_six_player_mesh_connects_every_pair_on_the_default_limits() {
    let t = tls();
    let cfg = config(&t, "");
    assert!(!cfg.contains("[limits]"), "the default limits are under test");
    let server = TestServer::start(&cfg);
    let urls = [
        format!("turn:{}?transport=udp", server.udp[0]),
        format!("turn:{}?transport=tcp", server.tcp[0]),
    ];
    let shared: Vec<serde_json::Value> = (0..6)
        .map(|_| serde_json::json!({"iceServers": [{"urls": urls, "username": "alice", "credential": "secret"}]}))
        .collect();
    assert_full_mesh(&run_mesh(&shared), "one shared static credential");
    assert_eq!(server.counter("turnstile_error_responses_total{code=\"486\"}"), 0.0);

    let own: Vec<serde_json::Value> = (0..6)
        .map(|i| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
            let user = format!("{}:player-{i}", now + 3600);
            let password = turnstile::proto::auth::rest::password(REST_SECRET.as_bytes(), &user);
            serde_json::json!({"iceServers": [{"urls": urls, "username": user, "credential": password}]})
        })
        .collect();
    assert_full_mesh(&run_mesh(&own), "a REST credential each");
    assert!(server.counter("turnstile_allocations_created_total") >= 60.0);
}

/// A relay-only call keeps going while the server is upgraded under it:
/// every data-channel message arrives in order, the connection never leaves
/// "connected", the selected relay pair stays, video keeps decoding.
#[test]
fn a_chromium_call_carries_on_across_a_live_upgrade() {
    use std::io::{BufRead, BufReader, Write};
    let t = tls();
    let config = config(&t, "").replace("[relay]", "[server]\npid_file = \"{dir}/turnstile.pid\"\n\n[relay]");
    let mut server = TestServer::start_copy(&config);
    let old = server.pid();
    let udp = server.udp[0];
    let ice = ice(&format!("turn:{udp}?transport=udp"), "alice", "secret");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    let mut child = Command::new("timeout")
        .args(["120", "node", "upgrade.mjs"])
        .arg(format!(r#"{{"iceServers":{},"afterMs":4000}}"#, ice.0))
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node (and Debian's chromium) must be installed");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(first, "CONNECTED", "the call did not start: {first}");
    let out = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("--config")
        .arg(server.config_path())
        .arg("upgrade")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    writeln!(child.stdin.take().unwrap(), "upgraded").unwrap();
    let result = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = child.wait();
    eprintln!("call across the upgrade: {result}");
    let o = Outcome {
        name: "upgrade".into(),
        json: result.clone(),
    };
    assert_eq!(o.field("ok").as_deref(), Some("true"), "{result}");
    assert_eq!(o.field("complete").as_deref(), Some("true"), "{result}");
    assert!(
        !result.contains("disconnected") && !result.contains("failed"),
        "{result}"
    );
    let v: serde_json::Value = serde_json::from_str(&result).unwrap();
    assert_eq!(v["before"], v["after"], "the selected relay pair changed: {result}");
    assert!(v["sent"][0].as_u64().unwrap() >= 200, "{result}");
    assert!(v["framesAfterUpgrade"].as_u64().unwrap() >= 30, "{result}");
    let new = server.pid_file().unwrap();
    assert_ne!(new, old);
    assert!(!server.first_running() || server.wait_exit(std::time::Duration::from_secs(5)).is_some());
}
