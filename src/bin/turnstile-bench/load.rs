//! The relay load: K allocations each with a channel (or Send indications)
//! to an echo peer this process owns; packets carry a sequence number and
//! a send time, so loss per leg and round-trip times come out exactly.
//! One thread, one epoll set: pinned to a CPU it never competes with itself.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use turnstile::proto::stun::{Class, Message, MessageWriter, Method};

use crate::server_process;
use crate::session::{Session, tid};
use crate::syscalls::{BATCH, Epoll, RecvSlots, Ticker, send_batch, send_gso};

/// Bytes at the start of every payload: magic, flow, sequence, send time.
pub const PAYLOAD_HEADER: usize = 24;
const MAGIC: u32 = 0x5453_424e;
pub const CHANNEL: u16 = 0x4000;

/// One allocation under load.
pub struct Flow {
    pub session: Session,
    pub relay: SocketAddr,
    pub peer: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub size: usize,
    pub duration: Duration,
    /// Packets per second over all flows; 0 sends as fast as the generator can.
    pub rate: u64,
    pub send_indications: bool,
    /// Stop sending while this many packets are unanswered (0: no limit).
    pub window: u64,
    /// Send each flow's burst as one GSO train (as a QUIC-style sender would).
    pub gso: bool,
    pub server_pid: Option<u32>,
    /// Refresh every allocation this often while the load runs (spread
    /// over the interval), as a client keeping a call up does.
    pub refresh_every: Option<Duration>,
}

#[derive(Debug, serde::Serialize)]
pub struct LoadReport {
    pub allocations: usize,
    pub size: usize,
    pub mode: &'static str,
    pub target_pps: u64,
    pub seconds: f64,
    pub sent: u64,
    pub send_failed: u64,
    pub peer_received: u64,
    pub client_received: u64,
    pub misrouted: u64,
    pub loss_to_peer: f64,
    pub loss_to_client: f64,
    /// Round trips completed per second.
    pub echoed_pps: f64,
    /// Packets the server relayed per second (both legs).
    pub relayed_pps: f64,
    pub echoed_mbit_s: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub rtt_p999_us: f64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_util: Option<f64>,
    pub server_cpu_us_per_packet: Option<f64>,
    pub generator_cpu_s: f64,
    /// Refreshes sent during the run, and how they were answered.
    pub refreshes_sent: u64,
    pub refreshes_ok: u64,
    /// 437: the server no longer knows the allocation.
    pub refreshes_437: u64,
    pub refreshes_other_error: u64,
    /// Echoes whose relayed address (as the peer saw it) was not the one
    /// the allocation was given.
    pub relay_moved: u64,
    /// Longest time without any echo arriving, and the longest without an
    /// echo for one allocation, while sending.
    pub longest_gap_ms: f64,
    pub longest_flow_gap_ms: f64,
}

struct Outgoing {
    template: Vec<u8>,
    /// Where the payload starts inside `template`.
    payload_at: usize,
}

fn outgoing(flow: &Flow, index: u32, spec: &LoadSpec) -> Outgoing {
    let mut payload = vec![0u8; spec.size];
    payload[..4].copy_from_slice(&MAGIC.to_be_bytes());
    payload[4..8].copy_from_slice(&index.to_be_bytes());
    if spec.send_indications {
        let mut buf = vec![0u8; spec.size + 64];
        let mut w =
            MessageWriter::new(&mut buf, Class::Indication, Method::SEND, tid(u64::from(index), 7)).expect("buffer");
        w.xor_peer_address(&flow.peer).expect("buffer");
        let payload_at = w.len() + 4;
        w.data(&payload).expect("buffer");
        let n = w.finish();
        buf.truncate(n);
        Outgoing {
            template: buf,
            payload_at,
        }
    } else {
        let mut buf = Vec::with_capacity(4 + spec.size);
        buf.extend_from_slice(&CHANNEL.to_be_bytes());
        buf.extend_from_slice(&(spec.size as u16).to_be_bytes());
        buf.extend_from_slice(&payload);
        Outgoing {
            template: buf,
            payload_at: 4,
        }
    }
}

/// The application payload of what a client socket received.
fn client_payload(datagram: &[u8]) -> Option<&[u8]> {
    match datagram.first()? {
        0x40..=0x7f => {
            let len = usize::from(u16::from_be_bytes([*datagram.get(2)?, *datagram.get(3)?]));
            datagram.get(4..4 + len)
        }
        0x00 | 0x01 => Message::parse(datagram).ok()?.data().ok().flatten(),
        _ => None,
    }
}

fn read_header(payload: &[u8]) -> Option<(u32, u64, u64)> {
    if payload.len() < PAYLOAD_HEADER || payload[..4] != MAGIC.to_be_bytes() {
        return None;
    }
    let flow = u32::from_be_bytes(payload[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(payload[8..16].try_into().ok()?);
    let sent = u64::from_be_bytes(payload[16..24].try_into().ok()?);
    Some((flow, seq, sent))
}

fn generator_cpu() -> f64 {
    // SAFETY: getrusage fills a live struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs the load and reports; `peers` are the echo sockets the flows point at.
pub fn run(flows: &mut [Flow], peers: &[UdpSocket], spec: &LoadSpec) -> std::io::Result<LoadReport> {
    let k = flows.len();
    let mut epoll = Epoll::new()?;
    for (i, f) in flows.iter().enumerate() {
        f.session.socket.set_nonblocking(true)?;
        epoll.add(f.session.socket.as_raw_fd(), i as u64)?;
    }
    for (j, p) in peers.iter().enumerate() {
        p.set_nonblocking(true)?;
        epoll.add(p.as_raw_fd(), (k + j) as u64)?;
    }
    let ticker_token = (k + peers.len()) as u64;
    let ticker = if let Some(period) = 1_000_000_000u64.checked_div(spec.rate) {
        let period = period.max(20_000);
        let t = Ticker::new(period)?;
        epoll.add(t.fd, ticker_token)?;
        Some(t)
    } else {
        None
    };
    let outgoing: Vec<Outgoing> = flows
        .iter()
        .enumerate()
        .map(|(i, f)| outgoing(f, i as u32, spec))
        .collect();
    let packet_len = outgoing.first().map_or(0, |o| o.template.len());
    let mut scratch = vec![0u8; packet_len * BATCH];
    let mut slots = RecvSlots::new(spec.size + 128, 0);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
    let per_flow_burst = (BATCH / k.max(1)).max(1);

    let (mut sent, mut send_failed, mut peer_received, mut client_received, mut misrouted) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut next_flow = 0usize;
    let mut seq = 0u64;
    let cpu_before = spec.server_pid.and_then(server_process::cpu_time);
    let gen_before = generator_cpu();
    let start = Instant::now();
    let stop_sending = start + spec.duration;
    let drain = Duration::from_millis(300);
    let mut ready: Vec<u64> = Vec::with_capacity(256);
    let (mut refreshes_sent, mut refreshes_ok, mut refreshes_437, mut refreshes_other) = (0u64, 0u64, 0u64, 0u64);
    let mut relay_moved = 0u64;
    let mut last_echo: Option<u64> = None;
    let mut longest_gap = 0u64;
    let mut flow_last: Vec<Option<u64>> = vec![None; k];
    let mut longest_flow_gap = 0u64;
    // Flow i refreshes at i/k of each interval.
    let mut next_refresh: Vec<Duration> = match spec.refresh_every {
        Some(every) => (0..k).map(|i| every.mul_f64(i as f64 / k.max(1) as f64)).collect(),
        None => Vec::new(),
    };
    let mut request = [0u8; 512];
    loop {
        let now = Instant::now();
        if now >= stop_sending + drain {
            break;
        }
        let sending = now < stop_sending;
        if let (Some(every), true) = (spec.refresh_every, sending) {
            let elapsed = now.duration_since(start);
            for (i, due) in next_refresh.iter_mut().enumerate() {
                if *due <= elapsed {
                    *due += every;
                    let f = &mut flows[i];
                    let (_, n) = f
                        .session
                        .write_request(&mut request, Method::REFRESH, |w| w.lifetime(600).expect("buffer"));
                    if f.session.socket.send(&request[..n]).is_ok() {
                        refreshes_sent += 1;
                    }
                }
            }
        }
        if sending {
            let elapsed = now.duration_since(start);
            let mut budget = if spec.rate > 0 {
                let due = (u128::from(spec.rate) * elapsed.as_nanos() / 1_000_000_000) as u64;
                due.saturating_sub(sent + send_failed)
                    .min(4 * BATCH as u64 * k.max(1) as u64)
            } else {
                BATCH as u64
            };
            if spec.window > 0 {
                let in_flight = (sent).saturating_sub(client_received);
                budget = budget.min(spec.window.saturating_sub(in_flight));
            }
            while budget > 0 {
                let flow = next_flow;
                next_flow = (next_flow + 1) % k;
                let n = (per_flow_burst as u64).min(budget) as usize;
                let out = &outgoing[flow];
                let t_ns = start.elapsed().as_nanos() as u64;
                for c in 0..n {
                    let pkt = &mut scratch[c * packet_len..(c + 1) * packet_len];
                    pkt.copy_from_slice(&out.template);
                    let p = &mut pkt[out.payload_at..];
                    p[8..16].copy_from_slice(&(seq + c as u64).to_be_bytes());
                    p[16..24].copy_from_slice(&t_ns.to_be_bytes());
                }
                let fd = flows[flow].session.socket.as_raw_fd();
                let ok = if spec.gso && n > 1 {
                    let taken = send_gso(fd, &scratch[..n * packet_len], packet_len as u16).unwrap_or(false);
                    if taken { n } else { 0 }
                } else {
                    let batch: Vec<(&[u8], Option<SocketAddr>)> =
                        scratch.chunks(packet_len).take(n).map(|c| (c, None)).collect();
                    send_batch(fd, &batch).unwrap_or(0)
                };
                sent += ok as u64;
                send_failed += (n - ok) as u64;
                seq += n as u64;
                budget -= n as u64;
            }
        }
        let timeout = if spec.rate > 0 || !sending { 1 } else { 0 };
        ready.clear();
        epoll.wait(timeout, |t| ready.push(t))?;
        for &token in &ready {
            if token == ticker_token {
                if let Some(t) = &ticker {
                    t.clear();
                }
                continue;
            }
            let token = token as usize;
            if token < k {
                let fd = flows[token].session.socket.as_raw_fd();
                loop {
                    let n = slots.recv(fd)?;
                    let arrived = start.elapsed().as_nanos() as u64;
                    for i in 0..n {
                        let d = slots.datagram(i);
                        if let Some(m) = Message::parse(d).ok().filter(|m| m.method() == Method::REFRESH) {
                            match m.error_code().ok().flatten().map(|e| e.code) {
                                None if m.class() == Class::Success => refreshes_ok += 1,
                                Some(437) => refreshes_437 += 1,
                                _ => refreshes_other += 1,
                            }
                            continue;
                        }
                        let Some((flow, _seq, t)) = client_payload(d).and_then(read_header) else {
                            continue;
                        };
                        if flow as usize != token {
                            misrouted += 1;
                            continue;
                        }
                        client_received += 1;
                        let _ = hist.record(arrived.saturating_sub(t).max(1));
                        if arrived < stop_sending.duration_since(start).as_nanos() as u64 {
                            if let Some(last) = last_echo {
                                longest_gap = longest_gap.max(arrived.saturating_sub(last));
                            }
                            if let Some(Some(last)) = flow_last.get(token) {
                                longest_flow_gap = longest_flow_gap.max(arrived.saturating_sub(*last));
                            }
                            last_echo = Some(arrived);
                            if let Some(slot) = flow_last.get_mut(token) {
                                *slot = Some(arrived);
                            }
                        }
                    }
                    if n < BATCH {
                        break;
                    }
                }
            } else {
                let peer = &peers[token - k];
                let fd = peer.as_raw_fd();
                loop {
                    let n = slots.recv(fd)?;
                    let mut back: Vec<(&[u8], Option<SocketAddr>)> = Vec::with_capacity(n);
                    for i in 0..n {
                        let d = slots.datagram(i);
                        if let Some((flow, _, _)) = read_header(d) {
                            peer_received += 1;
                            if flows
                                .get(flow as usize)
                                .is_some_and(|f| Some(f.relay) != slots.source(i))
                            {
                                relay_moved += 1;
                            }
                            back.push((d, slots.source(i)));
                        }
                    }
                    let _ = send_batch(fd, &back);
                    if n < BATCH {
                        break;
                    }
                }
            }
        }
    }
    let seconds = spec.duration.as_secs_f64();
    let cpu_after = spec.server_pid.and_then(server_process::cpu_time);
    let server_cpu = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
        _ => None,
    };
    let relayed = peer_received + client_received;
    let pct = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(LoadReport {
        allocations: k,
        size: spec.size,
        mode: match (spec.send_indications, spec.gso) {
            (true, _) => "send",
            (false, true) => "channel+gso",
            (false, false) => "channel",
        },
        target_pps: spec.rate,
        seconds,
        sent,
        send_failed,
        peer_received,
        client_received,
        misrouted,
        loss_to_peer: 1.0 - peer_received as f64 / sent.max(1) as f64,
        loss_to_client: 1.0 - client_received as f64 / peer_received.max(1) as f64,
        echoed_pps: client_received as f64 / seconds,
        relayed_pps: relayed as f64 / seconds,
        echoed_mbit_s: client_received as f64 * spec.size as f64 * 8.0 / seconds / 1e6,
        rtt_p50_us: pct(0.5),
        rtt_p99_us: pct(0.99),
        rtt_p999_us: pct(0.999),
        server_cpu_s: server_cpu,
        server_cpu_util: server_cpu.map(|c| c / (seconds + drain.as_secs_f64())),
        server_cpu_us_per_packet: server_cpu.map(|c| c * 1e6 / relayed.max(1) as f64),
        generator_cpu_s: generator_cpu() - gen_before,
        refreshes_sent,
        refreshes_ok,
        refreshes_437,
        refreshes_other_error: refreshes_other,
        relay_moved,
        longest_gap_ms: longest_gap as f64 / 1e6,
        longest_flow_gap_ms: longest_flow_gap as f64 / 1e6,
    })
}
