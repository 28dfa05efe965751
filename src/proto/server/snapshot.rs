//! The core's state in a versioned, serializable form, for a live upgrade:
//! the running process exports the allocations it hands over (with their
//! keys, lifetimes, permissions, channels, reservation tokens, traffic and
//! bandwidth buckets), the port walk and holds, and the amplification
//! budgets; the new process restores them into a fresh core.
//!
//! The core holds monotonic instants, which mean nothing in another
//! process: every instant is written as milliseconds from the moment of
//! the export, and that moment as wall-clock milliseconds, so the new
//! process re-bases them on its own clock (minus the time the hand-over
//! took). The types here are the wire format and change only with
//! [`VERSION`]; the core's own types stay free to change.

use serde::{Deserialize, Serialize};

use super::*;
use crate::proto::auth::PasswordAlgorithm;

/// The format version; a new process refuses any other (and the running
/// one then keeps serving), except the one before, which it reads too.
/// 2: allocations carry their RFC 8016 ticket id. 3: and their realm.
pub const VERSION: u32 = 3;

/// One worker's handed-over state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// Wall clock at the export, milliseconds since the Unix epoch; every
    /// instant below is milliseconds relative to it.
    pub taken_unix_ms: u64,
    pub allocations: Vec<AllocationState>,
    /// IPv4 and IPv6 relay ports: where the scrambled walk stands and the
    /// ports held back (reservations, kernel refusals).
    pub ports: [PortsState; 2],
    /// Amplification budgets of unauthenticated sources.
    pub budgets: Vec<(IpAddr, BucketState)>,
    /// This worker's bandwidth buckets (to peers, to clients).
    pub worker_bandwidth: Option<[BucketState; 2]>,
    pub next_connection: u32,
    /// The transaction-id counter of the indications the server sends.
    pub indications_sent: u64,
    /// Since 3: the realm of each allocation, by name, in the order of
    /// `allocations` (kept apart so that format 2, which has none, still
    /// reads: its allocations are the default realm's).
    pub realms: Vec<String>,
}

/// Format 2: [`Snapshot`] without `realms`.
#[derive(Deserialize)]
struct SnapshotV2 {
    version: u32,
    taken_unix_ms: u64,
    allocations: Vec<AllocationState>,
    ports: [PortsState; 2],
    budgets: Vec<(IpAddr, BucketState)>,
    worker_bandwidth: Option<[BucketState; 2]>,
    next_connection: u32,
    indications_sent: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationState {
    /// The listener of the client's 5-tuple, by this worker's listener id.
    pub listener: u16,
    pub client: SocketAddr,
    pub username: String,
    pub credential: Vec<u8>,
    /// PASSWORD-ALGORITHM number (RFC 8489 §18.5: 1 MD5, 2 SHA-256).
    pub password_algorithm: u16,
    /// Whether it signs with MESSAGE-INTEGRITY-SHA256.
    pub sha256_integrity: bool,
    pub rest_expiry: Option<u64>,
    pub tid: [u8; 12],
    pub expires_ms: i64,
    pub created_ms: i64,
    pub swept_ms: Option<i64>,
    pub relays: [Option<RelayState>; 2],
    pub permissions: Vec<(IpAddr, i64)>,
    pub channels: Vec<(u16, SocketAddr, i64)>,
    pub reservation_token: Option<[u8; 8]>,
    /// Packets and bytes to peers, packets and bytes to the client.
    pub traffic: [u64; 4],
    pub tcp: bool,
    pub shaper: Option<[BucketState; 2]>,
    /// RFC 6062 peer connections: id, peer, and for one still waiting for
    /// its data connection the ConnectionBind deadline (`None`: bound).
    pub connections: Vec<(u32, SocketAddr, Option<i64>)>,
    /// RFC 8016: the id its mobility ticket names.
    pub mobility: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayState {
    /// The relay socket's id; the socket itself travels beside the snapshot.
    pub id: u32,
    pub bound: SocketAddr,
    pub advertised: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsState {
    pub cursor: u32,
    pub holds: Vec<(i64, u16)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketState {
    pub tokens: u64,
    pub at_ms: i64,
}

/// Why a snapshot cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// Written by a turnstile with another format.
    Version(u32),
    /// Restoring needs a core that holds nothing yet.
    NotEmpty,
    /// The bytes do not decode.
    Malformed(String),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Version(v) => write!(f, "state format {v}, this turnstile reads {VERSION}"),
            SnapshotError::NotEmpty => f.write_str("the core already holds allocations"),
            SnapshotError::Malformed(e) => write!(f, "state does not decode: {e}"),
        }
    }
}

impl Snapshot {
    /// A worker with nothing to hand over (a new worker count).
    pub fn empty(unix_ms: u64) -> Snapshot {
        Snapshot {
            version: VERSION,
            taken_unix_ms: unix_ms,
            allocations: Vec::new(),
            ports: [
                PortsState {
                    cursor: 0,
                    holds: Vec::new(),
                },
                PortsState {
                    cursor: 0,
                    holds: Vec::new(),
                },
            ],
            budgets: Vec::new(),
            worker_bandwidth: None,
            next_connection: 0,
            indications_sent: 0,
            realms: Vec::new(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes, checking the version first (it leads the encoding), so an
    /// older or newer format is named as such rather than as garbage.
    pub fn from_bytes(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let (version, _) =
            postcard::take_from_bytes::<u32>(bytes).map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        let malformed = |e: postcard::Error| SnapshotError::Malformed(e.to_string());
        match version {
            VERSION => postcard::from_bytes(bytes).map_err(malformed),
            2 => {
                let v2: SnapshotV2 = postcard::from_bytes(bytes).map_err(malformed)?;
                debug_assert_eq!(v2.version, 2);
                Ok(Snapshot {
                    version: VERSION,
                    taken_unix_ms: v2.taken_unix_ms,
                    allocations: v2.allocations,
                    ports: v2.ports,
                    budgets: v2.budgets,
                    worker_bandwidth: v2.worker_bandwidth,
                    next_connection: v2.next_connection,
                    indications_sent: v2.indications_sent,
                    realms: Vec::new(),
                })
            }
            v => Err(SnapshotError::Version(v)),
        }
    }
}

/// Instants to and from milliseconds around a reference instant.
#[derive(Clone, Copy)]
pub(super) struct Rebase {
    at: Instant,
    /// Milliseconds to subtract from every offset (time spent in transit).
    elapsed: i64,
}

impl Rebase {
    /// Re-bases a snapshot taken at wall clock `taken_unix_ms` on `at` (wall
    /// clock `unix_ms`).
    pub(super) fn new(at: Instant, unix_ms: u64, taken_unix_ms: u64) -> Rebase {
        Rebase {
            at,
            elapsed: i64::try_from(unix_ms.saturating_sub(taken_unix_ms)).unwrap_or(i64::MAX),
        }
    }

    fn ms(self, t: Instant) -> i64 {
        if t >= self.at {
            i64::try_from((t - self.at).as_millis()).unwrap_or(i64::MAX)
        } else {
            -i64::try_from((self.at - t).as_millis()).unwrap_or(i64::MAX)
        }
    }

    fn instant(self, ms: i64) -> Instant {
        let ms = ms.saturating_sub(self.elapsed);
        if ms >= 0 {
            self.at + Duration::from_millis(ms as u64)
        } else {
            self.at
                .checked_sub(Duration::from_millis(ms.unsigned_abs()))
                .unwrap_or(self.at)
        }
    }

    fn bucket(self, b: TokenBucket) -> BucketState {
        let (tokens, at) = b.parts();
        BucketState {
            tokens,
            at_ms: self.ms(at),
        }
    }

    fn unbucket(self, b: BucketState) -> TokenBucket {
        TokenBucket::from_parts(b.tokens, self.instant(b.at_ms))
    }
}

impl Server {
    /// The state of the allocations whose client `include` names, and of
    /// the worker as a whole, as of `at` (wall clock `unix_ms`). The core
    /// is unchanged: if the hand-over fails it goes on serving.
    pub fn export(&self, at: Instant, unix_ms: u64, include: impl Fn(&ClientKey) -> bool) -> Snapshot {
        let r = Rebase { at, elapsed: 0 };
        let allocations = self
            .allocations
            .iter()
            .filter(|(id, a)| include(&a.key) && self.movable(*id, a))
            .map(|(id, a)| AllocationState {
                listener: a.key.listener.0,
                client: a.key.client,
                username: a.username.clone(),
                credential: a.credential.as_bytes().to_vec(),
                password_algorithm: a.algorithm.number(),
                sha256_integrity: a.suite == IntegritySuite::Sha256,
                rest_expiry: a.rest_expiry,
                tid: *a.tid.as_bytes(),
                expires_ms: r.ms(a.expires),
                created_ms: r.ms(a.created),
                swept_ms: a.swept.map(|s| r.ms(s)),
                relays: a.relays.map(|x| {
                    x.map(|x| RelayState {
                        id: x.id.0,
                        bound: x.bound,
                        advertised: x.advertised,
                    })
                }),
                permissions: a.permissions.iter().map(|p| (p.ip, r.ms(p.expires))).collect(),
                channels: a.channels.iter().map(|c| (c.number, c.peer, r.ms(c.expires))).collect(),
                reservation_token: a.reservation_token,
                traffic: [
                    a.traffic.to_peer_packets,
                    a.traffic.to_peer_bytes,
                    a.traffic.to_client_packets,
                    a.traffic.to_client_bytes,
                ],
                tcp: a.tcp,
                shaper: a.shaper.as_deref().map(|[p, c]| [r.bucket(*p), r.bucket(*c)]),
                connections: self
                    .tcp_connections
                    .iter()
                    .filter(|(_, c)| c.alloc == id)
                    .map(|(cid, c)| {
                        let deadline = match c.state {
                            TcpConnectionState::AwaitingBind { deadline } => Some(r.ms(deadline)),
                            _ => None,
                        };
                        (*cid, c.peer, deadline)
                    })
                    .collect(),
                mobility: a.mobility,
            })
            .collect();
        let realms = self
            .allocations
            .iter()
            .filter(|(id, a)| include(&a.key) && self.movable(*id, a))
            .map(|(_, a)| self.realms.get(a.realm).name().to_owned())
            .collect();
        let ports = self.ports.each_ref().map(|p| {
            let (cursor, holds) = p.walk();
            PortsState {
                cursor,
                holds: holds.iter().map(|(t, port)| (r.ms(*t), *port)).collect(),
            }
        });
        Snapshot {
            version: VERSION,
            taken_unix_ms: unix_ms,
            allocations,
            ports,
            budgets: self.budgets.entries().map(|(ip, b)| (ip, r.bucket(b))).collect(),
            worker_bandwidth: self.worker_bandwidth.map(|[p, c]| [r.bucket(p), r.bucket(c)]),
            next_connection: self.next_connection,
            indications_sent: self.stats.indications_sent,
            realms,
        }
    }

    /// Takes over a snapshot's allocations at `at` (wall clock `unix_ms`),
    /// with their relay ids unchanged. `listener` maps the exporting
    /// worker's listener ids to this core's; an allocation whose listener
    /// is gone is left out, as are its relays. Returns the relay ids
    /// restored: the driver closes the sockets of any others.
    ///
    /// The new configuration applies as a reload would: with
    /// `revoke_unverifiable`, allocations whose credential no longer
    /// verifies end, and permissions and channels the peer policy now
    /// refuses are withdrawn. Each allocation is reported created, with its
    /// permissions and channels, for drivers that mirror the core.
    pub fn restore(
        &mut self,
        snapshot: Snapshot,
        at: Instant,
        unix_ms: u64,
        listener: impl Fn(ListenerId) -> Option<ListenerId>,
        revoke_unverifiable: bool,
    ) -> Result<Vec<RelayId>, SnapshotError> {
        if snapshot.version != VERSION {
            return Err(SnapshotError::Version(snapshot.version));
        }
        if !self.allocations.is_empty() || !self.relays.is_empty() || !self.pending.is_empty() {
            return Err(SnapshotError::NotEmpty);
        }
        let r = Rebase {
            at,
            elapsed: i64::try_from(unix_ms.saturating_sub(snapshot.taken_unix_ms)).unwrap_or(i64::MAX),
        };
        let mut relays: Vec<(usize, Option<usize>)> = Vec::new();
        let mut realms = snapshot.realms.into_iter();
        for s in snapshot.allocations {
            let realm = realms.next().unwrap_or_default();
            let Some(l) = listener(ListenerId(s.listener)) else {
                continue;
            };
            let key = ClientKey {
                listener: l,
                client: s.client,
            };
            let Some(allocation) = restore_allocation(&s, &realm, key, r, &self.realms) else {
                tracing::info!(user = %s.username, realm, "allocation not taken over: its realm is not configured");
                continue;
            };
            let ids: Vec<usize> = allocation.relay_ids().map(|i| i.0 as usize).collect();
            if self.by_client.contains_key(&key) || ids.iter().any(|i| relays.iter().any(|(j, _)| j == i)) {
                continue;
            }
            let id = self.take_in(allocation, at);
            relays.extend(ids.into_iter().map(|i| (i, Some(id))));
            for (cid, peer, deadline) in &s.connections {
                let state = match deadline {
                    Some(ms) => TcpConnectionState::AwaitingBind {
                        deadline: r.instant(*ms),
                    },
                    None => TcpConnectionState::Bound,
                };
                if let TcpConnectionState::AwaitingBind { deadline } = state {
                    self.schedule_connection(*cid, deadline);
                }
                self.tcp_connections.insert(
                    *cid,
                    TcpConnection {
                        alloc: id,
                        peer: *peer,
                        state,
                    },
                );
            }
            if let Some(a) = self.allocations.get_mut(id) {
                a.connections = s.connections.len();
            }
        }
        let restored = relays.iter().map(|(i, _)| RelayId(*i as u32)).collect();
        self.relays = relays.into_iter().collect();
        for (ports, state) in self.ports.iter_mut().zip(snapshot.ports) {
            ports.set_walk(
                state.cursor,
                state.holds.into_iter().map(|(t, port)| (r.instant(t), port)),
            );
        }
        self.budgets
            .restore(snapshot.budgets.into_iter().map(|(ip, b)| (ip, r.unbucket(b))));
        if !self.config.worker_bandwidth.is_off() {
            self.worker_bandwidth = snapshot.worker_bandwidth.map(|[p, c]| [r.unbucket(p), r.unbucket(c)]);
        }
        self.next_connection = snapshot.next_connection;
        self.stats.indications_sent = snapshot.indications_sent;
        if revoke_unverifiable {
            self.revoke_unverifiable();
        }
        self.withdraw_refused_peers();
        Ok(restored)
    }

    /// Takes in an allocation that existed elsewhere (another process, or
    /// another worker): its ports held, its quota counted, its deadlines
    /// scheduled, and reported created with its permissions and channels.
    /// The caller points its relay ids at it.
    pub(super) fn take_in(&mut self, allocation: Allocation, at: Instant) -> usize {
        let next = allocation
            .permissions
            .iter()
            .map(|p| p.expires)
            .chain(allocation.channels.iter().map(|c| c.expires).filter(|e| *e > at))
            .fold(allocation.expires, Instant::min);
        for relay in allocation.relays.iter().flatten() {
            if let Some(p) = self.ports.get_mut(usize::from(relay.bound.is_ipv6())) {
                p.take_specific(relay.bound.port());
            }
        }
        self.quotas.restore(
            self.realms.get(allocation.realm).name(),
            &allocation.username,
            allocation.key.client.ip(),
        );
        let (key, mobility) = (allocation.key, allocation.mobility);
        let id = self.allocations.insert(allocation);
        if let Some(m) = mobility {
            self.by_mobility.insert(m, id);
        }
        self.by_client.insert(key, id);
        self.schedule_allocation(id, next);
        self.announce(id, at);
        id
    }

    /// After a hand-over: forgets the allocations handed over (their relay
    /// sockets are closed through [`Output::CloseRelay`]) and the TCP
    /// client connections, without ending them for their clients; the new
    /// process serves them now.
    pub fn release_handed_over(&mut self, include: impl Fn(&ClientKey) -> bool) -> usize {
        let ids: Vec<usize> = self
            .allocations
            .iter()
            .filter(|(id, a)| include(&a.key) && self.movable(*id, a))
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            self.remove_allocation(id, EndReason::HandedOver);
        }
        self.streams.retain(|key, _| !include(key));
        ids.len()
    }

    /// Whether a client's state can move to another process: anything but
    /// an RFC 6062 allocation with a Connect under way (the connection being
    /// made belongs to this process's driver).
    pub fn can_hand_over(&self, key: &ClientKey) -> bool {
        self.by_client
            .get(key)
            .and_then(|id| self.allocations.get(*id).map(|a| self.movable(*id, a)))
            .unwrap_or(true)
    }

    fn movable(&self, id: usize, a: &Allocation) -> bool {
        !a.tcp
            || !self
                .tcp_connections
                .values()
                .any(|c| c.alloc == id && matches!(c.state, TcpConnectionState::Connecting { .. }))
    }

    /// Whether an RFC 6062 peer connection exists.
    pub fn knows_connection(&self, connection: u32) -> bool {
        self.tcp_connections.contains_key(&connection)
    }

    /// The RFC 6062 peer connections of the allocation of `key`.
    pub fn connections_of(&self, key: &ClientKey) -> Vec<u32> {
        let Some(id) = self.by_client.get(key).copied() else {
            return Vec::new();
        };
        self.tcp_connections
            .iter()
            .filter(|(_, c)| c.alloc == id)
            .map(|(cid, _)| *cid)
            .collect()
    }
}

/// One allocation of a snapshot, in realm `realm` (by name; empty: the
/// default realm). `None` when its realm is not configured here, or its
/// key does not decode.
pub(super) fn restore_allocation(
    s: &AllocationState,
    realm: &str,
    key: ClientKey,
    r: Rebase,
    realms: &Realms,
) -> Option<Allocation> {
    let realm = if realm.is_empty() { 0 } else { realms.index_of(realm)? };
    let bandwidth = realms.get(realm).allocation_bandwidth;
    let algorithm = if s.password_algorithm == PasswordAlgorithm::Sha256.number() {
        PasswordAlgorithm::Sha256
    } else {
        PasswordAlgorithm::Md5
    };
    let relays = s.relays.map(|x| {
        x.map(|x| Relay {
            id: RelayId(x.id),
            bound: x.bound,
            advertised: x.advertised,
        })
    });
    let [to_peer_packets, to_peer_bytes, to_client_packets, to_client_bytes] = s.traffic;
    Some(Allocation {
        key,
        username: s.username.clone(),
        credential: LongTermKey::from_bytes(&s.credential)?,
        algorithm,
        suite: if s.sha256_integrity {
            IntegritySuite::Sha256
        } else {
            IntegritySuite::Sha1
        },
        rest_expiry: s.rest_expiry,
        tid: TransactionId(s.tid),
        expires: r.instant(s.expires_ms),
        relays,
        permissions: s
            .permissions
            .iter()
            .map(|(ip, t)| allocation::Permission {
                ip: *ip,
                expires: r.instant(*t),
            })
            .collect(),
        channels: s
            .channels
            .iter()
            .map(|(number, peer, t)| allocation::Channel {
                number: *number,
                peer: *peer,
                expires: r.instant(*t),
            })
            .collect(),
        reservation_token: s.reservation_token,
        traffic: allocation::Traffic {
            to_peer_packets,
            to_peer_bytes,
            to_client_packets,
            to_client_bytes,
        },
        created: r.instant(s.created_ms),
        tcp: s.tcp,
        // Counted as the connections are restored.
        connections: 0,
        mobility: s.mobility,
        scheduled: None,
        swept: s.swept_ms.map(|t| r.instant(t)),
        bandwidth,
        realm,
        shaper: match (s.shaper, bandwidth.is_off()) {
            (_, true) => None,
            (Some([p, c]), false) => Some(Box::new([r.unbucket(p), r.unbucket(c)])),
            (None, false) => Some(Box::new([TokenBucket::full(bandwidth, r.at); 2])),
        },
    })
}
