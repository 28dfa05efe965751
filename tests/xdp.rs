//! The XDP fast path on a real kernel (feature `xdp`, root): three network
//! namespaces — client, server, peer — joined by veth pairs, addresses from
//! 198.18.0.0/15 only. coturn's turnutils_uclient and turnutils_peer, and
//! the webrtc-rs client, relay through the real binary with `[xdp]` on; the
//! kernel's UDP counters at the receivers show the rewritten checksums are
//! right. Every namespace and process a test makes is removed when it ends.
#![cfg(feature = "xdp")]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::uclient::{Report, parse_report};

/// One topology at a time: the tests measure counters of whole namespaces.
static TOPOLOGY: Mutex<()> = Mutex::new(());

const CLIENT: &str = "198.18.0.2";
const SERVER: &str = "198.18.0.1";
const RELAY: &str = "198.18.1.1";
const PEER: &str = "198.18.1.2";
const METRICS: &str = "127.0.0.1:9641";
const TOKEN: &str = "xdp-test-admin-token";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect(args[0]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An XDP_PASS program for the far ends: on veth, frames a program sends
/// with XDP_TX or XDP_REDIRECT arrive only where an XDP program runs.
fn pass_program(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("pass.c");
    let obj = dir.join("pass.o");
    std::fs::write(
        &src,
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
         SEC(\"xdp\") int pass(struct xdp_md *ctx) { return XDP_PASS; }\n\
         char LICENSE[] SEC(\"license\") = \"GPL\";\n",
    )
    .unwrap();
    run(&[
        "clang",
        "-O2",
        "-target",
        "bpf",
        "-I/usr/include/x86_64-linux-gnu",
        "-c",
        src.to_str().unwrap(),
        "-o",
        obj.to_str().unwrap(),
    ]);
    obj
}

/// Client, server and peer namespaces, and the server in its own.
struct Topology {
    names: [String; 3],
    dir: tempfile::TempDir,
    server: Option<Child>,
    children: Vec<Child>,
}

impl Topology {
    fn new() -> Topology {
        let id = format!("{}", std::process::id() % 100_000);
        let names = [format!("tsx{id}c"), format!("tsx{id}s"), format!("tsx{id}p")];
        let dir = tempfile::tempdir().unwrap();
        let t = Topology {
            names,
            dir,
            server: None,
            children: Vec::new(),
        };
        let [c, s, p] = [t.client(), t.ns(), t.peer_ns()];
        for n in [c, s, p] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            run(&["ip", "netns", "add", n]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        run(&[
            "ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "s0", "netns", s,
        ]);
        run(&[
            "ip", "link", "add", "p0", "netns", p, "type", "veth", "peer", "name", "s1", "netns", s,
        ]);
        run(&["ip", "-n", c, "addr", "add", &format!("{CLIENT}/24"), "dev", "c0"]);
        run(&["ip", "-n", s, "addr", "add", &format!("{SERVER}/24"), "dev", "s0"]);
        run(&["ip", "-n", s, "addr", "add", &format!("{RELAY}/24"), "dev", "s1"]);
        run(&["ip", "-n", p, "addr", "add", &format!("{PEER}/24"), "dev", "p0"]);
        for (n, dev) in [(c, "c0"), (s, "s0"), (s, "s1"), (p, "p0")] {
            run(&["ip", "-n", n, "link", "set", dev, "up"]);
            // Full checksums from every sender: the program updates them
            // incrementally, which a partial (offloaded) one would defeat.
            run(&["ip", "netns", "exec", n, "ethtool", "-K", dev, "tx", "off"]);
        }
        run(&["ip", "-n", c, "route", "add", "default", "via", SERVER]);
        run(&["ip", "-n", p, "route", "add", "default", "via", RELAY]);
        // bpf_fib_lookup forwards only where forwarding is on.
        run(&["ip", "netns", "exec", s, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let pass = pass_program(t.dir.path());
        for (n, dev) in [(c, "c0"), (p, "p0")] {
            run(&[
                "ip",
                "-n",
                n,
                "link",
                "set",
                "dev",
                dev,
                "xdp",
                "obj",
                pass.to_str().unwrap(),
                "sec",
                "xdp",
            ]);
        }
        t
    }

    fn client(&self) -> &str {
        &self.names[0]
    }
    fn ns(&self) -> &str {
        &self.names[1]
    }
    fn peer_ns(&self) -> &str {
        &self.names[2]
    }

    fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("turnstile.toml")
    }

    fn write_config(&self, xdp: bool) {
        let xdp = if xdp {
            "[xdp]\ninterfaces = [\"s0\", \"s1\"]\nmode = \"native\"\n"
        } else {
            ""
        };
        std::fs::write(
            self.config_path(),
            format!(
                r#"realm = "example.org"
workers = 2

[[listen]]
transport = "udp"
address = "{SERVER}:3478"

[relay]
address = "{RELAY}"
ports = "50000-50999"

[auth]
users = {{ alice = "secret" }}

[peers]
allow = ["198.18.0.0/15"]

[metrics]
listen = "{METRICS}"

[admin]
listen = "127.0.0.1:9642"
token = "{TOKEN}"

{xdp}"#
            ),
        )
        .unwrap();
    }

    fn start_server(&mut self, xdp: bool) {
        self.write_config(xdp);
        let log = File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns(), env!("CARGO_BIN_EXE_turnstile"), "--config"])
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(" ready") {
            let exited = self.server.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "server not ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let pid = self.server.as_ref().unwrap().id().to_string();
        run(&["kill", "-s", sig, &pid]);
    }

    /// coturn's echo peer in namespace `ns` on `ip`.
    fn echo_peer(&mut self, ns: &str, ip: &str, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "turnutils_peer", "-L", ip, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnutils_peer (Debian package coturn)");
        self.children.push(child);
        std::thread::sleep(Duration::from_millis(300));
    }

    fn uclient(&self, peer_ip: &str, peer_port: u16, extra: &[&str]) -> Report {
        let out = Command::new("ip")
            .args(["netns", "exec", self.client(), "timeout", "60", "turnutils_uclient"])
            .args(["-p", "3478", "-e", peer_ip, "-r", &peer_port.to_string(), "-z", "5"])
            .args(["-u", "alice", "-w", "secret"])
            .args(extra)
            .arg(SERVER)
            .output()
            .expect("turnutils_uclient (Debian package coturn)");
        parse_report(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// The server's metrics, fetched from inside its namespace.
    fn scrape(&self) -> String {
        in_netns(self.ns(), || {
            let mut s = TcpStream::connect(METRICS).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        })
    }

    fn metric(&self, series: &str) -> f64 {
        self.scrape()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (up to 5 s: metrics are exported once a second) for `check`.
    fn wait_metric(&self, series: &str, check: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(series);
            if check(v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The kernel's UDP counters of a namespace: (InDatagrams, InCsumErrors).
    fn udp_counters(&self, ns: &str) -> (u64, u64) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
        let names: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let values: Vec<u64> = lines
            .next()
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        let get = |n: &str| values[names.iter().position(|x| *x == n).unwrap() - 1];
        (get("InDatagrams"), get("InCsumErrors"))
    }

    fn xdp_attached(&self, dev: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", self.ns(), "link", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in self.children.iter_mut().chain(self.server.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets belong to
/// the namespace of the thread that makes them).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap();
        // SAFETY: setns on this thread only, with a namespace descriptor we hold.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn guard() -> Option<std::sync::MutexGuard<'static, ()>> {
    if !is_root() {
        eprintln!("skipped: the XDP tests need root (network namespaces, XDP programs)");
        return None;
    }
    Some(TOPOLOGY.lock().unwrap_or_else(|e| e.into_inner()))
}

const XDP_TO_PEER: &str = "turnstile_xdp_relayed_packets_total{direction=\"client_to_peer\"}";
const XDP_TO_CLIENT: &str = "turnstile_xdp_relayed_packets_total{direction=\"peer_to_client\"}";
const RELAYED_TO_PEER: &str = "turnstile_relayed_packets_total{direction=\"client_to_peer\"}";

/// Relays ChannelData through a peer reached as `peer_ip` in `peer_ns`,
/// and checks what the kernel did with it.
fn relays_in_the_kernel(t: &mut Topology, peer_ns: &str, peer_ip: &str) {
    let peer_ns = peer_ns.to_owned();
    t.echo_peer(&peer_ns, peer_ip, 3480);
    let (before_c, _) = t.udp_counters(t.client());
    let r = t.uclient(peer_ip, 3480, &["-n", "500", "-l", "120", "-m", "10"]);
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.sent >= 5000 && r.received == r.sent, "{}", r.output);
    // ≥ 90 % of the ChannelData each way went through the program.
    let sent = r.sent as f64;
    let to_peer = t.wait_metric(XDP_TO_PEER, |v| v >= 0.9 * sent);
    let to_client = t.wait_metric(XDP_TO_CLIENT, |v| v >= 0.9 * sent);
    assert!(
        to_peer >= 0.9 * sent && to_client >= 0.9 * sent,
        "{to_peer} {to_client} of {sent}: {}",
        t.scrape()
    );
    // The core's totals count them too.
    assert!(t.wait_metric(RELAYED_TO_PEER, |v| v >= sent) >= sent);
    // The rewritten datagrams carry valid checksums at both receivers.
    let (after_c, c_errors) = t.udp_counters(t.client());
    let (_, p_errors) = t.udp_counters(&peer_ns);
    assert!(after_c - before_c >= r.received, "{after_c} - {before_c}");
    assert_eq!((c_errors, p_errors), (0, 0), "UDP checksum errors at the receivers");
}

#[test]
fn channels_are_relayed_in_the_kernel_both_ways_with_valid_checksums() {
    let Some(_g) = guard() else { return };
    let mut t = Topology::new();
    t.start_server(true);
    assert!(t.xdp_attached("s0") && t.xdp_attached("s1"));
    let peer_ns = t.peer_ns().to_owned();
    relays_in_the_kernel(&mut t, &peer_ns, PEER);
}

#[test]
fn a_peer_on_the_clients_side_is_relayed_back_out_of_the_same_interface() {
    let Some(_g) = guard() else { return };
    let mut t = Topology::new();
    t.start_server(true);
    let client_ns = t.client().to_owned();
    relays_in_the_kernel(&mut t, &client_ns, CLIENT);
}

#[test]
fn send_indications_stay_with_userspace_and_still_relay() {
    let Some(_g) = guard() else { return };
    let mut t = Topology::new();
    t.start_server(true);
    let peer_ns = t.peer_ns().to_owned();
    t.echo_peer(&peer_ns, PEER, 3480);
    let r = t.uclient(PEER, 3480, &["-s", "-n", "200", "-l", "120", "-m", "2"]);
    assert_eq!(r.lost, Some(0), "{}", r.output);
    assert!(r.sent >= 400 && r.received == r.sent, "{}", r.output);
    assert!(t.wait_metric(RELAYED_TO_PEER, |v| v >= r.sent as f64) >= r.sent as f64);
    assert_eq!(t.metric(XDP_TO_PEER), 0.0, "Send indications are not ChannelData");
    assert_eq!(
        t.metric(XDP_TO_CLIENT),
        0.0,
        "no channel: Data indications, from userspace"
    );
    let passed = t.wait_metric("turnstile_xdp_passed_total{reason=\"not_channel_data\"}", |v| {
        v >= r.sent as f64
    });
    assert!(passed >= r.sent as f64, "{passed}");
}

#[test]
fn kicked_allocations_leave_the_kernel_and_a_reload_without_xdp_detaches() {
    let Some(_g) = guard() else { return };
    let mut t = Topology::new();
    t.start_server(true);
    let peer_ns = t.peer_ns().to_owned();
    t.echo_peer(&peer_ns, PEER, 3480);
    // Kicked while relaying: coturn's client ends its allocations when it
    // finishes, so the kick comes while it still runs (4 s of messages).
    let kicked = std::thread::scope(|scope| {
        let running = scope.spawn(|| t.uclient(PEER, 3480, &["-n", "800", "-l", "120", "-m", "2"]));
        let bindings = t.wait_metric("turnstile_xdp_bindings", |v| v > 0.0);
        assert!(bindings > 0.0, "no bindings in the kernel while relaying: {}", t.log());
        // The operator ends the allocations: their bindings go with them.
        let out = Command::new("ip")
            .args(["netns", "exec", t.ns(), env!("CARGO_BIN_EXE_turnstile"), "--config"])
            .arg(t.config_path())
            .args(["kick", "alice"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let left = t.wait_metric("turnstile_xdp_bindings", |v| v == 0.0);
        let _ = running.join();
        left
    });
    assert_eq!(kicked, 0.0, "bindings left in the kernel after the kick");

    // A reload that removes [xdp] detaches the program; userspace relays.
    t.write_config(false);
    t.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.xdp_attached("s0") || t.xdp_attached("s1") {
        assert!(Instant::now() < deadline, "still attached: {}", t.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(t.log().contains("xdp fast path detached"), "{}", t.log());
    let before = t.metric(XDP_TO_PEER);
    let r = t.uclient(PEER, 3480, &["-n", "100", "-l", "120", "-m", "2"]);
    assert_eq!(r.lost, Some(0), "{}", r.output);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(t.metric(XDP_TO_PEER), before, "nothing offloaded after the detach");
}

#[test]
fn webrtc_rs_client_relays_through_the_kernel() {
    let Some(_g) = guard() else { return };
    let mut t = Topology::new();
    t.start_server(true);
    let peer_ns = t.peer_ns().to_owned();
    t.echo_peer(&peer_ns, PEER, 3480);
    let client_ns = t.client().to_owned();
    let (sent, echoed) = in_netns(&client_ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(webrtc_rs_round_trips(500))
    });
    assert_eq!(echoed, sent, "every datagram came back");
    // The client starts with Send indications until its channel is bound;
    // of the ChannelData that followed, ≥ 90 % went through the program
    // (what it passed to userspace, but for STUN, is an upper bound of the
    // ChannelData it did not relay).
    let to_peer = t.wait_metric(XDP_TO_PEER, |v| v > 0.0);
    let metrics = t.scrape();
    let passed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("turnstile_xdp_passed_total{") && !l.contains("not_channel_data"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        to_peer >= 0.9 * (to_peer + passed) && to_peer >= 0.5 * sent as f64,
        "{to_peer} relayed, {passed} passed, of {sent}: {metrics}"
    );
}

/// A webrtc-rs TURN client allocates, binds a channel to the echo peer and
/// sends `n` datagrams one after another; returns (sent, echoed).
async fn webrtc_rs_round_trips(n: usize) -> (usize, usize) {
    use std::sync::Arc;
    use turn::client::{Client, ClientConfig};
    use webrtc_util::Conn;

    let conn = Arc::new(tokio::net::UdpSocket::bind(format!("{CLIENT}:0")).await.unwrap());
    let client = Client::new(ClientConfig {
        stun_serv_addr: format!("{SERVER}:3478"),
        turn_serv_addr: format!("{SERVER}:3478"),
        username: "alice".into(),
        password: "secret".into(),
        realm: "example.org".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    let relay = client.allocate().await.unwrap();
    let peer: std::net::SocketAddr = format!("{PEER}:3480").parse().unwrap();
    let mut buf = [0u8; 1500];
    let mut echoed = 0;
    for i in 0..n {
        let msg = format!("datagram {i}");
        relay.send_to(msg.as_bytes(), peer).await.unwrap();
        if let Ok(Ok((len, _))) = tokio::time::timeout(Duration::from_secs(2), relay.recv_from(&mut buf)).await
            && &buf[..len] == msg.as_bytes()
        {
            echoed += 1;
        }
    }
    let _ = relay.close().await;
    client.close().await.unwrap();
    (n, echoed)
}

#[test]
fn stopping_the_server_detaches_the_program() {
    let Some(_g) = guard() else { return };
    let mut t = Topology::new();
    t.start_server(true);
    assert!(t.xdp_attached("s0") && t.xdp_attached("s1"));
    t.signal("TERM");
    let server = t.server.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while server.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !t.xdp_attached("s0") && !t.xdp_attached("s1"),
        "still attached after exit"
    );
}
