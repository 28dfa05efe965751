//! The sans-IO TURN server core (RFC 8656 over RFC 8489): packets and time
//! in, decisions out. It owns no socket and reads no clock; the drivers in
//! `crate::io` feed it and carry out what it returns.
//!
//! The two hot calls return a routing decision over the caller's buffer:
//! - [`Server::handle_client_packet`]: a datagram (or stream frame) from a
//!   client. The answer is a reply written into the caller's `out` buffer or
//!   a routing decision for relayed data (which relay socket, which peer,
//!   which byte range of the caller's packet).
//! - [`Server::handle_peer_packet`]: a datagram from a peer on a relay
//!   socket, received with headroom so the ChannelData or Data-indication
//!   header is written in place in front of it.
//!
//! Everything else goes through one seam (`seam.rs`): [`Server::handle`]
//! takes an [`Input`], [`Server::poll_output`] gives [`Output`]s (work for
//! the driver and state changes to mirror), and [`Server::poll_timeout`] /
//! [`Server::handle_timeout`] carry every deadline (`timers.rs`).
//!
//! Relayed data is never copied or heap-allocated here.

mod admin_view;
mod allocate;
pub mod allocation;
pub mod binding;
pub mod credentials;
mod mobility;
mod outcome;
pub mod peer_policy;
mod permissions;
pub mod ports;
pub mod quota;
pub mod rate;
pub mod realm;
mod relay_path;
mod responses;
mod seam;
pub mod snapshot;
mod stats;
mod tcp_relay;
mod timers;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use slab::Slab;

pub use allocation::{Allocation, ClientKey, ListenerId, Relay, RelayId};
pub use binding::NatDiscovery;
pub use credentials::{AuthFailure, Credentials, IntegritySuite};
pub use outcome::{ClientOutcome, DropReason, PeerOutcome};
pub use peer_policy::{OwnRelays, PeerPolicy, PeerRefusal};
pub use quota::{FleetCounts, QuotaLimits, QuotaRefusal, Quotas};
pub use rate::{Rate, SourceBudgets, TokenBucket};
pub use realm::{Realm, RealmIndex, Realms};
pub use seam::{BindResult, EndReason, Input, Output};
pub use stats::{Gauges, REQUEST_METHODS, RESPONSE_CODES, Stats};
pub use tcp_relay::CONNECT_TIMEOUT;
pub use timers::CloseReason;

use crate::proto::auth::LongTermKey;
use crate::proto::channel_data::{self, ChannelData, ChannelDataError, ChannelRange};
use crate::proto::demux::{PacketKind, classify_in};
use crate::proto::stun::attr::transport;
use crate::proto::stun::{
    AddressFamily, Attribute, BufferTooSmall, Class, Message, MessageWriter, Method, ParseError, TransactionId, kind,
};
use allocation::{BindConflict, family_index};
use ports::RelayPorts;
use responses::*;

/// Default allocation lifetime (RFC 8656 §7.2).
pub const DEFAULT_LIFETIME: u32 = 600;
/// Room a driver leaves in front of a peer datagram: a Data indication's
/// header, XOR-PEER-ADDRESS (IPv6) and DATA header.
pub const PEER_HEADROOM: usize = 20 + 4 + 20 + 4;
/// Room after a peer datagram: padding to a multiple of 4.
pub const PEER_TAILROOM: usize = 3;
/// Attempts to find a bindable relay port before answering 508.
const MAX_BIND_ATTEMPTS: u8 = 8;

/// The two clocks the core needs, given by the driver: a monotonic instant
/// for lifetimes and Unix seconds for nonces and REST expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub instant: Instant,
    pub unix: u64,
}

/// How a listener carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Udp,
    /// TCP or TLS: ChannelData is padded to a multiple of 4.
    Stream,
}

/// Where relay sockets of one address family bind and what they advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayAddress {
    pub bind: IpAddr,
    /// Advertised instead of `bind` behind 1:1 NAT.
    pub external: Option<IpAddr>,
}

/// Everything the core is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Sent as SOFTWARE in responses, if set.
    pub software: Option<String>,
    pub relay_v4: Option<RelayAddress>,
    pub relay_v6: Option<RelayAddress>,
    /// This worker's slice of the relay port range.
    pub ports: (u16, u16),
    /// Longest lifetime granted, seconds.
    pub max_lifetime: u32,
    pub max_permissions: usize,
    pub max_channels: usize,
    /// RFC 6062 peer connections per allocation (Connect and accepted).
    pub max_connections: usize,
    /// Whether RFC 6062 TCP allocations are offered (442 when not).
    pub tcp_relay: bool,
    /// Accepted channel numbers.
    pub channel_range: ChannelRange,
    /// This worker's number, carried in RFC 6062 connection ids.
    pub worker_index: u8,
    /// Keys the relay-port scramble and reservation tokens; shared by all
    /// workers so any of them redeems any token.
    pub port_seed: [u8; 32],
    /// Per-source budget for answers to unauthenticated requests over UDP
    /// (Binding, 401, errors before authentication): this worker's share.
    pub unauthenticated: Rate,
    /// Relayed bytes per allocation, each direction, for [`Server::new`]'s
    /// one realm (a realm table carries each realm's own).
    pub allocation_bandwidth: Rate,
    /// Relayed bytes through this worker, each direction.
    pub worker_bandwidth: Rate,
    /// A TCP or TLS client connection without an allocation must complete
    /// a message this often; with one, a started message must finish
    /// within it.
    pub idle_timeout: Duration,
    /// RFC 8016 mobility: allocations move to a new 5-tuple with their ticket.
    pub mobility: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            software: None,
            relay_v4: Some(RelayAddress {
                bind: IpAddr::from([127, 0, 0, 1]),
                external: None,
            }),
            relay_v6: None,
            ports: (49152, 65535),
            max_lifetime: 3600,
            max_permissions: 128,
            max_channels: 128,
            max_connections: 64,
            tcp_relay: true,
            channel_range: ChannelRange::Rfc8656,
            worker_index: 0,
            port_seed: [7; 32],
            unauthenticated: Rate::OFF,
            allocation_bandwidth: Rate::OFF,
            worker_bandwidth: Rate::OFF,
            idle_timeout: Duration::from_secs(30),
            mobility: false,
        }
    }
}

/// One allocation as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    pub user: String,
    pub realm: String,
    pub client: SocketAddr,
    /// "udp" or "stream" (TCP/TLS) to the client.
    pub transport: &'static str,
    pub relays: Vec<SocketAddr>,
    pub tcp_relay: bool,
    pub age_secs: u64,
    pub expires_in_secs: u64,
    pub permissions: usize,
    pub channels: usize,
    pub traffic: allocation::Traffic,
}

/// The worker that owns an RFC 6062 connection id (its top eight bits):
/// a data connection landing on another worker is handed over to it.
pub const fn connection_owner(connection: u32) -> usize {
    (connection >> 24) as usize
}

/// How long a peer connection waits for its ConnectionBind (RFC 6062 §5.3).
pub const CONNECTION_BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// State of one RFC 6062 peer connection.
#[derive(Debug, Clone)]
struct TcpConnection {
    alloc: usize,
    peer: SocketAddr,
    state: TcpConnectionState,
}

#[derive(Debug, Clone)]
enum TcpConnectionState {
    /// Connect sent to the driver; the response waits for the result, or
    /// is 447 at the deadline (RFC 6062 §5.2).
    Connecting {
        tid: TransactionId,
        fingerprint: bool,
        deadline: Instant,
    },
    /// Connected (or accepted); waiting for the client's ConnectionBind.
    AwaitingBind { deadline: Instant },
    /// Joined to a client data connection.
    Bound,
}

/// What a configuration reload changes in a running core.
#[derive(Debug, Clone)]
pub struct Reconfiguration {
    /// Each realm's credentials, peer policy and bandwidth per allocation,
    /// and how requests find their realm.
    pub realms: Arc<Realms>,
    /// End the allocations the new credentials no longer verify.
    pub revoke: bool,
    pub limits: AllocationLimits,
    /// Unauthenticated answer budget per source, bandwidth of this worker.
    pub rates: [Rate; 2],
}

/// Per-allocation limits that a configuration reload may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationLimits {
    /// Longest lifetime granted, seconds.
    pub max_lifetime: u32,
    pub max_permissions: usize,
    pub max_channels: usize,
    /// RFC 6062 peer connections.
    pub max_connections: usize,
    /// Whether RFC 6062 TCP allocations are offered.
    pub tcp_relay: bool,
    /// See [`ServerConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`ServerConfig::mobility`].
    pub mobility: bool,
}

/// Authentication-failure log lines per second per worker.
pub const AUTH_LOG_PER_SECOND: u32 = 10;

/// Counts the authentication-failure lines of the current second.
#[derive(Debug, Default)]
struct AuthLog {
    second: u64,
    logged: u32,
    suppressed: u64,
}

impl AuthLog {
    /// Whether a line may be written now; with it, how many were left out
    /// since the last one.
    fn admit(&mut self, now_unix: u64) -> Option<u64> {
        if now_unix != self.second {
            self.second = now_unix;
            self.logged = 0;
        }
        if self.logged >= AUTH_LOG_PER_SECOND {
            self.suppressed += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// An Allocate waiting for its relay sockets.
#[derive(Debug, Clone)]
struct PendingAllocate {
    key: ClientKey,
    tid: TransactionId,
    username: String,
    realm: RealmIndex,
    credential: LongTermKey,
    algorithm: crate::proto::auth::PasswordAlgorithm,
    suite: IntegritySuite,
    rest_expiry: Option<u64>,
    fingerprint: bool,
    lifetime: u32,
    sockets: [Option<(RelayId, SocketAddr)>; 2],
    bound: [bool; 2],
    /// ADDRESS-ERROR-CODE for an additional family that could not be served.
    family_error: Option<AddressFamily>,
    even_port: bool,
    reserve_pair: bool,
    /// Index of the family the reservation (EVEN-PORT, RESERVATION-TOKEN) applies to.
    primary: usize,
    /// The redeemed reservation's port is fixed: no retry on another port.
    fixed_port: bool,
    dont_fragment: bool,
    /// RFC 6062 TCP relay.
    tcp: bool,
    /// RFC 8016: the client asked for a mobility ticket.
    mobility: bool,
    attempts: u8,
    /// The driver's answers for this round's sockets.
    results: [Option<BindResult>; 2],
}

/// One worker's TURN server.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    realms: Arc<Realms>,
    /// Whether relayed packets pass through bandwidth buckets at all, and
    /// this worker's share of `bps_capacity`.
    shaping: relay_path::Shaping,
    quotas: Arc<Quotas>,
    listeners: Vec<ListenerKind>,
    /// What each listener is called in logs and the admin API: udp, tcp, tls.
    listener_names: Vec<&'static str>,
    /// RFC 5780 set-up of each UDP listener that offers it.
    nat: Vec<Option<binding::NatDiscovery>>,
    /// Rate limit of the authentication-failure log lines.
    auth_log: AuthLog,
    ports: [RelayPorts; 2],
    allocations: Slab<Allocation>,
    by_client: FxHashMap<ClientKey, usize>,
    /// Relay socket → allocation (`None` while its Allocate is pending).
    relays: Slab<Option<usize>>,
    timers: BinaryHeap<Reverse<(Instant, timers::Timer)>>,
    /// Idle and slow-message clocks of TCP/TLS client connections.
    streams: FxHashMap<ClientKey, timers::StreamClock>,
    outputs: VecDeque<Output>,
    /// Allocates waiting for their relay sockets, by their relay ids and
    /// their client.
    pending: Slab<PendingAllocate>,
    pending_by_relay: FxHashMap<RelayId, usize>,
    pending_by_client: FxHashMap<ClientKey, usize>,
    tcp_connections: FxHashMap<u32, TcpConnection>,
    next_connection: u32,
    /// RFC 8016: allocations by the id their mobility ticket names.
    by_mobility: FxHashMap<u64, usize>,
    /// Seals mobility tickets and draws their ids (from the port seed, so
    /// every worker checks any worker's ticket).
    mobility_key: crate::proto::stun::HmacSha256,
    mobility_counter: u64,
    /// Set while draining, with the alternate server if there is one.
    draining: Option<Option<SocketAddr>>,
    /// The fleet's least loaded other node: where a full or draining node
    /// sends Allocates (300 Try Alternate) instead of refusing them.
    fleet_alternate: Option<SocketAddr>,
    stats: Stats,
    /// Answer budgets of unauthenticated sources (amplification).
    budgets: SourceBudgets,
    /// This worker's bandwidth buckets (to peers, to clients), from the first packet.
    worker_bandwidth: Option<[TokenBucket; 2]>,
}

/// What the request handlers produce before it becomes a ClientOutcome.
type RequestResult = Result<ClientOutcome, Refusal>;

const BAD_REQUEST: Refusal = Refusal::BadRequest;

/// Authentication context of a response: MESSAGE-INTEGRITY of the request's suite.
#[derive(Clone, Copy)]
struct Signing<'k> {
    key: &'k LongTermKey,
    suite: IntegritySuite,
}

impl Server {
    /// A server of one realm: `credentials` and `policy`, with the
    /// configuration's bandwidth per allocation.
    pub fn new(config: ServerConfig, credentials: Arc<Credentials>, policy: PeerPolicy, quotas: Arc<Quotas>) -> Server {
        let realms = Realms::single(Realm {
            credentials,
            policy,
            allocation_bandwidth: config.allocation_bandwidth,
        });
        Server::with_realms(config, Arc::new(realms), quotas)
    }

    /// A server of several realms.
    pub fn with_realms(config: ServerConfig, realms: Arc<Realms>, quotas: Arc<Quotas>) -> Server {
        let (low, high) = config.ports;
        let mut seed6 = config.port_seed;
        seed6[0] ^= 0x5a;
        let ports = [
            RelayPorts::new(low, high, &config.port_seed),
            RelayPorts::new(low, high, &seed6),
        ];
        let mut seed = [0u8; 8];
        seed.copy_from_slice(config.port_seed.get(8..16).unwrap_or(&[0; 8]));
        let budgets = SourceBudgets::new(config.unauthenticated, u64::from_le_bytes(seed));
        let mut ticket_seed = config.port_seed;
        ticket_seed[31] ^= 0x8f;
        let mobility_key = crate::proto::stun::integrity::hmac_sha256(&ticket_seed);
        Server {
            shaping: relay_path::Shaping::of(&realms, config.worker_bandwidth),
            config,
            realms,
            quotas,
            listeners: Vec::new(),
            listener_names: Vec::new(),
            nat: Vec::new(),
            auth_log: AuthLog::default(),
            ports,
            allocations: Slab::new(),
            by_client: FxHashMap::default(),
            relays: Slab::new(),
            timers: BinaryHeap::new(),
            streams: FxHashMap::default(),
            outputs: VecDeque::new(),
            pending: Slab::new(),
            pending_by_relay: FxHashMap::default(),
            pending_by_client: FxHashMap::default(),
            tcp_connections: FxHashMap::default(),
            next_connection: 0,
            by_mobility: FxHashMap::default(),
            mobility_key,
            mobility_counter: 0,
            draining: None,
            fleet_alternate: None,
            stats: Stats::default(),
            budgets,
            worker_bandwidth: None,
        }
    }

    /// Registers a listening socket; its id goes into every [`ClientKey`],
    /// and `name` (udp, tcp, tls) is its clients' transport in logs and the
    /// admin API.
    pub fn add_listener(&mut self, kind: ListenerKind, name: &'static str) -> ListenerId {
        self.listeners.push(kind);
        self.listener_names.push(name);
        ListenerId((self.listeners.len() - 1) as u16)
    }

    /// RFC 5780: Binding requests on this UDP listener may ask for answers
    /// from the other address or port ([`binding::NatDiscovery`]).
    pub fn set_nat_discovery(&mut self, listener: ListenerId, d: binding::NatDiscovery) {
        let i = usize::from(listener.0);
        if self.nat.len() <= i {
            self.nat.resize(i + 1, None);
        }
        if let Some(slot) = self.nat.get_mut(i) {
            *slot = Some(d);
        }
    }

    /// The client transport of a 5-tuple, as logs name it.
    fn transport_name(&self, key: &ClientKey) -> &'static str {
        self.listener_names
            .get(usize::from(key.listener.0))
            .copied()
            .unwrap_or("udp")
    }

    /// A configuration reload: new credentials, peer policy, limits and
    /// rates, applied to requests from now on (allocations keep their keys
    /// and state). With `revoke`, allocations whose credential no longer
    /// verifies end; returns how many.
    pub fn reconfigure(&mut self, r: Reconfiguration) -> usize {
        let mut revoked = self.end_removed_realms(&r.realms);
        let old = std::mem::replace(&mut self.realms, r.realms);
        self.rehome(&old);
        if r.revoke {
            revoked += self.revoke_unverifiable();
        }
        self.withdraw_refused_peers();
        let limits = r.limits;
        self.config.max_lifetime = limits.max_lifetime;
        self.config.max_permissions = limits.max_permissions;
        self.config.max_channels = limits.max_channels;
        self.config.max_connections = limits.max_connections;
        self.config.tcp_relay = limits.tcp_relay;
        self.config.idle_timeout = limits.idle_timeout;
        self.config.mobility = limits.mobility;
        let [unauthenticated, worker_bandwidth] = r.rates;
        self.config.unauthenticated = unauthenticated;
        self.budgets.set_rate(unauthenticated);
        self.config.worker_bandwidth = worker_bandwidth;
        self.shaping = relay_path::Shaping::of(&self.realms, worker_bandwidth);
        if worker_bandwidth.is_off() {
            self.worker_bandwidth = None;
        }
        revoked
    }

    /// Stops granting new allocations (shutdown drain). Existing ones keep
    /// relaying and refreshing. With an alternate server, Allocate is
    /// answered 300 Try Alternate; without, 508.
    pub fn set_draining(&mut self, alternate: Option<SocketAddr>) {
        self.draining = Some(alternate);
    }

    /// Whether relayed packets pass through bandwidth buckets (a fast path
    /// that cannot keep them exact must leave such packets to the core).
    pub fn limits_bandwidth(&self) -> bool {
        self.shaping.on
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// The client's TCP or TLS connection closed: its allocation goes with it
    /// (RFC 8656 §5: the 5-tuple no longer exists).
    fn handle_client_closed(&mut self, key: ClientKey) {
        if let Some(id) = self.by_client.get(&key).copied() {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::ConnectionClosed);
        }
    }

    /// The next piece of work for the driver, or a state change to mirror.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Something happened outside the core: a relay socket bound, a TCP
    /// connection made, accepted or closed, a client connection closed, an
    /// ICMP error. What follows comes out of [`Server::poll_output`].
    pub fn handle(&mut self, now: Now, input: Input) {
        let mut out = [0u8; 1500];
        match input {
            Input::RelayBound { relay, result } => self.relay_bound(now, relay, result),
            Input::TcpConnected { connection, connected } => {
                match self.handle_tcp_connected(now, connection, connected, &mut out) {
                    Some((key, len)) => self.transmit(key, out.get(..len).unwrap_or_default()),
                    // Its allocation is gone meanwhile: the new connection goes too.
                    None if connected => self.outputs.push_back(Output::CloseConnection(connection)),
                    None => {}
                }
            }
            Input::TcpPeerAccepted { relay, peer } => match self.handle_tcp_peer_accepted(now, relay, peer, &mut out) {
                Ok((key, connection, len)) => {
                    self.outputs.push_back(Output::PeerConnectionAccepted {
                        relay,
                        peer,
                        connection,
                    });
                    self.transmit(key, out.get(..len).unwrap_or_default());
                }
                Err(reason) => self
                    .outputs
                    .push_back(Output::PeerConnectionRefused { relay, peer, reason }),
            },
            Input::TcpConnectionClosed { connection } => self.forget_connection(connection),
            Input::ClientClosed { key } => {
                self.streams.remove(&key);
                self.handle_client_closed(key);
            }
            Input::StreamOpened { key } => self.stream_opened(key, now.instant),
            Input::OffloadedTraffic { key, traffic } => self.count_offloaded(key, traffic),
            Input::FleetAlternate { server } => self.fleet_alternate = server,
            Input::StreamProgress {
                key,
                completed,
                partial,
            } => self.stream_progress(key, completed, partial, now.instant),
            Input::RelayIcmp {
                relay,
                peer,
                icmp_type,
                icmp_code,
                info,
            } => {
                if let Some((key, len)) =
                    self.handle_relay_icmp(now.instant, relay, peer, (icmp_type, icmp_code, info), &mut out)
                {
                    self.transmit(key, out.get(..len).unwrap_or_default());
                }
            }
        }
    }

    fn transmit(&mut self, key: ClientKey, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.outputs.push_back(Output::Transmit {
                key,
                bytes: bytes.to_vec(),
            });
        }
    }

    // ----- client side -------------------------------------------------

    /// Handles one packet from a client; any answer is written into `out`.
    pub fn handle_client_packet(&mut self, now: Now, key: ClientKey, packet: &[u8], out: &mut [u8]) -> ClientOutcome {
        match classify_in(packet, self.config.channel_range) {
            PacketKind::ChannelData => self.handle_channel_data(now.instant, &key, packet),
            PacketKind::Stun => {
                // A source whose budget is spent gets nothing for unsigned
                // requests: drop them before any work (nonces, lookups).
                if !self.is_stream(&key)
                    && self.budgets.is_spent(key.client.ip(), now.instant)
                    && Message::parse(packet).is_ok_and(|m| !m.has_integrity() && !m.has_integrity_sha256())
                {
                    self.stats.unauthenticated_bytes_in += packet.len() as u64;
                    self.stats.responses_suppressed += 1;
                    return ClientOutcome::Drop(DropReason::RateLimited);
                }
                let outcome = self.handle_stun(now, key, packet, out);
                let signed = self.count_response(&outcome, out);
                if let (ClientOutcome::Reply { len }, Some(false)) = (&outcome, signed)
                    && !self.is_stream(&key)
                {
                    // An unsigned answer over UDP may go to a spoofed source:
                    // each source gets a budget of such bytes.
                    if !self.pay_unauthenticated(key.client.ip(), packet.len(), *len, now.instant) {
                        return ClientOutcome::Drop(DropReason::RateLimited);
                    }
                }
                outcome
            }
            PacketKind::Other => ClientOutcome::Drop(DropReason::NotTurn),
        }
    }

    /// Takes an unauthenticated answer of `answer` bytes to a `request`-byte
    /// request from `source`'s budget, and counts both; false (counted as
    /// suppressed) when the budget is spent and the answer must not go.
    fn pay_unauthenticated(&mut self, source: IpAddr, request: usize, answer: usize, now: Instant) -> bool {
        self.stats.unauthenticated_bytes_in += request as u64;
        if !self.budgets.take(source, answer, now) {
            self.stats.responses_suppressed += 1;
            return false;
        }
        self.stats.unauthenticated_bytes_out += answer as u64;
        true
    }

    /// Counts an answer by method and code (control plane: the answer is
    /// read back from `out`); tells whether it carries MESSAGE-INTEGRITY.
    fn count_response(&mut self, outcome: &ClientOutcome, out: &[u8]) -> Option<bool> {
        let len = match *outcome {
            ClientOutcome::Reply { len } | ClientOutcome::ConnectionBound { len, .. } => len,
            _ => return None,
        };
        let m = out.get(..len).and_then(|b| Message::parse(b).ok())?;
        let code = m.error_code().ok().flatten().map(|e| e.code).unwrap_or(0);
        self.stats.count_response(m.method(), code);
        Some(m.has_integrity() || m.has_integrity_sha256())
    }

    fn handle_stun(&mut self, now: Now, key: ClientKey, packet: &[u8], out: &mut [u8]) -> ClientOutcome {
        let msg = match Message::parse(packet) {
            Ok(m) => m,
            Err(e) => return ClientOutcome::Drop(DropReason::Malformed(e)),
        };
        if msg.has_fingerprint() && msg.verify_fingerprint().is_err() {
            return ClientOutcome::Drop(DropReason::BadFingerprint);
        }
        match msg.class() {
            Class::Request => {}
            Class::Indication => return self.handle_indication(now.instant, &key, &msg),
            Class::Success | Class::Error => return ClientOutcome::Drop(DropReason::UnexpectedClass),
        }
        self.stats.count_request(msg.method());
        if !msg.unknown_comprehension_required().is_empty() {
            self.stats.count_error(420);
            return write_or_drop(error_response(&msg, 420, "Unknown Attribute", None, out, |w| {
                w.unknown_attributes(msg.unknown_comprehension_required())
            }));
        }
        let method = msg.method();
        if method == Method::BINDING {
            return self.binding(now.instant, key, &msg, out);
        }
        if !matches!(
            method,
            Method::ALLOCATE
                | Method::REFRESH
                | Method::CREATE_PERMISSION
                | Method::CHANNEL_BIND
                | Method::CONNECT
                | Method::CONNECTION_BIND
        ) {
            self.stats.count_error(400);
            return write_or_drop(error_response(&msg, 400, "Unsupported Method", None, out, |_| Ok(())));
        }

        // Long-term authentication; an existing allocation lends its key.
        let alloc_id = self.by_client.get(&key).copied();
        let known = alloc_id
            .and_then(|i| self.allocations.get(i))
            .map(|a| (a.username.as_str(), &a.credential, a.algorithm));
        // An allocation's requests stay in its realm; a new client's realm
        // comes from its ORIGIN or its listener.
        let realm = match alloc_id.and_then(|i| self.allocations.get(i)) {
            Some(a) => a.realm,
            None => self.realms.select(key.listener.0, &msg),
        };
        // A handle of our own, so the result may borrow from it while `self` changes.
        let realms = Arc::clone(&self.realms);
        let creds = &realms.get(realm).credentials;
        let scope = crate::proto::auth::NonceScope {
            client: key.client,
            listener: key.listener.0,
        };
        let authed = match creds.authenticate(&msg, &scope, now.unix, known) {
            Ok(a) => a,
            Err(f) => {
                self.stats.count_auth_failure(f);
                self.log_auth_failure(now.unix, &key, &msg, f);
                return write_or_drop(error_response(&msg, f.code(), f.reason(), None, out, |w| {
                    if f.sends_nonce() {
                        creds.write_challenge(w, &scope, now.unix)
                    } else {
                        Ok(())
                    }
                }));
            }
        };
        // A request that authenticates proves its source address is real.
        self.budgets.earn(key.client.ip(), now.instant);
        let signing_key = authed.key.clone();
        let signing = Signing {
            key: &signing_key,
            suite: authed.suite,
        };

        let result = match method {
            Method::ALLOCATE => self.allocate(now, key, &msg, authed, realm, out),
            Method::CONNECTION_BIND => {
                self.connection_bind(key, alloc_id, &msg, (realm, authed.username), signing, out)
            }
            // RFC 8016: a Refresh from a new 5-tuple with its allocation's ticket.
            Method::REFRESH if alloc_id.is_none() && msg.find(kind::MOBILITY_TICKET).is_some() => {
                self.mobility_refresh(now, key, &msg, (realm, authed.username), signing, out)
            }
            _ => {
                let Some(id) = alloc_id else {
                    return self.refuse(&msg, Refusal::AllocationMismatch, signing, out);
                };
                if self.allocations.get(id).is_some_and(|a| a.username != authed.username) {
                    return self.refuse(&msg, Refusal::WrongCredentials, signing, out);
                }
                match method {
                    Method::REFRESH => self.refresh(now, id, &msg, signing, out),
                    Method::CREATE_PERMISSION => self.create_permission(now.instant, id, &msg, signing, out),
                    Method::CONNECT => self.connect(now.instant, id, &msg),
                    _ => self.channel_bind(now.instant, id, &msg, signing, out),
                }
            }
        };
        match result {
            Ok(outcome) => outcome,
            Err(r) => self.refuse(&msg, r, signing, out),
        }
    }

    /// One info line per authentication failure that is not part of the
    /// normal exchange (the first 401, a stale nonce), for operators and
    /// fail2ban: `authentication failed ip=… port=… transport=… reason=…
    /// user=…`. At most [`AUTH_LOG_PER_SECOND`] a second per worker; the
    /// next line after a quiet spell says how many were left out.
    fn log_auth_failure(&mut self, now_unix: u64, key: &ClientKey, msg: &Message<'_>, f: AuthFailure) {
        if matches!(f, AuthFailure::Challenge | AuthFailure::StaleNonce(_)) {
            return;
        }
        let Some(suppressed) = self.auth_log.admit(now_unix) else {
            return;
        };
        let user = msg.username().ok().flatten().unwrap_or("");
        tracing::info!(
            ip = %key.client.ip(),
            port = key.client.port(),
            transport = self.transport_name(key),
            reason = f.label(),
            suppressed,
            user,
            "authentication failed"
        );
    }

    fn refuse(&mut self, msg: &Message<'_>, r: Refusal, signing: Signing<'_>, out: &mut [u8]) -> ClientOutcome {
        self.stats.count_refusal(r.code(), r.label());
        write_or_drop(error_response(
            msg,
            r.code(),
            r.reason(),
            Some(signing),
            out,
            |_| Ok(()),
        ))
    }

    /// A Binding request; with RFC 5780 on its listener, perhaps answered
    /// from another socket or to another port of the client.
    fn binding(&mut self, now: Instant, key: ClientKey, msg: &Message<'_>, out: &mut [u8]) -> ClientOutcome {
        let software = self.config.software.as_deref();
        let nat = self.nat.get(usize::from(key.listener.0)).copied().flatten();
        let Some(nat) = nat.filter(|_| !self.is_stream(&key)) else {
            // Not offered here (off, or over TCP/TLS): a server without RFC
            // 5780 does not understand its attributes (RFC 8489 §7.3.1).
            let asked = binding::Discovery::requested(msg);
            if !asked.is_empty() {
                self.stats.count_error(420);
                return write_or_drop(error_response(msg, 420, "Unknown Attribute", None, out, |w| {
                    w.unknown_attributes(&asked)
                }));
            }
            return write_or_drop(binding::success(msg, key.client, software, out).ok());
        };
        let Ok(d) = binding::Discovery::of(msg) else {
            self.stats.count_error(400);
            return write_or_drop(error_response(msg, 400, "Bad Request", None, out, |_| Ok(())));
        };
        let (from, origin) = match (d.change_ip, d.change_port) {
            (false, false) => (key.listener, nat.local),
            (true, false) => nat.change_ip,
            (false, true) => nat.change_port,
            (true, true) => nat.change_both,
        };
        let to = SocketAddr::new(key.client.ip(), d.response_port.unwrap_or(key.client.port()));
        let len = match binding::discovery_success(msg, key.client, origin, nat.change_both.1, d.padding, software, out)
        {
            Ok(len) => len,
            Err(_) => return ClientOutcome::Drop(DropReason::NotTurn),
        };
        if (from, to) == (key.listener, key.client) {
            return ClientOutcome::Reply { len };
        }
        // From another socket or to another port: the answer goes out as a
        // transmission, paid from the same per-source budget as a reply.
        self.stats.count_response(Method::BINDING, 0);
        if !self.pay_unauthenticated(key.client.ip(), msg.as_bytes().len(), len, now) {
            return ClientOutcome::Drop(DropReason::RateLimited);
        }
        let bytes = out.get(..len).unwrap_or_default().to_vec();
        self.outputs.push_back(Output::Transmit {
            key: ClientKey {
                listener: from,
                client: to,
            },
            bytes,
        });
        ClientOutcome::Consumed
    }

    fn handle_indication(&mut self, now: Instant, key: &ClientKey, msg: &Message<'_>) -> ClientOutcome {
        match msg.method() {
            Method::BINDING => ClientOutcome::Consumed, // keepalive
            Method::SEND => self.send_indication(now, key, msg),
            _ => ClientOutcome::Drop(DropReason::BadIndication),
        }
    }

    // ----- Allocate ------------------------------------------------------

    // ----- Refresh, CreatePermission, ChannelBind -------------------------

    // ----- RFC 6062: TCP allocations ---------------------------------------

    // ----- peer side ------------------------------------------------------
}
