//! Workers: one thread each, with its own single-threaded runtime, its own
//! SO_REUSEPORT listener sockets, its relay sockets and its own server core.
//! Nothing on the packet path is shared between workers. This module starts
//! a worker's drivers around its state (`executor`), runs its timers and
//! applies control messages from the main thread.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::io::executor::{Listener, Shared, Worker, now, run_outputs};
use crate::io::relay::PeerBatch;
use crate::io::relay_poll::RelayPoll;
use crate::io::stream::{self, StreamSettings, Streams};
use crate::io::udp::{MAX_DATAGRAM, UdpListener};
use crate::io::{listen_udp, peer_tcp, peer_udp};
use crate::proto::server::{Input, ListenerKind, PEER_HEADROOM, PEER_TAILROOM, Server};

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
        realm: Option<String>,
        reply: std::sync::mpsc::Sender<usize>,
    },
    /// The fleet's least loaded other node, for 300 Try Alternate.
    FleetAlternate(Option<SocketAddr>),
    /// `[xdp]` was removed: stop mirroring (the program is detached next).
    StopOffload {
        done: std::sync::mpsc::Sender<()>,
    },
    /// A live upgrade: export, then hold the thread until the verdict.
    Freeze {
        export: std::sync::mpsc::Sender<io::Result<crate::io::handover::WorkerExport>>,
        verdict: std::sync::mpsc::Receiver<bool>,
        timeout: Duration,
        /// Told once the verdict is carried out.
        done: std::sync::mpsc::Sender<()>,
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
    /// The fast path's maps and this worker's counter slots, with `[xdp]`.
    pub offload: Option<Offload>,
    /// Allocation statuses for the fleet store, with `[store]`.
    pub statuses: Option<crate::io::executor::StatusSender>,
    /// Every worker's queue of RFC 8016 lend requests, and this worker's own.
    pub lenders: Vec<crate::io::handover::LendSender>,
    pub lend_requests: crate::io::handover::LendReceiver,
    /// RFC 5780 set-up of the UDP listeners that offer it, by listener id.
    pub nat: Vec<(crate::proto::server::ListenerId, crate::proto::server::NatDiscovery)>,
    /// In a process started by a live upgrade: the running process's state
    /// for this worker, and the gate it waits at before serving.
    pub inherited: Option<(crate::io::handover::Inherited, StartGate)>,
}

/// Where a worker of an upgraded process reports its restore (allocations
/// taken over, or why not), and waits for the go-ahead to serve.
pub struct StartGate {
    pub restored: std::sync::mpsc::Sender<Result<usize, String>>,
    pub go: std::sync::mpsc::Receiver<bool>,
}

/// What a worker needs to mirror its core into the fast path's maps.
pub struct Offload {
    pub table: Box<dyn crate::io::xdp::BindingTable + Send>,
    pub slots: std::ops::Range<u32>,
    /// The server's relay addresses (bound and advertised).
    pub own: Vec<std::net::IpAddr>,
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
        let (tcp_relay_tx, tcp_relay_rx) = tokio::sync::mpsc::unbounded_channel();
        let worker: Shared = Rc::new(RefCell::new(Worker::new(
            setup.index,
            setup.server,
            relay_poll,
            PeerBatch::new(PEER_HEADROOM, MAX_DATAGRAM, PEER_TAILROOM),
            tcp_relay_tx,
        )));
        if let Some(o) = setup.offload {
            let mut mirror = crate::io::xdp::Mirror::new(o.table, o.slots, o.own);
            let mut w = worker.borrow_mut();
            // Bandwidth limits are exact only in userspace.
            let mut fold = Vec::new();
            mirror.set_enabled(!w.server.limits_bandwidth(), &mut fold);
            w.offload = Some(mirror);
        }
        worker.borrow_mut().statuses = setup.statuses;
        worker.borrow_mut().lenders = setup.lenders;
        let streams = Rc::new(Streams::new(setup.index, setup.handoff_senders));
        for socket in setup.udp {
            add_udp_listener(&worker, &streams, socket)?;
        }
        for s in setup.streams {
            add_stream_listener(&worker, &streams, s)?;
        }
        for (id, d) in setup.nat {
            worker.borrow_mut().server.set_nat_discovery(id, d);
        }
        if let Some((inherited, gate)) = setup.inherited {
            let adopted = crate::io::handover::adopt(&worker, &streams, inherited);
            let _ = gate
                .restored
                .send(adopted.as_ref().map(|n| *n).map_err(|e| e.to_string()));
            adopted?;
            // Nothing is served until the running process let go: its
            // workers are frozen meanwhile, and the datagrams wait in the
            // sockets' buffers.
            if !gate.go.recv().unwrap_or(false) {
                return Err(io::Error::other("the running process kept its state"));
            }
        }
        // SAFETY: an OwnedFd is a valid descriptor that stays open, and the
        // same, for as long as the AsyncFd owns it.
        let relay_watch = unsafe { AsyncFd::register_with_interest(relay_watch, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        tokio::task::spawn_local(peer_udp::relay_events(worker.clone(), relay_watch));
        tokio::task::spawn_local(peer_tcp::run(worker.clone(), tcp_relay_rx));
        tokio::task::spawn_local(timers(worker.clone()));
        tokio::task::spawn_local(stream::receive_handoffs(
            worker.clone(),
            streams.clone(),
            setup.handoff_receiver,
        ));
        tokio::task::spawn_local(crate::io::handover::serve_lends(worker.clone(), setup.lend_requests));
        tokio::task::spawn_local(controls(worker.clone(), streams, setup.control));
        // The worker lives as long as the process; listeners come and go with reloads.
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// Starts serving a UDP listener socket (at start-up or on reload). Every
/// worker adds listeners in the same order, so ids agree across workers.
fn add_udp_listener(shared: &Shared, streams: &Streams, socket: std::net::UdpSocket) -> io::Result<()> {
    let listener = Rc::new(UdpListener::new(socket)?);
    let mut w = shared.borrow_mut();
    let id = w.server.add_listener(ListenerKind::Udp, "udp");
    w.listeners.push(Listener::Udp(listener.clone()));
    let local = listener.local_addr().ok();
    if let Some(m) = w.offload.as_mut() {
        m.add_listener(usize::from(id.0), local);
    }
    streams.register(id, None);
    let task = tokio::task::spawn_local(log_end(listen_udp::listen_udp(shared.clone(), id, listener)));
    w.listener_tasks.push(Some(task.abort_handle()));
    Ok(())
}

/// Starts serving a TCP or TLS listener.
fn add_stream_listener(shared: &Shared, streams: &Rc<Streams>, setup: StreamListenerSetup) -> io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(setup.listener)?;
    let settings = Rc::new(setup.settings);
    let mut w = shared.borrow_mut();
    let name = if settings.tls.is_some() { "tls" } else { "tcp" };
    let id = w.server.add_listener(ListenerKind::Stream, name);
    w.listeners.push(Listener::Stream);
    if let Some(m) = w.offload.as_mut() {
        m.add_listener(usize::from(id.0), None);
    }
    streams.register(id, Some(settings.clone()));
    let task = tokio::task::spawn_local(log_end(stream::accept_loop(
        shared.clone(),
        streams.clone(),
        id,
        listener,
        settings,
    )));
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
            run_outputs(w, clock);
        }
        if tokio::time::Instant::now() >= next_export {
            next_export = tokio::time::Instant::now() + Duration::from_secs(1);
            let sent = std::mem::take(&mut w.sent);
            metrics::counter!("turnstile_udp_gso_sends_total").increment(sent.gso_sends);
            metrics::counter!("turnstile_send_dropped_total").increment(sent.dropped);
            if let Some(m) = w.offload.as_mut() {
                m.collect(&mut w.offloaded);
                let installed = m.installed() as f64;
                metrics::gauge!("turnstile_xdp_bindings").increment(installed - w.offload_exported);
                w.offload_exported = installed;
            }
            w.fold_offloaded(clock);
            let gauges = w.server.gauges(clock);
            w.exporter.export(w.server.stats(), &gauges, w.relays.len());
        }
    }
}

/// Applies control messages from the main thread.
async fn controls(shared: Shared, streams: Rc<Streams>, mut rx: ControlReceiver) {
    while let Some(c) = rx.recv().await {
        let c = match c {
            WorkerControl::AddUdpListener(socket) => {
                if let Err(e) = add_udp_listener(&shared, &streams, socket) {
                    tracing::error!("new listener: {e}");
                }
                continue;
            }
            WorkerControl::AddStreamListener(setup) => {
                if let Err(e) = add_stream_listener(&shared, &streams, setup) {
                    tracing::error!("new listener: {e}");
                }
                continue;
            }
            WorkerControl::Freeze {
                export,
                verdict,
                timeout,
                done,
            } => {
                // Plain TCP connections park first (this awaits them), then
                // the worker exports and holds still.
                crate::io::handover::park_streams(&shared).await;
                crate::io::handover::freeze(&mut shared.borrow_mut(), &export, &verdict, timeout);
                let _ = done.send(());
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
                let clock = now();
                run_outputs(&mut w, clock);
                // Bandwidth limits are exact only in userspace.
                let bandwidth = w.server.limits_bandwidth();
                let w = &mut *w;
                if let Some(m) = w.offload.as_mut() {
                    m.set_enabled(!bandwidth, &mut w.offloaded);
                }
                w.fold_offloaded(clock);
                let _ = applied.send(());
            }
            WorkerControl::Drain { alternate } => w.server.set_draining(alternate),
            WorkerControl::FleetAlternate(server) => w.server.handle(now(), Input::FleetAlternate { server }),
            WorkerControl::ListAllocations { reply } => {
                let _ = reply.send(w.server.allocations_info(now()));
            }
            WorkerControl::StopOffload { done } => {
                let w = &mut *w;
                if let Some(mut m) = w.offload.take() {
                    m.set_enabled(false, &mut w.offloaded);
                    metrics::gauge!("turnstile_xdp_bindings").decrement(w.offload_exported);
                    w.offload_exported = 0.0;
                }
                w.fold_offloaded(now());
                let _ = done.send(());
            }
            WorkerControl::Freeze { .. } => {}
            WorkerControl::Kick {
                user,
                client,
                realm,
                reply,
            } => {
                let n = w.server.kick(user.as_deref(), client, realm.as_deref());
                run_outputs(&mut w, now());
                let _ = reply.send(n);
            }
        }
    }
}
