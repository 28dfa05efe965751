//! Authenticated Allocate throughput: N clients each loop Allocate →
//! Refresh(lifetime 0) as fast as the server answers, with the server's
//! 401/438 rounds answered on the fly.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use turnstile::proto::stun::{Class, Message, Method, TransactionId};

use crate::server_process;
use crate::session::Session;
use crate::syscalls::{BATCH, Epoll, RecvSlots};

#[derive(Debug, serde::Serialize)]
pub struct AllocateReport {
    pub clients: usize,
    pub cold: bool,
    pub seconds: f64,
    pub allocations: u64,
    pub allocations_per_s: f64,
    pub refreshes: u64,
    pub auth_retries: u64,
    pub errors: u64,
    /// Error responses by code.
    pub error_codes: std::collections::BTreeMap<u16, u64>,
    pub timeouts: u64,
    /// Round trip of the Allocate request that succeeded (after any 401/438
    /// round), microseconds.
    pub allocate_p50_us: f64,
    pub allocate_p99_us: f64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_allocation: Option<f64>,
}

enum Step {
    Allocate,
    Release,
}

struct Client {
    session: Session,
    step: Step,
    pending: Option<(TransactionId, Instant)>,
}

fn send(c: &mut Client, buf: &mut [u8]) {
    let (id, n) = match c.step {
        Step::Allocate => c.session.write_request(buf, Method::ALLOCATE, |w| {
            w.requested_transport(17).expect("buffer");
        }),
        Step::Release => c.session.write_request(buf, Method::REFRESH, |w| {
            w.lifetime(0).expect("buffer");
        }),
    };
    let _ = c.session.socket.send(&buf[..n]);
    c.pending = Some((id, Instant::now()));
}

/// `cold`: every Allocate comes from a client that meets the 401 challenge
/// first (two transactions per allocation, as for a new client).
pub fn run(
    sessions: Vec<Session>,
    duration: Duration,
    cold: bool,
    rotate_ips: u8,
    server_pid: Option<u32>,
) -> std::io::Result<AllocateReport> {
    let mut next_ip = 0u32;
    let mut epoll = Epoll::new()?;
    let mut clients: Vec<Client> = Vec::with_capacity(sessions.len());
    for (i, s) in sessions.into_iter().enumerate() {
        s.socket.set_nonblocking(true)?;
        epoll.add(s.socket.as_raw_fd(), i as u64)?;
        clients.push(Client {
            session: s,
            step: Step::Allocate,
            pending: None,
        });
    }
    let mut buf = [0u8; 1500];
    let mut error_codes = std::collections::BTreeMap::new();
    let mut slots = RecvSlots::new(2048, 0);
    let (mut allocations, mut refreshes, mut retries, mut errors, mut timeouts) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let cpu_before = server_pid.and_then(server_process::cpu_time);
    let start = Instant::now();
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for c in clients.iter_mut() {
        send(c, &mut buf);
    }
    let mut ready = Vec::with_capacity(256);
    let mut last_sweep = Instant::now();
    // After the measured time, no new Allocate: every client waits for its
    // answer and releases what it holds, so nothing outlives the run.
    let mut measured: Option<(f64, Option<Duration>)> = None;
    loop {
        if measured.is_none() && start.elapsed() >= duration {
            measured = Some((
                start.elapsed().as_secs_f64(),
                server_pid.and_then(server_process::cpu_time),
            ));
        }
        let stopping = measured.is_some();
        if stopping
            && (clients.iter().all(|c| c.pending.is_none()) || start.elapsed() > duration + Duration::from_secs(3))
        {
            break;
        }
        ready.clear();
        epoll.wait(10, |t| ready.push(t as usize))?;
        for &i in &ready {
            loop {
                let fd = clients[i].session.socket.as_raw_fd();
                let n = slots.recv(fd)?;
                for s in 0..n {
                    let c = &mut clients[i];
                    let Ok(m) = Message::parse(slots.datagram(s)) else {
                        continue;
                    };
                    if c.pending.as_ref().map(|p| &p.0) != Some(m.transaction_id()) {
                        continue;
                    }
                    let sent_at = c.pending.take().map(|p| p.1);
                    match m.class() {
                        Class::Success => match c.step {
                            Step::Allocate => {
                                if !stopping {
                                    allocations += 1;
                                    if let Some(t) = sent_at {
                                        let _ = latency.record(t.elapsed().as_micros().max(1) as u64);
                                    }
                                }
                                c.step = Step::Release;
                            }
                            Step::Release => {
                                c.step = Step::Allocate;
                                if stopping {
                                    continue;
                                }
                                refreshes += 1;
                                // The next Allocate comes from a new 5-tuple, as a new
                                // client's would (servers may hold a released one back).
                                epoll.remove(c.session.socket.as_raw_fd());
                                let ip = (rotate_ips > 0).then(|| {
                                    next_ip = (next_ip + 1) % u32::from(rotate_ips);
                                    std::net::IpAddr::from([127, 0, 1, 1 + next_ip as u8])
                                });
                                c.session.new_port(ip)?;
                                c.session.socket.set_nonblocking(true)?;
                                if cold {
                                    c.session.forget_key();
                                }
                                epoll.add(c.session.socket.as_raw_fd(), i as u64)?;
                            }
                        },
                        _ => {
                            if c.session.learn(&m) {
                                retries += 1;
                            } else {
                                let code = m.error_code().ok().flatten().map_or(0, |e| e.code);
                                if stopping && matches!(c.step, Step::Release) {
                                    continue;
                                }
                                errors += 1;
                                *error_codes.entry(code).or_default() += 1;
                                // 437 on Allocate: this 5-tuple holds an allocation; release it.
                                c.step = match code {
                                    437 if matches!(c.step, Step::Allocate) => Step::Release,
                                    _ => Step::Allocate,
                                };
                                if stopping && matches!(c.step, Step::Allocate) {
                                    continue;
                                }
                            }
                        }
                    }
                    send(c, &mut buf);
                }
                if n < BATCH {
                    break;
                }
            }
        }
        if last_sweep.elapsed() > Duration::from_millis(100) {
            last_sweep = Instant::now();
            for c in clients.iter_mut() {
                if c.pending
                    .as_ref()
                    .is_some_and(|p| p.1.elapsed() > Duration::from_secs(1))
                {
                    timeouts += 1;
                    send(c, &mut buf);
                }
            }
        }
    }
    let (seconds, cpu_after) = measured.unwrap_or((start.elapsed().as_secs_f64(), None));
    let server_cpu = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
        _ => None,
    };
    Ok(AllocateReport {
        clients: clients.len(),
        cold,
        seconds,
        allocations,
        allocations_per_s: allocations as f64 / seconds,
        refreshes,
        auth_retries: retries,
        errors,
        error_codes,
        timeouts,
        allocate_p50_us: latency.value_at_quantile(0.5) as f64,
        allocate_p99_us: latency.value_at_quantile(0.99) as f64,
        server_cpu_s: server_cpu,
        server_cpu_us_per_allocation: server_cpu.map(|c| c * 1e6 / allocations.max(1) as f64),
    })
}
