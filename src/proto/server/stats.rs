//! Per-worker counters. Plain integers owned by one worker: the hot path
//! touches no shared atomic. The driver reads them periodically and exports
//! the deltas.

use super::credentials::AuthFailure;
use super::peer_policy::PeerRefusal;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub client_to_peer_packets: u64,
    pub client_to_peer_bytes: u64,
    pub peer_to_client_packets: u64,
    pub peer_to_client_bytes: u64,
    /// The part of the four totals above whose client is on TCP or TLS.
    pub stream_client_to_peer_packets: u64,
    pub stream_client_to_peer_bytes: u64,
    pub stream_peer_to_client_packets: u64,
    pub stream_peer_to_client_bytes: u64,
    pub allocations_created: u64,
    pub allocations_expired: u64,
    pub allocations_deleted: u64,
    /// RFC 8016: allocations a client took to a new 5-tuple with its ticket.
    pub allocations_moved: u64,
    pub indications_sent: u64,
    pub icmp_relayed: u64,
    /// Error responses by code class: 400, 401, 403, 420, 437, 438, 440–443, 486, 508, other.
    pub errors: ErrorCounts,
    /// Peer refusals by reason.
    pub peer_special_purpose: u64,
    pub peer_operator_denied: u64,
    pub peer_server_own_port: u64,
    /// Authentication failures answered 401 without a challenge-only reason.
    pub auth_bad_integrity: u64,
    pub auth_revoked: u64,
    pub auth_unknown_user: u64,
    pub auth_expired: u64,
    pub auth_stale_nonce: u64,
    pub auth_bid_down: u64,
    /// Unauthenticated answers over UDP not sent: the source's budget was spent.
    pub responses_suppressed: u64,
    /// Bytes of requests answered unsigned over UDP, and of those answers sent.
    pub unauthenticated_bytes_in: u64,
    pub unauthenticated_bytes_out: u64,
    /// Relayed packets dropped by the bandwidth limits (`max_bps`, `bps_capacity`).
    pub bandwidth_dropped_packets: u64,
    pub bandwidth_dropped_bytes: u64,
    /// Allocations refused for quota: per user, per client IP address, in total.
    pub quota_refusals: [u64; 4],
    /// Requests by method: binding, allocate, refresh, create_permission,
    /// channel_bind, connect, connection_bind, other.
    pub requests: [u64; 8],
    /// Responses by method (as `requests`) and code (as [`RESPONSE_CODES`]).
    pub responses: [[u64; 17]; 8],
}

/// Response code labels, in the order of [`Stats::responses`] columns.
pub const RESPONSE_CODES: [&str; 17] = [
    "200", "300", "400", "401", "403", "420", "437", "438", "440", "441", "442", "443", "446", "447", "486", "508",
    "other",
];

/// Method labels, in the order of [`Stats::requests`].
pub const REQUEST_METHODS: [&str; 8] = [
    "binding",
    "allocate",
    "refresh",
    "create_permission",
    "channel_bind",
    "connect",
    "connection_bind",
    "other",
];

/// Point-in-time counts of one worker's state, for gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Allocations by client transport (0: UDP, 1: TCP/TLS) and relay family (0: IPv4, 1: IPv6).
    pub allocations: [[u64; 2]; 2],
    pub permissions: u64,
    pub channels: u64,
    pub tcp_connections: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    pub e400: u64,
    pub e401: u64,
    pub e403: u64,
    pub e420: u64,
    pub e437: u64,
    pub e438: u64,
    pub e440: u64,
    pub e441: u64,
    pub e442: u64,
    pub e443: u64,
    pub e486: u64,
    pub e508: u64,
    pub other: u64,
}

impl ErrorCounts {
    /// (code, count) pairs for export.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("400", self.e400),
            ("401", self.e401),
            ("403", self.e403),
            ("420", self.e420),
            ("437", self.e437),
            ("438", self.e438),
            ("440", self.e440),
            ("441", self.e441),
            ("442", self.e442),
            ("443", self.e443),
            ("486", self.e486),
            ("508", self.e508),
            ("other", self.other),
        ]
        .into_iter()
    }
}

impl Stats {
    pub(crate) fn count_request(&mut self, method: crate::proto::stun::Method) {
        if let Some(n) = self.requests.get_mut(method_index(method)) {
            *n += 1;
        }
    }

    /// Counts a response by method and code (0 for success).
    pub(crate) fn count_response(&mut self, method: crate::proto::stun::Method, code: u16) {
        let label = if code == 0 { "200".to_owned() } else { code.to_string() };
        let column = RESPONSE_CODES
            .iter()
            .position(|c| *c == label)
            .unwrap_or(RESPONSE_CODES.len() - 1);
        if let Some(n) = self
            .responses
            .get_mut(method_index(method))
            .and_then(|row| row.get_mut(column))
        {
            *n += 1;
        }
    }
}

fn method_index(method: crate::proto::stun::Method) -> usize {
    {
        use crate::proto::stun::Method;
        match method {
            Method::BINDING => 0,
            Method::ALLOCATE => 1,
            Method::REFRESH => 2,
            Method::CREATE_PERMISSION => 3,
            Method::CHANNEL_BIND => 4,
            Method::CONNECT => 5,
            Method::CONNECTION_BIND => 6,
            _ => 7,
        }
    }
}

impl Stats {
    pub(crate) fn count_error(&mut self, code: u16) {
        let e = &mut self.errors;
        let slot = match code {
            400 => &mut e.e400,
            401 => &mut e.e401,
            403 => &mut e.e403,
            420 => &mut e.e420,
            437 => &mut e.e437,
            438 => &mut e.e438,
            440 => &mut e.e440,
            441 => &mut e.e441,
            442 => &mut e.e442,
            443 => &mut e.e443,
            486 => &mut e.e486,
            508 => &mut e.e508,
            _ => &mut e.other,
        };
        *slot += 1;
    }

    pub(crate) fn count_refusal(&mut self, code: u16, _label: &'static str) {
        self.count_error(code);
    }

    pub(crate) fn count_quota_refusal(&mut self, q: super::QuotaRefusal) {
        let i = match q {
            super::QuotaRefusal::User => 0,
            super::QuotaRefusal::Address => 1,
            super::QuotaRefusal::Total => 2,
            super::QuotaRefusal::Realm => 3,
        };
        if let Some(n) = self.quota_refusals.get_mut(i) {
            *n += 1;
        }
    }

    pub(crate) fn count_peer_refusal(&mut self, r: PeerRefusal) {
        match r {
            PeerRefusal::SpecialPurpose => self.peer_special_purpose += 1,
            PeerRefusal::OperatorDenied => self.peer_operator_denied += 1,
            PeerRefusal::ServerOwnPort => self.peer_server_own_port += 1,
        }
    }

    /// One packet of `len` bytes relayed from a client (over TCP/TLS when
    /// `stream`) to a peer.
    #[inline]
    pub(crate) fn count_to_peer(&mut self, len: usize, stream: bool) {
        self.client_to_peer_packets += 1;
        self.client_to_peer_bytes += len as u64;
        if stream {
            self.stream_client_to_peer_packets += 1;
            self.stream_client_to_peer_bytes += len as u64;
        }
    }

    pub(crate) fn count_auth_failure(&mut self, f: AuthFailure) {
        self.count_error(f.code());
        match f {
            AuthFailure::Challenge | AuthFailure::MissingAttributes | AuthFailure::WrongRealm => {}
            AuthFailure::StaleNonce(_) => self.auth_stale_nonce += 1,
            AuthFailure::AlgorithmMismatch => self.auth_bid_down += 1,
            AuthFailure::UnknownUser => self.auth_unknown_user += 1,
            AuthFailure::Expired => self.auth_expired += 1,
            AuthFailure::BadIntegrity => self.auth_bad_integrity += 1,
            AuthFailure::Revoked => self.auth_revoked += 1,
        }
    }
}
