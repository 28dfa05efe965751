//! One allocation: its relayed addresses, lifetime, credentials, and the
//! permission and channel tables (RFC 8656 §2.2, §9, §12).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::credentials::IntegritySuite;
use crate::proto::auth::{LongTermKey, PasswordAlgorithm};
use crate::proto::stun::{AddressFamily, TransactionId};

/// Permissions last 300 s (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel bindings last 600 s (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a binding expires, its number and peer stay reserved this long
/// (RFC 8656 §12: 5 minutes) so late packets cannot reach a new peer.
pub const CHANNEL_QUARANTINE: Duration = Duration::from_secs(300);

/// Identifies a relay socket between the core and its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(pub u32);

/// Identifies a listening socket (and so the server side of a 5-tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u16);

/// The client side of the 5-tuple: which listener, which client address.
/// (The transport is the listener's.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    pub listener: ListenerId,
    pub client: SocketAddr,
}

/// A relayed transport address of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay {
    pub id: RelayId,
    /// Where the socket is bound.
    pub bound: SocketAddr,
    /// What the client is told (XOR-RELAYED-ADDRESS): the external address
    /// behind 1:1 NAT, else the bound one.
    pub advertised: SocketAddr,
}

/// Packets and bytes relayed by one allocation, both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    pub ip: IpAddr,
    pub expires: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel {
    pub number: u16,
    pub peer: SocketAddr,
    pub expires: Instant,
}

/// Why a ChannelBind cannot be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindConflict {
    /// The number is bound (or quarantined) to another peer.
    NumberTaken,
    /// The peer is bound (or quarantined) to another number.
    PeerTaken,
    /// The allocation has as many channels as it may.
    Full,
}

#[derive(Debug, Clone)]
pub struct Allocation {
    pub key: ClientKey,
    pub username: String,
    pub credential: LongTermKey,
    pub algorithm: PasswordAlgorithm,
    pub suite: IntegritySuite,
    pub rest_expiry: Option<u64>,
    /// Transaction id of the Allocate that created it: a retransmission gets
    /// the success response again instead of 437.
    pub tid: TransactionId,
    pub expires: Instant,
    /// Index 0: IPv4 relay; index 1: IPv6 relay.
    pub relays: [Option<Relay>; 2],
    pub permissions: Vec<Permission>,
    pub channels: Vec<Channel>,
    pub reservation_token: Option<[u8; 8]>,
    /// What this allocation relayed, for the log line when it ends and the admin API.
    pub traffic: Traffic,
    /// When it was created (for its age in the admin API).
    pub created: Instant,
    /// RFC 6062: the relayed address is a TCP listener; data flows over
    /// connections, not channels or Send.
    pub tcp: bool,
    /// RFC 6062 peer connections it holds (Connect, or accepted from a
    /// peer), bound or waiting for their ConnectionBind.
    pub connections: usize,
    /// The instant its timer entry is for (see `timers.rs`).
    pub(crate) scheduled: Option<Instant>,
    /// When its permissions and channels were last checked for expiry.
    pub(crate) swept: Option<Instant>,
    /// Bandwidth buckets (to peer, to client) when `max_bps` is set.
    pub shaper: Option<Box<[crate::proto::server::TokenBucket; 2]>>,
    /// Its realm's `max_bps` (each direction), kept here for the hot path.
    pub bandwidth: crate::proto::server::Rate,
    /// The realm that created it; its requests authenticate there.
    pub realm: crate::proto::server::realm::RealmIndex,
    /// RFC 8016: the id its current MOBILITY-TICKET names, when the client
    /// asked for mobility.
    pub mobility: Option<u64>,
}

pub(crate) const fn family_index(f: AddressFamily) -> usize {
    match f {
        AddressFamily::V4 => 0,
        AddressFamily::V6 => 1,
    }
}

impl Allocation {
    /// The relay serving peers of `peer`'s family (443 when there is none).
    #[inline]
    pub fn relay_for(&self, peer: &SocketAddr) -> Option<&Relay> {
        self.relays
            .get(family_index(AddressFamily::of(peer)))
            .and_then(Option::as_ref)
    }

    pub fn relay_ids(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.relays.iter().flatten().map(|r| r.id)
    }

    /// Whether a live permission covers `ip`.
    #[inline]
    pub fn permits(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.iter().any(|p| p.ip == ip && p.expires > now)
    }

    /// Installs or refreshes permissions for all of `ips`, or none of them
    /// when that would exceed `max` live permissions.
    pub fn permit_all(&mut self, ips: &[IpAddr], now: Instant, max: usize) -> bool {
        self.permissions.retain(|p| p.expires > now);
        let new = ips
            .iter()
            .filter(|ip| !self.permissions.iter().any(|p| p.ip == **ip))
            .count();
        if self.permissions.len() + new > max {
            return false;
        }
        let expires = now + PERMISSION_LIFETIME;
        for ip in ips {
            match self.permissions.iter_mut().find(|p| p.ip == *ip) {
                Some(p) => p.expires = expires,
                None => self.permissions.push(Permission { ip: *ip, expires }),
            }
        }
        true
    }

    /// The live channel bound to `number`.
    #[inline]
    pub fn channel(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels.iter().find(|c| c.number == number && c.expires > now)
    }

    /// The live channel bound to `peer`.
    #[inline]
    pub fn channel_for_peer(&self, peer: &SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels.iter().find(|c| c.peer == *peer && c.expires > now)
    }

    /// Binds or refreshes `number` ↔ `peer` (RFC 8656 §12: a number and a
    /// peer stay paired for the binding's life and its quarantine).
    pub fn bind_channel(
        &mut self,
        number: u16,
        peer: SocketAddr,
        now: Instant,
        max: usize,
    ) -> Result<(), BindConflict> {
        self.channels.retain(|c| c.expires + CHANNEL_QUARANTINE > now);
        let by_number = self.channels.iter().position(|c| c.number == number);
        let by_peer = self.channels.iter().position(|c| c.peer == peer);
        let expires = now + CHANNEL_LIFETIME;
        match (by_number, by_peer) {
            (Some(a), Some(b)) if a == b => {
                if let Some(c) = self.channels.get_mut(a) {
                    c.expires = expires;
                }
                Ok(())
            }
            (Some(_), _) => Err(BindConflict::NumberTaken),
            (None, Some(_)) => Err(BindConflict::PeerTaken),
            (None, None) => {
                if self.channels.len() >= max {
                    return Err(BindConflict::Full);
                }
                self.channels.push(Channel { number, peer, expires });
                Ok(())
            }
        }
    }
}
