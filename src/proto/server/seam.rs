//! The core's one seam beside the two hot calls: what a driver tells the
//! core ([`Input`], through [`super::Server::handle`]) and what the core
//! asks of the driver ([`Output`], through [`super::Server::poll_output`]).
//! A driver drains the outputs after every call into the core.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::DropReason;
use super::allocation::{ClientKey, RelayId, Traffic};
use super::timers::CloseReason;

/// Something that happened outside the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The relay socket of an [`Output::BindRelay`] is bound, or not.
    RelayBound { relay: RelayId, result: BindResult },
    /// The TCP connection of an [`Output::TcpConnect`] was established, or not.
    TcpConnected { connection: u32, connected: bool },
    /// A peer connected to the TCP relay `relay` (RFC 6062 §5.3). The core
    /// answers [`Output::PeerConnectionAccepted`] or
    /// [`Output::PeerConnectionRefused`] before `handle` returns.
    TcpPeerAccepted { relay: RelayId, peer: SocketAddr },
    /// An RFC 6062 peer connection or its data connection closed.
    TcpConnectionClosed { connection: u32 },
    /// A client's TCP or TLS connection is open (after PROXY header and TLS
    /// handshake): from now on it must complete a message every
    /// `idle_timeout` until it has an allocation.
    StreamOpened { key: ClientKey },
    /// What a read on a client connection did: whether it completed at
    /// least one message (each handed to `handle_client_packet`), and
    /// whether bytes of an unfinished one wait in the driver's buffer. The
    /// core keeps the idle and slow-message deadlines from these.
    StreamProgress {
        key: ClientKey,
        completed: bool,
        partial: bool,
    },
    /// A client's TCP or TLS connection closed: its allocation goes with it.
    ClientClosed { key: ClientKey },
    /// Packets a kernel fast path relayed for this allocation since its
    /// last report: counted into the allocation's totals and the stats as
    /// if the core had relayed them.
    OffloadedTraffic { key: ClientKey, traffic: Traffic },
    /// The least loaded other node of the fleet (or none): a full or
    /// draining node answers Allocate with 300 Try Alternate to it.
    FleetAlternate { server: Option<SocketAddr> },
    /// An ICMP error arrived on a relay socket, about `peer`.
    RelayIcmp {
        relay: RelayId,
        peer: SocketAddr,
        icmp_type: u8,
        icmp_code: u8,
        info: u32,
    },
}

/// How binding one relay socket went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindResult {
    Bound,
    /// EADDRINUSE: the core tries another port.
    InUse,
    /// Any other failure (EMFILE, …): the Allocate is answered 508.
    Failed,
}

/// Why an allocation ended; one log field and metric label each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Refresh with LIFETIME 0.
    Deleted,
    /// Not refreshed in time.
    Expired,
    /// The client's TCP or TLS connection closed.
    ConnectionClosed,
    /// The admin API or `turnstile kick`.
    Operator,
    /// Its credential no longer verifies after a configuration reload.
    Revoked,
    /// A live upgrade handed it to the new process, which serves it on.
    HandedOver,
    /// RFC 8016: its client took it to another 5-tuple (reported for the
    /// old one; the allocation goes on under the new).
    Moved,
}

impl EndReason {
    pub const fn label(self) -> &'static str {
        match self {
            EndReason::Deleted => "deleted",
            EndReason::Expired => "expired",
            EndReason::ConnectionClosed => "connection_closed",
            EndReason::Operator => "operator",
            EndReason::Revoked => "revoked",
            EndReason::HandedOver => "handed_over",
            EndReason::Moved => "moved",
        }
    }

    /// Whether the client's stream connection goes with the allocation (as
    /// coturn does); after a Refresh 0 the client still holds the connection
    /// and the idle timeout applies to it.
    pub(crate) const fn closes_stream(self) -> bool {
        matches!(self, EndReason::Expired | EndReason::Operator | EndReason::Revoked)
    }
}

/// Work for the driver, and what changed for those that mirror the core's
/// state (a kernel fast path, a hand-over to a new process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes to the client of `key` (a response that came after
    /// the request's own call returned, or an indication).
    Transmit { key: ClientKey, bytes: Vec<u8> },
    /// Bind relay socket `relay` at `addr`, then answer with
    /// [`Input::RelayBound`].
    BindRelay {
        relay: RelayId,
        addr: SocketAddr,
        /// Set DF on it (DONT-FRAGMENT).
        dont_fragment: bool,
        /// RFC 6062: a listening TCP socket instead of a UDP socket.
        tcp: bool,
    },
    /// The relay socket is no longer used: close it.
    CloseRelay(RelayId),
    /// RFC 6062 Connect: open a TCP connection from relay `relay` to
    /// `peer`, then answer with [`Input::TcpConnected`].
    TcpConnect {
        relay: RelayId,
        peer: SocketAddr,
        connection: u32,
    },
    /// Keep the peer connection of [`Input::TcpPeerAccepted`] as `connection`.
    PeerConnectionAccepted {
        relay: RelayId,
        peer: SocketAddr,
        connection: u32,
    },
    /// Close the peer connection of [`Input::TcpPeerAccepted`].
    PeerConnectionRefused {
        relay: RelayId,
        peer: SocketAddr,
        reason: DropReason,
    },
    /// Close an RFC 6062 peer connection (and its data connection).
    CloseConnection(u32),
    /// Close this TCP or TLS client connection, then report
    /// [`Input::ClientClosed`]: its allocation ended without the client
    /// asking (expiry, the operator), which would otherwise leave it holding
    /// a descriptor and a connection slot with no deadline, or it missed its
    /// idle or slow-message deadline.
    CloseClient { key: ClientKey, reason: CloseReason },
    /// An allocation exists, with these relays (index 0 IPv4, 1 IPv6).
    AllocationCreated {
        key: ClientKey,
        user: String,
        /// The name of its realm.
        realm: String,
        relays: [Option<(RelayId, SocketAddr)>; 2],
        expires: Instant,
    },
    /// An allocation's lifetime changed.
    AllocationRefreshed { key: ClientKey, expires: Instant },
    /// An allocation ended; its relays, permissions and channels with it.
    /// `traffic` is what it relayed, all told.
    AllocationEnded {
        key: ClientKey,
        reason: EndReason,
        traffic: Traffic,
    },
    /// A permission for `peer` was installed or refreshed.
    PermissionInstalled {
        key: ClientKey,
        peer: IpAddr,
        expires: Instant,
    },
    /// A permission ran out (a refreshed one is reported installed again).
    PermissionExpired { key: ClientKey, peer: IpAddr },
    /// A channel was bound or refreshed.
    ChannelBound {
        key: ClientKey,
        relay: RelayId,
        channel: u16,
        peer: SocketAddr,
        expires: Instant,
    },
    /// A channel binding ran out. Its number and peer stay reserved for
    /// the RFC's quarantine, but nothing is relayed on it.
    ChannelExpired {
        key: ClientKey,
        relay: RelayId,
        channel: u16,
        peer: SocketAddr,
    },
}
