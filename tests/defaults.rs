//! The configuration as shipped, tried as real apps and operators use it:
//! each test here failed on the defaults or edges that came before it.

mod common;

use common::TestServer;
use common::raw::RawClient;
use turnstile::proto::stun::{Class, Message, Method};

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

fn code(answer: &[u8]) -> u16 {
    let m = Message::parse(answer).unwrap();
    match m.class() {
        Class::Success => 0,
        _ => m.error_code().unwrap().map(|e| e.code).unwrap_or(1),
    }
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
