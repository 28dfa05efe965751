//! Workers: one thread each, with its own single-threaded runtime, its own
//! SO_REUSEPORT listener sockets, its relay sockets and its own server core.
//! Nothing on the packet path is shared between workers.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashMap;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle as TaskHandle;

use crate::io::relay::{self, PeerBatch};
use crate::io::relay_poll::{RelayEvent, RelayPoll};
use crate::io::send_queue::{Flushed, SendQueue, Source};
use crate::io::stats_export::StatsExporter;
use crate::io::stream::{self, StreamOut, StreamSettings};
use crate::io::udp::{MAX_DATAGRAM, UdpListener};
use crate::proto::server::{
    BindResult, ClientKey, ClientOutcome, DropReason, Input, ListenerId, ListenerKind, Now, Output, PEER_HEADROOM,
    PEER_TAILROOM, PeerOutcome, RelayId, Server,
};

/// Control messages from the main thread (configuration reload, drain).
pub enum WorkerControl {
    Reload {
        settings: crate::proto::server::Reconfiguration,
        /// Told once the worker applied it.
        applied: std::sync::mpsc::Sender<()>,
    },
    Drain {
        alternate: Option<SocketAddr>,
    },
    AddUdpListener(std::net::UdpSocket),
    AddStreamListener(StreamListenerSetup),
    RemoveListener(usize),
    ListAllocations {
        reply: std::sync::mpsc::Sender<Vec<crate::proto::server::AllocationInfo>>,
    },
    Kick {
        user: Option<String>,
        client: Option<SocketAddr>,
        reply: std::sync::mpsc::Sender<usize>,
    },
}

pub type ControlSender = tokio::sync::mpsc::UnboundedSender<WorkerControl>;
pub type ControlReceiver = tokio::sync::mpsc::UnboundedReceiver<WorkerControl>;

/// A TCP or TLS listener handed to a worker.
pub struct StreamListenerSetup {
    pub listener: std::net::TcpListener,
    pub settings: StreamSettings,
}

/// What one worker is handed at start-up.
pub struct WorkerSetup {
    pub index: usize,
    pub udp: Vec<std::net::UdpSocket>,
    pub streams: Vec<StreamListenerSetup>,
    pub server: Server,
    /// Every worker's hand-over queue (index = worker), and this worker's own.
    pub handoff_senders: Vec<stream::HandoffSender>,
    pub handoff_receiver: stream::HandoffReceiver,
    pub control: ControlReceiver,
    /// See `[performance] coalesce_wakeups_us`.
    pub coalesce_wakeups: Duration,
}

/// Starts a worker thread. It runs until the process exits.
pub fn spawn(setup: WorkerSetup) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("turnstile-w{}", setup.index))
        .spawn(move || {
            let index = setup.index;
            if let Err(e) = run(setup) {
                tracing::error!(worker = index, "worker stopped: {e}");
                std::process::exit(1);
            }
        })
}

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

struct RelaySocket {
    /// The UDP relay socket, served by the worker's relay poll; `None` for
    /// an RFC 6062 TCP relay (a listener owned by its accept task).
    udp: Option<Rc<std::net::UdpSocket>>,
    /// Where the relay is bound (TCP connections to peers start from here).
    bound: SocketAddr,
    /// The accept task of a TCP relay.
    task: Option<TaskHandle<()>>,
}

/// An RFC 6062 peer connection: its stream until a data connection takes
/// it, and a signal that closes the pair.
pub(crate) struct TcpPeer {
    pub(crate) stream: Option<tokio::net::TcpStream>,
    pub(crate) close: Rc<tokio::sync::Notify>,
}

impl TcpPeer {
    fn new(stream: tokio::net::TcpStream) -> TcpPeer {
        TcpPeer {
            stream: Some(stream),
            close: Rc::new(tokio::sync::Notify::new()),
        }
    }
}

/// What became of a client frame, for the stream driver.
pub enum Handled {
    Done,
    /// ConnectionBind succeeded: the connection now pipes to this peer connection.
    Bound(u32),
}

/// Where answers for a listener's clients go.
enum Listener {
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
    listeners: Vec<Listener>,
    /// Settings of each stream listener, by listener id.
    pub(crate) stream_settings: Vec<Option<Rc<StreamSettings>>>,
    pub(crate) handoff: Vec<stream::HandoffSender>,
    pub(crate) tcp_peers: FxHashMap<u32, TcpPeer>,
    /// A peer connection just accepted on a TCP relay, while the core
    /// decides whether to keep it (`Input::TcpPeerAccepted`).
    accepting: Option<tokio::net::TcpStream>,
    pub(crate) streams: FxHashMap<ClientKey, Rc<StreamOut>>,
    /// The task serving each listener, by listener id (to stop it on removal).
    listener_tasks: Vec<Option<tokio::task::AbortHandle>>,
    relays: FxHashMap<RelayId, RelaySocket>,
    /// Every UDP relay socket of this worker, in one epoll set.
    relay_poll: RelayPoll,
    /// Responses are written here.
    out: Vec<u8>,
    /// Peer datagrams are received here (recvmmsg), each after PEER_HEADROOM bytes.
    peer_batch: PeerBatch,
    /// What the core framed in `peer_batch` for UDP clients, sent per batch.
    peer_queue: SendQueue,
    /// Batched-send counters since the last export.
    sent: Flushed,
    exporter: StatsExporter,
}

pub type Shared = Rc<RefCell<Worker>>;

impl Worker {
    /// Sends bytes to a client on the listener (UDP) or connection (TCP/TLS)
    /// of its 5-tuple. Never waits; false when the bytes were dropped.
    fn deliver(&self, key: &ClientKey, bytes: &[u8]) -> bool {
        match self.listeners.get(usize::from(key.listener.0)) {
            Some(Listener::Udp(l)) => l.send(key.client, bytes),
            Some(Listener::Stream) => self.streams.get(key).is_some_and(|o| o.push(bytes)),
            Some(Listener::Removed) | None => false,
        }
    }
}

fn run(setup: WorkerSetup) -> io::Result<()> {
    crate::io::coalesce::configure(setup.coalesce_wakeups);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(crate::io::coalesce::on_park)
        .on_thread_unpark(crate::io::coalesce::on_unpark)
        .build()?;
    let local = tokio::task::LocalSet::new();
    let relay_poll = RelayPoll::new()?;
    let relay_watch = relay_poll.try_clone_fd()?;
    local.block_on(&rt, async move {
        let worker: Shared = Rc::new(RefCell::new(Worker {
            index: setup.index,
            server: setup.server,
            listeners: Vec::new(),
            stream_settings: Vec::new(),
            handoff: setup.handoff_senders,
            tcp_peers: FxHashMap::default(),
            accepting: None,
            streams: FxHashMap::default(),
            listener_tasks: Vec::new(),
            relays: FxHashMap::default(),
            relay_poll,
            out: vec![0u8; 2048],
            peer_batch: PeerBatch::new(PEER_HEADROOM, MAX_DATAGRAM, PEER_TAILROOM),
            peer_queue: SendQueue::new(true),
            sent: Flushed::default(),
            exporter: StatsExporter::new(setup.index),
        }));
        for socket in setup.udp {
            add_udp_listener(&worker, socket)?;
        }
        for s in setup.streams {
            add_stream_listener(&worker, s)?;
        }
        // SAFETY: an OwnedFd is a valid descriptor that stays open, and the
        // same, for as long as the AsyncFd owns it.
        let relay_watch = unsafe { AsyncFd::register_with_interest(relay_watch, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        tokio::task::spawn_local(relay_events(worker.clone(), relay_watch));
        tokio::task::spawn_local(timers(worker.clone()));
        tokio::task::spawn_local(stream::receive_handoffs(worker.clone(), setup.handoff_receiver));
        tokio::task::spawn_local(controls(worker.clone(), setup.control));
        // The worker lives as long as the process; listeners come and go with reloads.
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// Starts serving a UDP listener socket (at start-up or on reload). Every
/// worker adds listeners in the same order, so ids agree across workers.
pub fn add_udp_listener(shared: &Shared, socket: std::net::UdpSocket) -> io::Result<()> {
    let listener = Rc::new(UdpListener::new(socket)?);
    let mut w = shared.borrow_mut();
    let id = w.server.add_listener(ListenerKind::Udp);
    w.listeners.push(Listener::Udp(listener.clone()));
    w.stream_settings.push(None);
    let task = tokio::task::spawn_local(log_end(listen_udp(shared.clone(), id, listener)));
    w.listener_tasks.push(Some(task.abort_handle()));
    Ok(())
}

/// Starts serving a TCP or TLS listener.
pub fn add_stream_listener(shared: &Shared, setup: StreamListenerSetup) -> io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(setup.listener)?;
    let settings = Rc::new(setup.settings);
    let mut w = shared.borrow_mut();
    let name = if settings.tls.is_some() { "tls" } else { "tcp" };
    let id = w.server.add_named_listener(ListenerKind::Stream, name);
    w.listeners.push(Listener::Stream);
    w.stream_settings.push(Some(settings.clone()));
    let task = tokio::task::spawn_local(log_end(stream::accept_loop(shared.clone(), id, listener, settings)));
    w.listener_tasks.push(Some(task.abort_handle()));
    Ok(())
}

/// Stops serving a listener (configuration reload). Its clients' answers
/// have nowhere to go any more; their allocations expire.
fn remove_listener(w: &mut Worker, index: usize) {
    if let Some(t) = w.listener_tasks.get_mut(index).and_then(Option::take) {
        t.abort();
    }
    if let Some(l) = w.listeners.get_mut(index) {
        *l = Listener::Removed;
    }
}

async fn log_end(task: impl std::future::Future<Output = io::Result<()>>) {
    if let Err(e) = task.await {
        tracing::error!("listener stopped: {e}");
    }
}

/// Receives client datagrams on one UDP listener and hands them to the
/// core; what they relay to peers leaves together once the batch is read.
async fn listen_udp(worker: Shared, id: ListenerId, listener: Rc<UdpListener>) -> io::Result<()> {
    let mut batch = listener.batch();
    let mut queue = SendQueue::new(true);
    loop {
        // The clock is read once per batch, after the receive returns: read
        // before the wait, an idle listener would stamp a datagram with the
        // moment it started waiting (stale nonces, expired credentials and
        // permissions accepted, new ones born expired).
        let mut stamp: Option<Now> = None;
        let mut received = 0;
        listener
            .recv(&mut batch, |client, at, datagram| {
                let now = *stamp.get_or_insert_with(now);
                let key = ClientKey { listener: id, client };
                handle_client(&worker, now, key, datagram, Some((&mut queue, at)));
                received += 1;
            })
            .await?;
        crate::io::coalesce::handled(received);
        if !queue.is_empty() {
            let done = queue.flush(batch.storage());
            worker.borrow_mut().sent.add(done);
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
            metrics::counter!("turnstile_dropped_packets_total", "reason" => reason.label()).increment(1);
            Handled::Done
        }
    };
    run_outputs(shared, w, now);
    handled
}

fn send_or_count(sent: bool) {
    if !sent {
        metrics::counter!("turnstile_send_dropped_total").increment(1);
    }
}

/// Carries out everything the core asked for since the last call: the one
/// place outputs are executed. Binding a relay socket answers the core at
/// once, which may ask for more (another port); state-change events are
/// for drivers that mirror the core and are not needed here.
pub fn run_outputs(shared: &Shared, w: &mut Worker, now: Now) {
    while let Some(output) = w.server.poll_output() {
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
                    open_tcp_relay(shared, w, relay, addr)
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
                    if let Some(task) = r.task {
                        task.abort();
                    }
                }
            }
            Output::TcpConnect {
                relay,
                peer,
                connection,
            } => {
                if let Some(from) = w.relays.get(&relay).map(|r| r.bound) {
                    tokio::task::spawn_local(tcp_connect(shared.clone(), connection, from, peer));
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
            Output::CloseClient(key) => {
                if let Some(out) = w.streams.get(&key) {
                    out.end_session();
                }
            }
            Output::AllocationCreated { .. }
            | Output::AllocationRefreshed { .. }
            | Output::AllocationEnded { .. }
            | Output::PermissionInstalled { .. }
            | Output::ChannelBound { .. } => {}
        }
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
            task: None,
        },
    );
    BindResult::Bound
}

/// A TCP socket bound to a relayed address. The relay's listener and its
/// outgoing connections share the address, so all set SO_REUSEADDR and
/// SO_REUSEPORT.
fn tcp_relay_socket(addr: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    Ok(s)
}

/// Binds an RFC 6062 TCP relay: a listener for peers, on a port that the
/// allocation's outgoing connections share (SO_REUSEADDR and SO_REUSEPORT).
fn open_tcp_relay(shared: &Shared, w: &mut Worker, id: RelayId, addr: SocketAddr) -> BindResult {
    let listener = tcp_relay_socket(addr).and_then(|s| s.listen(64));
    let listener = match listener {
        Ok(l) => l,
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => return BindResult::InUse,
        Err(_) => return BindResult::Failed,
    };
    let task = tokio::task::spawn_local(tcp_relay_accept(shared.clone(), id, listener));
    w.relays.insert(
        id,
        RelaySocket {
            udp: None,
            bound: addr,
            task: Some(task),
        },
    );
    BindResult::Bound
}

/// Peers connecting to a TCP relay: with a permission the client hears of
/// them (ConnectionAttempt) and the stream waits for its data connection.
async fn tcp_relay_accept(shared: Shared, id: RelayId, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut guard = shared.borrow_mut();
        let w = &mut *guard;
        let now = now();
        w.accepting = Some(stream);
        w.server.handle(now, Input::TcpPeerAccepted { relay: id, peer });
        run_outputs(&shared, w, now);
        // Neither accepted nor refused (cannot happen): not kept.
        w.accepting = None;
    }
}

/// Connect (RFC 6062): a TCP connection from the relayed address to the
/// peer; the Connect response goes out when it succeeds or fails.
async fn tcp_connect(shared: Shared, connection: u32, from: SocketAddr, peer: SocketAddr) {
    // The core answers 447 at its own deadline; a connection that comes
    // after it is closed on the core's word.
    let result = async { tcp_relay_socket(from)?.connect(peer).await }.await;
    let mut guard = shared.borrow_mut();
    let w = &mut *guard;
    let connected = result.is_ok();
    if let Ok(stream) = result {
        let _ = stream.set_nodelay(true);
        w.tcp_peers.insert(connection, TcpPeer::new(stream));
    }
    let now = now();
    w.server.handle(now, Input::TcpConnected { connection, connected });
    run_outputs(&shared, w, now);
}

/// Serves every UDP relay socket of the worker: waits for the relay poll,
/// reads each ready socket with recvmmsg into the shared peer batch (slots
/// filled across sockets), hands the datagrams to the core and sends what
/// it framed in place, batch by batch.
async fn relay_events(shared: Shared, watch: AsyncFd<std::os::fd::OwnedFd>) {
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
        PeerOutcome::Drop(reason) => {
            metrics::counter!("turnstile_dropped_packets_total", "reason" => reason.label()).increment(1);
        }
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
        run_outputs(shared, w, now);
    }
}

/// The core's timers, and the statistics export once a second: sleeps
/// until the core's next deadline or the next export, whichever is first
/// (a deadline set meanwhile is at most a second away from being seen).
async fn timers(shared: Shared) {
    let mut next_export = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let deadline = shared.borrow().server.poll_timeout();
        let wake = match deadline {
            Some(d) => next_export.min(tokio::time::Instant::from_std(d)),
            None => next_export,
        };
        tokio::time::sleep_until(wake).await;
        let mut guard = shared.borrow_mut();
        let w = &mut *guard;
        let clock = now();
        if w.server.poll_timeout().is_some_and(|t| t <= clock.instant) {
            w.server.handle_timeout(clock);
            run_outputs(&shared, w, clock);
        }
        if tokio::time::Instant::now() >= next_export {
            next_export = tokio::time::Instant::now() + Duration::from_secs(1);
            let sent = std::mem::take(&mut w.sent);
            metrics::counter!("turnstile_udp_gso_sends_total").increment(sent.gso_sends);
            metrics::counter!("turnstile_send_dropped_total").increment(sent.dropped);
            let gauges = w.server.gauges(clock.instant);
            w.exporter.export(w.server.stats(), &gauges, w.relays.len());
        }
    }
}

/// Applies control messages from the main thread.
async fn controls(shared: Shared, mut rx: ControlReceiver) {
    while let Some(c) = rx.recv().await {
        let c = match c {
            WorkerControl::AddUdpListener(socket) => {
                if let Err(e) = add_udp_listener(&shared, socket) {
                    tracing::error!("new listener: {e}");
                }
                continue;
            }
            WorkerControl::AddStreamListener(setup) => {
                if let Err(e) = add_stream_listener(&shared, setup) {
                    tracing::error!("new listener: {e}");
                }
                continue;
            }
            other => other,
        };
        let mut w = shared.borrow_mut();
        match c {
            WorkerControl::RemoveListener(index) => remove_listener(&mut w, index),
            WorkerControl::AddUdpListener(_) | WorkerControl::AddStreamListener(_) => {}
            WorkerControl::Reload { settings, applied } => {
                let revoked = w.server.reconfigure(settings);
                if revoked > 0 {
                    tracing::info!(
                        worker = w.index,
                        allocations = revoked,
                        "allocations revoked: credentials changed"
                    );
                }
                run_outputs(&shared, &mut w, now());
                let _ = applied.send(());
            }
            WorkerControl::Drain { alternate } => w.server.set_draining(alternate),
            WorkerControl::ListAllocations { reply } => {
                let _ = reply.send(w.server.allocations_info(Instant::now()));
            }
            WorkerControl::Kick { user, client, reply } => {
                let n = w.server.kick(user.as_deref(), client);
                run_outputs(&shared, &mut w, now());
                let _ = reply.send(n);
            }
        }
    }
}
