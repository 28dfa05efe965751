//! The minimal forwarder: the least work any UDP relay can do per packet
//! on this machine, as a baseline for the load generator. recvmmsg in,
//! sendmmsg out, a 4-byte ChannelData header added or stripped, and a
//! success answer to every control request — no authentication, no
//! permissions, no lifetimes. Never expose it: it relays for anyone.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use rustc_hash::FxHashMap;
use turnstile::proto::stun::{Class, Message, MessageWriter, Method};

use crate::syscalls::{BATCH, Epoll, RecvSlots, send_batch};

struct Allocation {
    client: SocketAddr,
    relay: UdpSocket,
    relayed: SocketAddr,
    channels: Vec<(u16, SocketAddr)>,
}

pub fn run(listen: SocketAddr, relay_ip: std::net::IpAddr) -> std::io::Result<()> {
    let listener = UdpSocket::bind(listen)?;
    listener.set_nonblocking(true)?;
    let lfd = listener.as_raw_fd();
    eprintln!("forwarder listening udp {}", listener.local_addr()?);
    let mut epoll = Epoll::new()?;
    epoll.add(lfd, 0)?;
    let mut allocations: Vec<Option<Allocation>> = Vec::new();
    let mut by_client: FxHashMap<SocketAddr, usize> = FxHashMap::default();
    let mut from_clients = RecvSlots::new(2048, 0);
    let mut from_peers = RecvSlots::new(2048, 4);
    let mut answer = [0u8; 512];
    let mut ready = Vec::with_capacity(256);
    loop {
        ready.clear();
        epoll.wait(-1, |t| ready.push(t as usize))?;
        for &token in &ready {
            if token == 0 {
                loop {
                    let n = from_clients.recv(lfd)?;
                    // (allocation, peer, slot, payload end) for this batch, sent grouped by relay socket.
                    let mut out: Vec<(usize, SocketAddr, usize, usize)> = Vec::with_capacity(n);
                    for i in 0..n {
                        let Some(client) = from_clients.source(i) else { continue };
                        let d = from_clients.datagram(i);
                        if d.len() >= 4 && (0x40..0x80).contains(&d[0]) {
                            let channel = u16::from_be_bytes([d[0], d[1]]);
                            let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
                            let Some(&a) = by_client.get(&client) else { continue };
                            let Some(alloc) = allocations[a].as_ref() else { continue };
                            if let Some(&(_, peer)) = alloc.channels.iter().find(|c| c.0 == channel)
                                && 4 + len <= d.len()
                            {
                                out.push((a, peer, i, 4 + len));
                            }
                            continue;
                        }
                        if let Some(len) = control(
                            d,
                            client,
                            relay_ip,
                            &mut allocations,
                            &mut by_client,
                            &epoll,
                            &mut answer,
                        ) {
                            let _ = listener.send_to(&answer[..len], client);
                        }
                    }
                    let mut at = 0;
                    while at < out.len() {
                        let a = out[at].0;
                        let group: Vec<(&[u8], Option<SocketAddr>)> = out[at..]
                            .iter()
                            .take_while(|o| o.0 == a)
                            .map(|&(_, peer, i, end)| (&from_clients.datagram(i)[4..end], Some(peer)))
                            .collect();
                        at += group.len();
                        if let Some(alloc) = allocations[a].as_ref() {
                            let _ = send_batch(alloc.relay.as_raw_fd(), &group);
                        }
                    }
                    if n < BATCH {
                        break;
                    }
                }
            } else {
                let a = token - 1;
                let Some(alloc) = allocations.get(a).and_then(Option::as_ref) else {
                    continue;
                };
                let fd = alloc.relay.as_raw_fd();
                loop {
                    let n = from_peers.recv(fd)?;
                    let mut keep = [false; BATCH];
                    for (i, k) in keep.iter_mut().enumerate().take(n) {
                        let Some(peer) = from_peers.source(i) else { continue };
                        let Some(&(channel, _)) = alloc.channels.iter().find(|c| c.1 == peer) else {
                            continue;
                        };
                        let slot = from_peers.with_headroom_mut(i);
                        let len = (slot.len() - 4) as u16;
                        slot[..2].copy_from_slice(&channel.to_be_bytes());
                        slot[2..4].copy_from_slice(&len.to_be_bytes());
                        *k = true;
                    }
                    let batch: Vec<(&[u8], Option<SocketAddr>)> = (0..n)
                        .filter(|&i| keep[i])
                        .map(|i| (from_peers.with_headroom(i), Some(alloc.client)))
                        .collect();
                    let _ = send_batch(lfd, &batch);
                    if n < BATCH {
                        break;
                    }
                }
            }
        }
    }
}

/// Answers a control request with success; returns the answer's length.
fn control(
    d: &[u8],
    client: SocketAddr,
    relay_ip: std::net::IpAddr,
    allocations: &mut Vec<Option<Allocation>>,
    by_client: &mut FxHashMap<SocketAddr, usize>,
    epoll: &Epoll,
    answer: &mut [u8],
) -> Option<usize> {
    let m = Message::parse(d).ok()?;
    let method = m.method();
    if m.class() == Class::Indication && method == Method::SEND {
        let a = by_client.get(&client)?;
        let alloc = allocations.get(*a)?.as_ref()?;
        let peer = m.xor_peer_addresses().next()?.ok()?;
        let _ = alloc.relay.send_to(m.data().ok()??, peer);
        return None;
    }
    if m.class() != Class::Request {
        return None;
    }
    let mut w = MessageWriter::new(answer, Class::Success, method, *m.transaction_id()).ok()?;
    match method {
        Method::BINDING => w.xor_mapped_address(&client).ok()?,
        Method::ALLOCATE => {
            let a = match by_client.get(&client) {
                Some(&a) => a,
                None => {
                    let relay = UdpSocket::bind(SocketAddr::new(relay_ip, 0)).ok()?;
                    relay.set_nonblocking(true).ok()?;
                    let relayed = relay.local_addr().ok()?;
                    let a = allocations
                        .iter()
                        .position(Option::is_none)
                        .unwrap_or(allocations.len());
                    epoll.add(relay.as_raw_fd(), a as u64 + 1).ok()?;
                    let alloc = Allocation {
                        client,
                        relay,
                        relayed,
                        channels: Vec::new(),
                    };
                    if a == allocations.len() {
                        allocations.push(Some(alloc));
                    } else {
                        allocations[a] = Some(alloc);
                    }
                    by_client.insert(client, a);
                    a
                }
            };
            let relayed = allocations[a].as_ref()?.relayed;
            w.xor_relayed_address(&relayed).ok()?;
            w.xor_mapped_address(&client).ok()?;
            w.lifetime(600).ok()?;
        }
        Method::REFRESH => {
            if m.lifetime().ok().flatten() == Some(0)
                && let Some(a) = by_client.remove(&client)
                && let Some(alloc) = allocations[a].take()
            {
                epoll.remove(alloc.relay.as_raw_fd());
            }
            w.lifetime(m.lifetime().ok().flatten().unwrap_or(600)).ok()?;
        }
        Method::CHANNEL_BIND => {
            let channel = m.channel_number().ok()??;
            let peer = m.xor_peer_addresses().next()?.ok()?;
            let a = *by_client.get(&client)?;
            let alloc = allocations[a].as_mut()?;
            alloc.channels.retain(|c| c.0 != channel && c.1 != peer);
            alloc.channels.push((channel, peer));
        }
        _ => {}
    }
    Some(w.finish())
}
