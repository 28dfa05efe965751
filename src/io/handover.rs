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

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashSet;

use crate::io::executor::{Listener, RelaySocket, Worker, now, run_outputs};
use crate::proto::server::snapshot::Snapshot;
use crate::proto::server::{ClientKey, ListenerId, RelayId};

/// What one worker hands over.
pub struct WorkerExport {
    /// The worker's index: its successor has the same one.
    pub worker: usize,
    pub core: Snapshot,
    /// Duplicates of the UDP relay sockets the snapshot's allocations hold.
    pub relays: Vec<(RelayId, OwnedFd)>,
}

/// What a worker of the new process takes over.
pub struct Inherited {
    pub core: Snapshot,
    pub relays: Vec<(RelayId, OwnedFd)>,
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

/// Whether `key`'s client is served over UDP (handed over) rather than a
/// TCP or TLS connection (which stays with this process).
fn on_udp(listeners: &[Listener]) -> impl Fn(&ClientKey) -> bool + '_ {
    |key| matches!(listeners.get(usize::from(key.listener.0)), Some(Listener::Udp(_)))
}

/// Exports, sends the export, and holds the thread until the verdict
/// (`true`: the new process took over). Returns whether it was handed over.
pub fn freeze(
    w: &mut Worker,
    export: &std::sync::mpsc::Sender<std::io::Result<WorkerExport>>,
    verdict: &std::sync::mpsc::Receiver<bool>,
    timeout: Duration,
) -> bool {
    let clock = now();
    let core = w.server.export(clock.instant, unix_ms(), on_udp(&w.listeners));
    let mut relays = Vec::new();
    let mut failed = None;
    for id in core
        .allocations
        .iter()
        .flat_map(|a| a.relays.iter().flatten().map(|r| RelayId(r.id)))
    {
        let Some(socket) = w.relays.get(&id).and_then(|r| r.udp.as_ref()) else {
            continue;
        };
        match socket.as_fd().try_clone_to_owned() {
            Ok(fd) => relays.push((id, fd)),
            Err(e) => failed = Some(e),
        }
    }
    let frozen = Instant::now();
    let sent = match failed {
        Some(e) => export.send(Err(e)),
        None => export.send(Ok(WorkerExport {
            worker: w.index,
            core,
            relays,
        })),
    };
    if sent.is_err() {
        return false;
    }
    let handed_over = verdict.recv_timeout(timeout).unwrap_or(false);
    if !handed_over {
        tracing::info!(
            worker = w.index,
            frozen_ms = frozen.elapsed().as_millis() as u64,
            "upgrade abandoned: serving on"
        );
        return false;
    }
    let released = w.server.release_handed_over(on_udp(&w.listeners));
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
pub fn adopt(w: &mut Worker, inherited: Inherited) -> std::io::Result<usize> {
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
    Ok(count)
}
