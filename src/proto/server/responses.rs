//! Writing responses and indications: signed or not, SOFTWARE and
//! FINGERPRINT as the request asked, errors from one refusal table.

use super::*;

/// Every error response a request handler gives, with its code, reason
/// phrase and metric label: spelled here once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    BadRequest,
    ChannelConflict,
    Forbidden,
    AllocationMismatch,
    FamilyNotSupported,
    WrongCredentials,
    UnsupportedTransport,
    FamilyMismatch,
    ConnectionExists,
    ConnectFailed,
    UserQuota,
    IpQuota,
    Draining,
    BadReservationToken,
    TotalQuota,
    NoRelayPort,
    TooManyPermissions,
    TooManyChannels,
    TooManyConnections,
    MobilityForbidden,
}

impl Refusal {
    pub(super) const fn code(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::ChannelConflict => 400,
            Refusal::Forbidden => 403,
            Refusal::AllocationMismatch => 437,
            Refusal::FamilyNotSupported => 440,
            Refusal::WrongCredentials => 441,
            Refusal::UnsupportedTransport => 442,
            Refusal::FamilyMismatch => 443,
            Refusal::ConnectionExists => 446,
            Refusal::ConnectFailed => 447,
            Refusal::UserQuota => 486,
            Refusal::IpQuota => 486,
            Refusal::Draining => 508,
            Refusal::BadReservationToken => 508,
            Refusal::TotalQuota => 508,
            Refusal::NoRelayPort => 508,
            Refusal::TooManyPermissions => 508,
            Refusal::TooManyChannels => 508,
            Refusal::TooManyConnections => 508,
            Refusal::MobilityForbidden => 405,
        }
    }

    pub(super) const fn reason(self) -> &'static str {
        match self {
            Refusal::BadRequest => "Bad Request",
            Refusal::ChannelConflict => "Bad Request",
            Refusal::Forbidden => "Forbidden",
            Refusal::AllocationMismatch => "Allocation Mismatch",
            Refusal::FamilyNotSupported => "Address Family not Supported",
            Refusal::WrongCredentials => "Wrong Credentials",
            Refusal::UnsupportedTransport => "Unsupported Transport Protocol",
            Refusal::FamilyMismatch => "Peer Address Family Mismatch",
            Refusal::ConnectionExists => "Connection Already Exists",
            Refusal::ConnectFailed => "Connection Timeout or Failure",
            Refusal::UserQuota => "Allocation Quota Reached",
            Refusal::IpQuota => "Allocation Quota Reached",
            Refusal::Draining => "Insufficient Capacity",
            Refusal::BadReservationToken => "Insufficient Capacity",
            Refusal::TotalQuota => "Insufficient Capacity",
            Refusal::NoRelayPort => "Insufficient Capacity",
            Refusal::TooManyPermissions => "Insufficient Capacity",
            Refusal::TooManyChannels => "Insufficient Capacity",
            Refusal::TooManyConnections => "Insufficient Capacity",
            Refusal::MobilityForbidden => "Mobility Forbidden",
        }
    }

    pub(super) const fn label(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::ChannelConflict => "channel_conflict",
            Refusal::Forbidden => "peer_forbidden",
            Refusal::AllocationMismatch => "allocation_mismatch",
            Refusal::FamilyNotSupported => "family_not_supported",
            Refusal::WrongCredentials => "wrong_credentials",
            Refusal::UnsupportedTransport => "unsupported_transport",
            Refusal::FamilyMismatch => "family_mismatch",
            Refusal::ConnectionExists => "connection_exists",
            Refusal::ConnectFailed => "connect_failed",
            Refusal::UserQuota => "user_quota",
            Refusal::IpQuota => "ip_quota",
            Refusal::Draining => "draining",
            Refusal::BadReservationToken => "bad_reservation_token",
            Refusal::TotalQuota => "total_quota",
            Refusal::NoRelayPort => "no_relay_port",
            Refusal::TooManyPermissions => "too_many_permissions",
            Refusal::TooManyChannels => "too_many_channels",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::MobilityForbidden => "mobility_forbidden",
        }
    }
}

/// Transaction ids of server-originated indications: unique per worker, no
/// randomness needed (RFC 8489 only asks clients for unpredictable ids).
pub(super) fn indication_tid(stats: &mut Stats) -> [u8; 12] {
    stats.indications_sent += 1;
    let mut t = [0u8; 12];
    let (_, counter) = t.split_at_mut(4);
    counter.copy_from_slice(&stats.indications_sent.to_be_bytes());
    t
}

pub(super) fn write_or_drop(written: Option<usize>) -> ClientOutcome {
    match written {
        Some(len) => ClientOutcome::Reply { len },
        None => ClientOutcome::Drop(DropReason::OutputTooSmall),
    }
}

/// Ends a success response: SOFTWARE (when configured), then integrity and
/// FINGERPRINT as [`finish_error`]. SOFTWARE goes on success responses and
/// on no error response (RFC 8489 §14.14 leaves it optional): errors, most
/// of them to sources not yet authenticated, stay as small as they can.
pub(super) fn finish_success(
    mut w: MessageWriter<'_>,
    signing: Option<Signing<'_>>,
    fingerprint: bool,
    software: Option<&str>,
) -> Option<usize> {
    if let Some(s) = software {
        w.software(s).ok()?;
    }
    finish_error(w, signing, fingerprint)
}

/// Ends a response: MESSAGE-INTEGRITY(-SHA256) when signing, FINGERPRINT
/// when the request had one; returns the length.
pub(super) fn finish_error(mut w: MessageWriter<'_>, signing: Option<Signing<'_>>, fingerprint: bool) -> Option<usize> {
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

pub(super) fn success_response(
    request: &Message<'_>,
    signing: Signing<'_>,
    software: Option<&str>,
    out: &mut [u8],
    body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), BufferTooSmall>,
) -> Option<usize> {
    let mut w = MessageWriter::new(out, Class::Success, request.method(), *request.transaction_id()).ok()?;
    body(&mut w).ok()?;
    finish_success(w, Some(signing), request.has_fingerprint(), software)
}

/// An error response to `request`: ERROR-CODE, extra attributes, then
/// integrity when the request was authenticated and FINGERPRINT when it had one.
pub(super) fn error_response(
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
    finish_error(w, signing, request.has_fingerprint())
}

/// An error response to a request answered after its call returned (a
/// pending Allocate, a Connect).
pub(super) fn error_for(
    tid: TransactionId,
    method: Method,
    r: Refusal,
    signing: Option<Signing<'_>>,
    fingerprint: bool,
    out: &mut [u8],
) -> Option<usize> {
    let mut w = MessageWriter::new(out, Class::Error, method, tid).ok()?;
    w.error_code(r.code(), r.reason()).ok()?;
    finish_error(w, signing, fingerprint)
}
