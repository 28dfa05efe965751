//! turnstile-bench: a TURN load generator that drives any TURN server over
//! UDP (turnstile, coturn, or the minimal forwarder it also contains), and
//! reports loss, throughput, round-trip times and the server's CPU cost
//! per relayed packet.
//!
//! Traffic goes to loopback unless `--allow-remote` is given; every run is
//! bounded in time.

mod allocate_rate;
mod forwarder;
mod load;
mod server_process;
mod session;
mod soak;
mod syscalls;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::load::{Flow, LoadSpec};
use crate::session::{Credentials, Session};

#[derive(Parser)]
#[command(
    name = "turnstile-bench",
    about = "TURN load generator and minimal forwarder baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay load: allocations with channels to echo peers, ChannelData or Send indications.
    Load(LoadArgs),
    /// Authenticated Allocate + Refresh(0) transactions per second.
    AllocateRate(AllocateArgs),
    /// Opens idle allocations and reports the server's memory and descriptors per allocation.
    Hold(HoldArgs),
    /// The minimal recvmmsg/sendmmsg forwarder (baseline; relays for anyone — loopback only).
    Forwarder(ForwarderArgs),
    /// Allocations kept for a long time with churn, sampling the server's memory and descriptors.
    Soak(SoakArgs),
}

#[derive(Args)]
struct SoakArgs {
    #[command(flatten)]
    target: Target,
    /// Allocations kept alive.
    #[arg(short = 'k', long, default_value_t = 1000)]
    allocations: usize,
    /// Seconds (at most 7200).
    #[arg(short = 'd', long, default_value_t = 1800)]
    duration: u64,
    /// Allocations replaced per second (half released, half abandoned to expire).
    #[arg(long, default_value_t = 10)]
    churn: usize,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60)]
    sample: u64,
}

#[derive(Args, Clone)]
struct Target {
    /// The TURN server's UDP address.
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// Long-term credential user name.
    #[arg(short = 'u', long, default_value = "alice")]
    user: String,
    /// Long-term credential password.
    #[arg(short = 'w', long, default_value = "secret")]
    password: String,
    /// TURN REST shared secret: credentials are computed for `--user` (overrides `--password`).
    #[arg(long)]
    rest_secret: Option<String>,
    /// Address the client sockets bind to.
    #[arg(long, default_value = "127.0.0.1")]
    client_ip: IpAddr,
    /// PID of the server, for its CPU time and memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Pin the generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Allow a server or peer address outside loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    target: Target,
    /// Allocations (each its own client socket, relay and channel).
    #[arg(short = 'k', long, default_value_t = 1)]
    allocations: usize,
    /// Application payload bytes per packet (at least 24).
    #[arg(short = 's', long, default_value_t = 100)]
    size: usize,
    /// Seconds of sending (at most 600).
    #[arg(short = 'd', long, default_value_t = 10)]
    duration: u64,
    /// Aggregate packets per second; 0 sends as fast as the generator can (open loop).
    #[arg(short = 'r', long, default_value_t = 0)]
    rate: u64,
    /// Cap on unanswered packets (0: none).
    #[arg(long, default_value_t = 0)]
    window: u64,
    /// Send indications instead of ChannelData.
    #[arg(long)]
    send_indications: bool,
    /// Send each allocation's bursts as UDP GSO trains (clients that batch).
    #[arg(long)]
    gso: bool,
    /// Echo peer sockets (default: min(allocations, 4)).
    #[arg(long)]
    peers: Option<usize>,
    /// Address the echo peers bind to.
    #[arg(long, default_value = "127.0.0.1")]
    peer_ip: IpAddr,
    /// Refresh every allocation this often, in seconds (0: never), and
    /// report how the refreshes were answered.
    #[arg(long, default_value_t = 0)]
    refresh_every: u64,
}

#[derive(Args)]
struct AllocateArgs {
    #[command(flatten)]
    target: Target,
    /// Concurrent clients, each with one transaction outstanding.
    #[arg(short = 'c', long, default_value_t = 64)]
    clients: usize,
    /// Seconds (at most 600).
    #[arg(short = 'd', long, default_value_t = 10)]
    duration: u64,
    /// Every allocation from a new client that meets the 401 challenge first
    /// (otherwise the realm and nonce are reused where the server accepts them).
    #[arg(long)]
    cold: bool,
    /// Each new client comes from the next of this many loopback addresses
    /// (127.0.1.1, 127.0.1.2, …), so no 5-tuple recurs while a server may
    /// still hold it; 0 keeps the client address. Implies new nonces on
    /// servers that bind nonces to the client's address.
    #[arg(long, default_value_t = 0)]
    rotate_ips: u8,
}

#[derive(Args)]
struct HoldArgs {
    #[command(flatten)]
    target: Target,
    /// Allocations to open.
    #[arg(short = 'k', long, default_value_t = 10_000)]
    allocations: usize,
    /// Seconds to keep them before releasing (at most 600).
    #[arg(long, default_value_t = 2)]
    hold: u64,
}

#[derive(Args)]
struct ForwarderArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:3490")]
    listen: SocketAddr,
    /// Address relay sockets bind to.
    #[arg(long, default_value = "127.0.0.1")]
    relay_ip: IpAddr,
    /// Pin to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Allow a non-loopback listen or relay address.
    #[arg(long)]
    allow_remote: bool,
}

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnstile-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Fallible<()> {
    syscalls::raise_fd_limit();
    match cli.command {
        Command::Load(a) => run_load(a),
        Command::AllocateRate(a) => run_allocate_rate(a),
        Command::Hold(a) => run_hold(a),
        Command::Soak(a) => run_soak(a),
        Command::Forwarder(a) => {
            loopback_only(a.allow_remote, &[a.listen.ip(), a.relay_ip])?;
            if let Some(cpu) = a.cpu {
                syscalls::pin_to_cpu(cpu)?;
            }
            forwarder::run(a.listen, a.relay_ip)?;
            Ok(())
        }
    }
}

fn loopback_only(allowed: bool, addrs: &[IpAddr]) -> Fallible<()> {
    if let Some(a) = addrs.iter().find(|a| !a.is_loopback())
        && !allowed
    {
        return Err(format!("{a} is not a loopback address (pass --allow-remote to send there)").into());
    }
    Ok(())
}

fn bounded(seconds: u64) -> Fallible<Duration> {
    if seconds == 0 || seconds > 600 {
        return Err("duration must be 1..=600 seconds".into());
    }
    Ok(Duration::from_secs(seconds))
}

fn credentials(t: &Target) -> Credentials {
    match &t.rest_secret {
        Some(secret) => Credentials::rest(secret, &t.user, Duration::from_secs(3600)),
        None => Credentials {
            username: t.user.clone(),
            password: t.password.clone(),
        },
    }
}

fn prepare(t: &Target, extra: &[IpAddr]) -> Fallible<()> {
    let mut addrs = vec![t.server.ip(), t.client_ip];
    addrs.extend_from_slice(extra);
    loopback_only(t.allow_remote, &addrs)?;
    if let Some(cpu) = t.cpu {
        syscalls::pin_to_cpu(cpu)?;
    }
    Ok(())
}

/// `n` signed-in sessions; the first learns realm and nonce, the rest reuse them.
fn sessions(t: &Target, n: usize) -> Fallible<Vec<Session>> {
    let creds = credentials(t);
    let mut out: Vec<Session> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = Session::new(SocketAddr::new(t.client_ip, 0), t.server, creds.clone())?;
        if let Some(first) = out.first() {
            s.share_auth(first);
        }
        out.push(s);
    }
    Ok(out)
}

fn print<T: serde::Serialize + std::fmt::Debug>(json: bool, report: &T) -> Fallible<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        let v = serde_json::to_value(report)?;
        if let Some(map) = v.as_object() {
            for (k, v) in map {
                println!("{k:>28}  {v}");
            }
        }
    }
    Ok(())
}

fn run_load(a: LoadArgs) -> Fallible<()> {
    prepare(&a.target, &[a.peer_ip])?;
    let duration = bounded(a.duration)?;
    if a.size < load::PAYLOAD_HEADER || a.size > 1400 {
        return Err(format!("size must be {}..=1400 bytes", load::PAYLOAD_HEADER).into());
    }
    if a.allocations == 0 || a.allocations > 50_000 {
        return Err("allocations must be 1..=50000".into());
    }
    let peer_count = a.peers.unwrap_or(a.allocations.min(4)).max(1);
    let peers: Vec<UdpSocket> = (0..peer_count)
        .map(|_| UdpSocket::bind(SocketAddr::new(a.peer_ip, 0)))
        .collect::<Result<_, _>>()?;
    // An echo peer takes the traffic of many allocations: room for the
    // bursts a server sends after a pause (a live upgrade's backlog), so the
    // generator is not where datagrams are lost.
    for p in &peers {
        let _ = socket2::SockRef::from(p).set_recv_buffer_size(4 << 20);
    }
    let started = Instant::now();
    let mut flows = Vec::with_capacity(a.allocations);
    for (i, mut session) in sessions(&a.target, a.allocations)?.into_iter().enumerate() {
        let peer = peers[i % peer_count].local_addr()?;
        let relay = session.allocate(600)?;
        session.create_permission(peer)?;
        if !a.send_indications {
            session.channel_bind(load::CHANNEL, peer)?;
        }
        flows.push(Flow { session, relay, peer });
    }
    if !a.target.json {
        eprintln!(
            "{} allocations ready in {:.2} s (first relay {})",
            flows.len(),
            started.elapsed().as_secs_f64(),
            flows[0].relay
        );
    }
    let spec = LoadSpec {
        size: a.size,
        duration,
        rate: a.rate,
        send_indications: a.send_indications,
        window: a.window,
        gso: a.gso,
        server_pid: a.target.server_pid,
        refresh_every: (a.refresh_every > 0).then(|| Duration::from_secs(a.refresh_every)),
    };
    let report = load::run(&mut flows, &peers, &spec)?;
    // Release the allocations so back-to-back runs start clean.
    for f in flows.iter_mut() {
        let _ = f.session.socket.set_nonblocking(false);
        let _ = f.session.refresh(0);
    }
    print(a.target.json, &report)
}

fn run_allocate_rate(a: AllocateArgs) -> Fallible<()> {
    prepare(&a.target, &[])?;
    let duration = bounded(a.duration)?;
    let mut all = sessions(&a.target, a.clients.clamp(1, 10_000))?;
    // One full round on the first client, so the others start with realm and nonce.
    allocate_somewhere(&mut all[0])?;
    all[0].refresh(0)?;
    let (first, rest) = all.split_at_mut(1);
    for s in rest {
        s.share_auth(&first[0]);
    }
    let report = allocate_rate::run(all, duration, a.cold, a.rotate_ips, a.target.server_pid)?;
    print(a.target.json, &report)
}

/// Allocates; a server may still hold a just-released 5-tuple (437), so
/// move on to other ports a few times.
fn allocate_somewhere(s: &mut Session) -> Fallible<std::net::SocketAddr> {
    let mut tries = 0;
    loop {
        match s.allocate(600) {
            Ok(relay) => return Ok(relay),
            Err(e) if e.code == Some(437) && tries < 20 => {
                tries += 1;
                s.new_port(None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn run_soak(a: SoakArgs) -> Fallible<()> {
    prepare(&a.target, &[])?;
    if a.duration == 0 || a.duration > 7200 {
        return Err("duration must be 1..=7200 seconds".into());
    }
    let spec = soak::SoakSpec {
        server: a.target.server,
        client_ip: a.target.client_ip,
        credentials: credentials(&a.target),
        allocations: a.allocations.clamp(1, 20_000),
        duration: Duration::from_secs(a.duration),
        churn: a.churn,
        sample: Duration::from_secs(a.sample.max(1)),
        server_pid: a.target.server_pid,
    };
    let (first, last) = soak::run(&spec, |s| {
        if let Ok(line) = serde_json::to_string(s) {
            println!("{line}");
        }
    })?;
    eprintln!(
        "soak done: {} created, {} released, {} abandoned, {} failures; RSS {:?} -> {:?}, descriptors {:?} -> {:?}",
        last.created,
        last.released,
        last.abandoned,
        last.failures,
        first.rss_bytes,
        last.rss_bytes,
        first.fds,
        last.fds
    );
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct HoldReport {
    allocations: usize,
    seconds_to_open: f64,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    rss_bytes_per_allocation: Option<f64>,
    fds_before: Option<usize>,
    fds_after: Option<usize>,
    fds_after_release: Option<usize>,
}

fn run_hold(a: HoldArgs) -> Fallible<()> {
    prepare(&a.target, &[])?;
    let hold = bounded(a.hold)?;
    let pid = a.target.server_pid;
    let rss_before = pid.and_then(server_process::rss_bytes);
    let fds_before = pid.and_then(server_process::fd_count);
    let started = Instant::now();
    let mut all = sessions(&a.target, a.allocations)?;
    for s in all.iter_mut() {
        allocate_somewhere(s)?;
    }
    let seconds_to_open = started.elapsed().as_secs_f64();
    std::thread::sleep(hold);
    let rss_after = pid.and_then(server_process::rss_bytes);
    let fds_after = pid.and_then(server_process::fd_count);
    for s in all.iter_mut() {
        let _ = s.refresh(0);
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = HoldReport {
        allocations: a.allocations,
        seconds_to_open,
        rss_before,
        rss_after,
        rss_bytes_per_allocation: match (rss_before, rss_after) {
            (Some(b), Some(a2)) => Some((a2 as f64 - b as f64) / a.allocations as f64),
            _ => None,
        },
        fds_before,
        fds_after,
        fds_after_release: pid.and_then(server_process::fd_count),
    };
    print(a.target.json, &report)
}
