//! TURN over UDP against the real binary, driven by clients nobody here
//! wrote: coturn's turnutils_uclient/turnutils_peer and the webrtc-rs `turn`
//! crate.

mod common;

use std::net::UdpSocket as StdUdp;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::uclient::{EchoPeer as Peer, Report, parse_report};
use common::{TestServer, loopback_config};

// Relay ports above Linux's ephemeral range (32768-60999), so a peer's
// ephemeral port can never look like one of this server's relay ports.
const USERS: &str = r#"
[relay]
address = "127.0.0.1"
ports = "61000-61999"

[auth]
users = { alice = "secret" }
secrets = ["s3cret-rest"]
"#;

fn config(allow_loopback: bool) -> String {
    let peers = if allow_loopback {
        "\n[peers]\nallow = [\"127.0.0.0/8\"]\n"
    } else {
        ""
    };
    loopback_config(&format!("{USERS}{peers}"))
}

fn free_udp_port() -> u16 {
    StdUdp::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn uclient(server: &TestServer, peer: &Peer, extra: &[&str]) -> Report {
    let port = server.udp[0].port().to_string();
    let peer_port = peer.port.to_string();
    let peer_ip = if extra.contains(&"-x") { "::1" } else { "127.0.0.1" };
    let mut args = vec!["-p", &port, "-e", peer_ip, "-r", &peer_port, "-z", "5"];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    let out = Command::new("timeout")
        .arg("60")
        .arg("turnutils_uclient")
        .args(&args)
        .output()
        .expect("turnutils_uclient (Debian package coturn) must be installed");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_report(output)
}

#[test]
fn uclient_relays_over_channels_with_zero_loss() {
    let server = TestServer::start(&config(true));
    let peer = Peer::start();
    let r = uclient(
        &server,
        &peer,
        &["-u", "alice", "-w", "secret", "-n", "200", "-l", "120", "-m", "10"],
    );
    assert_eq!(r.lost, Some(0), "{}", r.output);
    // uclient may run one session more than -m; every sent message must come back.
    assert!(r.sent >= 1000 && r.received == r.sent, "{}", r.output);
    assert!(server.wait_counter("turnstile_relayed_packets_total{direction=\"client_to_peer\"}", 1000.0));
    assert!(server.wait_counter("turnstile_relayed_packets_total{direction=\"peer_to_client\"}", 1000.0));
}

#[test]
fn uclient_relays_with_send_indications() {
    let server = TestServer::start(&config(true));
    let peer = Peer::start();
    let r = uclient(
        &server,
        &peer,
        &["-s", "-u", "alice", "-w", "secret", "-n", "100", "-l", "200", "-m", "2"],
    );
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.sent >= 200 && r.received == r.sent, "{}", r.output);
}

#[test]
fn uclient_with_a_rest_secret() {
    let server = TestServer::start(&config(true));
    let peer = Peer::start();
    let r = uclient(
        &server,
        &peer,
        &["-W", "s3cret-rest", "-u", "bob", "-n", "100", "-m", "2"],
    );
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.received >= 200 && r.received == r.sent, "{}", r.output);
    // The wrong secret gets no allocation.
    let r = uclient(&server, &peer, &["-W", "wrong-secret", "-u", "bob", "-n", "10"]);
    assert_eq!(r.received, 0, "{}", r.output);
    assert!(
        r.output.contains("Cannot complete Allocation") || r.output.contains("401"),
        "{}",
        r.output
    );
}

#[test]
fn uclient_with_a_wrong_password_is_refused() {
    let server = TestServer::start(&config(true));
    let peer = Peer::start();
    let r = uclient(&server, &peer, &["-u", "alice", "-w", "wrong", "-n", "10"]);
    assert_eq!(r.received, 0, "{}", r.output);
    assert!(r.output.contains("Cannot complete Allocation"), "{}", r.output);
    assert!(server.wait_counter("turnstile_error_responses_total{code=\"401\"}", 2.0));
}

#[test]
fn loopback_peers_are_refused_unless_allowed() {
    let server = TestServer::start(&config(false));
    let peer = Peer::start();
    let r = uclient(&server, &peer, &["-u", "alice", "-w", "secret", "-n", "20"]);
    assert_eq!(r.received, 0, "{}", r.output);
    assert!(r.output.contains("403"), "expected 403 Forbidden:\n{}", r.output);
    assert!(server.wait_counter("turnstile_peer_refused_total{reason=\"server_own_port\"}", 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_client_relays_both_ways() {
    use turn::client::{Client, ClientConfig};
    use webrtc_util::Conn;

    let server = TestServer::start(&config(true));
    let addr = server.udp[0].to_string();
    let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let client = Client::new(ClientConfig {
        stun_serv_addr: addr.clone(),
        turn_serv_addr: addr,
        username: "alice".into(),
        password: "secret".into(),
        realm: "test.local".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: socket,
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    let relay = client.allocate().await.unwrap();
    let relayed = relay.local_addr().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert!((61000..=61999).contains(&relayed.port()));

    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut buf = vec![0u8; 1500];
    for i in 0..50u32 {
        let msg = format!("ping {i}");
        relay.send_to(msg.as_bytes(), peer_addr).await.unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
        assert_eq!(from, relayed, "the peer sees the relayed address");
        let reply = format!("pong {i}");
        peer.send_to(reply.as_bytes(), relayed).await.unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], reply.as_bytes());
        assert_eq!(from, peer_addr);
    }
    relay.close().await.unwrap();
    client.close().await.unwrap();
}

#[test]
fn icmp_port_unreachable_reaches_the_client() {
    use turnstile::proto::stun::{Attribute, Class, Message, Method, kind};

    let server = TestServer::start(&config(true));
    let mut c = common::raw::RawClient::connect(server.udp[0]);
    let resp = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
    // A loopback port nobody listens on: the kernel answers with ICMP port unreachable.
    let closed: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let resp = c.request(Method::CREATE_PERMISSION, true, |w| {
        w.xor_peer_address(&closed).unwrap()
    });
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
    // ICMP is best effort (the kernel rate-limits it): try a few times.
    c.socket.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut ind = None;
    for _ in 0..8 {
        c.indication(Method::SEND, |w| {
            w.xor_peer_address(&closed).unwrap();
            w.data(b"anyone there?").unwrap();
        });
        if let Some(got) = c.try_recv() {
            ind = Some(got);
            break;
        }
    }
    let ind = ind.expect("no ICMP Data indication");
    let m = Message::parse(&ind).unwrap();
    assert_eq!((m.class(), m.method()), (Class::Indication, Method::DATA));
    assert_eq!(m.xor_peer_addresses().next().unwrap().unwrap(), closed);
    assert_eq!(
        m.get(kind::ICMP).unwrap(),
        Some(Attribute::Icmp {
            icmp_type: 3,
            icmp_code: 3,
            error_data: 0
        })
    );
    assert!(m.data().unwrap().is_none());
}

#[test]
fn ipv6_relays_and_an_ipv6_listener() {
    let cfg = loopback_config(
        r#"
[[listen]]
transport = "udp"
address = "[::1]:0"

[relay]
address = "127.0.0.1"
ipv6_address = "::1"
ports = "62000-62999"

[auth]
users = { alice = "secret" }

[peers]
allow = ["127.0.0.0/8", "::1/128"]
"#,
    );
    let server = TestServer::start(&cfg);
    assert_eq!(server.udp.len(), 2);
    let peer = Peer::start_on("::1");
    // An IPv4 client asking for an IPv6 relay (REQUESTED-ADDRESS-FAMILY).
    let r = uclient(
        &server,
        &peer,
        &["-x", "-u", "alice", "-w", "secret", "-n", "100", "-m", "2"],
    );
    assert!(r.sent >= 200 && r.received == r.sent, "{}", r.output);
    // An IPv6 client on the IPv6 listener.
    let out = Command::new("timeout")
        .args([
            "60",
            "turnutils_uclient",
            "-u",
            "alice",
            "-w",
            "secret",
            "-e",
            "::1",
            "-z",
            "5",
        ])
        .args([
            "-r",
            &peer.port.to_string(),
            "-p",
            &server.udp[1].port().to_string(),
            "-n",
            "100",
            "::1",
        ])
        .output()
        .unwrap();
    let r = parse_report(String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr));
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.sent >= 100 && r.received == r.sent, "{}", r.output);
}
