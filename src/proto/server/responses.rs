//! Writing responses and indications: signed or not, SOFTWARE and
//! FINGERPRINT as the request asked, errors from one refusal table.

use super::*;

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

/// SOFTWARE, MESSAGE-INTEGRITY(-SHA256) when signing, FINGERPRINT when the
/// request had one; returns the length.
pub(super) fn finish(
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

pub(super) fn success_response(
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
    finish(w, signing, request.has_fingerprint(), None)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn error_for(
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
