//! The sans-IO TURN server core (RFC 8656 over RFC 8489): packets and time
//! in, decisions out. It owns no socket and reads no clock; the drivers in
//! `crate::io` feed it and carry out what it returns.
//!
//! - [`Server::handle_client_packet`]: a datagram (or stream frame) from a
//!   client. The answer is a reply written into the caller's `out` buffer, a
//!   routing decision for relayed data (which relay socket, which peer, which
//!   byte range of the caller's packet), or a request to bind relay sockets.
//! - [`Server::relay_bound`]: the driver's answer to such a request.
//! - [`Server::handle_peer_packet`]: a datagram from a peer on a relay
//!   socket, received with headroom so the ChannelData or Data-indication
//!   header is written in place in front of it.
//! - [`Server::handle_timeout`] / [`Server::poll_timeout`]: timers.
//! - [`Server::poll_command`]: control-plane work for the driver (close a
//!   relay socket).
//!
//! Relayed data is never copied or heap-allocated here.

pub mod allocation;
pub mod auth;
pub mod binding;
pub mod peer_policy;
pub mod ports;
pub mod quota;
pub mod rate;
mod seam;
mod stats;
pub mod testing;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use slab::Slab;

pub use allocation::{Allocation, ClientKey, ListenerId, Relay, RelayId};
pub use auth::{AuthFailure, Credentials, IntegritySuite};
pub use peer_policy::{OwnRelays, PeerPolicy, PeerRefusal};
pub use quota::{QuotaLimits, QuotaRefusal, Quotas};
pub use rate::{Rate, SourceBudgets, TokenBucket};
pub use seam::{BindResult, EndReason, Input, Output};
pub use stats::{Gauges, REQUEST_METHODS, RESPONSE_CODES, Stats};

use crate::proto::auth::LongTermKey;
use crate::proto::channel_data::{self, ChannelData, ChannelDataError, ChannelRange};
use crate::proto::demux::{PacketKind, classify_in};
use crate::proto::stun::attr::transport;
use crate::proto::stun::{
    AddressFamily, Attribute, BufferTooSmall, Class, Message, MessageWriter, Method, ParseError, TransactionId, kind,
};
use allocation::{BindConflict, family_index};
use ports::RelayPorts;

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
pub enum Transport {
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
    /// Relayed bytes per allocation, each direction.
    pub allocation_bandwidth: Rate,
    /// Relayed bytes through this worker, each direction.
    pub worker_bandwidth: Rate,
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
        }
    }
}

impl ServerConfig {
    /// Whether relayed packets pass through bandwidth buckets at all.
    #[inline]
    pub fn limits_bandwidth(&self) -> bool {
        !self.allocation_bandwidth.is_off() || !self.worker_bandwidth.is_off()
    }
}

/// Bandwidth bucket index: client → peer.
const TO_PEER: usize = 0;
/// Bandwidth bucket index: peer → client.
const TO_CLIENT: usize = 1;

/// Takes `bytes` from the allocation's and the worker's buckets for one
/// direction; false when either is spent (the packet is dropped, and counted).
#[inline]
fn within_bandwidth(
    shaper: &mut Option<Box<[TokenBucket; 2]>>,
    worker: &mut Option<[TokenBucket; 2]>,
    stats: &mut Stats,
    config: &ServerConfig,
    direction: usize,
    bytes: usize,
    now: Instant,
) -> bool {
    if !config.limits_bandwidth() {
        return true;
    }
    let passed = take_bandwidth(shaper, worker, config, direction, bytes, now);
    if !passed {
        stats.bandwidth_dropped_packets += 1;
        stats.bandwidth_dropped_bytes += bytes as u64;
    }
    passed
}

fn take_bandwidth(
    shaper: &mut Option<Box<[TokenBucket; 2]>>,
    worker: &mut Option<[TokenBucket; 2]>,
    config: &ServerConfig,
    direction: usize,
    bytes: usize,
    now: Instant,
) -> bool {
    let per_allocation = config.allocation_bandwidth;
    if !per_allocation.is_off() {
        let buckets = shaper.get_or_insert_with(|| Box::new([TokenBucket::full(per_allocation, now); 2]));
        if buckets
            .get_mut(direction)
            .is_some_and(|b| !b.take(per_allocation, bytes, now))
        {
            return false;
        }
    }
    let total = config.worker_bandwidth;
    if !total.is_off() {
        let buckets = worker.get_or_insert([TokenBucket::full(total, now); 2]);
        if buckets.get_mut(direction).is_some_and(|b| !b.take(total, bytes, now)) {
            return false;
        }
    }
    true
}

/// One allocation as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    pub user: String,
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

/// What to do with one packet from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Send `out[..len]` back to the client.
    Reply { len: usize },
    /// Send `packet[start..end]` from relay socket `relay` to `peer`.
    Forward {
        relay: RelayId,
        peer: SocketAddr,
        start: usize,
        end: usize,
    },
    /// RFC 6062 ConnectionBind succeeded: send `out[..len]`, then this client
    /// connection carries raw bytes to and from peer connection `connection`.
    ConnectionBound { connection: u32, len: usize },
    /// Nothing to send now; the packet was handled (a keepalive), or its
    /// answer comes through [`Server::poll_output`] (an Allocate waiting for
    /// its relay sockets, a Connect for its TCP connection).
    Consumed,
    /// Refused without an answer; count it under this reason.
    Drop(DropReason),
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
    /// Connect sent to the driver; the response waits for the result.
    Connecting { tid: TransactionId, fingerprint: bool },
    /// Connected (or accepted); waiting for the client's ConnectionBind.
    AwaitingBind { deadline: Instant },
    /// Joined to a client data connection.
    Bound,
}

/// What to do with one datagram from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerOutcome {
    /// Send `buf[start..end]` to the client on its listener.
    ToClient {
        key: ClientKey,
        start: usize,
        end: usize,
    },
    Drop(DropReason),
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
}

/// Whether an operator's `name` picks out the allocation user `username`:
/// the whole name, or for a REST user "<expiry>:<name>" the name after the
/// expiry (operators know their users by that, not by the expiry).
fn names_user(username: &str, name: &str) -> bool {
    username == name || crate::proto::auth::RestUsername::parse(username).and_then(|r| r.user) == Some(name)
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

/// Why a packet got no answer. Each maps to one metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Neither STUN nor ChannelData by its first byte.
    NotTurn,
    /// Not a well-formed STUN message.
    Malformed(ParseError),
    /// FINGERPRINT present but wrong.
    BadFingerprint,
    /// A response or error arrived at the server.
    UnexpectedClass,
    /// An indication the server does not act on, or a malformed one.
    BadIndication,
    /// ChannelData that does not parse.
    BadChannelData(ChannelDataError),
    /// Data from a client without an allocation.
    NoAllocation,
    /// ChannelData for a channel that is not bound.
    UnboundChannel,
    /// Data to or from a peer without a permission.
    NoPermission,
    /// Send to a peer the policy refuses.
    PeerRefused(PeerRefusal),
    /// The peer's address family has no relay in this allocation.
    FamilyMismatch,
    /// A datagram on a relay socket the core does not know.
    UnknownRelay,
    /// The answer did not fit the output buffer.
    OutputTooSmall,
    /// An unauthenticated answer over the source's budget (amplification).
    RateLimited,
    /// Over the allocation's or the worker's bandwidth.
    BandwidthLimit,
    /// A peer connecting to a TCP relay whose allocation holds as many
    /// peer connections as it may.
    ConnectionLimit,
}

impl DropReason {
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::NotTurn => "not_turn",
            DropReason::RateLimited => "unauthenticated_rate_limited",
            DropReason::BandwidthLimit => "bandwidth_limit",
            DropReason::Malformed(e) => e.label(),
            DropReason::BadFingerprint => "bad_fingerprint",
            DropReason::UnexpectedClass => "unexpected_class",
            DropReason::BadIndication => "bad_indication",
            DropReason::BadChannelData(e) => e.label(),
            DropReason::NoAllocation => "no_allocation",
            DropReason::UnboundChannel => "unbound_channel",
            DropReason::NoPermission => "no_permission",
            DropReason::PeerRefused(_) => "peer_refused",
            DropReason::FamilyMismatch => "peer_family_mismatch",
            DropReason::UnknownRelay => "unknown_relay",
            DropReason::OutputTooSmall => "output_too_small",
            DropReason::ConnectionLimit => "peer_connection_limit",
        }
    }
}

/// An Allocate waiting for its relay sockets.
#[derive(Debug, Clone)]
struct PendingAllocate {
    key: ClientKey,
    tid: TransactionId,
    username: String,
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
    attempts: u8,
    /// The driver's answers for this round's sockets.
    results: [Option<BindResult>; 2],
}

/// One worker's TURN server.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    credentials: Arc<Credentials>,
    policy: PeerPolicy,
    quotas: Arc<Quotas>,
    listeners: Vec<Transport>,
    /// What each listener is called in logs and the admin API: udp, tcp, tls.
    listener_names: Vec<&'static str>,
    /// Rate limit of the authentication-failure log lines.
    auth_log: AuthLog,
    ports: [RelayPorts; 2],
    allocations: Slab<Allocation>,
    by_client: FxHashMap<ClientKey, usize>,
    /// Relay socket → allocation (`None` while its Allocate is pending).
    relays: Slab<Option<usize>>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    outputs: VecDeque<Output>,
    /// Allocates waiting for their relay sockets, by their relay ids and
    /// their client.
    pending: Slab<PendingAllocate>,
    pending_by_relay: FxHashMap<RelayId, usize>,
    pending_by_client: FxHashMap<ClientKey, usize>,
    tcp_connections: FxHashMap<u32, TcpConnection>,
    next_connection: u32,
    /// Set while draining, with the alternate server if there is one.
    draining: Option<Option<SocketAddr>>,
    stats: Stats,
    /// Answer budgets of unauthenticated sources (amplification).
    budgets: SourceBudgets,
    /// This worker's bandwidth buckets (to peers, to clients), from the first packet.
    worker_bandwidth: Option<[TokenBucket; 2]>,
}

/// What the request handlers produce before it becomes a ClientOutcome.
type Handled = Result<ClientOutcome, Refusal>;

/// An error response to send: code, reason, and a label for logs.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    code: u16,
    reason: &'static str,
    label: &'static str,
}

const fn refuse(code: u16, reason: &'static str, label: &'static str) -> Refusal {
    Refusal { code, reason, label }
}

const BAD_REQUEST: Refusal = refuse(400, "Bad Request", "bad_request");

/// Authentication context of a response: MESSAGE-INTEGRITY of the request's suite.
#[derive(Clone, Copy)]
struct Signing<'k> {
    key: &'k LongTermKey,
    suite: IntegritySuite,
}

impl Server {
    pub fn new(config: ServerConfig, credentials: Arc<Credentials>, policy: PeerPolicy, quotas: Arc<Quotas>) -> Server {
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
        Server {
            config,
            credentials,
            policy,
            quotas,
            listeners: Vec::new(),
            listener_names: Vec::new(),
            auth_log: AuthLog::default(),
            ports,
            allocations: Slab::new(),
            by_client: FxHashMap::default(),
            relays: Slab::new(),
            timers: BinaryHeap::new(),
            outputs: VecDeque::new(),
            pending: Slab::new(),
            pending_by_relay: FxHashMap::default(),
            pending_by_client: FxHashMap::default(),
            tcp_connections: FxHashMap::default(),
            next_connection: 0,
            draining: None,
            stats: Stats::default(),
            budgets,
            worker_bandwidth: None,
        }
    }

    /// Registers a listening socket; its id goes into every [`ClientKey`].
    pub fn add_listener(&mut self, transport: Transport) -> ListenerId {
        let name = match transport {
            Transport::Udp => "udp",
            Transport::Stream => "tcp",
        };
        self.add_named_listener(transport, name)
    }

    /// Adds a listener with the name logs give its clients' transport
    /// ("tls" for a TLS listener).
    pub fn add_named_listener(&mut self, transport: Transport, name: &'static str) -> ListenerId {
        self.listeners.push(transport);
        self.listener_names.push(name);
        ListenerId((self.listeners.len() - 1) as u16)
    }

    /// The client transport of a 5-tuple, as logs name it.
    fn transport_name(&self, key: &ClientKey) -> &'static str {
        self.listener_names
            .get(usize::from(key.listener.0))
            .copied()
            .unwrap_or("udp")
    }

    /// Replaces users, secrets and realm (configuration reload); allocations keep their keys.
    pub fn set_credentials(&mut self, credentials: Arc<Credentials>) {
        self.credentials = credentials;
    }

    /// Replaces the peer policy (configuration reload).
    pub fn set_policy(&mut self, policy: PeerPolicy) {
        self.policy = policy;
    }

    /// New lifetime and per-allocation limits (configuration reload). They
    /// apply to requests from now on; existing state is kept.
    pub fn set_limits(&mut self, limits: AllocationLimits) {
        self.config.max_lifetime = limits.max_lifetime;
        self.config.max_permissions = limits.max_permissions;
        self.config.max_channels = limits.max_channels;
        self.config.max_connections = limits.max_connections;
        self.config.tcp_relay = limits.tcp_relay;
    }

    /// New rate limits (configuration reload): the unauthenticated answer
    /// budget per source and the bandwidth limits.
    pub fn set_rates(&mut self, unauthenticated: Rate, allocation_bandwidth: Rate, worker_bandwidth: Rate) {
        self.config.unauthenticated = unauthenticated;
        self.budgets.set_rate(unauthenticated);
        self.config.allocation_bandwidth = allocation_bandwidth;
        self.config.worker_bandwidth = worker_bandwidth;
        if worker_bandwidth.is_off() {
            self.worker_bandwidth = None;
        }
    }

    /// Stops granting new allocations (shutdown drain). Existing ones keep
    /// relaying and refreshing. With an alternate server, Allocate is
    /// answered 300 Try Alternate; without, 508.
    pub fn set_draining(&mut self, alternate: Option<SocketAddr>) {
        self.draining = Some(alternate);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// The allocation of a 5-tuple, for inspection.
    pub fn allocation(&self, key: &ClientKey) -> Option<&Allocation> {
        self.by_client.get(key).and_then(|&i| self.allocations.get(i))
    }

    /// The client's TCP or TLS connection closed: its allocation goes with it
    /// (RFC 8656 §5: the 5-tuple no longer exists).
    fn handle_client_closed(&mut self, key: ClientKey) {
        if let Some(id) = self.by_client.get(&key).copied() {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::ConnectionClosed);
        }
    }

    /// Counts for gauges: allocations by transport and family, live
    /// permissions and channels, RFC 6062 connections.
    pub fn gauges(&self, now: Instant) -> Gauges {
        let mut g = Gauges {
            tcp_connections: self.tcp_connections.len() as u64,
            ..Gauges::default()
        };
        for (_, a) in &self.allocations {
            let t = usize::from(self.listeners.get(usize::from(a.key.listener.0)) == Some(&Transport::Stream));
            for (f, r) in a.relays.iter().enumerate() {
                if r.is_some()
                    && let Some(n) = g.allocations.get_mut(t).and_then(|row| row.get_mut(f))
                {
                    *n += 1;
                }
            }
            g.permissions += a.permissions.iter().filter(|p| p.expires > now).count() as u64;
            g.channels += a.channels.iter().filter(|c| c.expires > now).count() as u64;
        }
        g
    }

    /// A description of every allocation, for the admin API.
    pub fn allocations_info(&self, now: Instant) -> Vec<AllocationInfo> {
        self.allocations
            .iter()
            .map(|(_, a)| AllocationInfo {
                user: a.username.clone(),
                client: a.key.client,
                transport: self.transport_name(&a.key),
                relays: a.relays.iter().flatten().map(|r| r.advertised).collect(),
                tcp_relay: a.tcp,
                age_secs: now.saturating_duration_since(a.created).as_secs(),
                expires_in_secs: a.expires.saturating_duration_since(now).as_secs(),
                permissions: a.permissions.iter().filter(|p| p.expires > now).count(),
                channels: a.channels.iter().filter(|c| c.expires > now).count(),
                traffic: a.traffic,
            })
            .collect()
    }

    /// Deletes the allocations of `user` (the whole user name, or a REST
    /// user's name after its expiry) and/or of client address `client`
    /// (admin API); returns how many.
    /// Ends every allocation whose credential no longer verifies against
    /// the current credentials (a user removed or given a new password, a
    /// REST secret taken out of the list); returns how many.
    pub fn revoke_unverifiable(&mut self) -> usize {
        let creds = Arc::clone(&self.credentials);
        let ids: Vec<usize> = self
            .allocations
            .iter()
            .filter(|(_, a)| !creds.still_verifies(&a.username, a.algorithm, &a.credential))
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::Revoked);
        }
        ids.len()
    }

    pub fn kick(&mut self, user: Option<&str>, client: Option<SocketAddr>) -> usize {
        let ids: Vec<usize> = self
            .allocations
            .iter()
            .filter(|(_, a)| {
                user.is_none_or(|u| names_user(&a.username, u)) && client.is_none_or(|c| a.key.client == c)
            })
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::Operator);
        }
        ids.len()
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
            Input::ClientClosed { key } => self.handle_client_closed(key),
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

    /// When [`Server::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let alloc = self.timers.peek().map(|Reverse((t, _))| *t);
        let bind = self
            .tcp_connections
            .values()
            .filter_map(|c| match c.state {
                TcpConnectionState::AwaitingBind { deadline } => Some(deadline),
                _ => None,
            })
            .min();
        [
            alloc,
            bind,
            self.ports[0].next_deadline(),
            self.ports[1].next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Expires allocations and port holds whose time has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            // Refreshes push new entries; act only when the allocation really expired.
            if self.allocations.get(id).is_some_and(|a| a.expires <= now) {
                self.stats.allocations_expired += 1;
                self.remove_allocation(id, EndReason::Expired);
            }
        }
        for p in &mut self.ports {
            p.expire(now);
        }
        self.expire_tcp_connections(now);
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
                    self.stats.unauthenticated_bytes_in += packet.len() as u64;
                    if !self.budgets.take(key.client.ip(), *len, now.instant) {
                        self.stats.responses_suppressed += 1;
                        return ClientOutcome::Drop(DropReason::RateLimited);
                    }
                    self.stats.unauthenticated_bytes_out += *len as u64;
                }
                outcome
            }
            PacketKind::Other => ClientOutcome::Drop(DropReason::NotTurn),
        }
    }

    /// The hot path from clients: ChannelData to a bound peer.
    #[inline]
    fn handle_channel_data(&mut self, now: Instant, key: &ClientKey, packet: &[u8]) -> ClientOutcome {
        let cd = match ChannelData::parse_in(packet, self.config.channel_range) {
            Ok(cd) => cd,
            Err(e) => return ClientOutcome::Drop(DropReason::BadChannelData(e)),
        };
        let Some(alloc) = self
            .by_client
            .get(key)
            .copied()
            .and_then(|i| self.allocations.get_mut(i))
        else {
            return ClientOutcome::Drop(DropReason::NoAllocation);
        };
        let Some(channel) = alloc.channel(cd.channel, now) else {
            return ClientOutcome::Drop(DropReason::UnboundChannel);
        };
        let peer = channel.peer;
        if !alloc.permits(peer.ip(), now) {
            return ClientOutcome::Drop(DropReason::NoPermission);
        }
        let Some(relay) = alloc.relay_for(&peer).map(|r| r.id) else {
            return ClientOutcome::Drop(DropReason::FamilyMismatch);
        };
        let len = cd.data.len();
        if !within_bandwidth(
            &mut alloc.shaper,
            &mut self.worker_bandwidth,
            &mut self.stats,
            &self.config,
            TO_PEER,
            len,
            now,
        ) {
            return ClientOutcome::Drop(DropReason::BandwidthLimit);
        }
        alloc.traffic.to_peer_packets += 1;
        alloc.traffic.to_peer_bytes += len as u64;
        self.stats.client_to_peer_packets += 1;
        self.stats.client_to_peer_bytes += len as u64;
        if self.is_stream(key) {
            self.stats.stream_client_to_peer_packets += 1;
            self.stats.stream_client_to_peer_bytes += len as u64;
        }
        ClientOutcome::Forward {
            relay,
            peer: self.route(peer),
            start: channel_data::HEADER_LEN,
            end: channel_data::HEADER_LEN + len,
        }
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

    /// A peer that is this server's own external address is reached at the
    /// bound address instead, so relaying between two allocations of this
    /// server never depends on NAT hairpinning.
    #[inline]
    fn route(&self, peer: SocketAddr) -> SocketAddr {
        for r in [&self.config.relay_v4, &self.config.relay_v6].into_iter().flatten() {
            if r.external == Some(peer.ip()) {
                return SocketAddr::new(r.bind, peer.port());
            }
        }
        peer
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
            return write_or_drop(binding::success(&msg, key.client, self.config.software.as_deref(), out).ok());
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
        // A handle of our own, so the result may borrow from it while `self` changes.
        let creds = Arc::clone(&self.credentials);
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
            Method::ALLOCATE => self.allocate(now, key, &msg, authed, out),
            Method::CONNECTION_BIND => self.connection_bind(now, key, alloc_id, &msg, authed.username, signing, out),
            _ => {
                let Some(id) = alloc_id else {
                    return self.refuse(
                        &msg,
                        refuse(437, "Allocation Mismatch", "allocation_mismatch"),
                        signing,
                        out,
                    );
                };
                if self.allocations.get(id).is_some_and(|a| a.username != authed.username) {
                    return self.refuse(
                        &msg,
                        refuse(441, "Wrong Credentials", "wrong_credentials"),
                        signing,
                        out,
                    );
                }
                match method {
                    Method::REFRESH => self.refresh(now, id, &msg, signing, out),
                    Method::CREATE_PERMISSION => self.create_permission(now.instant, id, &msg, signing, out),
                    Method::CONNECT => self.connect(id, &msg),
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
        self.stats.count_refusal(r.code, r.label);
        write_or_drop(error_response(msg, r.code, r.reason, Some(signing), out, |_| Ok(())))
    }

    fn handle_indication(&mut self, now: Instant, key: &ClientKey, msg: &Message<'_>) -> ClientOutcome {
        match msg.method() {
            Method::BINDING => ClientOutcome::Consumed, // keepalive
            Method::SEND => self.send_indication(now, key, msg),
            _ => ClientOutcome::Drop(DropReason::BadIndication),
        }
    }

    /// Send indication (RFC 8656 §11): DATA to XOR-PEER-ADDRESS, given a permission.
    fn send_indication(&mut self, now: Instant, key: &ClientKey, msg: &Message<'_>) -> ClientOutcome {
        let Some(alloc) = self.by_client.get(key).and_then(|&i| self.allocations.get(i)) else {
            return ClientOutcome::Drop(DropReason::NoAllocation);
        };
        if alloc.tcp {
            return ClientOutcome::Drop(DropReason::BadIndication);
        }
        let Some(Ok(peer)) = msg.xor_peer_addresses().next() else {
            return ClientOutcome::Drop(DropReason::BadIndication);
        };
        let Some(data) = msg.raw_attributes().find(|a| a.kind == kind::DATA) else {
            return ClientOutcome::Drop(DropReason::BadIndication);
        };
        let Some(relay) = alloc.relay_for(&peer) else {
            return ClientOutcome::Drop(DropReason::FamilyMismatch);
        };
        if !alloc.permits(peer.ip(), now) {
            return ClientOutcome::Drop(DropReason::NoPermission);
        }
        if let Err(r) = self.policy.check(&peer) {
            tracing::debug!(peer = %peer, reason = r.label(), "peer refused");
            self.stats.count_peer_refusal(r);
            return ClientOutcome::Drop(DropReason::PeerRefused(r));
        }
        let start = data.offset + 4;
        let (relay_id, alloc_idx) = (relay.id, self.by_client.get(key).copied());
        if let Some(a) = alloc_idx.and_then(|i| self.allocations.get_mut(i)) {
            let len = data.value.len();
            if !within_bandwidth(
                &mut a.shaper,
                &mut self.worker_bandwidth,
                &mut self.stats,
                &self.config,
                TO_PEER,
                len,
                now,
            ) {
                return ClientOutcome::Drop(DropReason::BandwidthLimit);
            }
            a.traffic.to_peer_packets += 1;
            a.traffic.to_peer_bytes += len as u64;
        }
        self.stats.client_to_peer_packets += 1;
        self.stats.client_to_peer_bytes += data.value.len() as u64;
        if self.is_stream(key) {
            self.stats.stream_client_to_peer_packets += 1;
            self.stats.stream_client_to_peer_bytes += data.value.len() as u64;
        }
        ClientOutcome::Forward {
            relay: relay_id,
            peer: self.route(peer),
            start,
            end: start + data.value.len(),
        }
    }

    // ----- Allocate ------------------------------------------------------

    fn relay_config(&self, f: AddressFamily) -> Option<RelayAddress> {
        match f {
            AddressFamily::V4 => self.config.relay_v4,
            AddressFamily::V6 => self.config.relay_v6,
        }
    }

    fn granted_lifetime(&self, requested: Option<u32>) -> u32 {
        let max = self.config.max_lifetime.max(DEFAULT_LIFETIME);
        match requested {
            Some(r) => r.clamp(DEFAULT_LIFETIME, max),
            None => DEFAULT_LIFETIME,
        }
    }

    fn allocate(
        &mut self,
        now: Now,
        key: ClientKey,
        msg: &Message<'_>,
        authed: auth::Authenticated<'_>,
        out: &mut [u8],
    ) -> Handled {
        if self.pending_by_client.contains_key(&key) {
            // Its relay sockets are being bound: the answer is on its way.
            return Ok(ClientOutcome::Consumed);
        }
        if let Some(&id) = self.by_client.get(&key) {
            let signing = Signing {
                key: &authed.key,
                suite: authed.suite,
            };
            // A retransmitted Allocate gets its success again (RFC 8656 §7.2).
            if let Some(a) = self.allocations.get(id)
                && a.tid == *msg.transaction_id()
                && a.username == authed.username
            {
                return Ok(write_or_drop(self.allocate_success(msg, id, now, signing, out)));
            }
            return Err(refuse(437, "Allocation Mismatch", "allocation_mismatch"));
        }
        if let Some(alternate) = self.draining {
            return match alternate {
                Some(server) => {
                    self.stats.count_error(300);
                    let signing = Signing {
                        key: &authed.key,
                        suite: authed.suite,
                    };
                    let software = self.config.software.as_deref();
                    let written = (|| {
                        let mut w =
                            MessageWriter::new(out, Class::Error, Method::ALLOCATE, *msg.transaction_id()).ok()?;
                        w.error_code(300, "Try Alternate").ok()?;
                        w.alternate_server(&server).ok()?;
                        finish(w, Some(signing), msg.has_fingerprint(), software)
                    })();
                    Ok(write_or_drop(written))
                }
                None => Err(refuse(508, "Insufficient Capacity", "draining")),
            };
        }
        match msg.requested_transport() {
            Ok(Some(transport::UDP)) => {}
            // RFC 6062: TCP relaying only for clients that reach us over TCP or TLS.
            Ok(Some(transport::TCP)) if self.is_stream(&key) && self.config.tcp_relay => {}
            Ok(Some(_)) => return Err(refuse(442, "Unsupported Transport Protocol", "unsupported_transport")),
            Ok(None) | Err(_) => return Err(BAD_REQUEST),
        }
        let tcp = msg.requested_transport().ok().flatten() == Some(transport::TCP);
        let attr = |k| msg.get(k).map_err(|_| BAD_REQUEST);
        let even_port = match attr(kind::EVEN_PORT)? {
            Some(Attribute::EvenPort { reserve }) => Some(reserve),
            _ => None,
        };
        let token = match attr(kind::RESERVATION_TOKEN)? {
            Some(Attribute::ReservationToken(t)) => Some(*t),
            _ => None,
        };
        let requested_family = match attr(kind::REQUESTED_ADDRESS_FAMILY)? {
            Some(Attribute::RequestedAddressFamily(f)) => Some(f),
            _ => None,
        };
        let additional = match attr(kind::ADDITIONAL_ADDRESS_FAMILY)? {
            Some(Attribute::AdditionalAddressFamily(f)) => Some(f),
            _ => None,
        };
        // RFC 8656 §7.2 and RFC 6062 §5.1: combinations that make no sense are 400.
        if (tcp
            && (token.is_some()
                || even_port.is_some()
                || additional.is_some()
                || msg.find(kind::DONT_FRAGMENT).is_some()))
            || (token.is_some() && (even_port.is_some() || requested_family.is_some()))
            || (additional.is_some() && requested_family.is_some())
            || additional.is_some_and(|f| f != AddressFamily::V6)
        {
            return Err(BAD_REQUEST);
        }
        let lifetime = self.granted_lifetime(msg.lifetime().map_err(|_| BAD_REQUEST)?);
        let dont_fragment = msg.find(kind::DONT_FRAGMENT).is_some();

        // Which families, which ports. A reservation token names its family:
        // each family's port pool keys its own tokens.
        let redeemed = match token {
            Some(t) => Some(
                self.ports
                    .iter()
                    .enumerate()
                    .find_map(|(i, p)| p.redeem(&t, now.unix, authed.username).map(|port| (i, port)))
                    .ok_or(refuse(508, "Insufficient Capacity", "bad_reservation_token"))?,
            ),
            None => None,
        };
        let primary = match redeemed {
            Some((1, _)) => AddressFamily::V6,
            Some(_) => AddressFamily::V4,
            None => requested_family.unwrap_or(AddressFamily::V4),
        };
        let fixed_port = redeemed.map(|(_, port)| port);
        if self.relay_config(primary).is_none() {
            return Err(refuse(440, "Address Family not Supported", "family_not_supported"));
        }
        let mut family_error = None;
        let mut wanted = vec![primary];
        if let Some(extra) = additional {
            if self.relay_config(extra).is_some() {
                wanted.push(extra);
            } else {
                family_error = Some(extra);
            }
        }

        if let Err(q) = self.quotas.acquire(authed.username, key.client.ip()) {
            self.stats.count_quota_refusal(q);
            tracing::info!(
                client = %key.client,
                user = %authed.username,
                quota = q.label(),
                "allocation refused: quota reached"
            );
            return Err(match q {
                QuotaRefusal::User => refuse(486, "Allocation Quota Reached", "user_quota"),
                QuotaRefusal::Address => refuse(486, "Allocation Quota Reached", "ip_quota"),
                QuotaRefusal::Total => refuse(508, "Insufficient Capacity", "total_quota"),
            });
        }
        // EVEN-PORT with R reserves the next port of the primary family's relay.
        let reserve_pair = even_port == Some(true);
        let mut sockets = [None, None];
        for family in wanted {
            let i = family_index(family);
            let is_primary = family == primary;
            let port = match (fixed_port.filter(|_| is_primary), self.ports.get_mut(i)) {
                (Some(p), Some(ports)) => {
                    ports.take_specific(p);
                    Some(p)
                }
                (None, Some(ports)) => ports.take(now.instant, even_port.is_some(), reserve_pair && is_primary),
                (_, None) => None,
            };
            let (Some(port), Some(bind)) = (port, self.relay_config(family)) else {
                self.abandon(&sockets, authed.username, key.client.ip());
                return Err(refuse(508, "Insufficient Capacity", "no_relay_port"));
            };
            let rid = RelayId(self.relays.insert(None) as u32);
            if let Some(slot) = sockets.get_mut(i) {
                *slot = Some((rid, SocketAddr::new(bind.bind, port)));
            }
        }
        let dont_fragment_socket = dont_fragment;
        let pid = self.pending.insert(PendingAllocate {
            key,
            tid: *msg.transaction_id(),
            username: authed.username.to_owned(),
            credential: authed.key.clone(),
            algorithm: authed.algorithm,
            suite: authed.suite,
            rest_expiry: authed.rest_expiry,
            fingerprint: msg.has_fingerprint(),
            lifetime,
            sockets,
            bound: [false; 2],
            family_error,
            even_port: even_port.is_some(),
            reserve_pair,
            primary: family_index(primary),
            fixed_port: fixed_port.is_some(),
            dont_fragment,
            tcp,
            attempts: 1,
            results: [None, None],
        });
        self.pending_by_client.insert(key, pid);
        for (rid, addr) in sockets.iter().flatten() {
            self.pending_by_relay.insert(*rid, pid);
            self.outputs.push_back(Output::BindRelay {
                relay: *rid,
                addr: *addr,
                dont_fragment: dont_fragment_socket,
                tcp,
            });
        }
        Ok(ClientOutcome::Consumed)
    }

    /// Gives back ports, relay ids and the quota taken for an Allocate that failed.
    fn abandon(&mut self, sockets: &[Option<(RelayId, SocketAddr)>; 2], username: &str, ip: IpAddr) {
        for (s, ports) in sockets.iter().zip(self.ports.iter_mut()) {
            if let Some((rid, addr)) = s {
                ports.release(addr.port());
                self.relays.try_remove(rid.0 as usize);
            }
        }
        self.quotas.release(username, ip);
    }

    /// The driver's answer for one relay socket of a pending Allocate. Once
    /// every socket of the round has an answer, the Allocate is answered,
    /// or the sockets that met EADDRINUSE try other ports.
    fn relay_bound(&mut self, now: Now, relay: RelayId, result: BindResult) {
        let Some(pid) = self.pending_by_relay.get(&relay).copied() else {
            return;
        };
        let Some(p) = self.pending.get_mut(pid) else {
            return;
        };
        let Some(i) = p.sockets.iter().position(|s| s.is_some_and(|(r, _)| r == relay)) else {
            return;
        };
        if let Some(r) = p.results.get_mut(i) {
            *r = Some(result);
        }
        let waiting = p
            .sockets
            .iter()
            .zip(p.bound.iter().zip(p.results.iter()))
            .any(|(s, (bound, r))| s.is_some() && !bound && r.is_none());
        if waiting {
            return;
        }
        let p = self.pending.remove(pid);
        self.pending_by_client.remove(&p.key);
        for (rid, _) in p.sockets.iter().flatten() {
            self.pending_by_relay.remove(rid);
        }
        let key = p.key;
        let mut out = [0u8; 1500];
        if let Some(len) = self.finish_allocate(now, p, &mut out) {
            let outcome = ClientOutcome::Reply { len };
            self.count_response(&outcome, &out);
            self.transmit(key, out.get(..len).unwrap_or_default());
        }
    }

    /// Answers a pending Allocate whose round of binds is complete: the
    /// response's length in `out`, or `None` while sockets retry other ports.
    fn finish_allocate(&mut self, now: Now, mut p: PendingAllocate, out: &mut [u8]) -> Option<usize> {
        let results = std::mem::take(&mut p.results);
        let mut retry = [None, None];
        let mut failed = false;
        let can_retry = !p.fixed_port && p.attempts < MAX_BIND_ATTEMPTS;
        let slots = p.sockets.iter_mut().zip(p.bound.iter_mut()).zip(retry.iter_mut());
        let pools = results.iter().zip(self.ports.iter_mut()).enumerate();
        for (((socket, bound), retry), (i, (result, ports))) in slots.zip(pools) {
            let (Some((rid, addr)), Some(result)) = (*socket, *result) else {
                continue;
            };
            match result {
                BindResult::Bound => *bound = true,
                BindResult::InUse if can_retry => {
                    ports.hold_busy(now.instant, addr.port());
                    match ports.take(now.instant, p.even_port, p.reserve_pair && i == p.primary) {
                        Some(port) => {
                            let next = SocketAddr::new(addr.ip(), port);
                            *socket = Some((rid, next));
                            *retry = Some((rid, next));
                        }
                        None => failed = true,
                    }
                }
                BindResult::InUse | BindResult::Failed => failed = true,
            }
        }
        let signing_key = p.credential.clone();
        let signing = Signing {
            key: &signing_key,
            suite: p.suite,
        };
        if failed {
            for (socket, bound) in p.sockets.iter().zip(p.bound) {
                if let (Some((rid, _)), true) = (socket, bound) {
                    self.outputs.push_back(Output::CloseRelay(*rid));
                }
            }
            self.abandon(&p.sockets, &p.username, p.key.client.ip());
            self.stats.count_refusal(508, "no_relay_port");
            return error_for(
                p.tid,
                Method::ALLOCATE,
                508,
                "Insufficient Capacity",
                Some(signing),
                p.fingerprint,
                self.config.software.as_deref(),
                out,
            );
        }
        if retry.iter().any(Option::is_some) {
            p.attempts += 1;
            let (key, dont_fragment, tcp) = (p.key, p.dont_fragment, p.tcp);
            let pid = self.pending.insert(p);
            self.pending_by_client.insert(key, pid);
            if let Some(p) = self.pending.get(pid) {
                for (rid, _) in p.sockets.iter().flatten() {
                    self.pending_by_relay.insert(*rid, pid);
                }
            }
            for (relay, addr) in retry.into_iter().flatten() {
                self.outputs.push_back(Output::BindRelay {
                    relay,
                    addr,
                    dont_fragment,
                    tcp,
                });
            }
            return None;
        }

        // Every socket is bound: the allocation exists.
        let relays = p.sockets.map(|s| {
            s.map(|(id, bound)| {
                let f = if bound.is_ipv4() {
                    self.config.relay_v4
                } else {
                    self.config.relay_v6
                };
                let ip = f.and_then(|f| f.external).unwrap_or(bound.ip());
                Relay {
                    id,
                    bound,
                    advertised: SocketAddr::new(ip, bound.port()),
                }
            })
        });
        let reservation_token = match (p.reserve_pair, p.sockets.get(p.primary), self.ports.get(p.primary)) {
            (true, Some(Some((_, a))), Some(ports)) => Some(ports.token(a.port() + 1, now.unix, &p.username)),
            _ => None,
        };
        let expires = now.instant + Duration::from_secs(u64::from(p.lifetime));
        let id = self.allocations.insert(Allocation {
            key: p.key,
            username: p.username,
            credential: p.credential,
            algorithm: p.algorithm,
            suite: p.suite,
            rest_expiry: p.rest_expiry,
            tid: p.tid,
            expires,
            relays,
            permissions: Vec::new(),
            channels: Vec::new(),
            reservation_token,
            tcp: p.tcp,
            traffic: allocation::Traffic::default(),
            created: now.instant,
            connections: 0,
            shaper: (!self.config.allocation_bandwidth.is_off())
                .then(|| Box::new([TokenBucket::full(self.config.allocation_bandwidth, now.instant); 2])),
        });
        for r in relays.iter().flatten() {
            if let Some(slot) = self.relays.get_mut(r.id.0 as usize) {
                *slot = Some(id);
            }
        }
        self.by_client.insert(p.key, id);
        self.timers.push(Reverse((expires, id)));
        self.stats.allocations_created += 1;
        self.outputs.push_back(Output::AllocationCreated {
            key: p.key,
            relays: relays.map(|r| r.map(|r| (r.id, r.bound))),
            expires,
        });
        if let Some(a) = self.allocations.get(id) {
            tracing::info!(
                client = %a.key.client,
                user = %a.username,
                relay = ?a.relays.iter().flatten().map(|r| r.advertised).collect::<Vec<_>>(),
                lifetime = p.lifetime,
                transport = self.transport_name(&a.key),
                relay_transport = if a.tcp { "tcp" } else { "udp" },
                "allocation created"
            );
        }

        let family_error = p.family_error;
        let software = self.config.software.as_deref();
        let a = self.allocations.get(id)?;
        let mut w = MessageWriter::new(out, Class::Success, Method::ALLOCATE, p.tid).ok()?;
        write_allocate_body(&mut w, a, p.lifetime, family_error).ok()?;
        finish(w, Some(signing), p.fingerprint, software)
    }

    /// The success response of an existing allocation (for a retransmitted Allocate).
    fn allocate_success(
        &self,
        msg: &Message<'_>,
        id: usize,
        now: Now,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> Option<usize> {
        let a = self.allocations.get(id)?;
        let remaining = a.expires.saturating_duration_since(now.instant).as_secs() as u32;
        let mut w = MessageWriter::new(out, Class::Success, Method::ALLOCATE, *msg.transaction_id()).ok()?;
        write_allocate_body(&mut w, a, remaining, None).ok()?;
        finish(w, Some(signing), msg.has_fingerprint(), self.config.software.as_deref())
    }

    fn remove_allocation(&mut self, id: usize, why: EndReason) {
        let Some(a) = self.allocations.try_remove(id) else {
            return;
        };
        self.outputs.push_back(Output::AllocationEnded {
            key: a.key,
            reason: why,
        });
        if why.closes_stream() && self.listeners.get(usize::from(a.key.listener.0)) == Some(&Transport::Stream) {
            self.outputs.push_back(Output::CloseClient(a.key));
        }
        let t = a.traffic;
        tracing::info!(
            client = %a.key.client,
            transport = self.transport_name(&a.key),
            user = %a.username,
            relay = ?a.relays.iter().flatten().map(|r| r.advertised).collect::<Vec<_>>(),
            to_peer_packets = t.to_peer_packets,
            to_peer_bytes = t.to_peer_bytes,
            to_client_packets = t.to_client_packets,
            to_client_bytes = t.to_client_bytes,
            reason = why.label(),
            "allocation ended"
        );
        let connections: Vec<u32> = self
            .tcp_connections
            .iter()
            .filter(|(_, c)| c.alloc == id)
            .map(|(cid, _)| *cid)
            .collect();
        for cid in connections {
            self.tcp_connections.remove(&cid);
            self.outputs.push_back(Output::CloseConnection(cid));
        }
        self.by_client.remove(&a.key);
        for r in a.relays.iter().flatten() {
            self.relays.try_remove(r.id.0 as usize);
            let i = usize::from(r.bound.is_ipv6());
            if let Some(p) = self.ports.get_mut(i) {
                p.release(r.bound.port());
            }
            self.outputs.push_back(Output::CloseRelay(r.id));
        }
        self.quotas.release(&a.username, a.key.client.ip());
    }

    // ----- Refresh, CreatePermission, ChannelBind -------------------------

    fn refresh(&mut self, now: Now, id: usize, msg: &Message<'_>, signing: Signing<'_>, out: &mut [u8]) -> Handled {
        let requested = msg.lifetime().map_err(|_| BAD_REQUEST)?;
        if let Some(Attribute::RequestedAddressFamily(f)) =
            msg.get(kind::REQUESTED_ADDRESS_FAMILY).map_err(|_| BAD_REQUEST)?
            && self
                .allocations
                .get(id)
                .is_some_and(|a| a.relays.get(family_index(f)).is_none_or(Option::is_none))
        {
            return Err(refuse(443, "Peer Address Family Mismatch", "family_mismatch"));
        }
        let lifetime = if requested == Some(0) {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::Deleted);
            0
        } else {
            let lifetime = self.granted_lifetime(requested);
            let expires = now.instant + Duration::from_secs(u64::from(lifetime));
            let names = &self.listener_names;
            if let Some(a) = self.allocations.get_mut(id) {
                a.expires = expires;
                self.outputs
                    .push_back(Output::AllocationRefreshed { key: a.key, expires });
                tracing::info!(
                    client = %a.key.client,
                    transport = names.get(usize::from(a.key.listener.0)).copied().unwrap_or("udp"),
                    user = %a.username,
                    lifetime,
                    "allocation refreshed"
                );
            }
            self.timers.push(Reverse((expires, id)));
            lifetime
        };
        let software = self.config.software.as_deref();
        Ok(write_or_drop(success_response(msg, signing, software, out, |w| {
            w.lifetime(lifetime)
        })))
    }

    /// Peer addresses of a request, each checked against family and policy.
    fn checked_peers(&mut self, id: usize, msg: &Message<'_>) -> Result<Vec<SocketAddr>, Refusal> {
        let alloc = self.allocations.get(id).ok_or(BAD_REQUEST)?;
        let mut peers = Vec::new();
        for p in msg.xor_peer_addresses() {
            let peer = p.map_err(|_| BAD_REQUEST)?;
            if alloc.relay_for(&peer).is_none() {
                return Err(refuse(443, "Peer Address Family Mismatch", "family_mismatch"));
            }
            if let Err(r) = self.policy.check_permission(peer.ip()) {
                tracing::debug!(peer = %peer, reason = r.label(), "peer refused");
                self.stats.count_peer_refusal(r);
                return Err(refuse(403, "Forbidden", "peer_forbidden"));
            }
            peers.push(peer);
        }
        if peers.is_empty() {
            return Err(BAD_REQUEST);
        }
        Ok(peers)
    }

    fn create_permission(
        &mut self,
        now: Instant,
        id: usize,
        msg: &Message<'_>,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> Handled {
        let ips: Vec<IpAddr> = self.checked_peers(id, msg)?.iter().map(SocketAddr::ip).collect();
        let max = self.config.max_permissions;
        let a = self.allocations.get_mut(id).ok_or(BAD_REQUEST)?;
        if !a.permit_all(&ips, now, max) {
            return Err(refuse(508, "Insufficient Capacity", "too_many_permissions"));
        }
        let (key, expires) = (a.key, now + allocation::PERMISSION_LIFETIME);
        for peer in ips {
            self.outputs
                .push_back(Output::PermissionInstalled { key, peer, expires });
        }
        let software = self.config.software.as_deref();
        Ok(write_or_drop(success_response(msg, signing, software, out, |_| Ok(()))))
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        id: usize,
        msg: &Message<'_>,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> Handled {
        // RFC 6062: a TCP allocation relays over connections, not channels.
        if self.allocations.get(id).is_some_and(|a| a.tcp) {
            return Err(BAD_REQUEST);
        }
        let number = match msg.channel_number() {
            Ok(Some(n)) if self.config.channel_range.contains(n) => n,
            _ => return Err(BAD_REQUEST),
        };
        let peers = self.checked_peers(id, msg)?;
        let [peer] = peers.as_slice() else {
            return Err(BAD_REQUEST);
        };
        // A channel to the server's own address must also name a relay port.
        if let Err(r) = self.policy.check(peer) {
            tracing::debug!(peer = %peer, reason = r.label(), "peer refused");
            self.stats.count_peer_refusal(r);
            return Err(refuse(403, "Forbidden", "peer_forbidden"));
        }
        let (max_channels, max_permissions) = (self.config.max_channels, self.config.max_permissions);
        let a = self.allocations.get_mut(id).ok_or(BAD_REQUEST)?;
        match a.bind_channel(number, *peer, now, max_channels) {
            Ok(()) => {}
            Err(BindConflict::Full) => return Err(refuse(508, "Insufficient Capacity", "too_many_channels")),
            Err(_) => return Err(refuse(400, "Bad Request", "channel_conflict")),
        }
        // Binding installs or refreshes the permission (RFC 8656 §12.2).
        if !a.permit_all(&[peer.ip()], now, max_permissions) {
            return Err(refuse(508, "Insufficient Capacity", "too_many_permissions"));
        }
        let key = a.key;
        if let Some(relay) = a.relay_for(peer).map(|r| r.id) {
            self.outputs.push_back(Output::PermissionInstalled {
                key,
                peer: peer.ip(),
                expires: now + allocation::PERMISSION_LIFETIME,
            });
            self.outputs.push_back(Output::ChannelBound {
                key,
                relay,
                channel: number,
                peer: *peer,
                expires: now + allocation::CHANNEL_LIFETIME,
            });
        }
        let software = self.config.software.as_deref();
        Ok(write_or_drop(success_response(msg, signing, software, out, |_| Ok(()))))
    }

    // ----- RFC 6062: TCP allocations ---------------------------------------

    fn is_stream(&self, key: &ClientKey) -> bool {
        self.listeners.get(usize::from(key.listener.0)) == Some(&Transport::Stream)
    }

    fn new_connection_id(&mut self) -> u32 {
        loop {
            self.next_connection = (self.next_connection + 1) & 0x00FF_FFFF;
            let id = (u32::from(self.config.worker_index) << 24) | self.next_connection;
            if !self.tcp_connections.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connect (RFC 6062 §5.2): the answer comes when the driver reports
    /// whether the TCP connection to the peer was established.
    fn connect(&mut self, id: usize, msg: &Message<'_>) -> Handled {
        let a = self.allocations.get(id).ok_or(BAD_REQUEST)?;
        if !a.tcp {
            return Err(BAD_REQUEST);
        }
        let peer = match msg.xor_peer_addresses().next() {
            Some(Ok(p)) => p,
            _ => return Err(BAD_REQUEST),
        };
        let relay = a
            .relay_for(&peer)
            .ok_or(refuse(443, "Peer Address Family Mismatch", "family_mismatch"))?
            .id;
        // The same rule as for UDP peers: CVE-2020-26262 came through this path.
        if let Err(r) = self.policy.check(&peer) {
            tracing::debug!(peer = %peer, reason = r.label(), "peer refused");
            self.stats.count_peer_refusal(r);
            return Err(refuse(403, "Forbidden", "peer_forbidden"));
        }
        if a.connections >= self.config.max_connections {
            return Err(refuse(508, "Insufficient Capacity", "too_many_connections"));
        }
        if self.tcp_connections.values().any(|c| c.alloc == id && c.peer == peer) {
            return Err(refuse(446, "Connection Already Exists", "connection_exists"));
        }
        let connection = self.new_connection_id();
        if let Some(a) = self.allocations.get_mut(id) {
            a.connections += 1;
        }
        let state = TcpConnectionState::Connecting {
            tid: *msg.transaction_id(),
            fingerprint: msg.has_fingerprint(),
        };
        self.tcp_connections
            .insert(connection, TcpConnection { alloc: id, peer, state });
        let peer = self.route(peer);
        self.outputs.push_back(Output::TcpConnect {
            relay,
            peer,
            connection,
        });
        Ok(ClientOutcome::Consumed)
    }

    /// The driver's result for an [`Output::TcpConnect`]: the Connect
    /// response (success with CONNECTION-ID, or 447) for the control connection.
    fn handle_tcp_connected(
        &mut self,
        now: Now,
        connection: u32,
        connected: bool,
        out: &mut [u8],
    ) -> Option<(ClientKey, usize)> {
        let c = self.tcp_connections.get_mut(&connection)?;
        let TcpConnectionState::Connecting { tid, fingerprint } = c.state else {
            return None;
        };
        let a = self.allocations.get(c.alloc)?;
        let signing = Signing {
            key: &a.credential,
            suite: a.suite,
        };
        let software = self.config.software.as_deref();
        let written = if connected {
            c.state = TcpConnectionState::AwaitingBind {
                deadline: now.instant + CONNECTION_BIND_TIMEOUT,
            };
            let mut w = MessageWriter::new(out, Class::Success, Method::CONNECT, tid).ok()?;
            w.connection_id(connection).ok()?;
            finish(w, Some(signing), fingerprint, software)?
        } else {
            let key = a.key;
            let credential = a.credential.clone();
            let suite = a.suite;
            self.forget_connection(connection);
            self.stats.count_error(447);
            let software = self.config.software.as_deref();
            let signing = Signing {
                key: &credential,
                suite,
            };
            let n = error_for(
                tid,
                Method::CONNECT,
                447,
                "Connection Timeout or Failure",
                Some(signing),
                fingerprint,
                software,
                out,
            )?;
            return Some((key, n));
        };
        Some((a.key, written))
    }

    /// A peer connected to a TCP relay (RFC 6062 §5.3): with a permission it
    /// gets a connection id and the client a ConnectionAttempt indication
    /// (written into `out`); without one, or beyond the allocation's
    /// connection limit, the driver closes it.
    fn handle_tcp_peer_accepted(
        &mut self,
        now: Now,
        relay: RelayId,
        peer: SocketAddr,
        out: &mut [u8],
    ) -> Result<(ClientKey, u32, usize), DropReason> {
        let alloc = self
            .relays
            .get(relay.0 as usize)
            .copied()
            .flatten()
            .ok_or(DropReason::UnknownRelay)?;
        let a = self.allocations.get_mut(alloc).ok_or(DropReason::UnknownRelay)?;
        if !a.tcp || !a.permits(peer.ip(), now.instant) {
            return Err(DropReason::NoPermission);
        }
        if a.connections >= self.config.max_connections {
            return Err(DropReason::ConnectionLimit);
        }
        a.connections += 1;
        let key = a.key;
        let connection = self.new_connection_id();
        let state = TcpConnectionState::AwaitingBind {
            deadline: now.instant + CONNECTION_BIND_TIMEOUT,
        };
        self.tcp_connections
            .insert(connection, TcpConnection { alloc, peer, state });
        let tid = TransactionId(indication_tid(&mut self.stats));
        let written = (|| {
            let mut w = MessageWriter::new(out, Class::Indication, Method::CONNECTION_ATTEMPT, tid).ok()?;
            w.xor_peer_address(&peer).ok()?;
            w.connection_id(connection).ok()?;
            Some(w.finish())
        })();
        match written {
            Some(len) => Ok((key, connection, len)),
            None => {
                self.forget_connection(connection);
                Err(DropReason::OutputTooSmall)
            }
        }
    }

    /// ConnectionBind (RFC 6062 §5.4) on a new client connection.
    #[allow(clippy::too_many_arguments)]
    fn connection_bind(
        &mut self,
        _now: Now,
        key: ClientKey,
        alloc_id: Option<usize>,
        msg: &Message<'_>,
        username: &str,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> Handled {
        // Only a fresh TCP/TLS connection can become a data connection.
        if !self.is_stream(&key) || alloc_id.is_some() {
            return Err(BAD_REQUEST);
        }
        let connection = match msg.connection_id() {
            Ok(Some(c)) => c,
            _ => return Err(BAD_REQUEST),
        };
        let c = self.tcp_connections.get(&connection).ok_or(BAD_REQUEST)?;
        if !matches!(c.state, TcpConnectionState::AwaitingBind { .. }) {
            return Err(BAD_REQUEST);
        }
        if self.allocations.get(c.alloc).is_none_or(|a| a.username != username) {
            return Err(refuse(441, "Wrong Credentials", "wrong_credentials"));
        }
        if let Some(c) = self.tcp_connections.get_mut(&connection) {
            c.state = TcpConnectionState::Bound;
        }
        let software = self.config.software.as_deref();
        match success_response(msg, signing, software, out, |_| Ok(())) {
            Some(len) => Ok(ClientOutcome::ConnectionBound { connection, len }),
            None => Ok(ClientOutcome::Drop(DropReason::OutputTooSmall)),
        }
    }

    /// Removes a peer connection and gives its place in the allocation's
    /// count back.
    fn forget_connection(&mut self, connection: u32) {
        if let Some(c) = self.tcp_connections.remove(&connection)
            && let Some(a) = self.allocations.get_mut(c.alloc)
        {
            a.connections = a.connections.saturating_sub(1);
        }
    }

    fn expire_tcp_connections(&mut self, now: Instant) {
        let expired: Vec<u32> = self
            .tcp_connections
            .iter()
            .filter(|(_, c)| matches!(c.state, TcpConnectionState::AwaitingBind { deadline } if deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.forget_connection(id);
            self.outputs.push_back(Output::CloseConnection(id));
        }
    }

    // ----- peer side ------------------------------------------------------

    /// Handles a datagram from `peer` on relay socket `relay`. The datagram
    /// is `buf[start..start + len]`; at least [`PEER_HEADROOM`] bytes before
    /// it and [`PEER_TAILROOM`] after it are the core's to write.
    pub fn handle_peer_packet(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> PeerOutcome {
        // One lookup of the allocation's index serves the whole packet.
        let Some(alloc_idx) = self.relays.get(relay.0 as usize).copied().flatten() else {
            return PeerOutcome::Drop(DropReason::UnknownRelay);
        };
        let Some(alloc) = self.allocations.get(alloc_idx) else {
            return PeerOutcome::Drop(DropReason::UnknownRelay);
        };
        if !alloc.permits(peer.ip(), now) {
            return PeerOutcome::Drop(DropReason::NoPermission);
        }
        if self.config.limits_bandwidth() {
            let Some(a) = self.allocations.get_mut(alloc_idx) else {
                return PeerOutcome::Drop(DropReason::UnknownRelay);
            };
            if !within_bandwidth(
                &mut a.shaper,
                &mut self.worker_bandwidth,
                &mut self.stats,
                &self.config,
                TO_CLIENT,
                len,
                now,
            ) {
                return PeerOutcome::Drop(DropReason::BandwidthLimit);
            }
        }
        let Some(alloc) = self.allocations.get(alloc_idx) else {
            return PeerOutcome::Drop(DropReason::UnknownRelay);
        };
        let key = alloc.key;
        let stream = self.listeners.get(usize::from(key.listener.0)) == Some(&Transport::Stream);
        let end = start + len;
        let outcome = if let Some(ch) = alloc.channel_for_peer(&peer, now) {
            let Ok(len16) = u16::try_from(len) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let Some(head_at) = start.checked_sub(channel_data::HEADER_LEN) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let Some(h) = buf.get_mut(head_at..start) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            h.copy_from_slice(&channel_data::header(ch.number, len16));
            let mut end = end;
            if stream {
                let padded = head_at + 4 + ((len + 3) & !3);
                let Some(pad) = buf.get_mut(end..padded) else {
                    return PeerOutcome::Drop(DropReason::OutputTooSmall);
                };
                pad.fill(0);
                end = padded;
            }
            PeerOutcome::ToClient {
                key,
                start: head_at,
                end,
            }
        } else {
            // Data indication, written in place around the data.
            let addr_len = if peer.is_ipv4() { 8 } else { 20 };
            let head = 20 + 4 + addr_len + 4;
            let Some(head_at) = start.checked_sub(head) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let padded_end = start + ((len + 3) & !3);
            let Some(region) = buf.get_mut(head_at..padded_end) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let tid = TransactionId(indication_tid(&mut self.stats));
            let written = (|| {
                let mut w = MessageWriter::new(region, Class::Indication, Method::DATA, tid).ok()?;
                w.xor_peer_address(&peer).ok()?;
                // The value is already in place: only the header and padding are written.
                w.attribute_with(kind::DATA, len, |_| Some(())).ok()?;
                Some(w.finish())
            })();
            match written {
                Some(n) => PeerOutcome::ToClient {
                    key,
                    start: head_at,
                    end: head_at + n,
                },
                None => PeerOutcome::Drop(DropReason::OutputTooSmall),
            }
        };
        if let Some(a) = self.allocations.get_mut(alloc_idx) {
            a.traffic.to_client_packets += 1;
            a.traffic.to_client_bytes += len as u64;
        }
        self.stats.peer_to_client_packets += 1;
        self.stats.peer_to_client_bytes += len as u64;
        if stream {
            self.stats.stream_peer_to_client_packets += 1;
            self.stats.stream_peer_to_client_bytes += len as u64;
        }
        outcome
    }

    /// An ICMP error the relay socket received for `peer` (IP_RECVERR): tell
    /// the client with a Data indication carrying ICMP (RFC 8656 §11.5),
    /// written into `out`, if the peer has a permission.
    fn handle_relay_icmp(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        (icmp_type, icmp_code, error_data): (u8, u8, u32),
        out: &mut [u8],
    ) -> Option<(ClientKey, usize)> {
        let alloc = self
            .relays
            .get(relay.0 as usize)
            .copied()
            .flatten()
            .and_then(|i| self.allocations.get(i))?;
        if !alloc.permits(peer.ip(), now) {
            return None;
        }
        let key = alloc.key;
        let tid = TransactionId(indication_tid(&mut self.stats));
        let mut w = MessageWriter::new(out, Class::Indication, Method::DATA, tid).ok()?;
        w.xor_peer_address(&peer).ok()?;
        w.icmp(icmp_type, icmp_code, error_data).ok()?;
        self.stats.icmp_relayed += 1;
        Some((key, w.finish()))
    }
}

/// Transaction ids of server-originated indications: unique per worker, no
/// randomness needed (RFC 8489 only asks clients for unpredictable ids).
fn indication_tid(stats: &mut Stats) -> [u8; 12] {
    stats.indications_sent += 1;
    let mut t = [0u8; 12];
    let (_, counter) = t.split_at_mut(4);
    counter.copy_from_slice(&stats.indications_sent.to_be_bytes());
    t
}

fn write_allocate_body(
    w: &mut MessageWriter<'_>,
    a: &Allocation,
    lifetime: u32,
    family_error: Option<AddressFamily>,
) -> Result<(), BufferTooSmall> {
    for r in a.relays.iter().flatten() {
        w.xor_relayed_address(&r.advertised)?;
    }
    w.lifetime(lifetime)?;
    if let Some(t) = &a.reservation_token {
        w.reservation_token(t)?;
    }
    w.xor_mapped_address(&a.key.client)?;
    if let Some(f) = family_error {
        w.address_error_code(f, 440, "Address Family not Supported")?;
    }
    Ok(())
}

fn write_or_drop(written: Option<usize>) -> ClientOutcome {
    match written {
        Some(len) => ClientOutcome::Reply { len },
        None => ClientOutcome::Drop(DropReason::OutputTooSmall),
    }
}

/// SOFTWARE, MESSAGE-INTEGRITY(-SHA256) when signing, FINGERPRINT when the
/// request had one; returns the length.
fn finish(
    mut w: MessageWriter<'_>,
    signing: Option<Signing<'_>>,
    fingerprint: bool,
    software: Option<&str>,
) -> Option<usize> {
    if let Some(s) = software {
        w.software(s).ok()?;
    }
    match signing {
        Some(Signing {
            key,
            suite: IntegritySuite::Sha1,
        }) => w.message_integrity(key.hmac_sha1()).ok()?,
        Some(Signing {
            key,
            suite: IntegritySuite::Sha256,
        }) => w.message_integrity_sha256(key.hmac_sha256()).ok()?,
        None => {}
    }
    if fingerprint {
        w.fingerprint().ok()?;
    }
    Some(w.finish())
}

fn success_response(
    request: &Message<'_>,
    signing: Signing<'_>,
    software: Option<&str>,
    out: &mut [u8],
    body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), BufferTooSmall>,
) -> Option<usize> {
    let mut w = MessageWriter::new(out, Class::Success, request.method(), *request.transaction_id()).ok()?;
    body(&mut w).ok()?;
    finish(w, Some(signing), request.has_fingerprint(), software)
}

/// An error response to `request`: ERROR-CODE, extra attributes, then
/// integrity when the request was authenticated and FINGERPRINT when it had one.
fn error_response(
    request: &Message<'_>,
    code: u16,
    reason: &str,
    signing: Option<Signing<'_>>,
    out: &mut [u8],
    extra: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), BufferTooSmall>,
) -> Option<usize> {
    let mut w = MessageWriter::new(out, Class::Error, request.method(), *request.transaction_id()).ok()?;
    w.error_code(code, reason).ok()?;
    extra(&mut w).ok()?;
    finish(w, signing, request.has_fingerprint(), None)
}

#[allow(clippy::too_many_arguments)]
fn error_for(
    tid: TransactionId,
    method: Method,
    code: u16,
    reason: &str,
    signing: Option<Signing<'_>>,
    fingerprint: bool,
    software: Option<&str>,
    out: &mut [u8],
) -> Option<usize> {
    let mut w = MessageWriter::new(out, Class::Error, method, tid).ok()?;
    w.error_code(code, reason).ok()?;
    finish(w, signing, fingerprint, software)
}
