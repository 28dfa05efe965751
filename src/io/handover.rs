//! A worker's half of a live upgrade (the process's half is
//! `crate::ops::upgrade`).
//!
//! Running process: on [`freeze`], the worker exports its core's UDP
//! clients' allocations with duplicates of their relay sockets, then stops
//! its thread until the verdict. Nothing of the worker runs meanwhile, so
//! nothing is read from its sockets: datagrams wait in the kernel's
//! buffers for whichever process serves next. On commit it lets go of what
//! it handed over and goes on serving its TCP and TLS clients only; on
//! anything else it carries on as if nothing happened.
//!
//! New process: [`adopt`] restores the snapshot into the fresh core and
//! takes the relay sockets into the worker's relay poll, before the
//! worker serves anything.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashSet;

use rustc_hash::FxHashMap;

use crate::io::executor::{Listener, Parked, RelaySocket, Shared, Worker, now, run_outputs};
use crate::io::stream::Streams;
use crate::io::stream_queue::StreamOut;
use crate::proto::server::snapshot::Snapshot;
use crate::proto::server::{ClientKey, ListenerId, RelayId};

/// What one worker hands over.
pub struct WorkerExport {
    /// The worker's index: its successor has the same one.
    pub worker: usize,
    pub core: Snapshot,
    /// The UDP relay sockets the snapshot's allocations hold: the worker's
    /// own descriptors, open until it carries out the verdict.
    pub relays: Vec<(RelayId, RawFd)>,
    pub streams: Vec<StreamExport>,
}

/// A plain TCP client connection, parked between messages.
pub struct StreamExport {
    /// The client's 5-tuple, by the exporting worker's listener id.
    pub key: ClientKey,
    pub socket: OwnedFd,
    /// Read from the client and not handled yet (a partial message).
    pub inbound: Vec<u8>,
    /// Queued for the client and not written yet.
    pub outbound: Vec<u8>,
}

/// What a worker of the new process takes over.
pub struct Inherited {
    pub core: Snapshot,
    pub relays: Vec<(RelayId, OwnedFd)>,
    pub streams: Vec<StreamExport>,
    /// The running workers' listener ids mapped to this worker's (`None`:
    /// the new configuration dropped that listener).
    pub listeners: Vec<Option<ListenerId>>,
    /// End allocations whose credential the new configuration no longer
    /// verifies (`[auth] revoke_on_reload`).
    pub revoke: bool,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `key`'s client goes to the new process: served over UDP, or
/// over a plain TCP connection parked for the hand-over. TLS connections,
/// and TCP ones that could not park, stay with this process.
fn handed(listeners: &[Listener], parked: &FxHashMap<ClientKey, Parked>) -> impl Fn(&ClientKey) -> bool + use<> {
    let udp: Vec<bool> = listeners.iter().map(|l| matches!(l, Listener::Udp(_))).collect();
    let parked: FxHashSet<ClientKey> = parked.keys().copied().collect();
    move |key| udp.get(usize::from(key.listener.0)).copied().unwrap_or(false) || parked.contains(key)
}

/// Asks every plain TCP connection that can move to park between
/// messages, and waits (briefly) until they did; those that did not stay.
pub async fn park_streams(shared: &Shared) {
    let asked: Vec<(ClientKey, Rc<StreamOut>)> = {
        let w = shared.borrow();
        w.streams
            .iter()
            .filter(|(k, o)| o.handover_fd().is_some() && w.server.can_hand_over(k))
            .map(|(k, o)| (*k, o.clone()))
            .collect()
    };
    for (_, out) in &asked {
        out.request_park();
    }
    let deadline = Instant::now() + PARK_WAIT;
    loop {
        let waiting = {
            let w = shared.borrow();
            asked
                .iter()
                .filter(|(k, o)| o.is_parking() && !w.parked.contains_key(k))
                .count()
        };
        if waiting == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let w = shared.borrow();
    for (k, out) in &asked {
        if !w.parked.contains_key(k) {
            out.decide(false);
        }
    }
}

/// How long connections get to park.
const PARK_WAIT: Duration = Duration::from_millis(200);

/// Exports, sends the export, and holds the thread until the verdict
/// (`true`: the new process took over). Returns whether it was handed over.
pub fn freeze(
    w: &mut Worker,
    export: &std::sync::mpsc::Sender<std::io::Result<WorkerExport>>,
    verdict: &std::sync::mpsc::Receiver<bool>,
    timeout: Duration,
) -> bool {
    let clock = now();
    let include = handed(&w.listeners, &w.parked);
    let core = w.server.export(clock.instant, unix_ms(), &include);
    let mut relays = Vec::new();
    let mut failed = None;
    let mut streams = Vec::new();
    for (key, parked) in &w.parked {
        let Some((fd, outbound)) = w
            .streams
            .get(key)
            .and_then(|o| o.handover_fd().map(|fd| (fd, o.queued_copy())))
        else {
            continue;
        };
        // SAFETY: the parked connection's task owns this descriptor and
        // keeps it open until the verdict, which comes after this returns.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        match borrowed.try_clone_to_owned() {
            Ok(socket) => streams.push(StreamExport {
                key: *key,
                socket,
                inbound: parked.inbound.clone(),
                outbound,
            }),
            Err(e) => failed = Some(e),
        }
    }
    for id in core
        .allocations
        .iter()
        .flat_map(|a| a.relays.iter().flatten().map(|r| RelayId(r.id)))
    {
        if let Some(socket) = w.relays.get(&id).and_then(|r| r.udp.as_ref()) {
            relays.push((id, socket.as_raw_fd()));
        }
    }
    let frozen = Instant::now();
    let sent = match failed {
        Some(e) => export.send(Err(e)),
        None => export.send(Ok(WorkerExport {
            worker: w.index,
            core,
            relays,
            streams,
        })),
    };
    let handed_over = sent.is_ok() && verdict.recv_timeout(timeout).unwrap_or(false);
    for out in w.parked.keys().filter_map(|k| w.streams.get(k)) {
        out.decide(handed_over);
    }
    if !handed_over {
        tracing::info!(
            worker = w.index,
            frozen_ms = frozen.elapsed().as_millis() as u64,
            "upgrade abandoned: serving on"
        );
        return false;
    }
    let released = w.server.release_handed_over(&include);
    run_outputs(w, now());
    // The new process serves every listener now: stop reading and
    // accepting. TCP and TLS connections already open stay here.
    for t in w.listener_tasks.iter_mut().filter_map(Option::take) {
        t.abort();
    }
    for l in &mut w.listeners {
        if matches!(l, Listener::Udp(_)) {
            *l = Listener::Removed;
        }
    }
    tracing::debug!(worker = w.index, allocations = released, "handed over");
    true
}

/// Restores the running process's state into this worker (before it
/// serves). Returns how many allocations it took over.
pub fn adopt(shared: &Shared, streams: &Rc<Streams>, inherited: Inherited) -> std::io::Result<usize> {
    let mut guard = shared.borrow_mut();
    let w = &mut *guard;
    let clock = now();
    let map = inherited.listeners;
    let kept = w
        .server
        .restore(
            inherited.core,
            clock.instant,
            unix_ms(),
            |id| map.get(usize::from(id.0)).copied().flatten(),
            inherited.revoke,
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let kept: FxHashSet<RelayId> = kept.into_iter().collect();
    for (id, fd) in inherited.relays {
        // A relay the new core left out (its listener is gone) closes here.
        if !kept.contains(&id) {
            continue;
        }
        let socket = std::net::UdpSocket::from(fd);
        socket.set_nonblocking(true)?;
        let bound = socket.local_addr()?;
        w.relay_poll.add(socket.as_raw_fd(), id)?;
        w.relays.insert(
            id,
            RelaySocket {
                udp: Some(Rc::new(socket)),
                bound,
                close: None,
            },
        );
    }
    let count = w.server.allocation_count();
    run_outputs(w, clock);
    drop(guard);
    for s in inherited.streams {
        let Some(listener) = map.get(usize::from(s.key.listener.0)).copied().flatten() else {
            continue;
        };
        let key = ClientKey {
            listener,
            client: s.key.client,
        };
        let socket = std::net::TcpStream::from(s.socket);
        if let Err(e) = crate::io::stream::adopt_connection(shared, streams, key, socket, &s.inbound, s.outbound) {
            tracing::warn!(client = %key.client, "connection not taken over: {e}");
        }
    }
    Ok(count)
}
