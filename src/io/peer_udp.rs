//! The UDP relay driver: waits on the worker's relay poll, reads each
//! ready relay socket with recvmmsg into the shared peer batch (slots
//! filled across sockets), hands the datagrams to the core and sends what
//! it framed in place, batch by batch; reads ICMP errors and tells the core.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use tokio::io::unix::AsyncFd;

use crate::io::executor::{Listener, Shared, Worker, count_drop, now, run_outputs, send_or_count};
use crate::io::relay;
use crate::io::relay_poll::RelayEvent;
use crate::io::send_queue::Source;
use crate::proto::server::{DropReason, Input, PEER_HEADROOM, PeerOutcome, RelayId};

/// Serves every UDP relay socket of the worker: waits for the relay poll,
/// reads each ready socket with recvmmsg into the shared peer batch (slots
/// filled across sockets), hands the datagrams to the core and sends what
/// it framed in place, batch by batch.
pub async fn relay_events(shared: Shared, watch: AsyncFd<std::os::fd::OwnedFd>) {
    let mut space = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut work: Vec<RelayEvent> = Vec::with_capacity(256);
    // Sockets left with data when their budget ran out (edge-triggered:
    // epoll will not report them again until more arrives).
    let mut carry: Vec<RelayId> = Vec::new();
    let mut errors: Vec<RelayId> = Vec::new();
    loop {
        let Ok(mut ready) = watch.readable().await else {
            return;
        };
        let (mut rounds, mut handled, mut busy) = (0, 0, false);
        loop {
            work.clear();
            work.extend(carry.drain(..).map(|relay| RelayEvent {
                relay,
                readable: true,
                error: false,
            }));
            let reported = shared.borrow().relay_poll.poll(&mut space, &mut work).unwrap_or(0);
            if work.is_empty() {
                ready.clear_ready();
                break;
            }
            let relayed = relay_round(&shared, &work, &mut carry, &mut errors);
            for id in errors.drain(..) {
                relay_errors(&shared, id);
            }
            rounds += 1;
            handled += relayed;
            if reported < space.len() && carry.is_empty() {
                // Every reported socket was read dry; anything newer raises
                // a new edge on the poll, so no further epoll_wait is needed.
                ready.clear_ready();
                break;
            }
            if rounds == 8 || handled >= WAKE_BUDGET {
                busy = true;
                break;
            }
        }
        if busy {
            // Busy: let the listeners and timers run; readiness was kept.
            tokio::task::yield_now().await;
        }
    }
}

/// Datagrams read from one relay socket per round before it waits its turn.
const RELAY_BUDGET: usize = 4 * relay::RECV_BATCH;

/// Peer datagrams handled per wake-up before the listeners and timers get a turn.
const WAKE_BUDGET: usize = 1024;

/// Reads the ready relay sockets of one poll round and relays what they
/// hold; returns how many datagrams that was.
fn relay_round(shared: &Shared, work: &[RelayEvent], carry: &mut Vec<RelayId>, errors: &mut Vec<RelayId>) -> usize {
    let mut guard = shared.borrow_mut();
    let w = &mut *guard;
    let now = Instant::now();
    let (mut used, mut total) = (0, 0);
    for ev in work {
        if ev.error {
            errors.push(ev.relay);
        }
        if !ev.readable {
            continue;
        }
        let Some(socket) = w.relays.get(&ev.relay).and_then(|r| r.udp.clone()) else {
            continue;
        };
        let mut taken = 0;
        loop {
            if used == relay::RECV_BATCH {
                let done = w.peer_queue.flush(w.peer_batch.storage());
                w.sent.add(done);
                used = 0;
            }
            let want = relay::RECV_BATCH - used;
            let n = match w.peer_batch.recv(socket.as_raw_fd(), used) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // With IP_RECVERR a queued ICMP error fails the receive;
                    // drain the error queue, then read again.
                    errors.push(ev.relay);
                    carry.push(ev.relay);
                    break;
                }
            };
            crate::io::coalesce::handled(n);
            total += n;
            for i in used..used + n {
                relay_one(w, ev.relay, i, now);
            }
            used += n;
            taken += n;
            if n < want {
                break;
            }
            if taken >= RELAY_BUDGET {
                carry.push(ev.relay);
                break;
            }
        }
    }
    if used > 0 {
        let done = w.peer_queue.flush(w.peer_batch.storage());
        w.sent.add(done);
    }
    total
}

/// One peer datagram (slot `i` of the peer batch) through the core; what
/// goes to a UDP client is queued, to a stream client pushed at once.
fn relay_one(w: &mut Worker, relay: RelayId, i: usize, now: Instant) {
    let len = w.peer_batch.len(i);
    let Some((peer, slot, at)) = w.peer_batch.slot_mut(i) else {
        return;
    };
    match w.server.handle_peer_packet(now, relay, peer, slot, PEER_HEADROOM, len) {
        PeerOutcome::ToClient { key, start, end } => match w.listeners.get(usize::from(key.listener.0)) {
            Some(Listener::Udp(l)) => w
                .peer_queue
                .push(Source::Listener(l.fd()), key.client, at + start, end - start),
            Some(Listener::Stream) => {
                let bytes = slot.get(start..end).unwrap_or_default();
                send_or_count(w.streams.get(&key).is_some_and(|o| o.push(bytes)));
            }
            Some(Listener::Removed) | None => send_or_count(false),
        },
        // Counted by the core (turnstile_bandwidth_dropped_*_total).
        PeerOutcome::Drop(DropReason::BandwidthLimit) => {}
        PeerOutcome::Drop(reason) => count_drop(reason),
    }
}

/// Reads a relay socket's error queue and tells each affected client.
fn relay_errors(shared: &Shared, id: RelayId) {
    let mut guard = shared.borrow_mut();
    let w = &mut *guard;
    let Some(fd) = w.relays.get(&id).and_then(|r| r.udp.as_ref()).map(|s| s.as_raw_fd()) else {
        return;
    };
    // Edge-triggered: drain the whole queue so the next error raises a new edge.
    for _ in 0..1024 {
        let Ok(Some(e)) = relay::recv_icmp_error(fd) else {
            break;
        };
        let now = now();
        w.server.handle(
            now,
            Input::RelayIcmp {
                relay: id,
                peer: e.peer,
                icmp_type: e.icmp_type,
                icmp_code: e.icmp_code,
                info: e.info,
            },
        );
        run_outputs(w, now);
    }
}
