//! A worker's half of a live upgrade (the process's half is
//! `crate::ops::upgrade`).
//!
//! Running process: plain TCP connections and RFC 6062 pipes first park
//! ([`park_streams`]); then, in [`freeze`], the worker exports the
//! allocations of its UDP clients and parked connections with their
//! sockets, and stops its thread until the verdict. Nothing of the worker
//! runs meanwhile, so nothing is read from its sockets: datagrams wait in
//! the kernel's buffers for whichever process serves next. On commit it
//! lets go of what it handed over and goes on serving only what it kept
//! (TLS connections); on anything else it carries on as if nothing
//! happened.
//!
//! New process: [`adopt`] restores the snapshot into the fresh core and
//! takes the relay sockets into the worker's relay poll, before the
//! worker serves anything.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashSet;

use rustc_hash::FxHashMap;

use crate::io::executor::{Listener, Parked, Pipe, RelaySocket, Shared, TcpPeer, Worker, now, run_outputs};
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
    /// RFC 6062: the TCP relays' listening sockets, and the peer
    /// connections (with their data connections once bound). The worker's
    /// own descriptors, open until it carries out the verdict.
    pub tcp_relays: Vec<(RelayId, RawFd)>,
    pub peers: Vec<PeerExport>,
}

/// An RFC 6062 peer connection, and its data connection if bound.
#[derive(Debug, Clone, Copy)]
pub struct PeerExport {
    pub connection: u32,
    pub peer: RawFd,
    pub client: Option<RawFd>,
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
    pub tcp_relays: Vec<(RelayId, OwnedFd)>,
    /// Connection id, peer socket, data connection socket.
    pub peers: Vec<(u32, OwnedFd, Option<OwnedFd>)>,
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
    // RFC 6062 pipes over plain TCP pause both directions between chunks.
    let pipes: Vec<Rc<Pipe>> = shared
        .borrow()
        .pipes
        .values()
        .filter(|p| p.client_fd.is_some())
        .cloned()
        .collect();
    for out in &asked {
        out.1.request_park();
    }
    for p in &pipes {
        p.parking.request();
    }
    let deadline = Instant::now() + PARK_WAIT;
    loop {
        let waiting = {
            let w = shared.borrow();
            asked
                .iter()
                .filter(|(k, o)| o.is_parking() && !w.parked.contains_key(k))
                .count()
                + pipes
                    .iter()
                    .filter(|p| p.parking.is_requested() && p.parking.paused() < 2)
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
    for p in &pipes {
        if p.parking.paused() < 2 {
            p.parking.decide(false);
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
    let candidates = handed(&w.listeners, &w.parked);
    let mut core = w.server.export(clock.instant, unix_ms(), &candidates);
    // An RFC 6062 allocation moves only with every peer connection: each
    // waiting for its data connection, or piped over plain TCP and parked.
    let mut kept: FxHashSet<ClientKey> = FxHashSet::default();
    let (mut tcp_relays, mut peers) = (Vec::new(), Vec::new());
    core.allocations.retain(|a| {
        if !a.tcp {
            return true;
        }
        let key = ClientKey {
            listener: ListenerId(a.listener),
            client: a.client,
        };
        let mut these = Vec::new();
        for (connection, _, waiting) in &a.connections {
            let sockets = match waiting {
                Some(_) => w
                    .tcp_peers
                    .get(connection)
                    .and_then(|p| p.stream.as_ref())
                    .map(|s| (s.as_raw_fd(), None)),
                None => w
                    .pipes
                    .get(connection)
                    .filter(|p| p.parking.paused() >= 2)
                    .and_then(|p| p.client_fd.map(|c| (p.peer_fd, Some(c)))),
            };
            let Some((peer, client)) = sockets else {
                kept.insert(key);
                return false;
            };
            these.push(PeerExport {
                connection: *connection,
                peer,
                client,
            });
        }
        let listener = a.relays.iter().flatten().find_map(|r| {
            w.relays
                .get(&RelayId(r.id))
                .and_then(|s| s.tcp_fd)
                .map(|fd| (RelayId(r.id), fd))
        });
        let Some(listener) = listener else {
            kept.insert(key);
            return false;
        };
        tcp_relays.push(listener);
        peers.extend(these);
        true
    });
    let include = move |key: &ClientKey| candidates(key) && !kept.contains(key);
    let moved: FxHashSet<u32> = peers
        .iter()
        .filter(|p| p.client.is_some())
        .map(|p| p.connection)
        .collect();
    let mut relays = Vec::new();
    let mut failed = None;
    let mut streams = Vec::new();
    for (key, parked) in w.parked.iter().filter(|(k, _)| include(k)) {
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
            tcp_relays,
            peers,
        })),
    };
    let handed_over = sent.is_ok() && verdict.recv_timeout(timeout).unwrap_or(false);
    for (key, out) in w.parked.keys().filter_map(|k| w.streams.get(k).map(|o| (k, o))) {
        out.decide(handed_over && include(key));
    }
    for (connection, pipe) in &w.pipes {
        pipe.parking.decide(handed_over && moved.contains(connection));
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
        if kept.contains(&id) {
            take_relay_socket(w, id, fd)?;
        }
    }
    // RFC 6062: TCP relays accept again, peer connections wait for their
    // data connections or are piped to them again (below).
    for (id, fd) in inherited.tcp_relays {
        if !kept.contains(&id) {
            continue;
        }
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        w.serve_tcp_relay(id, tokio::net::TcpListener::from_std(listener)?, bound)?;
    }
    let mut pipes = Vec::new();
    for (connection, peer, client) in inherited.peers {
        if !w.server.knows_connection(connection) {
            continue;
        }
        let peer = std::net::TcpStream::from(peer);
        peer.set_nonblocking(true)?;
        w.tcp_peers
            .insert(connection, TcpPeer::new(tokio::net::TcpStream::from_std(peer)?));
        if let Some(client) = client {
            pipes.push((connection, client));
        }
    }
    let count = w.server.allocation_count();
    run_outputs(w, clock);
    drop(guard);
    for (connection, client) in pipes {
        crate::io::stream::adopt_pipe(shared, streams, connection, std::net::TcpStream::from(client))?;
    }
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

/// Serves a UDP relay socket that came from elsewhere under relay id `id`.
fn take_relay_socket(w: &mut Worker, id: RelayId, fd: OwnedFd) -> std::io::Result<()> {
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
            tcp_fd: None,
        },
    );
    Ok(())
}

/// RFC 8016 between workers: one asks another for the allocation a
/// mobility ticket names (the client's new 5-tuple reached it).
pub struct LendRequest {
    pub mobility: u64,
    pub reply: tokio::sync::oneshot::Sender<Option<Lent>>,
}

/// An allocation given up by one worker for another, with its sockets.
pub struct Lent {
    pub core: Snapshot,
    pub relays: Vec<(RelayId, OwnedFd)>,
}

pub type LendSender = tokio::sync::mpsc::UnboundedSender<LendRequest>;
pub type LendReceiver = tokio::sync::mpsc::UnboundedReceiver<LendRequest>;

/// Gives other workers the allocations their clients' tickets name.
pub async fn serve_lends(shared: Shared, mut requests: LendReceiver) {
    while let Some(req) = requests.recv().await {
        let lent = {
            let mut guard = shared.borrow_mut();
            let w = &mut *guard;
            let clock = now();
            w.server.lend(req.mobility, clock.instant, unix_ms()).map(|core| {
                // Duplicates first: the outputs close this worker's sockets.
                let relays = core
                    .allocations
                    .iter()
                    .flat_map(|a| a.relays.iter().flatten().map(|r| RelayId(r.id)))
                    .filter_map(|id| {
                        let socket = w.relays.get(&id)?.udp.as_ref()?;
                        Some((id, socket.as_fd().try_clone_to_owned().ok()?))
                    })
                    .collect();
                run_outputs(w, clock);
                Lent { core, relays }
            })
        };
        let _ = req.reply.send(lent);
    }
}

/// A Refresh whose ticket names another worker's allocation: fetches the
/// allocation, then hands the core the same request again.
pub async fn fetch_and_retry(shared: Shared, owner: usize, mobility: u64, key: ClientKey, packet: Vec<u8>) {
    let Some(lender) = shared.borrow().lenders.get(owner).cloned() else {
        return;
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if lender.send(LendRequest { mobility, reply }).is_err() {
        return;
    }
    let Ok(Some(lent)) = answer.await else {
        // Spent or gone meanwhile (a retransmission raced the first).
        crate::io::executor::count_drop(crate::proto::server::DropReason::NoAllocation);
        return;
    };
    {
        let mut guard = shared.borrow_mut();
        let w = &mut *guard;
        let clock = now();
        let pairs = w.server.adopt(lent.core, clock.instant, unix_ms());
        let mut sockets: FxHashMap<RelayId, OwnedFd> = lent.relays.into_iter().collect();
        for (theirs, ours) in pairs {
            if let Some(fd) = sockets.remove(&theirs)
                && let Err(e) = take_relay_socket(w, ours, fd)
            {
                tracing::warn!("a moved allocation's relay socket: {e}");
            }
        }
        run_outputs(w, clock);
    }
    crate::io::executor::handle_client(&shared, now(), key, &packet, None);
}
