//! Several turnstile nodes sharing one Redis in coturn's layout: users and
//! REST secrets written by coturn's own `turnadmin` are accepted by every
//! node, and a deleted user is refused everywhere within two seconds. A
//! real `redis-server` (Debian) on an ephemeral loopback port; nodes on
//! 127.0.0.11, .12 and .13; everything stopped when the test ends.

mod common;

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use common::raw::{RawClient, code};
use common::uclient::{EchoPeer as Peer, Report, parse_report};
use turnstile::proto::stun::Method;

const REALM: &str = "test.local";

struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// Debian's redis-server on loopback, keeping nothing on disk, with extra
/// arguments; returns once it accepts connections on `port`.
fn redis_server(port: u16, dir: &std::path::Path, extra: &[&str]) -> Child {
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = redis_server(port, dir.path(), &["--port", &port.to_string()]);
        Redis { child, port, _dir: dir }
    }

    /// coturn's `turnadmin`, pointed at this Redis.
    fn turnadmin(&self, args: &[&str]) {
        self.turnadmin_in(REALM, args);
    }

    /// The same, in `realm`.
    fn turnadmin_in(&self, realm: &str, args: &[&str]) {
        let db = format!("ip=127.0.0.1 port={} dbname=0", self.port);
        let out = Command::new("turnadmin")
            .args(args)
            .args(["-r", realm, "-N", &db])
            .output()
            .expect("turnadmin (Debian package coturn)");
        assert!(
            out.status.success(),
            "turnadmin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(ip: &str, redis: &Redis) -> TestServer {
    node_with(ip, redis, "")
}

fn node_with(ip: &str, redis: &Redis, extra: &str) -> TestServer {
    TestServer::start(&format!(
        r#"realm = "{REALM}"
workers = 2

[[listen]]
transport = "udp"
address = "{ip}:0"

[relay]
address = "{ip}"

[metrics]
listen = "127.0.0.1:0"

[peers]
allow = ["127.0.0.0/8"]

[store]
redis = "redis://127.0.0.1:{}/0"

{extra}
"#,
        redis.port
    ))
}

fn uclient(server: &TestServer, peer: &Peer, user: &str, password: &str) -> Report {
    uclient_with(server, peer, &["-u", user, "-w", password])
}

/// turnutils_uclient through `server` to `peer`, 2 sessions of 50
/// messages, with these credential flags.
fn uclient_with(server: &TestServer, peer: &Peer, credentials: &[&str]) -> Report {
    let addr = server.udp[0];
    let out = Command::new("timeout")
        .args([
            "30",
            "turnutils_uclient",
            "-p",
            &addr.port().to_string(),
            "-e",
            "127.0.0.1",
        ])
        .args(["-r", &peer.port.to_string(), "-z", "5", "-n", "50", "-m", "2"])
        .args(credentials)
        .arg(addr.ip().to_string())
        .output()
        .expect("turnutils_uclient (Debian package coturn)");
    parse_report(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
fn users_written_by_turnadmin_work_on_every_node_and_deleting_one_refuses_it_everywhere() {
    let redis = Redis::start();
    let nodes: Vec<TestServer> = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .map(|ip| node(ip, &redis))
        .collect();
    for n in &nodes {
        assert!(n.wait_counter("turnstile_store_up", 1.0), "store not reachable");
    }
    let peer = Peer::start();

    redis.turnadmin(&["-a", "-u", "bob", "-p", "bobs-password"]);
    // Within about a second every node knows bob.
    std::thread::sleep(Duration::from_millis(2000));
    for n in &nodes {
        let r = uclient(n, &peer, "bob", "bobs-password");
        assert_eq!(r.lost, Some(0), "{}", r.output);
        assert!(r.sent >= 100 && r.received == r.sent, "{}", r.output);
    }

    // Deleted: refused everywhere within 2 s.
    redis.turnadmin(&["-d", "-u", "bob"]);
    std::thread::sleep(Duration::from_millis(2000));
    for n in &nodes {
        let r = uclient(n, &peer, "bob", "bobs-password");
        assert_eq!(r.received, 0, "{}", r.output);
        assert!(r.output.contains("Cannot complete Allocation"), "{}", r.output);
    }
}

#[test]
fn rest_secrets_written_by_turnadmin_work_on_every_node() {
    let redis = Redis::start();
    let nodes: Vec<TestServer> = ["127.0.0.11", "127.0.0.12"].iter().map(|ip| node(ip, &redis)).collect();
    redis.turnadmin(&["-s", "fleet-rest-secret"]);
    std::thread::sleep(Duration::from_millis(2000));
    let peer = Peer::start();
    for n in &nodes {
        let r = uclient_with(n, &peer, &["-u", "carol", "-W", "fleet-rest-secret"]);
        assert_eq!(r.lost, Some(0), "{}", r.output);
        assert!(r.sent >= 100 && r.received == r.sent, "{}", r.output);
    }
}

#[test]
fn with_redis_gone_the_users_read_last_still_work() {
    let mut redis = Redis::start();
    let n = node("127.0.0.11", &redis);
    redis.turnadmin(&["-a", "-u", "bob", "-p", "bobs-password"]);
    assert!(n.wait_counter("turnstile_store_up", 1.0));
    std::thread::sleep(Duration::from_millis(2000));
    // An allocation made before the outage.
    let (mut held, code_before) = allocate(&n, "bob", "bobs-password");
    assert_eq!(code_before, 0);
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.counter("turnstile_store_up") != 0.0 {
        assert!(Instant::now() < deadline, "the outage was not noticed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(n.wait_log("store unreachable"));
    // Degraded, not down: still ready, and the allocation lives on.
    assert_eq!(n.http_get("/readyz").0, 200);
    let refreshed = held.request(Method::REFRESH, true, |w| w.lifetime(600).unwrap());
    assert_eq!(code(&refreshed), 0, "an established allocation keeps its place");
    let peer = Peer::start();
    let r = uclient(&n, &peer, "bob", "bobs-password");
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.received > 0, "{}", r.output);

    // Redis back (empty, on the same port): the node says so and reads it again.
    let dir = tempfile::tempdir().unwrap();
    redis.child = redis_server(redis.port, dir.path(), &["--port", &redis.port.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while n.counter("turnstile_store_up") != 1.0 {
        assert!(Instant::now() < deadline, "the store's return was not noticed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(n.wait_log("store reachable"));
    redis.turnadmin(&["-a", "-u", "ivy", "-p", "ivys-password"]);
    std::thread::sleep(Duration::from_millis(2000));
    let r = uclient(&n, &peer, "ivy", "ivys-password");
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.received > 0, "a user added after the return works: {}", r.output);
}

/// Allocates for `user` on `server`; the answer's error code (0: success).
fn allocate(server: &TestServer, user: &str, password: &str) -> (RawClient, u16) {
    let mut c = RawClient::connect_as(server.udp[0], user, password);
    let answer = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    let code = code(&answer);
    (c, code)
}

#[test]
fn user_quota_counts_the_whole_fleet_and_a_dead_nodes_lease_runs_out() {
    let redis = Redis::start();
    let quota = "[limits]\nuser_quota = 2\n";
    let mut nodes: Vec<TestServer> = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .map(|ip| {
            node_with(
                ip,
                &redis,
                &format!("[auth]\nusers = {{ dave = \"daves-password\" }}\n{quota}"),
            )
        })
        .collect();
    for n in &nodes {
        assert!(n.wait_counter("turnstile_store_up", 1.0));
    }
    let (_a, first) = allocate(&nodes[0], "dave", "daves-password");
    let (mut b, second) = allocate(&nodes[1], "dave", "daves-password");
    assert_eq!((first, second), (0, 0), "two allocations on two nodes");
    // Leases are written and read once a second.
    std::thread::sleep(Duration::from_millis(2500));
    for n in &nodes {
        let (_c, third) = allocate(n, "dave", "daves-password");
        assert_eq!(third, 486, "the fleet holds dave's two already");
    }
    // One released (Refresh 0): a place again, on any node.
    let answer = b.request(Method::REFRESH, true, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&answer), 0);
    std::thread::sleep(Duration::from_millis(2500));
    let (_d, again) = allocate(&nodes[2], "dave", "daves-password");
    assert_eq!(again, 0, "a released place is free on another node");

    // Node 1 dies holding one: its lease runs out within LEASE (10 s).
    let dead = nodes.remove(0);
    let pid = dead.pid();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    loop {
        let (_e, code) = allocate(&nodes[0], "dave", "daves-password");
        if code == 0 {
            break;
        }
        assert_eq!(code, 486);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the dead node still holds its quota"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(dead);
}

const TOKEN: &str = "fleet-admin-token-0123";

fn admin_node(ip: &str, redis: &Redis) -> TestServer {
    node_with(
        ip,
        redis,
        &format!(
            "[auth]\nusers = {{ erin = \"erins-password\" }}\nsecrets = [\"fleet-rest\"]\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ),
    )
}

/// The allocations the admin API of `n` lists, as (node, user).
fn listed(n: &TestServer) -> Vec<(String, String)> {
    let (status, body) = n.admin_request("GET", "/v1/allocations", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["node"].as_str().unwrap().to_owned(),
                a["user"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn one_admin_view_and_a_kick_that_reaches_the_node_holding_the_allocation() {
    let redis = Redis::start();
    let nodes: Vec<TestServer> = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .map(|ip| admin_node(ip, &redis))
        .collect();
    let (_a, on_one) = allocate(&nodes[0], "erin", "erins-password");
    let (_b, on_three) = allocate(&nodes[2], "erin", "erins-password");
    assert_eq!((on_one, on_three), (0, 0));
    // Any node lists the whole fleet, each allocation with its node.
    wait_for("node 2 lists both allocations", || listed(&nodes[1]).len() == 2);
    let list = listed(&nodes[1]);
    let holders: std::collections::BTreeSet<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(holders.len(), 2, "{list:?}");
    assert!(list.iter().any(|(n, _)| n.starts_with("127.0.0.11:")), "{list:?}");
    assert!(list.iter().any(|(n, _)| n.starts_with("127.0.0.13:")), "{list:?}");

    // A kick on node 1 ends erin's allocation on node 3 too.
    let (status, body) = nodes[0].admin_request("DELETE", "/v1/allocations?user=erin", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    wait_for("node 3 ended erin's allocation", || {
        nodes[2].counter("turnstile_allocations_deleted_total") >= 1.0
    });
    wait_for("nothing listed anywhere", || nodes.iter().all(|n| listed(n).is_empty()));
}

#[test]
fn a_revocation_ends_rest_allocations_on_every_node_and_refuses_new_ones_until_it_runs_out() {
    let redis = Redis::start();
    let nodes: Vec<TestServer> = ["127.0.0.11", "127.0.0.12"]
        .iter()
        .map(|ip| admin_node(ip, &redis))
        .collect();
    // A REST credential for frank, as an app backend hands it out.
    let rest = |n: &TestServer| -> (String, String) {
        let (status, body) = n.admin_request(
            "POST",
            "/v1/ice-servers",
            Some(TOKEN),
            r#"{"user": "frank", "ttl": 600}"#,
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let s = v["iceServers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s.get("username").is_some())
            .unwrap()
            .clone();
        (
            s["username"].as_str().unwrap().to_owned(),
            s["credential"].as_str().unwrap().to_owned(),
        )
    };
    let (user, password) = rest(&nodes[0]);
    for n in &nodes {
        let (_c, code) = allocate(n, &user, &password);
        assert_eq!(code, 0);
    }
    wait_for("both allocations listed", || listed(&nodes[0]).len() == 2);

    let (status, body) =
        nodes[1].admin_request("POST", "/v1/revocations", Some(TOKEN), r#"{"user": "frank", "ttl": 4}"#);
    assert_eq!(status, 200, "{body}");
    wait_for("frank's allocations ended on both nodes", || {
        nodes.iter().all(|n| listed(n).is_empty())
    });
    for n in &nodes {
        let (_c, code) = allocate(n, &user, &password);
        assert_eq!(code, 401, "revoked on every node");
    }
    // The revocation runs out (4 s): frank may allocate again.
    std::thread::sleep(Duration::from_secs(6));
    for n in &nodes {
        let (_c, code) = allocate(n, &user, &password);
        assert_eq!(code, 0, "the revocation ran out");
    }
}

#[test]
fn a_node_out_of_relay_ports_sends_allocates_to_a_live_node() {
    let redis = Redis::start();
    let small = TestServer::start(&format!(
        r#"realm = "{REALM}"
workers = 1

[[listen]]
transport = "udp"
address = "127.0.0.11:0"

[relay]
address = "127.0.0.11"
ports = "50990-50990"

[metrics]
listen = "127.0.0.1:0"

[auth]
users = {{ gina = "ginas-password" }}

[store]
redis = "redis://127.0.0.1:{}/0"
"#,
        redis.port
    ));
    let other = node_with("127.0.0.12", &redis, "[auth]\nusers = { gina = \"ginas-password\" }\n");
    // Leases are exchanged once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let (_first, first) = allocate(&small, "gina", "ginas-password");
    assert_eq!(first, 0, "the one relay port");
    let mut c = RawClient::connect_as(small.udp[0], "gina", "ginas-password");
    let answer = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert_eq!(code(&answer), 300, "full: try the other node");
    let m = turnstile::proto::stun::Message::parse(&answer).unwrap();
    let alternate = match m.get(turnstile::proto::stun::kind::ALTERNATE_SERVER) {
        Ok(Some(turnstile::proto::stun::Attribute::AlternateServer(a))) => a,
        other => panic!("no ALTERNATE-SERVER: {other:?}"),
    };
    assert_eq!(alternate, other.udp[0], "the live node with room");
    let (_moved, moved) = allocate(&other, "gina", "ginas-password");
    assert_eq!(moved, 0, "and it takes the allocation");
}

#[test]
fn allocation_statuses_are_published_in_coturns_layout() {
    let redis = Redis::start();
    let n = node_with("127.0.0.11", &redis, "[auth]\nusers = { hank = \"hanks-password\" }\n");
    assert!(n.wait_counter("turnstile_store_up", 1.0));
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port)).unwrap();
    let mut con = client.get_connection().unwrap();
    let mut watcher = client.get_connection().unwrap();
    let mut events = watcher.as_pubsub();
    events.psubscribe("turn/realm/*/user/*/allocation/*").unwrap();
    events.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let (mut c, allocated) = allocate(&n, "hank", "hanks-password");
    assert_eq!(allocated, 0);
    let pattern = format!("turn/realm/{REALM}/user/hank/allocation/*/status");
    let mut keys: Vec<String> = Vec::new();
    wait_for("a status key for hank's allocation", || {
        keys = redis::cmd("KEYS").arg(&pattern).query(&mut con).unwrap();
        !keys.is_empty()
    });
    let status: String = redis::cmd("GET").arg(&keys[0]).query(&mut con).unwrap();
    assert!(status.starts_with("new lifetime="), "{status}");
    let ttl: i64 = redis::cmd("TTL").arg(&keys[0]).query(&mut con).unwrap();
    assert!(ttl > 500 && ttl <= 600, "the key expires with the allocation: {ttl}");

    // Released: the key goes, "deleted" and the totals are published.
    let answer = c.request(Method::REFRESH, true, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&answer), 0);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(ch, _): &(String, String)| ch.ends_with("/total_traffic"))
    {
        let m = events.get_message().expect("a notification within 5 s");
        seen.push((m.get_channel_name().to_owned(), m.get_payload::<String>().unwrap()));
    }
    assert!(
        seen.iter()
            .any(|(ch, p)| ch == &keys[0] && p.starts_with("new lifetime=")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|(ch, p)| ch == &keys[0] && p == "deleted"), "{seen:?}");
    let (_, totals) = seen.iter().find(|(ch, _)| ch.ends_with("/total_traffic")).unwrap();
    assert!(totals.starts_with("rcvp=0, rcvb=0, sentp=0, sentb=0"), "{totals}");
    let left: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut con).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_store_over_tls_is_reached_with_rediss_and_its_certificate_checked() {
    let dir = tempfile::tempdir().unwrap();
    common::write_cert(dir.path(), &common::cert());
    let port = free_port();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let tls_port = port.to_string();
    let mut child = redis_server(
        port,
        dir.path(),
        &[
            "--port",
            "0",
            "--tls-port",
            &tls_port,
            "--tls-auth-clients",
            "no",
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            cert.to_str().unwrap(),
        ],
    );
    let config = |ca: &str| {
        format!(
            "realm = \"{REALM}\"\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.11:0\"\n\
             [relay]\naddress = \"127.0.0.11\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [store]\nredis = \"rediss://127.0.0.1:{port}/0\"\n# {ca}\n"
        )
    };
    // Trusting the server's certificate: connected.
    let ca = dir.path().join("cert.pem");
    let trusted = TestServer::start_with_env(&config("trusted"), &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    assert!(trusted.wait_counter("turnstile_store_up", 1.0), "no TLS store");
    // Not trusting it: never connected.
    let other = tempfile::tempdir().unwrap();
    common::write_cert(other.path(), &common::cert());
    let stranger = other.path().join("cert.pem");
    let untrusted = TestServer::start_with_env(&config("untrusted"), &[("SSL_CERT_FILE", stranger.to_str().unwrap())]);
    assert!(untrusted.wait_log("store unreachable"));
    assert_eq!(untrusted.counter("turnstile_store_up"), 0.0);
    let _ = child.kill();
    let _ = child.wait();
}

/// A node on `ip` sharing `redis`, with the default realm and
/// games.example (with these settings), these listeners, then a listener
/// of games.example.
fn realm_node(ip: &str, redis: &Redis, games: &str, listeners: &str) -> TestServer {
    TestServer::start(&format!(
        r#"workers = 2

[[realm]]
name = "{REALM}"

[[realm]]
name = "games.example"
{games}
{listeners}
[[listen]]
transport = "udp"
address = "{ip}:0"
realm = "games.example"

[relay]
address = "{ip}"

[metrics]
listen = "127.0.0.1:0"

[store]
redis = "redis://127.0.0.1:{}/0"
"#,
        redis.port
    ))
}

#[test]
fn each_realms_users_and_secrets_come_from_its_own_part_of_the_store() {
    use turnstile::proto::auth::rest;
    let redis = Redis::start();
    // The same name in two realms, with two passwords; a REST secret for
    // one realm only. All written by coturn's turnadmin.
    redis.turnadmin(&["-a", "-u", "alice", "-p", "secret"]);
    redis.turnadmin_in("games.example", &["-a", "-u", "alice", "-p", "arcade"]);
    redis.turnadmin_in("games.example", &["-s", "games-fleet-secret"]);
    // The default realm's listener first, then games.example's.
    let n = realm_node(
        "127.0.0.11",
        &redis,
        "",
        "[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.11:0\"\n",
    );
    assert!(n.wait_counter("turnstile_store_up", 1.0));
    let (default, games) = (n.udp[0], n.udp[1]);
    let allocate_at = |at, user: &str, password: &str| {
        let mut c = RawClient::connect_as(at, user, password);
        let answer = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
        (c, code(&answer))
    };
    wait_for("games.example's alice from the store", || {
        allocate_at(games, "alice", "arcade").1 == 0
    });
    assert_eq!(allocate_at(games, "alice", "secret").1, 401);
    assert_eq!(allocate_at(default, "alice", "arcade").1, 401);
    let (_kept, ok) = allocate_at(default, "alice", "secret");
    assert_eq!(ok, 0);
    let user = format!(
        "{}:carol",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600
    );
    let password = rest::password(b"games-fleet-secret", &user);
    let (_carol, ok) = allocate_at(games, &user, &password);
    assert_eq!(ok, 0, "games.example's REST secret from the store");
    assert_eq!(
        allocate_at(default, &user, &password).1,
        401,
        "not the default realm's secret"
    );

    // Statuses go under each allocation's own realm.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port)).unwrap();
    let mut con = client.get_connection().unwrap();
    for realm in [REALM, "games.example"] {
        let pattern = format!("turn/realm/{realm}/user/alice/allocation/*/status");
        wait_for(&format!("a status key in {realm}"), || {
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut con).unwrap();
            !keys.is_empty()
        });
    }
}

#[test]
fn a_realms_quotas_count_the_whole_fleet() {
    let redis = Redis::start();
    // games.example: one allocation per user, two in all, across the fleet.
    let games_node = |ip: &str| {
        realm_node(
            ip,
            &redis,
            "users = { alice = \"arcade\", bob = \"arcade\", carol = \"arcade\" }\nuser_quota = 1\ntotal_quota = 2\n",
            "",
        )
    };
    let nodes = [games_node("127.0.0.11"), games_node("127.0.0.12")];
    for n in &nodes {
        assert!(n.wait_counter("turnstile_store_up", 1.0));
    }
    let (_a, first) = allocate(&nodes[0], "alice", "arcade");
    assert_eq!(first, 0);
    // Leases are written and read once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let (_a2, again) = allocate(&nodes[1], "alice", "arcade");
    assert_eq!(again, 486, "alice holds games.example's one per user on the other node");
    let (_b, second) = allocate(&nodes[1], "bob", "arcade");
    assert_eq!(second, 0);
    std::thread::sleep(Duration::from_millis(2500));
    let (_c, third) = allocate(&nodes[0], "carol", "arcade");
    assert_eq!(third, 486, "games.example holds its two across the fleet");
    assert!(nodes[0].wait_counter("turnstile_quota_refusals_total{quota=\"realm\"}", 1.0));
}
