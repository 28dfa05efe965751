//! The one place the core's outputs are carried out, and the worker state
//! every driver shares: the core, its listeners, relay sockets, peer
//! connections and client connection queues.
//!
//! Drivers (`listen_udp`, `stream`, `peer_udp`, `peer_tcp`) depend on this
//! module and not on each other: each feeds the core (`handle_client`,
//! `feed`) and the outputs run here. Work that must wait (an RFC 6062
//! connection to a peer, accepting on a TCP relay) goes to the `peer_tcp`
//! driver as a [`TcpRelayTask`].

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use rustc_hash::FxHashMap;

use crate::io::relay::{self, PeerBatch};
use crate::io::relay_poll::RelayPoll;
use crate::io::send_queue::{Flushed, SendQueue, Source};
use crate::io::stats_export::StatsExporter;
use crate::io::stream_queue::StreamOut;
use crate::io::udp::UdpListener;
use crate::io::xdp::Mirror;
use crate::proto::server::allocation::Traffic;
use crate::proto::server::{BindResult, ClientKey, ClientOutcome, DropReason, Input, Now, Output, RelayId, Server};

/// The clocks as the core wants them.
pub fn now() -> Now {
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Now {
        instant: Instant::now(),
        unix,
    }
}

pub(crate) struct RelaySocket {
    /// The UDP relay socket, served by the worker's relay poll; `None` for
    /// an RFC 6062 TCP relay (a listener owned by its accept task).
    pub(crate) udp: Option<Rc<std::net::UdpSocket>>,
    /// Where the relay is bound (TCP connections to peers start from here).
    pub(crate) bound: SocketAddr,
    /// Stops the accept task of a TCP relay.
    pub(crate) close: Option<Rc<tokio::sync::Notify>>,
    /// A TCP relay's listening socket, owned by its accept task (a live
    /// upgrade hands it over).
    pub(crate) tcp_fd: Option<std::os::fd::RawFd>,
}

/// An RFC 6062 peer connection: its stream until a data connection takes
/// it, and a signal that closes the pair.
pub(crate) struct TcpPeer {
    pub(crate) stream: Option<tokio::net::TcpStream>,
    pub(crate) close: Rc<tokio::sync::Notify>,
}

impl TcpPeer {
    pub(crate) fn new(stream: tokio::net::TcpStream) -> TcpPeer {
        TcpPeer {
            stream: Some(stream),
            close: Rc::new(tokio::sync::Notify::new()),
        }
    }
}

/// Work for the `peer_tcp` driver (RFC 6062), which waits where the
/// executor cannot.
pub enum TcpRelayTask {
    /// Accept peers on a bound TCP relay until `close` is notified.
    Accept {
        relay: RelayId,
        listener: tokio::net::TcpListener,
        close: Rc<tokio::sync::Notify>,
    },
    /// Connect from the relayed address to a peer (RFC 6062 Connect).
    Connect {
        connection: u32,
        from: SocketAddr,
        peer: SocketAddr,
    },
}

/// An allocation's status for the fleet store's statistics (coturn's
/// `turn/realm/<realm>/user/<user>/allocation/<id>/status`).
#[derive(Debug, Clone)]
pub struct AllocationStatus {
    pub user: String,
    /// Its realm's name.
    pub realm: String,
    /// Unique on this node: the worker in the top byte, a counter below.
    pub id: u64,
    pub change: StatusChange,
}

#[derive(Debug, Clone)]
pub enum StatusChange {
    New { lifetime: u64 },
    Refreshed { lifetime: u64 },
    Deleted { traffic: Traffic },
}

/// Where a worker sends allocation statuses (bounded: a store that is away
/// loses statuses, never memory).
pub type StatusSender = tokio::sync::mpsc::Sender<AllocationStatus>;

/// What became of a client frame, for the stream driver.
pub enum Handled {
    Done,
    /// ConnectionBind succeeded: the connection now pipes to this peer connection.
    Bound(u32),
}

/// A plain TCP connection parked by a live upgrade: what its reader held
/// and had not handled (a partial message).
pub(crate) struct Parked {
    pub(crate) inbound: Vec<u8>,
}

/// An RFC 6062 pipe as a live upgrade sees it: its two sockets (the data
/// connection's only if it is plain TCP) and its parking.
pub(crate) struct Pipe {
    pub(crate) client_fd: Option<std::os::fd::RawFd>,
    pub(crate) peer_fd: std::os::fd::RawFd,
    pub(crate) parking: crate::io::stream_queue::Parking,
}

/// Where answers for a listener's clients go.
pub(crate) enum Listener {
    Udp(Rc<UdpListener>),
    /// Per connection, in `Worker::streams`.
    Stream,
    /// Taken out by a configuration reload; its id is not reused.
    Removed,
}

/// A worker's state, shared by its tasks (one thread: `Rc<RefCell<_>>`,
/// never held across an await).
pub struct Worker {
    pub(crate) index: usize,
    pub(crate) server: Server,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) tcp_peers: FxHashMap<u32, TcpPeer>,
    /// A peer connection just accepted on a TCP relay, while the core
    /// decides whether to keep it (`Input::TcpPeerAccepted`).
    pub(crate) accepting: Option<tokio::net::TcpStream>,
    pub(crate) streams: FxHashMap<ClientKey, Rc<StreamOut>>,
    /// Plain TCP connections parked by a live upgrade.
    pub(crate) parked: FxHashMap<ClientKey, Parked>,
    /// RFC 6062 data connections piped to their peer connections.
    pub(crate) pipes: FxHashMap<u32, Rc<Pipe>>,
    /// Every worker's queue of RFC 8016 lend requests (index = worker).
    pub(crate) lenders: Vec<crate::io::handover::LendSender>,
    /// The task serving each listener, by listener id (to stop it on removal).
    pub(crate) listener_tasks: Vec<Option<tokio::task::AbortHandle>>,
    pub(crate) relays: FxHashMap<RelayId, RelaySocket>,
    /// Every UDP relay socket of this worker, in one epoll set.
    pub(crate) relay_poll: RelayPoll,
    /// Responses are written here.
    out: Vec<u8>,
    /// Peer datagrams are received here (recvmmsg), each after PEER_HEADROOM bytes.
    pub(crate) peer_batch: PeerBatch,
    /// What the core framed in `peer_batch` for UDP clients, sent per batch.
    pub(crate) peer_queue: SendQueue,
    /// Batched-send counters since the last export.
    pub(crate) sent: Flushed,
    pub(crate) exporter: StatsExporter,
    tcp_relay: tokio::sync::mpsc::UnboundedSender<TcpRelayTask>,
    /// The kernel fast path's view of this worker's core, when it runs.
    pub(crate) offload: Option<Mirror>,
    /// Traffic the fast path relayed, on its way into the core's totals.
    pub(crate) offloaded: Vec<(ClientKey, Traffic)>,
    /// The bindings gauge as this worker last added to it.
    pub(crate) offload_exported: f64,
    /// With a fleet store: allocation statuses for it, and each
    /// allocation's id, user and realm.
    pub(crate) statuses: Option<StatusSender>,
    status_ids: FxHashMap<ClientKey, (u64, String, String)>,
    next_status_id: u64,
}

pub type Shared = Rc<RefCell<Worker>>;

impl Worker {
    pub fn new(
        index: usize,
        server: Server,
        relay_poll: RelayPoll,
        peer_batch: PeerBatch,
        tcp_relay: tokio::sync::mpsc::UnboundedSender<TcpRelayTask>,
    ) -> Worker {
        Worker {
            index,
            server,
            listeners: Vec::new(),
            tcp_peers: FxHashMap::default(),
            accepting: None,
            streams: FxHashMap::default(),
            parked: FxHashMap::default(),
            pipes: FxHashMap::default(),
            lenders: Vec::new(),
            listener_tasks: Vec::new(),
            relays: FxHashMap::default(),
            relay_poll,
            out: vec![0u8; 2048],
            peer_batch,
            peer_queue: SendQueue::new(true),
            sent: Flushed::default(),
            exporter: StatsExporter::new(index),
            tcp_relay,
            offload: None,
            offloaded: Vec::new(),
            offload_exported: 0.0,
            statuses: None,
            status_ids: FxHashMap::default(),
            next_status_id: 0,
        }
    }

    /// Hands what the fast path relayed to the core (its totals, logs and
    /// metrics count it) and to the fast path's own metrics.
    pub(crate) fn fold_offloaded(&mut self, now: Now) {
        for (key, traffic) in self.offloaded.drain(..) {
            metrics::counter!("turnstile_xdp_relayed_packets_total", "direction" => "client_to_peer")
                .increment(traffic.to_peer_packets);
            metrics::counter!("turnstile_xdp_relayed_packets_total", "direction" => "peer_to_client")
                .increment(traffic.to_client_packets);
            metrics::counter!("turnstile_xdp_relayed_bytes_total", "direction" => "client_to_peer")
                .increment(traffic.to_peer_bytes);
            metrics::counter!("turnstile_xdp_relayed_bytes_total", "direction" => "peer_to_client")
                .increment(traffic.to_client_bytes);
            self.server.handle(now, Input::OffloadedTraffic { key, traffic });
        }
    }

    /// Sends bytes to a client on the listener (UDP) or connection (TCP/TLS)
    /// of its 5-tuple. Never waits; false when the bytes were dropped.
    pub(crate) fn deliver(&self, key: &ClientKey, bytes: &[u8]) -> bool {
        match self.listeners.get(usize::from(key.listener.0)) {
            Some(Listener::Udp(l)) => l.send(key.client, bytes),
            Some(Listener::Stream) => self.streams.get(key).is_some_and(|o| o.push(bytes)),
            Some(Listener::Removed) | None => false,
        }
    }
}

/// One datagram or stream frame from a client, through the core and out.
/// With `batch` (the UDP listener's send queue and where `packet` lies in
/// the buffer it flushes), relayed data is queued instead of sent.
pub fn handle_client(
    shared: &Shared,
    now: Now,
    key: ClientKey,
    packet: &[u8],
    mut batch: Option<(&mut SendQueue, usize)>,
) -> Handled {
    let mut guard = shared.borrow_mut();
    let w = &mut *guard;
    let handled = match w.server.handle_client_packet(now, key, packet, &mut w.out) {
        ClientOutcome::Reply { len } => {
            send_or_count(w.deliver(&key, w.out.get(..len).unwrap_or_default()));
            Handled::Done
        }
        ClientOutcome::Forward {
            relay,
            peer,
            start,
            end,
        } => {
            if let Some(socket) = w.relays.get(&relay).and_then(|r| r.udp.as_ref()) {
                match batch.as_mut() {
                    Some((queue, at)) => queue.push(Source::Relay(socket.clone()), peer, *at + start, end - start),
                    None => {
                        let data = packet.get(start..end).unwrap_or_default();
                        send_or_count(relay::send_to(socket, data, peer));
                    }
                }
            }
            Handled::Done
        }
        ClientOutcome::ConnectionBound { connection, len } => {
            send_or_count(w.deliver(&key, w.out.get(..len).unwrap_or_default()));
            Handled::Bound(connection)
        }
        ClientOutcome::Consumed => Handled::Done,
        // Flood drops are counted by the core and exported once a second
        // (turnstile_unauthenticated_responses_suppressed_total): no
        // shared counter is touched per flood packet.
        // So are bandwidth drops (turnstile_bandwidth_dropped_*_total): one
        // metric each, never two.
        ClientOutcome::Drop(DropReason::RateLimited | DropReason::BandwidthLimit) => Handled::Done,
        ClientOutcome::Drop(reason) => {
            count_drop(reason);
            Handled::Done
        }
        // RFC 8016: the allocation is another worker's; fetch it, then retry.
        ClientOutcome::AllocationElsewhere { worker, mobility } => {
            tokio::task::spawn_local(crate::io::handover::fetch_and_retry(
                shared.clone(),
                worker,
                mobility,
                key,
                packet.to_vec(),
            ));
            Handled::Done
        }
    };
    run_outputs(w, now);
    handled
}

/// Tells the core what happened and carries out what follows.
pub fn feed(shared: &Shared, input: Input) {
    let mut guard = shared.borrow_mut();
    let w = &mut *guard;
    let now = now();
    w.server.handle(now, input);
    run_outputs(w, now);
}

pub(crate) fn send_or_count(sent: bool) {
    if !sent {
        metrics::counter!("turnstile_send_dropped_total").increment(1);
    }
}

pub(crate) fn count_drop(reason: DropReason) {
    metrics::counter!("turnstile_dropped_packets_total", "reason" => reason.label()).increment(1);
}

/// Carries out everything the core asked for since the last call. Binding
/// a relay socket answers the core at once, which may ask for more
/// (another port); state-change events are for drivers that mirror the
/// core and are not needed here.
pub fn run_outputs(w: &mut Worker, now: Now) {
    while let Some(output) = w.server.poll_output() {
        if let Some(mirror) = w.offload.as_mut() {
            mirror.observe(&output, &mut w.offloaded);
        }
        if w.statuses.is_some() {
            report_status(w, &output, now);
        }
        match output {
            Output::Transmit { key, bytes } => send_or_count(w.deliver(&key, &bytes)),
            Output::BindRelay {
                relay,
                addr,
                dont_fragment,
                tcp,
            } => {
                let started = Instant::now();
                let result = if tcp {
                    open_tcp_relay(w, relay, addr)
                } else {
                    open_relay(w, relay, addr, dont_fragment)
                };
                w.server.handle(now, Input::RelayBound { relay, result });
                metrics::histogram!("turnstile_allocation_setup_seconds").record(started.elapsed().as_secs_f64());
            }
            Output::CloseRelay(id) => {
                if let Some(r) = w.relays.remove(&id) {
                    if let Some(socket) = &r.udp {
                        w.relay_poll.remove(socket.as_raw_fd());
                    }
                    if let Some(close) = r.close {
                        close.notify_one();
                    }
                }
            }
            Output::TcpConnect {
                relay,
                peer,
                connection,
            } => {
                if let Some(from) = w.relays.get(&relay).map(|r| r.bound) {
                    let _ = w.tcp_relay.send(TcpRelayTask::Connect { connection, from, peer });
                }
            }
            Output::PeerConnectionAccepted { connection, .. } => {
                if let Some(stream) = w.accepting.take() {
                    let _ = stream.set_nodelay(true);
                    w.tcp_peers.insert(connection, TcpPeer::new(stream));
                }
            }
            Output::PeerConnectionRefused { reason, .. } => {
                w.accepting = None;
                let reason = match reason {
                    DropReason::NoPermission => "tcp_peer_no_permission",
                    other => other.label(),
                };
                metrics::counter!("turnstile_dropped_packets_total", "reason" => reason).increment(1);
            }
            Output::CloseConnection(id) => {
                if let Some(p) = w.tcp_peers.remove(&id) {
                    p.close.notify_one();
                }
            }
            Output::CloseClient { key, reason } => {
                if let Some(out) = w.streams.get(&key) {
                    metrics::counter!("turnstile_connections_closed_total", "reason" => reason.label()).increment(1);
                    out.end(reason);
                }
            }
            Output::AllocationCreated { .. }
            | Output::AllocationRefreshed { .. }
            | Output::AllocationEnded { .. }
            | Output::PermissionInstalled { .. }
            | Output::PermissionExpired { .. }
            | Output::ChannelBound { .. }
            | Output::ChannelExpired { .. } => {}
        }
    }
    if !w.offloaded.is_empty() {
        w.fold_offloaded(now);
    }
}

/// Turns an allocation's lifecycle output into a status for the store.
fn report_status(w: &mut Worker, output: &Output, now: Now) {
    let lifetime = |expires: Instant| expires.saturating_duration_since(now.instant).as_secs();
    let status = match output {
        Output::AllocationCreated {
            key,
            user,
            realm,
            expires,
            ..
        } => {
            w.next_status_id += 1;
            let id = ((w.index as u64) << 56) | w.next_status_id;
            w.status_ids.insert(*key, (id, user.clone(), realm.clone()));
            AllocationStatus {
                user: user.clone(),
                realm: realm.clone(),
                id,
                change: StatusChange::New {
                    lifetime: lifetime(*expires),
                },
            }
        }
        Output::AllocationRefreshed { key, expires } => match w.status_ids.get(key) {
            Some((id, user, realm)) => AllocationStatus {
                user: user.clone(),
                realm: realm.clone(),
                id: *id,
                change: StatusChange::Refreshed {
                    lifetime: lifetime(*expires),
                },
            },
            None => return,
        },
        Output::AllocationEnded { key, traffic, .. } => match w.status_ids.remove(key) {
            Some((id, user, realm)) => AllocationStatus {
                user,
                realm,
                id,
                change: StatusChange::Deleted { traffic: *traffic },
            },
            None => return,
        },
        _ => return,
    };
    if let Some(tx) = &w.statuses
        && tx.try_send(status).is_err()
    {
        metrics::counter!("turnstile_store_statuses_dropped_total").increment(1);
    }
}

/// Binds a relay socket and adds it to the worker's relay poll.
fn open_relay(w: &mut Worker, id: RelayId, addr: SocketAddr, dont_fragment: bool) -> BindResult {
    let socket = match relay::bind(addr, dont_fragment) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if w.relay_poll.add(socket.as_raw_fd(), id).is_err() {
        return BindResult::Failed;
    }
    w.relays.insert(
        id,
        RelaySocket {
            udp: Some(Rc::new(socket)),
            bound: addr,
            close: None,
            tcp_fd: None,
        },
    );
    BindResult::Bound
}

/// Binds an RFC 6062 TCP relay: a listener for peers, on a port that the
/// allocation's outgoing connections share; the `peer_tcp` driver accepts on it.
fn open_tcp_relay(w: &mut Worker, id: RelayId, addr: SocketAddr) -> BindResult {
    let listener = relay::tcp_socket(addr).and_then(|s| s.listen(64));
    let listener = match listener {
        Ok(l) => l,
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => return BindResult::InUse,
        Err(_) => return BindResult::Failed,
    };
    if w.serve_tcp_relay(id, listener, addr).is_err() {
        return BindResult::Failed;
    }
    BindResult::Bound
}

impl Worker {
    /// Accepts peers on a TCP relay (bound now, or taken over by a live upgrade).
    pub(crate) fn serve_tcp_relay(
        &mut self,
        id: RelayId,
        listener: tokio::net::TcpListener,
        bound: SocketAddr,
    ) -> std::io::Result<()> {
        let close = Rc::new(tokio::sync::Notify::new());
        let tcp_fd = Some(listener.as_raw_fd());
        let task = TcpRelayTask::Accept {
            relay: id,
            listener,
            close: close.clone(),
        };
        self.tcp_relay
            .send(task)
            .map_err(|_| std::io::Error::other("the TCP relay driver is gone"))?;
        self.relays.insert(
            id,
            RelaySocket {
                udp: None,
                bound,
                close: Some(close),
                tcp_fd,
            },
        );
        Ok(())
    }
}
