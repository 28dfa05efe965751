//! Stateless nonces (RFC 8489 §9.2): the server keeps no per-client state.
//! A nonce carries its issue time, the listener and client port it was
//! issued to, and a MAC over (issue time, client IP address, port,
//! listener, security features) under a server key. It is good on the
//! 5-tuple it was issued to only, so a signed request captured on the wire
//! and replayed from another port or transport of the same address (another
//! user behind the same NAT) is stale, as coturn answers it too. The one
//! exception is ConnectionBind (RFC 6062), which arrives on a new data
//! connection from another port of the same client: it is checked against
//! the client's address alone. A nonce that fails the MAC or is older than
//! its lifetime is stale (438).
//!
//! When the server offers RFC 8489's new security features, the nonce starts
//! with the cookie "obMatJos2" and four base64 characters of the 24-bit
//! security feature set. Those bits are under the MAC, so a man in the middle
//! cannot clear them to bid a client down to the weaker suite.

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::Mac;

use crate::proto::stun::integrity::{self, HmacSha256};

/// RFC 8489 §9.2 nonce cookie.
pub const NONCE_COOKIE: &str = "obMatJos2";

/// The 24-bit security feature set (RFC 8489 §18.1); bit 0 is the most significant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SecurityFeatures(u32);

impl SecurityFeatures {
    /// Bit 0: the server supports PASSWORD-ALGORITHMS.
    pub const PASSWORD_ALGORITHMS: SecurityFeatures = SecurityFeatures(1 << 23);
    /// Bit 1: the server supports USERHASH.
    pub const USERNAME_ANONYMITY: SecurityFeatures = SecurityFeatures(1 << 22);
    pub const NONE: SecurityFeatures = SecurityFeatures(0);

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn from_bits(bits: u32) -> SecurityFeatures {
        SecurityFeatures(bits & 0x00FF_FFFF)
    }

    pub const fn union(self, other: SecurityFeatures) -> SecurityFeatures {
        SecurityFeatures(self.0 | other.0)
    }

    pub const fn contains(self, other: SecurityFeatures) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// Parses the security features of a nonce that starts with the cookie.
pub fn nonce_cookie_features(nonce: &str) -> Option<SecurityFeatures> {
    let rest = nonce.strip_prefix(NONCE_COOKIE)?;
    let enc = rest.get(..4)?;
    let mut out = [0u8; 3];
    STANDARD.decode_slice(enc, &mut out).ok()?;
    Some(SecurityFeatures::from_bits(u32::from_be_bytes([
        0, out[0], out[1], out[2],
    ])))
}

/// Where a nonce is issued or used: the client's address and port, and the
/// listener (so the transport) it came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceScope {
    pub client: SocketAddr,
    pub listener: u16,
}

/// How much of the scope must match when a nonce is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceBinding {
    /// The same listener, client address and port: every request but one.
    FiveTuple,
    /// The same client address (RFC 6062 ConnectionBind on a new connection).
    Address,
}

/// Why a nonce is not accepted. Either way the answer is 438 with a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceError {
    /// Not one of ours: wrong form, wrong MAC, or issued for another address.
    Invalid,
    /// Ours, but older than the nonce lifetime.
    Expired,
}

const TAG_LEN: usize = 12;
/// Issue time, listener, port, tag.
const BODY_LEN: usize = 8 + 2 + 2 + TAG_LEN;
/// base64url without padding of BODY_LEN bytes.
const BODY_CHARS: usize = (BODY_LEN * 4).div_ceil(3);
/// Longest nonce we issue.
pub const MAX_NONCE_LEN: usize = NONCE_COOKIE.len() + 4 + BODY_CHARS;

/// A nonce string held on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce {
    bytes: [u8; MAX_NONCE_LEN],
    len: u8,
}

impl Nonce {
    pub fn as_str(&self) -> &str {
        let b = self.bytes.get(..self.len as usize).unwrap_or_default();
        std::str::from_utf8(b).unwrap_or_default()
    }
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({})", self.as_str())
    }
}

/// Issues and validates nonces with a server key.
#[derive(Clone)]
pub struct NonceKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

impl NonceKey {
    /// A key from 32 secret bytes (random at start-up, or shared by the
    /// workers of one server so any worker validates any nonce).
    pub fn new(secret: &[u8; 32]) -> NonceKey {
        NonceKey {
            mac: integrity::hmac_sha256(secret),
        }
    }

    fn tag(&self, issued: u64, ip: IpAddr, port: u16, listener: u16, features: SecurityFeatures) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(&issued.to_be_bytes());
        match ip {
            IpAddr::V4(ip) => mac.update(&ip.to_ipv6_mapped().octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&port.to_be_bytes());
        mac.update(&listener.to_be_bytes());
        mac.update(&features.bits().to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(full.get(..TAG_LEN).unwrap_or(&[0; TAG_LEN]));
        tag
    }

    /// Issues a nonce for `scope` at `now_unix`; `features` non-empty adds the cookie.
    pub fn issue(&self, now_unix: u64, scope: &NonceScope, features: SecurityFeatures) -> Nonce {
        let port = scope.client.port();
        let mut body = [0u8; BODY_LEN];
        let (time, rest) = body.split_at_mut(8);
        let (listener, rest) = rest.split_at_mut(2);
        let (port_bytes, tag) = rest.split_at_mut(2);
        time.copy_from_slice(&now_unix.to_be_bytes());
        listener.copy_from_slice(&scope.listener.to_be_bytes());
        port_bytes.copy_from_slice(&port.to_be_bytes());
        tag.copy_from_slice(&self.tag(now_unix, scope.client.ip(), port, scope.listener, features));

        let mut n = Nonce {
            bytes: [0; MAX_NONCE_LEN],
            len: 0,
        };
        let mut at = 0;
        if !features.is_empty() {
            let (cookie, rest) = n.bytes.split_at_mut(NONCE_COOKIE.len());
            cookie.copy_from_slice(NONCE_COOKIE.as_bytes());
            let f = features.bits().to_be_bytes();
            let _ = STANDARD.encode_slice([f[1], f[2], f[3]], rest);
            at = NONCE_COOKIE.len() + 4;
        }
        let written = n
            .bytes
            .get_mut(at..)
            .and_then(|out| URL_SAFE_NO_PAD.encode_slice(body, out).ok());
        n.len = (at + written.unwrap_or(0)) as u8;
        n
    }

    /// Validates a nonce a client sent back; returns the features it was issued with.
    pub fn validate(
        &self,
        nonce: &str,
        now_unix: u64,
        scope: &NonceScope,
        binding: NonceBinding,
        lifetime_secs: u64,
    ) -> Result<SecurityFeatures, NonceError> {
        let (features, body) = match nonce_cookie_features(nonce) {
            Some(f) => (f, nonce.get(NONCE_COOKIE.len() + 4..).ok_or(NonceError::Invalid)?),
            None => (SecurityFeatures::NONE, nonce),
        };
        if body.len() != BODY_CHARS {
            return Err(NonceError::Invalid);
        }
        let mut raw = [0u8; BODY_LEN + 2];
        let n = URL_SAFE_NO_PAD
            .decode_slice(body, &mut raw)
            .map_err(|_| NonceError::Invalid)?;
        if n != BODY_LEN {
            return Err(NonceError::Invalid);
        }
        let issued = u64::from_be_bytes(
            raw.get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or(NonceError::Invalid)?,
        );
        let field = |at: usize| {
            raw.get(at..at + 2)
                .and_then(|b| <[u8; 2]>::try_from(b).ok())
                .map(u16::from_be_bytes)
        };
        let listener = field(8).ok_or(NonceError::Invalid)?;
        let port = field(10).ok_or(NonceError::Invalid)?;
        let tag = raw.get(12..BODY_LEN).ok_or(NonceError::Invalid)?;
        if !integrity::ct_eq(tag, &self.tag(issued, scope.client.ip(), port, listener, features)) {
            return Err(NonceError::Invalid);
        }
        if binding == NonceBinding::FiveTuple && (listener != scope.listener || port != scope.client.port()) {
            // Ours, but issued to another 5-tuple: a replay, or a client
            // that moved. Either way it gets a nonce of its own.
            return Err(NonceError::Invalid);
        }
        // A nonce from the future means a clock step back or a forged time: stale.
        if issued > now_unix.saturating_add(5) || now_unix.saturating_sub(issued) >= lifetime_secs {
            return Err(NonceError::Expired);
        }
        Ok(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> NonceKey {
        NonceKey::new(&[42; 32])
    }

    fn scope(client: &str, listener: u16) -> NonceScope {
        NonceScope {
            client: client.parse().unwrap(),
            listener,
        }
    }

    const STRICT: NonceBinding = NonceBinding::FiveTuple;

    #[test]
    fn round_trip_and_staleness() {
        let c = scope("192.0.2.7:5000", 0);
        let n = key().issue(1000, &c, SecurityFeatures::NONE);
        assert!(!n.as_str().starts_with(NONCE_COOKIE));
        assert_eq!(
            key().validate(n.as_str(), 1000, &c, STRICT, 600),
            Ok(SecurityFeatures::NONE)
        );
        assert_eq!(
            key().validate(n.as_str(), 1599, &c, STRICT, 600),
            Ok(SecurityFeatures::NONE)
        );
        assert_eq!(
            key().validate(n.as_str(), 1600, &c, STRICT, 600),
            Err(NonceError::Expired)
        );
        assert_eq!(
            key().validate(n.as_str(), 900, &c, STRICT, 600),
            Err(NonceError::Expired)
        );
        let other = scope("192.0.2.8:5000", 0);
        assert_eq!(
            key().validate(n.as_str(), 1000, &other, STRICT, 600),
            Err(NonceError::Invalid)
        );
        assert_eq!(
            NonceKey::new(&[1; 32]).validate(n.as_str(), 1000, &c, STRICT, 600),
            Err(NonceError::Invalid)
        );
        assert_eq!(
            key().validate("garbage", 1000, &c, STRICT, 600),
            Err(NonceError::Invalid)
        );
        assert_eq!(key().validate("", 1000, &c, STRICT, 600), Err(NonceError::Invalid));
    }

    #[test]
    fn a_nonce_is_good_on_its_own_five_tuple_only() {
        let c = scope("192.0.2.7:5000", 1);
        let n = key().issue(1000, &c, SecurityFeatures::NONE);
        // Another port of the same address, or another listener (transport): stale.
        for elsewhere in [scope("192.0.2.7:5001", 1), scope("192.0.2.7:5000", 0)] {
            assert_eq!(
                key().validate(n.as_str(), 1000, &elsewhere, STRICT, 600),
                Err(NonceError::Invalid),
                "{elsewhere:?}"
            );
            // ConnectionBind on a new data connection of the same client is fine.
            assert_eq!(
                key().validate(n.as_str(), 1000, &elsewhere, NonceBinding::Address, 600),
                Ok(SecurityFeatures::NONE)
            );
        }
        assert_eq!(
            key().validate(
                n.as_str(),
                1000,
                &scope("192.0.2.8:5000", 1),
                NonceBinding::Address,
                600
            ),
            Err(NonceError::Invalid)
        );
        // The port and listener in the nonce are under the MAC.
        let mut raw = [0u8; BODY_LEN];
        URL_SAFE_NO_PAD.decode_slice(n.as_str(), &mut raw).unwrap();
        raw[11] ^= 1;
        let moved = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            key().validate(&moved, 1000, &scope("192.0.2.7:5001", 1), STRICT, 600),
            Err(NonceError::Invalid)
        );
    }

    #[test]
    fn cookie_carries_features_under_the_mac() {
        let c = scope("[2001:db8::1]:5000", 0);
        let f = SecurityFeatures::PASSWORD_ALGORITHMS.union(SecurityFeatures::USERNAME_ANONYMITY);
        let n = key().issue(1000, &c, f);
        assert!(n.as_str().starts_with("obMatJos2wAAA"), "{}", n.as_str());
        assert_eq!(n.as_str().len(), MAX_NONCE_LEN);
        assert_eq!(nonce_cookie_features(n.as_str()), Some(f));
        assert_eq!(key().validate(n.as_str(), 1001, &c, STRICT, 600), Ok(f));
        // Clearing the password-algorithms bit (a bid-down) breaks the MAC.
        let tampered = n.as_str().replacen("obMatJos2wAAA", "obMatJos2QAAA", 1);
        assert_eq!(
            key().validate(&tampered, 1001, &c, STRICT, 600),
            Err(NonceError::Invalid)
        );
    }

    #[test]
    fn rfc8489_vector_nonce_features() {
        let f = nonce_cookie_features("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA").unwrap();
        assert!(!f.contains(SecurityFeatures::PASSWORD_ALGORITHMS));
        assert!(!f.contains(SecurityFeatures::USERNAME_ANONYMITY));
        assert_eq!(f.bits(), 2);
    }
}
