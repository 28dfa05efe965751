//! MESSAGE-INTEGRITY (HMAC-SHA1), MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256) and
//! FINGERPRINT (CRC-32 xor 0x5354554e), computed over a message prefix whose
//! length field is patched as RFC 8489 §14.5–14.7 require — without copying
//! the message: the MAC is fed the header in three pieces.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::header::HEADER_LEN;

pub type HmacSha1 = Hmac<Sha1>;
pub type HmacSha256 = Hmac<Sha256>;

/// XORed into the CRC-32 of the message to form FINGERPRINT.
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Size of the MESSAGE-INTEGRITY value.
pub const SHA1_LEN: usize = 20;
/// Full size of the MESSAGE-INTEGRITY-SHA256 value.
pub const SHA256_LEN: usize = 32;

/// Why an integrity check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityError {
    /// The attribute is not in the message.
    Missing,
    /// The value does not match: wrong key, or the message was altered.
    Mismatch,
}

/// Keys an HMAC-SHA1 with a long-term or short-term key. HMAC accepts keys of
/// any length, so this cannot fail.
pub fn hmac_sha1(key: &[u8]) -> HmacSha1 {
    match HmacSha1::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// Keys an HMAC-SHA256.
pub fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// Feeds `msg[..upto]` into `f` with the header's length field replaced by
/// `patched_len`. `msg` holds at least a header and `upto >= HEADER_LEN`.
#[inline]
pub(crate) fn feed_patched(msg: &[u8], upto: usize, patched_len: u16, mut f: impl FnMut(&[u8])) -> Option<()> {
    f(msg.get(0..2)?);
    f(&patched_len.to_be_bytes());
    f(msg.get(4..upto)?);
    Some(())
}

/// HMAC-SHA1 over `msg[..attr_at]`, length patched so the message appears to
/// end right after a MESSAGE-INTEGRITY attribute at `attr_at`.
pub(crate) fn sha1_over(mut mac: HmacSha1, msg: &[u8], attr_at: usize) -> Option<[u8; SHA1_LEN]> {
    let patched = u16::try_from(attr_at + 4 + SHA1_LEN - HEADER_LEN).ok()?;
    feed_patched(msg, attr_at, patched, |b| mac.update(b))?;
    Some(mac.finalize().into_bytes().into())
}

/// HMAC-SHA256 over `msg[..attr_at]`, for a MESSAGE-INTEGRITY-SHA256 value of
/// `value_len` bytes at `attr_at`.
pub(crate) fn sha256_over(
    mut mac: HmacSha256,
    msg: &[u8],
    attr_at: usize,
    value_len: usize,
) -> Option<[u8; SHA256_LEN]> {
    let patched = u16::try_from(attr_at + 4 + value_len - HEADER_LEN).ok()?;
    feed_patched(msg, attr_at, patched, |b| mac.update(b))?;
    Some(mac.finalize().into_bytes().into())
}

/// FINGERPRINT value for a FINGERPRINT attribute at `attr_at`.
pub(crate) fn fingerprint_over(msg: &[u8], attr_at: usize) -> Option<u32> {
    let patched = u16::try_from(attr_at + 8 - HEADER_LEN).ok()?;
    let mut crc = crc32fast::Hasher::new();
    feed_patched(msg, attr_at, patched, |b| crc.update(b))?;
    Some(crc.finalize() ^ FINGERPRINT_XOR)
}

/// Constant-time comparison, so MAC checks leak no timing.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}
