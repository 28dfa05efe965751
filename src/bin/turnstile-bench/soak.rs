//! A bounded soak: K allocations kept alive for D seconds while a share of
//! them is replaced every second — half released with Refresh(0), half
//! simply abandoned to expire — with the server's resident memory and open
//! descriptors sampled as it goes. At the end everything left is released
//! and the descriptors must return to where they started, less nothing.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::server_process;
use crate::session::{Credentials, Session};

pub struct SoakSpec {
    pub server: SocketAddr,
    pub client_ip: std::net::IpAddr,
    pub credentials: Credentials,
    pub allocations: usize,
    pub duration: Duration,
    /// Allocations replaced per second.
    pub churn: usize,
    pub sample: Duration,
    pub server_pid: Option<u32>,
}

#[derive(Debug, serde::Serialize)]
pub struct Sample {
    pub at_s: u64,
    pub live: usize,
    /// Abandoned allocations the server should still hold (lifetime 600 s).
    pub abandoned_unexpired: usize,
    pub rss_bytes: Option<u64>,
    pub fds: Option<usize>,
    pub created: u64,
    pub released: u64,
    pub abandoned: u64,
    pub failures: u64,
    /// Failures by what the server answered ("timeout" when nothing).
    pub failure_codes: std::collections::BTreeMap<String, u64>,
}

struct Live {
    session: Session,
    refreshed: Instant,
}

fn open(spec: &SoakSpec, peer: SocketAddr) -> Result<Live, Box<dyn std::error::Error>> {
    let mut s = Session::new(
        SocketAddr::new(spec.client_ip, 0),
        spec.server,
        spec.credentials.clone(),
    )?;
    // The system may hand out the port of an abandoned client whose
    // allocation is still alive (437): like any client, try another port.
    let mut tries = 0;
    loop {
        match s.allocate(600) {
            Ok(_) => break,
            Err(e) if e.code == Some(437) && tries < 20 => {
                tries += 1;
                s.new_port(None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    s.create_permission(peer)?;
    s.channel_bind(0x4000, peer)?;
    Ok(Live {
        session: s,
        refreshed: Instant::now(),
    })
}

pub fn run(spec: &SoakSpec, mut report: impl FnMut(&Sample)) -> Result<(Sample, Sample), Box<dyn std::error::Error>> {
    let peer_socket = UdpSocket::bind(SocketAddr::new(spec.client_ip, 0))?;
    let peer = peer_socket.local_addr()?;
    let pid = spec.server_pid;
    let baseline_fds = pid.and_then(server_process::fd_count);
    let start = Instant::now();
    let mut live: Vec<Live> = Vec::with_capacity(spec.allocations);
    let (mut created, mut released, mut abandoned_count, mut failures) = (0u64, 0u64, 0u64, 0u64);
    let mut abandoned: Vec<Instant> = Vec::new();
    for _ in 0..spec.allocations {
        live.push(open(spec, peer)?);
        created += 1;
    }
    let mut codes: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let note = |codes: &mut std::collections::BTreeMap<String, u64>, e: &crate::session::Refused| {
        let key = format!(
            "{} {}",
            e.method.name(),
            e.code.map_or("timeout".to_owned(), |c| c.to_string())
        );
        *codes.entry(key).or_default() += 1;
    };
    let sample =
        |live: &Vec<Live>, abandoned: &Vec<Instant>, c, r, a, f, codes: &std::collections::BTreeMap<String, u64>| {
            Sample {
                at_s: start.elapsed().as_secs(),
                live: live.len(),
                abandoned_unexpired: abandoned
                    .iter()
                    .filter(|t| t.elapsed() < Duration::from_secs(600))
                    .count(),
                rss_bytes: pid.and_then(server_process::rss_bytes),
                fds: pid.and_then(server_process::fd_count),
                created: c,
                released: r,
                abandoned: a,
                failures: f,
                failure_codes: codes.clone(),
            }
        };
    let first = sample(&live, &abandoned, created, released, abandoned_count, failures, &codes);
    report(&first);
    let mut next_sample = Instant::now() + spec.sample;
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    let mut turn = 0usize;
    while start.elapsed() < spec.duration {
        std::thread::sleep(next_tick.saturating_duration_since(Instant::now()));
        next_tick += Duration::from_secs(1);
        for _ in 0..spec.churn.min(live.len()) {
            turn = (turn + 1) % live.len().max(1);
            let mut old = live.swap_remove(turn % live.len());
            if turn.is_multiple_of(2) {
                match old.session.refresh(0) {
                    Ok(()) => released += 1,
                    Err(e) => {
                        failures += 1;
                        note(&mut codes, &e);
                    }
                }
            } else {
                // It expires 600 s after it was created or last refreshed.
                abandoned.push(old.refreshed);
                abandoned_count += 1;
            }
            drop(old);
            match open(spec, peer) {
                Ok(l) => {
                    live.push(l);
                    created += 1;
                }
                Err(e) => {
                    failures += 1;
                    *codes.entry(format!("open: {e}")).or_default() += 1;
                }
            }
        }
        // Refresh what would otherwise expire.
        for l in live
            .iter_mut()
            .filter(|l| l.refreshed.elapsed() > Duration::from_secs(300))
        {
            match l.session.refresh(600) {
                Ok(()) => l.refreshed = Instant::now(),
                Err(e) => {
                    failures += 1;
                    note(&mut codes, &e);
                }
            }
        }
        abandoned.retain(|t| t.elapsed() < Duration::from_secs(700));
        if Instant::now() >= next_sample {
            next_sample += spec.sample;
            report(&sample(
                &live,
                &abandoned,
                created,
                released,
                abandoned_count,
                failures,
                &codes,
            ));
        }
    }
    for l in live.iter_mut() {
        match l.session.refresh(0) {
            Ok(()) => released += 1,
            Err(e) => {
                failures += 1;
                note(&mut codes, &e);
            }
        }
    }
    live.clear();
    std::thread::sleep(Duration::from_secs(1));
    let last = sample(&live, &abandoned, created, released, abandoned_count, failures, &codes);
    report(&last);
    if let (Some(base), Some(end)) = (baseline_fds, last.fds) {
        // The server expires allocations on a one-second timer: allow the
        // ones that reached their lifetime in the last two seconds.
        let pending = abandoned
            .iter()
            .filter(|t| t.elapsed() < Duration::from_secs(602))
            .count();
        let expected = base + pending;
        if end > expected {
            return Err(format!("descriptors leaked: {end} open, expected at most {expected}").into());
        }
    }
    Ok((first, last))
}
