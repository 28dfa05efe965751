//! Operating the server: reload on SIGHUP without dropping allocations,
//! drain on SIGTERM, health endpoints, and metrics that count exactly what
//! was relayed.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::raw::{RawClient, code};
use common::{TestServer, loopback_config};
use turnstile::proto::stun::{Attribute, Class, Message, Method, kind};

fn config(password: &str, secret: &str, top_level: &str) -> String {
    let rest = loopback_config(&format!(
        r#"
[relay]
address = "127.0.0.1"
ports = "61500-61999"

[auth]
users = {{ alice = "{password}" }}
secrets = ["{secret}"]

[peers]
allow = ["127.0.0.0/8"]
"#
    ));
    // Top-level keys must come before the first table.
    format!("{top_level}\n{rest}")
}

fn class(resp: &[u8]) -> Class {
    Message::parse(resp).unwrap().class()
}

/// Allocates, permits `peer`, and checks a Send reaches it.
fn relaying_client(server: &TestServer, user: &str, password: &str, peer: &UdpSocket) -> RawClient {
    let mut c = RawClient::connect_as(server.udp[0], user, password);
    let resp = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert_eq!(class(&resp), Class::Success, "error {}", code(&resp));
    let peer_addr = peer.local_addr().unwrap();
    let resp = c.request(Method::CREATE_PERMISSION, true, |w| {
        w.xor_peer_address(&peer_addr).unwrap()
    });
    assert_eq!(class(&resp), Class::Success);
    let data = format!("hello {user}");
    let peer_addr = peer.local_addr().unwrap();
    c.indication(Method::SEND, |w| {
        w.xor_peer_address(&peer_addr).unwrap();
        w.data(data.as_bytes()).unwrap();
    });
    let mut buf = [0u8; 1500];
    match peer.recv_from(&mut buf) {
        Ok((n, _)) => assert_eq!(&buf[..n], data.as_bytes()),
        Err(e) => {
            std::thread::sleep(Duration::from_millis(1200));
            panic!("{data} not relayed: {e}\n{}", server.scrape());
        }
    }
    c
}

fn send_and_receive(c: &mut RawClient, peer: &UdpSocket, data: &[u8]) {
    let peer_addr = peer.local_addr().unwrap();
    c.indication(Method::SEND, |w| {
        w.xor_peer_address(&peer_addr).unwrap();
        w.data(data).unwrap();
    });
    let mut buf = [0u8; 1500];
    let (n, _) = peer
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("relayed data {:?} did not arrive: {e}", String::from_utf8_lossy(data)));
    assert_eq!(&buf[..n], data);
}

fn peer() -> UdpSocket {
    let p = UdpSocket::bind("127.0.0.1:0").unwrap();
    p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    p
}

#[test]
fn sighup_changes_credentials_without_dropping_allocations() {
    let server = TestServer::start(&config("old-password", "old-secret", ""));
    let peer = peer();
    let mut old = relaying_client(&server, "alice", "old-password", &peer);

    // An invalid file is refused; the running configuration stays.
    std::fs::write(
        server.config_path(),
        "realm = \"x\"\n[[listen]]\ntransport = \"udp\"\nbogus = 1\n",
    )
    .unwrap();
    server.signal("HUP");
    assert!(server.wait_log("configuration not reloaded"));
    relaying_client(&server, "alice", "old-password", &peer);

    std::fs::write(server.config_path(), config("new-password", "new-secret", "")).unwrap();
    server.signal("HUP");
    assert!(server.wait_log("configuration reloaded"));

    // The existing allocation refreshes with its own key and keeps relaying.
    let resp = old.request(Method::REFRESH, true, |_| {});
    assert_eq!(class(&resp), Class::Success);
    send_and_receive(&mut old, &peer, b"still here");

    // New allocations need the new credentials.
    let mut stale = RawClient::connect_as(server.udp[0], "alice", "old-password");
    let resp = stale.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&resp), 401);
    relaying_client(&server, "alice", "new-password", &peer);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let user = format!("{}:app", now + 600);
    let new_rest = turnstile::proto::auth::rest::password(b"new-secret", &user);
    relaying_client(&server, &user, &new_rest, &peer);
    let old_rest = turnstile::proto::auth::rest::password(b"old-secret", &user);
    let mut c = RawClient::connect_as(server.udp[0], &user, &old_rest);
    let resp = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&resp), 401, "the removed secret no longer verifies");
}

#[test]
fn sigterm_drains_then_exits() {
    let mut server = TestServer::start(&config(
        "pw",
        "s",
        "alternate_server = \"192.0.2.9:3478\"\ndrain_timeout = 20",
    ));
    let peer = peer();
    let mut c = relaying_client(&server, "alice", "pw", &peer);
    assert_eq!(server.http_get("/readyz").0, 200);
    assert_eq!(server.http_get("/healthz").0, 200);

    server.signal("TERM");
    assert!(server.wait_log("draining"));
    assert_eq!(server.http_get("/readyz").0, 503);
    // New allocations are sent elsewhere.
    let mut newcomer = RawClient::connect_as(server.udp[0], "alice", "pw");
    let resp = newcomer.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&resp), 300);
    assert_eq!(
        Message::parse(&resp).unwrap().get(kind::ALTERNATE_SERVER).unwrap(),
        Some(Attribute::AlternateServer("192.0.2.9:3478".parse().unwrap()))
    );
    // The existing one keeps relaying; when it ends, the server exits 0.
    send_and_receive(&mut c, &peer, b"during drain");
    let resp = c.request(Method::REFRESH, true, |w| w.lifetime(0).unwrap());
    assert_eq!(class(&resp), Class::Success);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("server did not exit after draining");
    assert!(status.success(), "{status:?}");
}

#[test]
fn metrics_count_exactly_what_was_relayed() {
    let server = TestServer::start(&config("pw", "s", ""));
    let peer = peer();
    let mut c = relaying_client(&server, "alice", "pw", &peer);
    let series = "turnstile_relayed_packets_total{direction=\"client_to_peer\"}";
    assert!(server.wait_counter(series, 1.0));
    std::thread::sleep(Duration::from_millis(1200)); // one export period: the counter has settled
    let before = server.counter(series);
    for i in 0..50u8 {
        send_and_receive(&mut c, &peer, &[i; 100]);
    }
    assert!(server.wait_counter(series, before + 50.0));
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(server.counter(series), before + 50.0);
    // Requests by method, state gauges and the setup-time histogram are there too.
    let text = server.scrape();
    assert!(
        server.counter("turnstile_requests_total{method=\"allocate\"}") >= 2.0,
        "{text}"
    );
    assert!(
        server.counter("turnstile_requests_total{method=\"create_permission\"}") >= 1.0,
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("turnstile_allocations_active{")
            && l.contains("transport=\"udp\"")
            && l.contains("family=\"ipv4\"")
            && l.ends_with(" 1")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("turnstile_permissions_active{") && l.ends_with(" 1")),
        "{text}"
    );
    assert!(text.contains("turnstile_allocation_setup_seconds"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("turnstile_responses_total{")
            && l.contains("method=\"allocate\"")
            && l.contains("code=\"401\"")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("turnstile_responses_total{")
            && l.contains("method=\"allocate\"")
            && l.contains("code=\"200\"")),
        "{text}"
    );
}

#[test]
fn admin_lists_and_kicks_allocations() {
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"operations-token-123456\"\n";
    let server = TestServer::start(&format!("{}\n{admin}", config("pw", "s", "")));
    let peer = peer();
    let mut c = relaying_client(&server, "alice", "pw", &peer);
    let client = c.socket.local_addr().unwrap();

    let (status, body) = server.admin_request("GET", "/v1/allocations", Some("operations-token-123456"), "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v["allocations"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0]["user"], "alice");
    assert_eq!(list[0]["client"], client.to_string());
    assert_eq!(list[0]["permissions"], 1);
    assert!(list[0]["to_peer"]["packets"].as_u64().unwrap() >= 1);
    assert_eq!(server.admin_request("GET", "/v1/allocations", None, "").0, 401);

    // The CLI front-ends read the admin address and token from the configuration
    // (written here with the port the server actually bound).
    let text = std::fs::read_to_string(server.config_path()).unwrap();
    let real = format!("listen = \"{}\"\ntoken", server.admin.unwrap());
    std::fs::write(
        server.config_path(),
        text.replace("listen = \"127.0.0.1:0\"\ntoken", &real),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["--config", server.config_path().to_str().unwrap(), "sessions", "--json"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"user\":\"alice\""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["--config", server.config_path().to_str().unwrap(), "kick", "alice"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{\"deleted\":1}");
    let resp = c.request(Method::REFRESH, true, |_| {});
    assert_eq!(code(&resp), 437, "the allocation is gone");
}

#[test]
fn started_as_root_it_drops_to_the_configured_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: privilege drop cannot be observed here");
        return;
    }
    let server = TestServer::start(&config("pw", "s", "user = \"nobody\"\ngroup = \"nogroup\""));
    assert!(server.wait_log("dropped privileges to nobody"));
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "{uid}");
    // Still serving, as nobody.
    let peer = peer();
    relaying_client(&server, "alice", "pw", &peer);
}

#[test]
fn sighup_adds_and_removes_listeners() {
    use std::io::{Read, Write};

    let server = TestServer::start(&config("pw", "s", ""));
    let peer = peer();
    let mut c = relaying_client(&server, "alice", "pw", &peer);

    let with_tcp = format!(
        "{}\n[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:0\"\n",
        config("pw", "s", "")
    );
    std::fs::write(server.config_path(), &with_tcp).unwrap();
    server.signal("HUP");
    let tcp: std::net::SocketAddr = server
        .wait_log_after("listening tcp ")
        .expect("no tcp listener")
        .parse()
        .unwrap();
    assert!(server.wait_log("configuration reloaded"));
    // A Binding over the new TCP listener is answered.
    let mut s = std::net::TcpStream::connect(tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[
        0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ])
    .unwrap();
    let mut resp = [0u8; 64];
    let n = s.read(&mut resp).unwrap();
    let m = Message::parse(&resp[..n]).unwrap();
    assert_eq!(m.xor_mapped_address().unwrap(), Some(s.local_addr().unwrap()));
    // The UDP allocation was not disturbed.
    send_and_receive(&mut c, &peer, b"after adding");

    std::fs::write(server.config_path(), config("pw", "s", "")).unwrap();
    server.signal("HUP");
    assert!(server.wait_log("closing listener"));
    assert!(server.wait_log("configuration reloaded"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(std::net::TcpStream::connect(tcp).is_err(), "the TCP listener is gone");
    send_and_receive(&mut c, &peer, b"after removing");
}

#[test]
fn systemd_notifications() {
    // A stand-in for systemd's notification socket.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut server = TestServer::start_with_env(
        &config("pw", "s", "drain_timeout = 5"),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let next = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("no notification");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    };
    assert_eq!(next(), "READY=1");
    server.signal("HUP");
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    server.signal("TERM");
    assert_eq!(next(), "STOPPING=1");
    // Nothing allocated: the drain ends at once.
    let status = server.wait_exit(Duration::from_secs(10)).expect("no exit");
    assert!(status.success());
}

#[test]
fn a_drain_that_times_out_says_what_it_cut_off() {
    let mut server = TestServer::start(&config("pw", "s", "drain_timeout = 1"));
    let peer = peer();
    let _c = relaying_client(&server, "alice", "pw", &peer);
    let _d = relaying_client(&server, "alice", "pw", &peer);
    server.signal("TERM");
    let line = server
        .wait_line("drain timeout: exiting with allocations still open")
        .expect("the cut-off is logged");
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("allocations=2") && line.contains("udp=2") && line.contains("tcp=0"),
        "{line}"
    );
    assert!(line.contains("users=1"), "{line}");
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}
