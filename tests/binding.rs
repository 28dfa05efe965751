//! The running binary answers STUN Binding requests, drops and counts
//! malformed packets, and validates configuration files.

mod common;

use std::process::Command;

use common::{TestServer, loopback_config, udp_client};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

fn binding_request(tid: u8, fingerprint: bool) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([tid; 12])).unwrap();
    if fingerprint {
        w.fingerprint().unwrap();
    }
    let n = w.finish();
    buf[..n].to_vec()
}

#[test]
fn answers_binding_with_the_exact_source_address() {
    let server = TestServer::start(&loopback_config(""));
    let client = udp_client();
    client.send_to(&binding_request(1, true), server.udp[0]).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, server.udp[0]);
    let resp = Message::parse(&buf[..n]).unwrap();
    assert_eq!(resp.class(), Class::Success);
    assert_eq!(resp.transaction_id(), &TransactionId([1; 12]));
    assert_eq!(resp.xor_mapped_address().unwrap(), Some(client.local_addr().unwrap()));
    assert_eq!(resp.software().unwrap(), Some("turnstile"));
    assert!(resp.verify_fingerprint().is_ok());
}

#[test]
fn malformed_packets_are_dropped_silently_and_counted() {
    let server = TestServer::start(&loopback_config(""));
    let client = udp_client();
    let good = binding_request(2, true);
    let mut bad_fp = good.clone();
    let last = bad_fp.len() - 1;
    bad_fp[last] ^= 0xff;
    let garbage: [&[u8]; 5] = [
        b"\x16\x03\x01hello",
        &good[..19],
        &good[..good.len() - 4],
        &bad_fp,
        b"\x40\x00\xff\xff",
    ];
    for g in garbage {
        client.send_to(g, server.udp[0]).unwrap();
    }
    // The same 4-tuple reaches the same worker, so once this is answered the
    // garbage before it has been processed.
    client.send_to(&binding_request(3, false), server.udp[0]).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = client.recv_from(&mut buf).unwrap();
    let resp = Message::parse(&buf[..n]).unwrap();
    assert_eq!(
        resp.transaction_id(),
        &TransactionId([3; 12]),
        "garbage must get no answer"
    );

    let text = server.scrape();
    for reason in [
        "not_turn",
        "too_short",
        "truncated",
        "bad_fingerprint",
        "channel_data_truncated",
    ] {
        let series = format!("turnstile_dropped_packets_total{{reason=\"{reason}\"}}");
        assert!(server.counter(&series) >= 1.0, "{series} missing in:\n{text}");
    }
}

#[test]
fn turnutils_stunclient_sees_its_mapped_address() {
    let server = TestServer::start(&loopback_config(""));
    let out = Command::new("turnutils_stunclient")
        .args(["-p", &server.udp[0].port().to_string(), "-L", "127.0.0.1", "127.0.0.1"])
        .output()
        .expect("turnutils_stunclient (Debian package coturn) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.contains("UDP reflexive addr:"))
        .unwrap_or_else(|| panic!("no mapped address in output:\n{stdout}\n{stderr}"));
    let addr: std::net::SocketAddr = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    assert_ne!(addr.port(), server.udp[0].port());
}

#[test]
fn check_config_accepts_good_and_names_the_line_of_bad() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, loopback_config("")).unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "realm = \"x\"\n\n[relay]\nportz = \"1-2\"\n").unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("line 4") && err.contains("portz"), "{err}");
}
