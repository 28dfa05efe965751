//! Live upgrade against the real binary: the load generator's allocations
//! keep relaying and refreshing across `turnstile upgrade`, coturn's client
//! keeps flowing over UDP and TCP, a TLS connection stays with the old
//! process until it closes, and a new binary that does not start (or never
//! gets ready) leaves the old process serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::uclient::EchoPeer;
use common::{TestServer, cert, loopback_config, write_cert};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

fn config(extra: &str) -> String {
    loopback_config(&format!(
        r#"
[[listen]]
transport = "tcp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "62000-62999"

[auth]
users = {{ alice = "secret" }}

[peers]
allow = ["127.0.0.0/8"]

[server]
pid_file = "{{dir}}/turnstile.pid"
upgrade_timeout = 5

{extra}
"#
    ))
}

/// `turnstile upgrade` with the server's configuration, by the binary the
/// test built (the server runs its own copy).
fn upgrade(server: &TestServer) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("--config")
        .arg(server.config_path())
        .arg("upgrade")
        .output()
        .unwrap()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Sum of a gauge over its labels.
fn gauge(server: &TestServer, name: &str) -> f64 {
    server
        .scrape()
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Once `series` reaches `at_least` (the clients are under way) and a
/// moment later, `turnstile upgrade`; the old process must then go, having
/// kept nothing.
fn upgrade_under_way(server: &mut TestServer, series: &str, at_least: f64) {
    assert!(
        wait_until(Duration::from_secs(10), || gauge(server, series) >= at_least),
        "the clients did not start ({series})"
    );
    std::thread::sleep(Duration::from_millis(800));
    let out = upgrade(server);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        wait_until(Duration::from_secs(5), || !server.first_running()),
        "the old process kept connections"
    );
}

/// Replaces the server's binary the way a package upgrade does: a new
/// file renamed over the old path.
fn install(server: &TestServer, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let next = server.dir().join("turnstile.next");
    std::fs::write(&next, contents).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&next, server.dir().join("turnstile")).unwrap();
}

fn the_real_binary() -> Vec<u8> {
    std::fs::read(env!("CARGO_BIN_EXE_turnstile")).unwrap()
}

#[test]
fn two_hundred_allocations_under_load_keep_relaying_across_an_upgrade() {
    let mut server = TestServer::start_copy(&config(""));
    let old = server.pid();
    let bench = Command::new(env!("CARGO_BIN_EXE_turnstile-bench"))
        .args(["load", "--server", &server.udp[0].to_string()])
        .args(["-k", "200", "-d", "8", "-r", "4000", "--refresh-every", "2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || gauge(
            &server,
            "turnstile_allocations_active"
        ) >= 200.0),
        "the load generator did not set up its allocations"
    );
    // Under way for a second, then the upgrade.
    std::thread::sleep(Duration::from_secs(1));
    install(&server, &the_real_binary());
    let out = upgrade(&server);
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let new = server.pid_file().expect("the new process wrote its PID");
    assert_ne!(new, old);
    assert!(said.contains(&format!("PID {old} handed over to PID {new}")), "{said}");
    let took = server
        .wait_line("upgrade: handed over")
        .expect("the old process logs the hand-over");
    eprintln!("{took}");

    let report = bench.wait_with_output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&report.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&report.stderr)));
    eprintln!("load across the upgrade: {json:#}");
    let n = |k: &str| json[k].as_u64().unwrap_or_else(|| panic!("{k} in {json}"));
    let sent = n("sent");
    let received = n("client_received");
    assert!(sent >= 20_000, "{json}");
    // Every allocation is still known (no 437), its relayed address unchanged.
    assert_eq!(n("refreshes_437"), 0, "{json}");
    assert_eq!(n("refreshes_other_error"), 0, "{json}");
    assert!(n("refreshes_sent") >= 600, "{json}");
    assert_eq!(n("refreshes_ok"), n("refreshes_sent"), "{json}");
    assert_eq!(n("relay_moved"), 0, "{json}");
    assert_eq!(n("misrouted"), 0, "{json}");
    let lost = sent - received;
    assert!(lost * 1000 <= sent, "lost {lost} of {sent} datagrams: {json}");
    let gap = json["longest_gap_ms"].as_f64().unwrap();
    eprintln!("lost {lost} of {sent}; longest gap between echoes {gap:.1} ms");

    // The old process is gone; the new one serves (its metrics too).
    assert!(
        wait_until(Duration::from_secs(5), || !server.first_running()),
        "the old process is still running"
    );
    assert!(alive(new));
    // The generator released its 200 allocations at the end: the new
    // process knew every one (its metrics listener is the one handed over).
    assert!(server.wait_counter("turnstile_allocations_deleted_total", 200.0));
}

#[test]
fn a_new_binary_that_fails_leaves_the_old_process_serving() {
    let mut server = TestServer::start_copy(&config(""));
    let old = server.pid();
    // A stand-in that exits at once.
    install(&server, b"#!/bin/sh\nexit 3\n");
    let began = Instant::now();
    let out = upgrade(&server);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "upgrade to a failing binary succeeded: {said}");
    assert!(said.contains("upgrade failed"), "{said}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the failure took {:?} to show",
        began.elapsed()
    );
    assert!(server.wait_line("upgrade failed, serving on").is_some());
    assert!(server.first_running());
    assert_eq!(server.pid_file(), Some(old));
    // It still serves: a Binding and an allocation through coturn's client.
    let peer = EchoPeer::start();
    let r = uclient(&server, &peer, &["-n", "20", "-m", "1"]);
    assert_eq!(r.lost, Some(0), "{}", r.output);

    // One that never gets ready is given up after upgrade_timeout.
    install(&server, b"#!/bin/sh\nexec sleep 60\n");
    let out = upgrade(&server);
    assert!(!out.status.success());
    assert!(server.wait_line("upgrade failed, serving on").is_some());
    assert!(server.first_running());

    // And the real one then takes over.
    install(&server, &the_real_binary());
    let out = upgrade(&server);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(server.pid_file(), Some(old));
}

/// coturn's client as alice, relaying to `peer` through the UDP listener.
fn uclient(server: &TestServer, peer: &EchoPeer, flags: &[&str]) -> common::uclient::Report {
    common::uclient::run_args(&common::uclient::as_alice(server.udp[0].port(), peer.port, flags))
}

#[test]
fn coturn_clients_over_udp_and_tcp_keep_flowing_across_an_upgrade() {
    let mut server = TestServer::start_copy(&config(""));
    let old = server.pid();
    let peer = EchoPeer::start();
    let (udp_port, tcp_port) = (server.udp[0].port(), server.tcp[0].port());
    // Four seconds of messages each (400 at 10 ms), both started before the upgrade.
    let run = |port: u16, tcp: bool| {
        let mut flags = vec!["-n", "400", "-z", "10", "-m", "2", "-l", "120"];
        if tcp {
            flags.push("-t");
        }
        let args = common::uclient::as_alice(port, peer.port, &flags);
        std::thread::spawn(move || common::uclient::run_args(&args))
    };
    let over_udp = run(udp_port, false);
    let over_tcp = run(tcp_port, true);
    // The TCP connections move too: nothing is left to keep the old process.
    upgrade_under_way(&mut server, "turnstile_allocations_active", 4.0);
    let (udp_report, tcp_report) = (over_udp.join().unwrap(), over_tcp.join().unwrap());
    for (name, r) in [("udp", &udp_report), ("tcp", &tcp_report)] {
        assert!(r.sent >= 800, "{name}: {}", r.output);
        assert_eq!(r.lost, Some(0), "{name}: {}", r.output);
        assert_eq!(r.received, r.sent, "{name}: {}", r.output);
    }
    let new = server.pid_file().unwrap();
    assert_ne!(new, old);
    assert!(alive(new));
}

/// A Binding request over a connection; the answer's XOR-MAPPED-ADDRESS.
fn binding(io: &mut impl ReadWrite, n: u8) -> SocketAddr {
    let mut buf = [0u8; 128];
    let w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([n; 12])).unwrap();
    let len = w.finish();
    io.write_all(&buf[..len]).unwrap();
    let mut head = [0u8; 20];
    io.read_exact(&mut head).unwrap();
    let body = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut whole = head.to_vec();
    whole.resize(20 + body, 0);
    io.read_exact(&mut whole[20..]).unwrap();
    let m = Message::parse(&whole).unwrap();
    assert_eq!(m.class(), Class::Success);
    m.xor_mapped_address().unwrap().unwrap()
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn tls(addr: SocketAddr, trusted: &[u8]) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let config = common::tls_client_config(trusted);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn tls_config(dir: &Path) -> String {
    config(&format!(
        r#"
[[listen]]
transport = "tls"
address = "127.0.0.1:0"

[tls]
certificate = "{}"
private_key = "{}"
"#,
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    ))
}

#[test]
fn a_tls_connection_stays_with_the_old_process_until_it_closes() {
    let certs = tempfile::tempdir().unwrap();
    let c = cert();
    write_cert(certs.path(), &c);
    let mut server = TestServer::start_copy(&tls_config(certs.path()));
    let old = server.pid();
    let addr = server.tls[0];
    let mut kept = tls(addr, &c.der);
    let mapped = binding(&mut kept, 1);

    let out = upgrade(&server);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new = server.pid_file().unwrap();
    assert_ne!(new, old);
    assert!(server.wait_line("upgrade: handed over").is_some());
    // The session goes on, on the old process.
    assert_eq!(binding(&mut kept, 2), mapped);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.first_running(),
        "the old process left with a TLS client connected"
    );
    // A new TLS connection is the new process's.
    let mut fresh = tls(addr, &c.der);
    binding(&mut fresh, 3);
    // The kept connection closes: the old process has nothing left and exits.
    kept.conn.send_close_notify();
    let _ = kept.flush();
    drop(kept);
    assert!(
        wait_until(Duration::from_secs(5), || !server.first_running()),
        "the old process did not exit"
    );
    binding(&mut fresh, 4);
    assert!(alive(new));
}

#[test]
fn rfc6062_tcp_allocations_and_their_connections_move_across_an_upgrade() {
    let mut server = TestServer::start_copy(&config(""));
    let old = server.pid();
    let port = server.tcp[0].port().to_string();
    // -T: TCP allocations; the clients Connect to each other's relayed
    // addresses, peer and data connections piped (RFC 6062). 400 messages
    // at 10 ms: the upgrade comes in the middle.
    let run = common::uclient::spawn(&[
        "-T",
        "-u",
        "alice",
        "-w",
        "secret",
        "-z",
        "10",
        "-n",
        "400",
        "-l",
        "120",
        "-m",
        "4",
        "-p",
        &port,
        "127.0.0.1",
    ]);
    // Control, peer and data connections all move: the old process has
    // nothing left and goes.
    upgrade_under_way(&mut server, "turnstile_tcp_relay_connections", 4.0);
    let r = run.join().unwrap();
    assert!(r.sent >= 1600, "{}", r.output);
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert_eq!(r.received, r.sent, "{}", r.output);
    let new = server.pid_file().unwrap();
    assert_ne!(new, old);
    assert!(alive(new));
}
