//! Long-term credential keys (RFC 8489 §9.2.2) and USERHASH (§14.4).
//!
//! key = MD5(username ":" realm ":" password) for the default suite, and
//! SHA-256 of the same string when PASSWORD-ALGORITHM selects SHA-256.

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::proto::stun::attr::password_algorithm;
use crate::proto::stun::integrity::{self, HmacSha1, HmacSha256};

/// Which hash turns the credential string into a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    Md5,
    Sha256,
}

impl PasswordAlgorithm {
    pub const fn number(self) -> u16 {
        match self {
            PasswordAlgorithm::Md5 => password_algorithm::MD5,
            PasswordAlgorithm::Sha256 => password_algorithm::SHA256,
        }
    }

    pub const fn from_number(n: u16) -> Option<PasswordAlgorithm> {
        match n {
            password_algorithm::MD5 => Some(PasswordAlgorithm::Md5),
            password_algorithm::SHA256 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }
}

/// A derived long-term key: 16 bytes (MD5) or 32 bytes (SHA-256).
#[derive(Clone, PartialEq, Eq)]
pub struct LongTermKey {
    bytes: [u8; 32],
    len: u8,
}

impl std::fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LongTermKey(..)")
    }
}

impl LongTermKey {
    /// Derives the key from an already prepared password (see [`prepare_password`]).
    pub fn derive(algorithm: PasswordAlgorithm, username: &str, realm: &str, password: &str) -> LongTermKey {
        let parts: [&[u8]; 5] = [username.as_bytes(), b":", realm.as_bytes(), b":", password.as_bytes()];
        let mut bytes = [0u8; 32];
        let len = match algorithm {
            PasswordAlgorithm::Md5 => {
                let mut h = Md5::new();
                parts.iter().for_each(|p| h.update(p));
                let (head, _) = bytes.split_at_mut(16);
                head.copy_from_slice(&h.finalize());
                16
            }
            PasswordAlgorithm::Sha256 => {
                let mut h = Sha256::new();
                parts.iter().for_each(|p| h.update(p));
                bytes.copy_from_slice(&h.finalize());
                32
            }
        };
        LongTermKey { bytes, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len as usize).unwrap_or_default()
    }

    /// A key as [`LongTermKey::as_bytes`] gave it (16 bytes MD5, 32 SHA-256).
    pub fn from_bytes(key: &[u8]) -> Option<LongTermKey> {
        if key.len() != 16 && key.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 32];
        bytes.get_mut(..key.len())?.copy_from_slice(key);
        Some(LongTermKey {
            bytes,
            len: key.len() as u8,
        })
    }

    /// An MD5 key as stored elsewhere (coturn's user database keeps
    /// MD5(name:realm:password), never the password).
    pub fn md5_from_bytes(key: [u8; 16]) -> LongTermKey {
        let mut bytes = [0u8; 32];
        let (head, _) = bytes.split_at_mut(16);
        head.copy_from_slice(&key);
        LongTermKey { bytes, len: 16 }
    }

    /// HMAC-SHA1 keyed for MESSAGE-INTEGRITY; clone it per message.
    pub fn hmac_sha1(&self) -> HmacSha1 {
        integrity::hmac_sha1(self.as_bytes())
    }

    /// HMAC-SHA256 keyed for MESSAGE-INTEGRITY-SHA256.
    pub fn hmac_sha256(&self) -> HmacSha256 {
        integrity::hmac_sha256(self.as_bytes())
    }
}

/// USERHASH = SHA-256(username ":" realm), RFC 8489 §14.4.
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// The password cannot be prepared (it holds prohibited code points).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordPrepError;

/// Prepares a password for key derivation.
///
/// RFC 8489 names the OpaqueString profile of RFC 8265, but its own test
/// vector (and RFC 5769's, computed with SASLprep) turns
/// "The\u{00AD}M\u{00AA}tr\u{2168}" into "TheMatrIX": the soft hyphen mapped to
/// nothing and NFKC compatibility folding. Clients that interoperate today
/// derive keys that way, so that is the preparation used here: non-ASCII
/// spaces become U+0020, "commonly mapped to nothing" code points vanish, the
/// result is NFKC-normalised, and control or unassigned code points are
/// refused. ASCII passwords (nearly all) come back unchanged.
pub fn prepare_password(password: &str) -> Result<std::borrow::Cow<'_, str>, PasswordPrepError> {
    stringprep::saslprep(password).map_err(|_| PasswordPrepError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5769_password_preparation() {
        assert_eq!(prepare_password("The\u{00AD}M\u{00AA}tr\u{2168}").unwrap(), "TheMatrIX");
        assert_eq!(
            prepare_password("VOkJxbRl1RmTxUk/WvJxBt").unwrap(),
            "VOkJxbRl1RmTxUk/WvJxBt"
        );
        assert_eq!(prepare_password("a\u{00A0}b").unwrap(), "a b");
        assert!(prepare_password("bad\u{0007}").is_err());
    }

    #[test]
    fn md5_key_matches_rfc_5389_definition() {
        // MD5("user:realm:pass") computed independently.
        let k = LongTermKey::derive(PasswordAlgorithm::Md5, "user", "realm", "pass");
        assert_eq!(k.as_bytes().len(), 16);
        let want = Md5::digest(b"user:realm:pass");
        assert_eq!(k.as_bytes(), want.as_slice());
        let k = LongTermKey::derive(PasswordAlgorithm::Sha256, "user", "realm", "pass");
        assert_eq!(k.as_bytes(), Sha256::digest(b"user:realm:pass").as_slice());
    }

    #[test]
    fn algorithm_numbers() {
        assert_eq!(PasswordAlgorithm::from_number(1), Some(PasswordAlgorithm::Md5));
        assert_eq!(PasswordAlgorithm::from_number(2), Some(PasswordAlgorithm::Sha256));
        assert_eq!(PasswordAlgorithm::from_number(3), None);
        assert_eq!(PasswordAlgorithm::Sha256.number(), 2);
    }
}
