//! The configuration as shipped, tried as real apps and operators use it:
//! each test here failed on the defaults or edges that came before it.

mod common;

use common::TestServer;
use common::raw::{RawClient, code};
use turnstile::proto::stun::Method;

/// A configuration with users and a REST secret and nothing else set.
fn plain(extra: &str) -> String {
    format!(
        r#"realm = "test.local"
workers = 1

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "62300-62399"

[auth]
users = {{ alice = "secret" }}
secrets = ["defaults-rest-secret"]

[metrics]
listen = "127.0.0.1:0"

{extra}
"#
    )
}

fn bind_channel(c: &mut RawClient, number: u16) -> u16 {
    // One peer per channel number (a peer has one channel at a time).
    let peer = std::net::SocketAddr::from(([8, 8, 8, 8], number));
    code(&c.request(Method::CHANNEL_BIND, true, |w| {
        w.channel_number(number).unwrap();
        w.xor_peer_address(&peer).unwrap();
    }))
}

/// RFC 5766-era clients pick channel numbers up to 0x7FFF: accepted by
/// default, refused only when the operator asks for RFC 8656's range.
#[test]
fn channel_numbers_up_to_0x7fff_are_accepted_by_default() {
    let server = TestServer::start(&plain(""));
    let mut c = RawClient::connect(server.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    assert_eq!(bind_channel(&mut c, 0x4000), 0);
    assert_eq!(bind_channel(&mut c, 0x7FFF), 0, "0x7FFF on the default configuration");
    assert_eq!(bind_channel(&mut c, 0x8000), 400);
    // ChannelData on 0x7FFF is relayed, not taken for something else.
    let data = [0x7f, 0xff, 0x00, 0x04, 1, 2, 3, 4];
    c.socket.send_to(&data, server.udp[0]).unwrap();
    assert!(server.wait_counter("turnstile_relayed_packets_total{direction=\"client_to_peer\"}", 1.0));

    let strict = TestServer::start(&plain("[compat]\nlegacy_channel_numbers = false"));
    let mut c = RawClient::connect(strict.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    assert_eq!(bind_channel(&mut c, 0x4FFF), 0);
    assert_eq!(bind_channel(&mut c, 0x5000), 400, "RFC 8656 only, when asked");
}

/// `turnstile check-config FILE`: (success, what it printed).
fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A level the log filter does not know silenced every line, errors
/// included; now it is refused by check-config and at start-up.
#[test]
fn an_unknown_log_level_is_an_error_naming_the_valid_ones() {
    for bad in ["warning", "verbose", "", "info,turnstile=loud"] {
        let (ok, text) = check_config(&plain(&format!("[log]\nlevel = {bad:?}")));
        assert!(!ok, "{bad:?} accepted: {text}");
        assert!(text.contains("trace, debug, info, warn, error, off"), "{text}");
    }
    for good in ["warn", "ERROR", "debug", "info,turnstile::io=debug", "off"] {
        let (ok, text) = check_config(&plain(&format!("[log]\nlevel = {good:?}")));
        assert!(ok, "{good:?} refused: {text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, plain("[log]\nlevel = \"warning\"")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the server started with level = \"warning\"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
}

/// A second turnstile on the same address refuses to start, naming the
/// address and transport, instead of silently sharing the port
/// (SO_REUSEPORT) and splitting the clients with the first.
#[test]
fn a_second_server_on_the_same_address_refuses_to_start() {
    // A port free for UDP and TCP.
    let port = loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            break p;
        }
    };
    let cfg = plain("").replace("address = \"127.0.0.1:0\"", &format!("address = \"127.0.0.1:{port}\""))
        + &format!("\n[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n");
    let first = TestServer::start(&cfg);
    assert_eq!(first.udp[0].port(), port);
    for (transport, cfg) in [
        ("udp", cfg.clone()),
        // The TCP listener alone: its check must catch it too.
        (
            "tcp",
            cfg.replace(
                &format!("transport = \"udp\"\naddress = \"127.0.0.1:{port}\""),
                "transport = \"udp\"\naddress = \"127.0.0.1:0\"",
            ),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("second.toml");
        std::fs::write(&path, cfg.replace("[metrics]\nlisten = \"127.0.0.1:0\"\n", "")).unwrap();
        let out = std::process::Command::new("timeout")
            .arg("10")
            .arg(env!("CARGO_BIN_EXE_turnstile"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the second server started ({transport})");
        assert!(
            err.contains(&format!("listen {transport} 127.0.0.1:{port}: address already in use")),
            "{err}"
        );
    }
    // The first is untouched.
    let mut c = RawClient::connect(first.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
}

/// Authentication failures are logged at info, for operators and fail2ban
/// (the shipped filter, run by fail2ban's own `fail2ban-regex`), at most
/// ten lines a second per worker, the next line saying how many were left
/// out.
#[test]
fn authentication_failures_are_logged_for_fail2ban_and_rate_limited() {
    let server = TestServer::start(&plain(""));
    let mut lines = Vec::new();
    let mut bad = RawClient::connect_as(server.udp[0], "alice", "not-the-password");
    let port = bad.socket.local_addr().unwrap().port();
    assert_eq!(
        code(&bad.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        401
    );
    let line = server
        .wait_line("authentication failed")
        .expect("the failure is logged");
    assert!(
        line.contains(&format!(
            "authentication failed ip=127.0.0.1 port={port} transport=udp reason=bad_integrity suppressed=0 user=alice"
        )),
        "{line}"
    );
    lines.push(line);
    // A burst: fifty more failures inside a second or two.
    let started = std::time::Instant::now();
    for _ in 0..50 {
        bad.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    }
    let burst = started.elapsed();
    let mut logged = 0;
    while let Some(l) = server.wait_line_for("authentication failed", std::time::Duration::from_millis(500)) {
        logged += 1;
        lines.push(l);
    }
    let seconds = burst.as_secs() + 2;
    assert!(logged <= 10 * seconds as usize, "{logged} lines in {burst:?}");
    assert!(logged < 50, "{logged} lines: not rate-limited");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut unknown = RawClient::connect_as(server.udp[0], "mallory", "x");
    unknown.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    let last = server.wait_line("authentication failed").unwrap();
    assert!(last.contains("reason=unknown_user"), "{last}");
    let left_out: u64 = last
        .split("suppressed=")
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(left_out as usize, 50 - logged, "{last}");
    lines.push(last);

    // The shipped filter matches every line, with the client's address.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("turnstile.log");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let filter = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/fail2ban/filter.d/turnstile.conf");
    let out = std::process::Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(&log)
        .arg(filter)
        .output()
        .expect("fail2ban-regex (Debian package fail2ban) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("Lines: {n} lines, 0 ignored, {n} matched", n = lines.len())),
        "{text}"
    );
    assert!(text.contains("127.0.0.1"), "{text}");
}

/// Allocation lines name the client transport; admin actions are logged
/// with who asked; a refused admin request is a warning.
#[test]
fn allocation_and_admin_log_lines_say_what_an_operator_needs() {
    let token = "a-token-for-the-log-test";
    let server = TestServer::start(&plain(&format!(
        "[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\""
    )));
    let mut c = RawClient::connect_tcp(server.tcp[0], "alice", "secret");
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    let line = server.wait_line("allocation created").unwrap();
    assert!(line.contains(" transport=tcp "), "{line}");
    assert!(line.contains(" relay_transport=udp"), "{line}");

    assert_eq!(
        server
            .admin_request("DELETE", "/v1/allocations?user=alice", Some("wrong"), "")
            .0,
        401
    );
    let line = server.wait_line("admin: request refused").unwrap();
    assert!(line.contains("WARN") && line.contains("admin=127.0.0.1:"), "{line}");
    let (status, _) = server.admin_request("DELETE", "/v1/allocations?user=alice", Some(token), "");
    assert_eq!(status, 200);
    // The allocation ends (on its worker) before the admin call returns.
    let line = server.wait_line("allocation ended").unwrap();
    assert!(
        line.contains(" transport=tcp ") && line.contains("reason=operator"),
        "{line}"
    );
    let line = server.wait_line("admin: allocations deleted").unwrap();
    assert!(line.contains("user=alice") && line.contains("deleted=1"), "{line}");
}

/// `turnstile sessions --config FILE` (the option after the subcommand, as
/// people type it) prints a table, `--json` the raw list; `kick NAME`
/// matches a REST user by the name after its expiry.
#[test]
fn sessions_and_kick_as_an_operator_types_them() {
    let token = "a-token-for-the-cli-test";
    let server = TestServer::start(&plain(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\""
    )));
    let text = std::fs::read_to_string(server.config_path()).unwrap();
    std::fs::write(
        server.config_path(),
        text.replace(
            "listen = \"127.0.0.1:0\"\ntoken",
            &format!("listen = \"{}\"\ntoken", server.admin.unwrap()),
        ),
    )
    .unwrap();
    let user = "1999999999:phone-42";
    let password = turnstile::proto::auth::rest::password(b"defaults-rest-secret", user);
    let mut phone = RawClient::connect_as(server.udp[0], user, &password);
    assert_eq!(
        code(&phone.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    let mut alice = RawClient::connect(server.udp[0]);
    assert_eq!(
        code(&alice.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(args)
            .args(["--config", server.config_path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let table = cli(&["sessions"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("USER")
            && header.contains("REALM")
            && header.contains("CLIENT")
            && header.contains("EXPIRES"),
        "{table}"
    );
    assert!(
        table.contains("1999999999:phone-42") && table.contains("alice") && table.contains("test.local"),
        "{table}"
    );
    assert!(table.trim_end().ends_with("2 allocation(s)"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&cli(&["sessions", "--json"])).unwrap();
    assert_eq!(json["allocations"].as_array().unwrap().len(), 2);

    assert_eq!(cli(&["kick", "phone-42"]).trim(), r#"{"deleted":1}"#);
    assert_eq!(code(&phone.request(Method::REFRESH, true, |_| {})), 437);
    assert_eq!(
        code(&alice.request(Method::REFRESH, true, |_| {})),
        0,
        "alice is not phone-42"
    );
}

/// `[peers]` takes bare addresses as one host; a bad entry's error names
/// it; check-config warns when the relay range covers a listener's port.
#[test]
fn peer_entries_and_port_overlaps_as_operators_write_them() {
    let (ok, text) = check_config(&plain(
        "[peers]\nallow = [\"127.0.0.1\", \"::1\", \"10.0.0.0/8\"]\ndeny = [\"203.0.113.9\"]",
    ));
    assert!(ok, "{text}");
    let (ok, text) = check_config(&plain("[peers]\nallow = [\"10.0.0.0/8\", \"10.0.0.300\"]"));
    assert!(!ok);
    assert!(text.contains("\"10.0.0.300\" is not an address or CIDR"), "{text}");
    assert!(text.contains("line"), "the error points at the line: {text}");

    let (ok, text) = check_config(
        &plain("")
            .replace("ports = \"62300-62399\"", "ports = \"3000-65535\"")
            .replace("address = \"127.0.0.1:0\"", "address = \"0.0.0.0:3478\""),
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: relay.ports 3000-65535 includes port 3478 of the udp listener 0.0.0.0:3478"),
        "{text}"
    );
    let (_, text) = check_config(&plain(""));
    assert!(!text.contains("warning"), "{text}");

    // A bare allowed address works on the running server: a loopback peer.
    let server = TestServer::start(&plain("[peers]\nallow = [\"127.0.0.1\"]"));
    let mut c = RawClient::connect(server.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    let ok_peer: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let other: std::net::SocketAddr = "127.0.0.2:9".parse().unwrap();
    assert_eq!(
        code(&c.request(Method::CREATE_PERMISSION, true, |w| {
            w.xor_peer_address(&ok_peer).unwrap()
        })),
        0
    );
    assert_eq!(
        code(&c.request(Method::CREATE_PERMISSION, true, |w| w.xor_peer_address(&other).unwrap())),
        403
    );
}

/// `[relay] tcp = false` (coturn's no-tcp-relay, carried by import-coturn)
/// refuses RFC 6062 TCP allocations with 442; UDP relaying goes on.
#[test]
fn tcp_relaying_can_be_turned_off() {
    let tcp = "[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:0\"\n";
    for (setting, expect) in [("", 0), ("\n[relay]\ntcp = false\n", 442)] {
        let cfg = plain(tcp);
        let cfg = if setting.is_empty() {
            cfg
        } else {
            cfg.replace("[relay]\n", "[relay]\ntcp = false\n")
        };
        let server = TestServer::start(&cfg);
        let mut c = RawClient::connect_tcp(server.tcp[0], "alice", "secret");
        assert_eq!(
            code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(6).unwrap())),
            expect,
            "{setting:?}"
        );
        let mut u = RawClient::connect_tcp(server.tcp[0], "alice", "secret");
        assert_eq!(
            code(&u.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
            0
        );
    }
}

/// Every metric family has `# HELP` and `# TYPE`, and families come in one
/// stable (sorted) order.
#[test]
fn every_metric_family_is_described_in_a_stable_order() {
    let server = TestServer::start(&plain(""));
    let mut c = RawClient::connect(server.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    let mut bad = RawClient::connect_as(server.udp[0], "alice", "wrong");
    bad.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert!(server.wait_counter("turnstile_allocations_created_total", 1.0));
    let families = |text: &str| -> Vec<String> {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or(text);
        let mut order = Vec::new();
        let (mut help, mut kind) = (None::<String>, None::<String>);
        for line in body.lines() {
            if let Some(r) = line.strip_prefix("# HELP ") {
                help = r.split(' ').next().map(str::to_owned);
                assert!(
                    r.split_once(' ').is_some_and(|(_, h)| !h.is_empty()),
                    "empty help: {line}"
                );
                continue;
            }
            if let Some(r) = line.strip_prefix("# TYPE ") {
                kind = r.split(' ').next().map(str::to_owned);
                assert_eq!(help, kind, "TYPE without its HELP: {line}");
                order.push(kind.clone().unwrap());
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let family = kind.as_deref().expect("a sample before any TYPE");
            assert!(name.starts_with(family), "{name} under the TYPE of {family}");
        }
        order
    };
    let first = families(&server.scrape());
    assert!(first.len() >= 10, "{first:?}");
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(first, sorted, "families in sorted order");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = families(&server.scrape());
    let common: Vec<&String> = second.iter().filter(|f| first.contains(f)).collect();
    assert_eq!(
        common,
        first.iter().collect::<Vec<_>>(),
        "the same order on every scrape"
    );
}

/// JSON logs carry what a log shipper indexes as fields: addresses as
/// strings, the client transport, the end reason.
#[test]
fn json_logs_carry_structured_fields() {
    let token = "a-token-for-the-json-test";
    let server = TestServer::start(&plain(&format!(
        "[log]\nformat = \"json\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\""
    )));
    let mut c = RawClient::connect(server.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    let client = c.socket.local_addr().unwrap().to_string();
    assert_eq!(
        server
            .admin_request("DELETE", "/v1/allocations?user=alice", Some(token), "")
            .0,
        200
    );
    let line = server.wait_line("allocation ended").unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &v["fields"];
    assert_eq!(f["client"], client.as_str(), "{line}");
    assert_eq!(f["transport"], "udp", "{line}");
    assert_eq!(f["reason"], "operator", "{line}");
    assert_eq!(f["user"], "alice", "{line}");
    assert!(f["to_peer_bytes"].is_u64(), "{line}");
    let mut bad = RawClient::connect_as(server.udp[0], "alice", "wrong");
    bad.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    let line = server.wait_line("authentication failed").unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["ip"], "127.0.0.1", "{line}");
    assert_eq!(v["fields"]["reason"], "bad_integrity", "{line}");
}
