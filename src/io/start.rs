//! The composition root: binds every listener, builds each worker's core
//! and starts the workers; reloads and drains them later.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use super::{stream, tls, udp, worker};
use crate::config::{Config, Transport};
use crate::io::handover::{Inherited, WorkerExport};
use crate::proto::channel_data::ChannelRange;
use crate::proto::server::snapshot::Snapshot;
use crate::proto::server::{
    Credentials, ListenerId, OwnRelays, PeerPolicy, Quotas, Realm, Realms, RelayAddress, RelayId, Server, ServerConfig,
};

/// What `start` bound, for logs and for the iceServers hint.
pub struct Started {
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
    /// The TLS certificate, for reloads.
    pub certificates: Option<Arc<tls::CertStore>>,
    /// Allocation counts shared by the workers (the total tells when a drain is done).
    pub quotas: Arc<Quotas>,
    controls: Vec<worker::ControlSender>,
    nonce_secret: [u8; 32],
    /// Listen entries by listener id, with where each is bound and a
    /// duplicate of each worker's socket (for a live upgrade).
    listening: std::sync::Mutex<Vec<Option<Listening>>>,
    port_seed: [u8; 32],
    /// A process started by a live upgrade: each worker's go-ahead.
    gates: std::sync::Mutex<Vec<std::sync::mpsc::Sender<bool>>>,
    extra_services: Vec<SocketAddr>,
    stream_context: StreamContext,
    /// The fast path, attached while this lives.
    xdp: std::sync::Mutex<Option<FastPath>>,
    /// The configuration applied last, and what the fleet store holds.
    applied: std::sync::Mutex<(Config, StoreContents)>,
    draining: std::sync::atomic::AtomicBool,
    /// Allocation statuses from the workers, for the fleet store (taken by it).
    pub statuses: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::io::executor::AllocationStatus>>>,
}

/// A listen entry as bound: the entry, its address, and a duplicate of
/// each worker's socket.
type Listening = (crate::config::Listen, SocketAddr, Vec<OwnedFd>);

/// What a process started by a live upgrade takes over from the running
/// one (see `crate::ops::upgrade`).
pub struct Inheritance {
    pub nonce_secret: [u8; 32],
    pub port_seed: [u8; 32],
    pub workers: usize,
    /// Listen entries: the running process's listener id, transport, the
    /// address as configured, and one socket per worker.
    pub listeners: Vec<(u16, Transport, SocketAddr, Vec<OwnedFd>)>,
    /// Each worker's core and relay sockets.
    pub states: Vec<WorkerInheritance>,
}

/// One worker's core, its relay sockets by relay id and its plain TCP
/// client connections.
pub struct WorkerInheritance {
    pub core: Snapshot,
    pub relays: Vec<(RelayId, OwnedFd)>,
    pub streams: Vec<crate::io::handover::StreamExport>,
    pub tcp_relays: Vec<(RelayId, OwnedFd)>,
    /// RFC 6062: connection id, peer socket, data connection socket.
    pub peers: Vec<(u32, OwnedFd, Option<OwnedFd>)>,
}

/// Every worker frozen by a live upgrade, with what they exported.
pub struct Frozen {
    pub exports: Vec<WorkerExport>,
    /// Listen entries as [`Inheritance::listeners`] takes them, with
    /// duplicates of their sockets.
    pub listeners: Vec<(u16, Transport, SocketAddr, SocketAddr, Vec<OwnedFd>)>,
    pub nonce_secret: [u8; 32],
    pub port_seed: [u8; 32],
    verdicts: Vec<std::sync::mpsc::Sender<bool>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Frozen {
    /// The new process serves: every worker lets go of what it handed
    /// over (returns once they did).
    pub fn commit(self) {
        self.decide(true);
    }

    /// The upgrade failed: every worker serves on as before.
    pub fn resume(self) {
        self.decide(false);
    }

    fn decide(self, handed_over: bool) {
        for v in &self.verdicts {
            let _ = v.send(handed_over);
        }
        for _ in &self.verdicts {
            let _ = self.done.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// Duplicates of sockets, kept to hand over.
fn duplicates<'a>(sockets: impl Iterator<Item = BorrowedFd<'a>>) -> io::Result<Vec<OwnedFd>> {
    sockets.map(|s| s.try_clone_to_owned()).collect()
}

/// Users and REST secrets read from the fleet store (src/ops/store.rs),
/// added to the configured ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreContents {
    /// The default realm's users: name and MD5 long-term key.
    pub users: Vec<(String, [u8; 16])>,
    /// The default realm's REST secrets.
    pub secrets: Vec<String>,
    /// Users refused for now (revocations): a name alone for every realm,
    /// or one realm's user (`crate::ops::fleet::encode_scoped`).
    pub revoked: Vec<String>,
    /// The users and secrets of the other configured realms.
    pub realms: Vec<RealmContents>,
}

/// One non-default realm's part of the fleet store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealmContents {
    pub name: String,
    pub users: Vec<(String, [u8; 16])>,
    pub secrets: Vec<String>,
}

/// The loaded XDP program (or nothing, in a build without the feature).
#[cfg(feature = "xdp")]
type FastPath = std::sync::Arc<crate::io::xdp::kernel::Program>;
#[cfg(not(feature = "xdp"))]
type FastPath = ();

impl Started {
    /// Applies a new, already validated configuration to the running
    /// workers: users, secrets, realm, peer ACLs, quotas and limits. Existing
    /// allocations keep their keys and lifetimes; listeners are added and
    /// removed. The nonce key stays, so outstanding nonces remain valid.
    pub fn reload(&self, config: &Config) -> io::Result<()> {
        self.reload_listeners(config)?;
        self.reload_xdp(config);
        let store = {
            let mut applied = self.applied.lock().map_err(|_| io::Error::other("poisoned"))?;
            applied.0 = config.clone();
            applied.1.clone()
        };
        self.apply(config, &store)?;
        if let Some(store) = &self.certificates {
            store.reload().map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// New contents of the fleet store: applied with the configuration in
    /// force, as a reload would (without touching listeners). Unchanged
    /// contents do nothing.
    pub fn set_store(&self, contents: StoreContents) -> io::Result<()> {
        let config = {
            let mut applied = self.applied.lock().map_err(|_| io::Error::other("poisoned"))?;
            if applied.1 == contents {
                return Ok(());
            }
            applied.1 = contents.clone();
            applied.0.clone()
        };
        self.apply(&config, &contents)
    }

    /// Sends every worker the settings of `config` and the store, and waits
    /// until each applied them.
    fn apply(&self, config: &Config, store: &StoreContents) -> io::Result<()> {
        let services = self.services();
        let realms = {
            let listening = self.listening.lock().map_err(|_| io::Error::other("poisoned"))?;
            realms(config, &self.nonce_secret, store, &services, &listening)?
        };
        self.quotas.set_limits(config.limits.quota_limits());
        self.quotas.set_realms(&config.realm, realm_quotas(config));
        let (applied, acks) = std::sync::mpsc::channel();
        for c in &self.controls {
            let _ = c.send(worker::WorkerControl::Reload {
                settings: crate::proto::server::Reconfiguration {
                    realms: realms.clone(),
                    revoke: config.auth.revoke_on_reload,
                    limits: crate::proto::server::AllocationLimits {
                        max_lifetime: config.limits.max_lifetime,
                        max_permissions: config.limits.permissions_per_allocation,
                        max_channels: config.limits.channels_per_allocation,
                        max_connections: config.limits.connections_per_allocation,
                        tcp_relay: config.relay.tcp,
                        idle_timeout: Duration::from_secs(config.limits.idle_timeout),
                        mobility: config.auth.mobility,
                    },
                    rates: [
                        config.limits.unauthenticated(self.controls.len()),
                        config.limits.worker_bandwidth(self.controls.len()),
                    ],
                },
                applied: applied.clone(),
            });
        }
        // Report success only once every worker applied the new settings.
        for _ in &self.controls {
            acks.recv_timeout(Duration::from_secs(5))
                .map_err(|_| io::Error::other("a worker did not apply the reload"))?;
        }
        Ok(())
    }

    /// A reload that removes `[xdp]` detaches the program once every worker
    /// stopped mirroring; adding or changing it takes a restart.
    fn reload_xdp(&self, config: &Config) {
        let Ok(mut xdp) = self.xdp.lock() else {
            return;
        };
        match (config.xdp.is_some(), xdp.is_some()) {
            (false, true) => {
                let (done, acks) = std::sync::mpsc::channel();
                for c in &self.controls {
                    let _ = c.send(worker::WorkerControl::StopOffload { done: done.clone() });
                }
                for _ in &self.controls {
                    let _ = acks.recv_timeout(Duration::from_secs(5));
                }
                *xdp = None;
            }
            (true, false) => tracing::warn!("[xdp] was added: it takes effect at the next start"),
            _ => {}
        }
    }

    /// The server's own sockets (listeners, metrics, admin), which relayed
    /// traffic must never reach.
    fn services(&self) -> Vec<SocketAddr> {
        let mut services: Vec<SocketAddr> = self
            .listening
            .lock()
            .map(|l| l.iter().flatten().map(|(_, a, _)| *a).collect())
            .unwrap_or_default();
        services.extend_from_slice(&self.extra_services);
        services
    }

    /// Opens listeners the new configuration adds and closes the ones it
    /// drops; the others (and their clients) are untouched.
    fn reload_listeners(&self, config: &Config) -> io::Result<()> {
        let Ok(mut listening) = self.listening.lock() else {
            return Ok(());
        };
        let same = |a: &crate::config::Listen, b: &crate::config::Listen| {
            a.transport == b.transport
                && a.address == b.address
                && a.autodetect == b.autodetect
                && a.proxy_protocol == b.proxy_protocol
        };
        for (index, slot) in listening.iter_mut().enumerate() {
            if let Some((listen, addr, _)) = slot
                && !config.listen.iter().any(|l| same(l, listen))
            {
                tracing::info!("closing listener {:?} {addr}", listen.transport);
                for c in &self.controls {
                    let _ = c.send(worker::WorkerControl::RemoveListener(index));
                }
                *slot = None;
            }
        }
        let workers = self.controls.len();
        for listen in &config.listen {
            if let Some((kept, _, _)) = listening.iter_mut().flatten().find(|(l, _, _)| same(l, listen)) {
                // Its realm may have changed; the realm table says so.
                kept.realm.clone_from(&listen.realm);
                continue;
            }
            if listen.transport == Transport::Udp {
                let (addr, sockets) = bind_udp(listen.address, workers)?;
                let kept = duplicates(sockets.iter().map(AsFd::as_fd))?;
                for (c, socket) in self.controls.iter().zip(sockets) {
                    let _ = c.send(worker::WorkerControl::AddUdpListener(socket));
                }
                listening.push(Some((listen.clone(), addr, kept)));
            } else {
                let (addr, setups) = bind_stream(listen, config, &self.stream_context, workers)?;
                let kept = duplicates(setups.iter().map(|s| s.listener.as_fd()))?;
                for (c, setup) in self.controls.iter().zip(setups) {
                    let _ = c.send(worker::WorkerControl::AddStreamListener(setup));
                }
                listening.push(Some((listen.clone(), addr, kept)));
            }
        }
        Ok(())
    }

    /// The names of the realms other than the default in the configuration
    /// in force (the fleet store reads their users and secrets too).
    pub fn other_realms(&self) -> Vec<String> {
        self.applied
            .lock()
            .map(|a| a.0.realms.iter().skip(1).map(|t| t.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The bound UDP, TCP and TLS listeners whose new clients `realm`
    /// serves: those naming it, and for the default realm those naming
    /// none (RFC 5780's extra sockets left out).
    pub fn listeners_of(&self, realm: &str, default: bool) -> (Vec<SocketAddr>, Vec<SocketAddr>, Vec<SocketAddr>) {
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        let Ok(listening) = self.listening.lock() else {
            return out;
        };
        for (l, addr, _) in listening.iter().flatten() {
            let serves = match &l.realm {
                Some(r) => r == realm,
                None => default,
            };
            if !serves || l.alternate.is_some() {
                continue;
            }
            match l.transport {
                Transport::Udp => out.0.push(*addr),
                Transport::Tcp => out.1.push(*addr),
                Transport::Tls => out.2.push(*addr),
            }
        }
        out
    }

    /// A process started by a live upgrade: every worker starts serving.
    pub fn serve(&self) {
        if let Ok(mut gates) = self.gates.lock() {
            for g in gates.drain(..) {
                let _ = g.send(true);
            }
        }
    }

    /// A live upgrade: every worker exports its UDP clients' allocations and
    /// holds still until [`Frozen::commit`] or [`Frozen::resume`] (or
    /// `timeout`, which resumes).
    pub fn freeze(&self, timeout: Duration) -> io::Result<Frozen> {
        if self.xdp.lock().is_ok_and(|x| x.is_some()) {
            return Err(io::Error::other(
                "[xdp] is attached: a live upgrade cannot take the fast path over; restart instead",
            ));
        }
        let listeners = {
            let listening = self.listening.lock().map_err(|_| io::Error::other("poisoned"))?;
            let mut entries = Vec::new();
            for (id, slot) in listening.iter().enumerate() {
                if let Some((listen, addr, fds)) = slot {
                    entries.push((
                        id as u16,
                        listen.transport,
                        listen.address,
                        *addr,
                        duplicates(fds.iter().map(AsFd::as_fd))?,
                    ));
                }
            }
            entries
        };
        let mut verdicts = Vec::new();
        let (export_tx, exports_rx) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut frozen = Frozen {
            exports: Vec::new(),
            listeners,
            nonce_secret: self.nonce_secret,
            port_seed: self.port_seed,
            verdicts: Vec::new(),
            done,
        };
        for c in &self.controls {
            let (verdict_tx, verdict) = std::sync::mpsc::channel();
            verdicts.push(verdict_tx);
            let _ = c.send(worker::WorkerControl::Freeze {
                export: export_tx.clone(),
                verdict,
                timeout,
                done: done_tx.clone(),
            });
        }
        frozen.verdicts = verdicts;
        for _ in &self.controls {
            match exports_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(e)) => frozen.exports.push(e),
                Ok(Err(e)) => {
                    frozen.resume();
                    return Err(e);
                }
                Err(_) => {
                    frozen.resume();
                    return Err(io::Error::other("a worker did not export its state"));
                }
            }
        }
        // Workers answer in any order; each state goes to the new worker
        // with the same index.
        frozen.exports.sort_by_key(|e| e.worker);
        Ok(frozen)
    }

    /// Open TCP and TLS client connections (all workers).
    pub fn open_connections(&self) -> usize {
        self.stream_context.limits.total()
    }

    /// Every worker's allocations (admin API).
    pub fn allocations(&self) -> Vec<crate::proto::server::AllocationInfo> {
        let (tx, rx) = std::sync::mpsc::channel();
        for c in &self.controls {
            let _ = c.send(worker::WorkerControl::ListAllocations { reply: tx.clone() });
        }
        let mut all = Vec::new();
        for _ in &self.controls {
            if let Ok(list) = rx.recv_timeout(Duration::from_secs(2)) {
                all.extend(list);
            }
        }
        all
    }

    /// Deletes allocations by user and/or client address on every worker.
    pub fn kick(&self, user: Option<&str>, client: Option<SocketAddr>, realm: Option<&str>) -> usize {
        let (tx, rx) = std::sync::mpsc::channel();
        for c in &self.controls {
            let _ = c.send(worker::WorkerControl::Kick {
                user: user.map(str::to_owned),
                client,
                realm: realm.map(str::to_owned),
                reply: tx.clone(),
            });
        }
        (0..self.controls.len())
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(2)).ok())
            .sum()
    }

    /// Stops granting new allocations on every worker.
    pub fn drain(&self, alternate: Option<SocketAddr>) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in &self.controls {
            let _ = c.send(worker::WorkerControl::Drain { alternate });
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where a full or draining node sends Allocates: the fleet's least
    /// loaded other node, or none.
    pub fn set_fleet_alternate(&self, server: Option<SocketAddr>) {
        for c in &self.controls {
            let _ = c.send(worker::WorkerControl::FleetAlternate(server));
        }
    }
}

/// Every realm's credentials, peer policy and bandwidth per allocation,
/// and the realm of each listener (by listener id) and origin. The fleet
/// store's users, secrets and revocations are the default realm's.
pub fn realms(
    config: &Config,
    nonce_secret: &[u8; 32],
    store: &StoreContents,
    services: &[SocketAddr],
    listening: &[Option<Listening>],
) -> io::Result<Arc<Realms>> {
    let base = peer_policy(config, services.to_vec());
    let mut built = Vec::new();
    for (i, table) in config.realm_tables().into_iter().enumerate() {
        let users = table.users.iter().map(|(u, p)| (u.as_str(), p.as_str()));
        let (stored_users, stored_secrets) = if i == 0 {
            (&store.users[..], &store.secrets[..])
        } else {
            match store.realms.iter().find(|r| r.name == table.name) {
                Some(r) => (&r.users[..], &r.secrets[..]),
                None => (&[][..], &[][..]),
            }
        };
        let mut secrets = table.secrets.clone();
        secrets.extend(stored_secrets.iter().filter(|s| !table.secrets.contains(s)).cloned());
        let credentials = Credentials::new(&table.name, users, &secrets, nonce_secret, config.auth.nonce_lifetime)
            .map_err(|e| {
                io::Error::other(format!(
                    "realm {:?}: users.{}: password cannot be prepared",
                    table.name, e.0
                ))
            })?
            .with_md5_users(stored_users.iter().cloned())
            .with_revoked(revoked_in(&store.revoked, &table.name));
        let policy = if table.peers == crate::config::Peers::default() {
            base.clone()
        } else {
            peer_policy_with(config, &table.peers, services.to_vec())
        };
        built.push(Realm {
            credentials: Arc::new(credentials),
            policy,
            allocation_bandwidth: table.allocation_bandwidth(&config.limits),
        });
    }
    let mut built = built.into_iter();
    let default = built.next().ok_or_else(|| io::Error::other("no realm configured"))?;
    let listeners: Vec<Option<&str>> = listening
        .iter()
        .map(|slot| slot.as_ref().and_then(|(l, _, _)| l.realm.as_deref()))
        .collect();
    let origins: Vec<(&str, &str)> = config
        .realms
        .iter()
        .flat_map(|r| r.origins.iter().map(|o| (o.as_str(), r.name.as_str())))
        .collect();
    Ok(Arc::new(Realms::new(default, built.collect(), &listeners, &origins)))
}

/// The users revoked in `realm`: those revoked everywhere and those
/// revoked in it (revocations as the fleet store holds them).
fn revoked_in<'a>(revoked: &'a [String], realm: &'a str) -> impl Iterator<Item = String> + 'a {
    revoked
        .iter()
        .filter_map(|r| crate::ops::fleet::decode_scoped(r))
        .filter(move |(_, r)| r.as_deref().is_none_or(|r| r == realm))
        .map(|(user, _)| user)
}

/// Each realm's quotas, for the shared counts.
fn realm_quotas(config: &Config) -> Vec<(String, crate::proto::server::QuotaLimits)> {
    config
        .realms
        .iter()
        .map(|r| (r.name.clone(), r.quota_limits(&config.limits)))
        .collect()
}

/// The peer policy, with the relay addresses as "own" addresses and the
/// listeners and metrics endpoint as the server's own services.
pub fn peer_policy(config: &Config, services: Vec<SocketAddr>) -> PeerPolicy {
    peer_policy_with(config, &crate::config::Peers::default(), services)
}

/// The same, with a realm's own allow and deny ranges added to `[peers]`.
fn peer_policy_with(config: &Config, extra: &crate::config::Peers, services: Vec<SocketAddr>) -> PeerPolicy {
    let r = &config.relay;
    let addresses: Vec<IpAddr> = [
        Some(r.address),
        r.external_address,
        r.ipv6_address,
        r.ipv6_external_address,
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut allow = config.peers.allow.clone();
    allow.extend(extra.allow.iter().copied());
    let mut deny = config.peers.deny.clone();
    deny.extend(extra.deny.iter().copied());
    PeerPolicy::new(
        allow,
        deny,
        OwnRelays {
            addresses,
            port_low: r.ports.low,
            port_high: r.ports.high,
            services,
        },
    )
}

fn random_secret() -> io::Result<[u8; 32]> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(s)
}

/// Binds every listener for every worker and starts the workers. Port 0 in
/// a listen address is resolved once, so all workers share the port.
/// Refuses an address another process already serves. SO_REUSEPORT lets
/// every socket of one user share a port, so a second turnstile started
/// on the same address would silently split the clients with the first:
/// a socket bound without it first finds out whether anyone is there.
fn ensure_free(transport: &str, address: SocketAddr) -> io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    if address.port() == 0 {
        return Ok(());
    }
    let (kind, protocol) = if transport == "udp" {
        (Type::DGRAM, Protocol::UDP)
    } else {
        (Type::STREAM, Protocol::TCP)
    };
    let probe = Socket::new(Domain::for_address(address), kind, Some(protocol))?;
    if address.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    match probe.bind(&address.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            e.kind(),
            format!(
                "listen {transport} {address}: address already in use by another process (another turnstile or TURN server?)"
            ),
        )),
        Err(e) => Err(io::Error::new(e.kind(), format!("listen {transport} {address}: {e}"))),
    }
}

/// Names the listener in a bind error.
fn naming(transport: &str, address: SocketAddr) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("listen {transport} {address}: {e}"))
}

/// Binds one UDP listen address once per worker (port 0 resolved once).
fn bind_udp(address: SocketAddr, workers: usize) -> io::Result<(SocketAddr, Vec<std::net::UdpSocket>)> {
    ensure_free("udp", address)?;
    let first = udp::bind_reuseport(address).map_err(naming("udp", address))?;
    let addr = first.local_addr()?;
    tracing::info!("listening udp {addr}");
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(udp::bind_reuseport(addr).map_err(naming("udp", addr))?);
    }
    Ok((addr, sockets))
}

/// What stream listeners need beyond their address.
struct StreamContext {
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    limits: Arc<stream::ConnLimits>,
}

/// Binds one TCP/TLS listen address once per worker, with its settings.
fn bind_stream(
    listen: &crate::config::Listen,
    config: &Config,
    ctx: &StreamContext,
    workers: usize,
) -> io::Result<(SocketAddr, Vec<worker::StreamListenerSetup>)> {
    let name = transport_name(listen.transport);
    ensure_free(name, listen.address)?;
    let first = stream::bind_reuseport(listen.address).map_err(naming(name, listen.address))?;
    let addr = first.local_addr()?;
    tracing::info!("listening {name} {addr}");
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(stream::bind_reuseport(addr).map_err(naming(name, addr))?);
    }
    Ok((addr, stream_setups(listen, config, ctx, sockets)?))
}

pub fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
    }
}

/// Each worker's TCP/TLS listener socket with the entry's settings.
fn stream_setups(
    listen: &crate::config::Listen,
    config: &Config,
    ctx: &StreamContext,
    sockets: Vec<std::net::TcpListener>,
) -> io::Result<Vec<worker::StreamListenerSetup>> {
    let is_tls = listen.transport == Transport::Tls;
    if is_tls && ctx.acceptor.is_none() {
        return Err(io::Error::other(format!(
            "listen {}: tls needs a [tls] certificate",
            listen.address
        )));
    }
    let channel_range = if config.compat.legacy_channel_numbers {
        ChannelRange::Rfc5766
    } else {
        ChannelRange::Rfc8656
    };
    let setups = sockets
        .into_iter()
        .map(|listener| worker::StreamListenerSetup {
            listener,
            settings: stream::StreamSettings {
                tls: if is_tls { ctx.acceptor.clone() } else { None },
                autodetect: listen.autodetect,
                proxy_protocol: listen.proxy_protocol,
                limits: ctx.limits.clone(),
                handshake_timeout: Duration::from_secs(config.limits.handshake_timeout),
                send_buffer: config.limits.stream_send_buffer,
                channel_range,
            },
        })
        .collect();
    Ok(setups)
}

/// `extra_services` are sockets bound elsewhere (the metrics listener) that
/// relayed traffic must never reach.
pub fn start(config: &Config, extra_services: &[SocketAddr]) -> io::Result<Started> {
    start_with(config, extra_services, None)
}

/// The running process's socket for this listen entry, if it handed one
/// over: the address it is bound to and each worker's socket.
fn take_inherited(
    inheritance: &mut Option<Inheritance>,
    listen: &crate::config::Listen,
    workers: usize,
    id: usize,
    map: &mut Vec<Option<ListenerId>>,
) -> io::Result<Option<(SocketAddr, Vec<OwnedFd>)>> {
    let Some(inh) = inheritance.as_mut() else {
        return Ok(None);
    };
    let Some(i) = inh
        .listeners
        .iter()
        .position(|(_, t, a, fds)| *t == listen.transport && *a == listen.address && fds.len() == workers)
    else {
        return Ok(None);
    };
    let (old, _, _, fds) = inh.listeners.swap_remove(i);
    let old = usize::from(old);
    if map.len() <= old {
        map.resize(old + 1, None);
    }
    if let Some(slot) = map.get_mut(old) {
        *slot = Some(ListenerId(id as u16));
    }
    let addr = socket2::SockRef::from(fds.first().ok_or_else(|| io::Error::other("no socket"))?)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    tracing::info!("listening {} {addr} (taken over)", transport_name(listen.transport));
    Ok(Some((addr, fds)))
}

/// Like [`start`]; with an inheritance, in a process started by a live
/// upgrade: the running process's sockets are used instead of binding
/// anew, its state goes into the workers, and the workers wait for
/// [`Started::serve`].
pub fn start_with(
    config: &Config,
    extra_services: &[SocketAddr],
    mut inheritance: Option<Inheritance>,
) -> io::Result<Started> {
    let mut workers = config.worker_count();
    if let Some(inh) = &inheritance
        && inh.workers != workers
    {
        tracing::warn!(
            configured = workers,
            running = inh.workers,
            "workers changed: keeping the running process's count until the next restart (each worker's state goes to its successor)"
        );
        workers = inh.workers;
    }
    // The running process's listener ids → this process's.
    let mut map: Vec<Option<ListenerId>> = Vec::new();
    let mut per_worker: Vec<Vec<std::net::UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    // Listener ids are positions in this list: UDP first, then TCP/TLS, then
    // whatever reloads add; removed ones keep their place as `None`.
    let mut listening: Vec<Option<Listening>> = Vec::new();
    let mut udp_bound = Vec::new();
    for listen in config.listen.iter().filter(|l| l.transport == Transport::Udp) {
        let (addr, sockets) = match take_inherited(&mut inheritance, listen, workers, listening.len(), &mut map)? {
            Some((addr, fds)) => (addr, fds.into_iter().map(std::net::UdpSocket::from).collect()),
            None => bind_udp(listen.address, workers)?,
        };
        udp_bound.push(addr);
        let kept = duplicates(sockets.iter().map(AsFd::as_fd))?;
        listening.push(Some((listen.clone(), addr, kept)));
        for (slot, socket) in per_worker.iter_mut().zip(sockets) {
            slot.push(socket);
        }
    }

    let certificates = match &config.tls {
        Some(t) => Some(tls::CertStore::load(&t.certificate, &t.private_key)?),
        None => None,
    };
    let acceptor = match &certificates {
        Some(store) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(store.clone())?)),
        None => None,
    };
    let ctx = StreamContext {
        acceptor,
        limits: stream::ConnLimits::new(config.limits.max_connections, config.limits.max_connections_per_ip),
    };
    let channel_range = if config.compat.legacy_channel_numbers {
        ChannelRange::Rfc5766
    } else {
        ChannelRange::Rfc8656
    };
    let mut per_worker_streams: Vec<Vec<worker::StreamListenerSetup>> = (0..workers).map(|_| Vec::new()).collect();
    let (mut tcp_bound, mut tls_bound) = (Vec::new(), Vec::new());
    for listen in config.listen.iter().filter(|l| l.transport != Transport::Udp) {
        let (addr, setups) = match take_inherited(&mut inheritance, listen, workers, listening.len(), &mut map)? {
            Some((addr, fds)) => {
                let sockets = fds.into_iter().map(std::net::TcpListener::from).collect();
                (addr, stream_setups(listen, config, &ctx, sockets)?)
            }
            None => bind_stream(listen, config, &ctx, workers)?,
        };
        if listen.transport == Transport::Tls {
            tls_bound.push(addr)
        } else {
            tcp_bound.push(addr)
        }
        let kept = duplicates(setups.iter().map(|s| s.listener.as_fd()))?;
        listening.push(Some((listen.clone(), addr, kept)));
        for (slot, setup) in per_worker_streams.iter_mut().zip(setups) {
            slot.push(setup);
        }
    }

    if let Some(inh) = &inheritance {
        for (_, t, a, _) in &inh.listeners {
            tracing::info!("listen {} {a} is no longer configured: closed", transport_name(*t));
        }
    }
    let (nonce_secret, port_seed) = match &inheritance {
        // Outstanding nonces and reservation tokens stay good.
        Some(inh) => (inh.nonce_secret, inh.port_seed),
        None => (random_secret()?, random_secret()?),
    };
    let mut states: Vec<Option<WorkerInheritance>> = match inheritance {
        Some(inh) => inh.states.into_iter().map(Some).collect(),
        None => Vec::new(),
    };
    let upgrading = !states.is_empty();
    let nat = nat_discovery(config, &listening);
    let (restored_tx, restored_rx) = std::sync::mpsc::channel();
    let mut gates = Vec::new();
    let mut services = udp_bound.clone();
    services.extend_from_slice(&tcp_bound);
    services.extend_from_slice(&tls_bound);
    services.extend_from_slice(extra_services);
    let realms = realms(config, &nonce_secret, &StoreContents::default(), &services, &listening)?;
    let quotas = Arc::new(Quotas::with_limits(config.limits.quota_limits()));
    quotas.set_realms(&config.realm, realm_quotas(config));
    let r = &config.relay;
    let relay_v4 = Some(RelayAddress {
        bind: r.address,
        external: r.external_address,
    });
    let relay_v6 = r.ipv6_address.map(|bind| RelayAddress {
        bind,
        external: r.ipv6_external_address,
    });
    let software = (!config.software.is_empty()).then(|| config.software.clone());
    let (low, high) = (u32::from(r.ports.low), u32::from(r.ports.high));
    let span = high - low + 1;
    let fast_path = load_xdp(config, &udp_bound)?;
    let (status_tx, status_rx) = match config.store {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::channel(10_000);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let mut own: Vec<IpAddr> = vec![r.address];
    own.extend(r.external_address);
    let (handoff_senders, mut handoff_receivers): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
    handoff_receivers.reverse();
    let (lenders, mut lend_receivers): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
    lend_receivers.reverse();
    let mut controls = Vec::new();
    for (index, (udp, streams)) in per_worker.into_iter().zip(per_worker_streams).enumerate() {
        // Each worker hands out its own slice of the relay port range.
        let i = index as u32;
        let n = workers as u32;
        let slice_low = low + span * i / n;
        let slice_high = low + span * (i + 1) / n - 1;
        let server_config = ServerConfig {
            software: software.clone(),
            relay_v4,
            relay_v6,
            ports: (slice_low as u16, slice_high as u16),
            max_lifetime: config.limits.max_lifetime,
            max_permissions: config.limits.permissions_per_allocation,
            max_channels: config.limits.channels_per_allocation,
            max_connections: config.limits.connections_per_allocation,
            tcp_relay: config.relay.tcp,
            channel_range,
            worker_index: index as u8,
            port_seed,
            unauthenticated: config.limits.unauthenticated(workers),
            allocation_bandwidth: config.limits.allocation_bandwidth(),
            worker_bandwidth: config.limits.worker_bandwidth(workers),
            idle_timeout: Duration::from_secs(config.limits.idle_timeout),
            mobility: config.auth.mobility,
        };
        let server = Server::with_realms(server_config, realms.clone(), quotas.clone());
        let handoff_receiver = handoff_receivers
            .pop()
            .ok_or_else(|| io::Error::other("worker count"))?;
        let (control_tx, control) = tokio::sync::mpsc::unbounded_channel();
        controls.push(control_tx);
        worker::spawn(worker::WorkerSetup {
            index,
            udp,
            streams,
            server,
            handoff_senders: handoff_senders.clone(),
            handoff_receiver,
            control,
            coalesce_wakeups: Duration::from_micros(u64::from(config.performance.coalesce_wakeups_us)),
            offload: offload_for(fast_path.as_ref(), index, workers, &own)?,
            statuses: status_tx.clone(),
            lenders: lenders.clone(),
            lend_requests: lend_receivers.pop().ok_or_else(|| io::Error::other("worker count"))?,
            nat: nat.clone(),
            inherited: if upgrading {
                let state = states
                    .get_mut(index)
                    .and_then(Option::take)
                    .unwrap_or_else(|| WorkerInheritance {
                        core: crate::proto::server::snapshot::Snapshot::empty(crate::io::handover::unix_ms()),
                        relays: Vec::new(),
                        streams: Vec::new(),
                        tcp_relays: Vec::new(),
                        peers: Vec::new(),
                    });
                let (go_tx, go) = std::sync::mpsc::channel();
                gates.push(go_tx);
                Some((
                    Inherited {
                        core: state.core,
                        relays: state.relays,
                        streams: state.streams,
                        tcp_relays: state.tcp_relays,
                        peers: state.peers,
                        listeners: map.clone(),
                        revoke: config.auth.revoke_on_reload,
                    },
                    worker::StartGate {
                        restored: restored_tx.clone(),
                        go,
                    },
                ))
            } else {
                None
            },
        })?;
    }
    if upgrading {
        let mut adopted = 0;
        for _ in 0..workers {
            match restored_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(n)) => adopted += n,
                Ok(Err(e)) => return Err(io::Error::other(format!("state not restored: {e}"))),
                Err(_) => return Err(io::Error::other("a worker did not restore its state")),
            }
        }
        tracing::info!(allocations = adopted, "state taken over");
    }
    Ok(Started {
        udp: udp_bound,
        tcp: tcp_bound,
        tls: tls_bound,
        certificates,
        quotas,
        controls,
        nonce_secret,
        listening: std::sync::Mutex::new(listening),
        port_seed,
        gates: std::sync::Mutex::new(gates),
        extra_services: extra_services.to_vec(),
        stream_context: ctx,
        xdp: std::sync::Mutex::new(fast_path),
        applied: std::sync::Mutex::new((config.clone(), StoreContents::default())),
        draining: std::sync::atomic::AtomicBool::new(false),
        statuses: std::sync::Mutex::new(status_rx),
    })
}

/// RFC 5780: for each UDP listener A:P that offers it, the group of four
/// sockets A:P, B:P, A:P', B:P' (B the alternate address, P' the alternate
/// port), each with the sockets that answer its CHANGE-REQUESTs.
fn nat_discovery(
    config: &Config,
    listening: &[Option<Listening>],
) -> Vec<(ListenerId, crate::proto::server::NatDiscovery)> {
    let Some(other) = config.stun.alternate_address else {
        return Vec::new();
    };
    let id_of = |addr: SocketAddr| {
        listening.iter().enumerate().find_map(|(i, l)| {
            let (listen, bound, _) = l.as_ref()?;
            (listen.transport == Transport::Udp && *bound == addr).then_some((ListenerId(i as u16), addr))
        })
    };
    let mut out = Vec::new();
    for a in config.nat_primaries() {
        let p2 = config.alternate_port(a);
        let group = [
            a,
            SocketAddr::new(other, a.port()),
            SocketAddr::new(a.ip(), p2),
            SocketAddr::new(other, p2),
        ];
        let Some(members) = group.iter().map(|g| id_of(*g)).collect::<Option<Vec<_>>>() else {
            continue;
        };
        for &(id, local) in &members {
            let find = |ip_same: bool, port_same: bool| {
                members
                    .iter()
                    .find(|(_, m)| (m.ip() == local.ip()) == ip_same && (m.port() == local.port()) == port_same)
                    .copied()
            };
            if let (Some(change_ip), Some(change_port), Some(change_both)) =
                (find(false, true), find(true, false), find(false, false))
            {
                out.push((
                    id,
                    crate::proto::server::NatDiscovery {
                        local,
                        change_ip,
                        change_port,
                        change_both,
                    },
                ));
            }
        }
    }
    out
}

/// Loads and attaches the fast path when `[xdp]` asks for it.
#[cfg(feature = "xdp")]
fn load_xdp(config: &Config, udp: &[SocketAddr]) -> io::Result<Option<FastPath>> {
    let Some(x) = &config.xdp else {
        return Ok(None);
    };
    let mut ports: Vec<u16> = udp.iter().filter(|a| a.is_ipv4()).map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    let relay = (config.relay.ports.low, config.relay.ports.high);
    let program = std::sync::Arc::new(crate::io::xdp::kernel::Program::load(
        &x.interfaces,
        x.mode,
        &ports,
        relay,
    )?);
    // The program's own counters, once a second, for as long as it is attached.
    let weak = std::sync::Arc::downgrade(&program);
    std::thread::Builder::new()
        .name("turnstile-xdp".into())
        .spawn(move || {
            while let Some(p) = weak.upgrade() {
                let counts = p.passed();
                drop(p);
                for (reason, n) in crate::io::xdp::kernel::PASS_REASONS.iter().zip(counts) {
                    metrics::counter!("turnstile_xdp_passed_total", "reason" => *reason).absolute(n);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
    Ok(Some(program))
}

#[cfg(not(feature = "xdp"))]
fn load_xdp(config: &Config, _udp: &[SocketAddr]) -> io::Result<Option<FastPath>> {
    match config.xdp {
        Some(_) => Err(io::Error::other(
            "[xdp] is set, but this turnstile was built without the xdp feature",
        )),
        None => Ok(None),
    }
}

/// Worker `index`'s handle on the fast path's maps and its share of the
/// counter slots.
#[cfg(feature = "xdp")]
fn offload_for(
    fast_path: Option<&FastPath>,
    index: usize,
    workers: usize,
    own: &[IpAddr],
) -> io::Result<Option<worker::Offload>> {
    let Some(p) = fast_path else {
        return Ok(None);
    };
    let max = crate::io::xdp::kernel::MAX_BINDINGS as usize;
    let slots = (max * index / workers) as u32..(max * (index + 1) / workers) as u32;
    Ok(Some(worker::Offload {
        table: Box::new(p.table()?),
        slots,
        own: own.to_vec(),
    }))
}

#[cfg(not(feature = "xdp"))]
fn offload_for(
    _fast_path: Option<&FastPath>,
    _index: usize,
    _workers: usize,
    _own: &[IpAddr],
) -> io::Result<Option<worker::Offload>> {
    Ok(None)
}
