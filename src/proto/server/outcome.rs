//! What the two hot calls return: a routing decision over the caller's
//! buffer, or why a packet got no answer.

use super::*;

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
    /// RFC 8016: a Refresh carries the mobility ticket of an allocation
    /// that worker `worker` holds. The driver brings that allocation here
    /// ([`Server::lend`] there, [`Server::adopt`] here) and hands the core
    /// the same packet again.
    AllocationElsewhere { worker: usize, mobility: u64 },
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
