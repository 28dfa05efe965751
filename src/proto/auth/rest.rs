//! TURN REST API shared-secret credentials (draft-uberti-behave-turn-rest):
//! username = "<unix-expiry>[:<user>]", password = base64(HMAC-SHA1(secret,
//! username)). The user part may itself contain colons (Matrix ids such as
//! "1700000000:@alice:example.org"), so only the first colon separates.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::Mac;

use crate::proto::stun::integrity::{self, HmacSha1};

/// A username in REST form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestUsername<'a> {
    /// Expiry as seconds since the Unix epoch.
    pub expiry: u64,
    /// The application's user id, if present.
    pub user: Option<&'a str>,
}

impl<'a> RestUsername<'a> {
    /// Parses "<expiry>[:<user>]"; `None` if the username is not in that form.
    pub fn parse(username: &'a str) -> Option<RestUsername<'a>> {
        let (ts, user) = match username.split_once(':') {
            Some((ts, user)) => (ts, Some(user)),
            None => (username, None),
        };
        if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(RestUsername {
            expiry: ts.parse().ok()?,
            user,
        })
    }
}

/// Why a REST credential is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestError {
    /// The username is not "<expiry>[:<user>]".
    NotRestUsername,
    /// The expiry lies in the past.
    Expired,
}

/// The shared secrets; several verify at once so secrets can be rotated.
#[derive(Clone)]
pub struct RestSecrets {
    keyed: Vec<HmacSha1>,
}

impl std::fmt::Debug for RestSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RestSecrets({} secrets)", self.keyed.len())
    }
}

/// A REST password: 28 base64 characters of a 20-byte HMAC-SHA1.
pub type RestPassword = [u8; 28];

impl RestSecrets {
    pub fn new<S: AsRef<[u8]>>(secrets: impl IntoIterator<Item = S>) -> RestSecrets {
        RestSecrets {
            keyed: secrets.into_iter().map(|s| integrity::hmac_sha1(s.as_ref())).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keyed.is_empty()
    }

    /// Checks the username's form and expiry against `now` (Unix seconds).
    pub fn check_username<'a>(&self, username: &'a str, now_unix: u64) -> Result<RestUsername<'a>, RestError> {
        let parsed = RestUsername::parse(username).ok_or(RestError::NotRestUsername)?;
        if parsed.expiry < now_unix {
            return Err(RestError::Expired);
        }
        Ok(parsed)
    }

    /// The password each secret gives for `username`, in configuration order.
    /// The server derives a long-term key from each and keeps the one whose
    /// MESSAGE-INTEGRITY verifies.
    pub fn passwords<'s>(&'s self, username: &'s str) -> impl Iterator<Item = RestPassword> + 's {
        self.keyed.iter().map(move |mac| password_with(mac.clone(), username))
    }
}

/// base64(HMAC-SHA1(secret, username)): what an app's backend hands out.
pub fn password(secret: &[u8], username: &str) -> String {
    let p = password_with(integrity::hmac_sha1(secret), username);
    String::from_utf8_lossy(&p).into_owned()
}

fn password_with(mut mac: HmacSha1, username: &str) -> RestPassword {
    mac.update(username.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut out = [0u8; 28];
    // 20 bytes always encode to exactly 28 base64 characters.
    let _ = STANDARD.encode_slice(digest, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rest_usernames() {
        assert_eq!(
            RestUsername::parse("1700000000"),
            Some(RestUsername {
                expiry: 1_700_000_000,
                user: None
            })
        );
        assert_eq!(
            RestUsername::parse("1700000000:@alice:example.org"),
            Some(RestUsername {
                expiry: 1_700_000_000,
                user: Some("@alice:example.org")
            })
        );
        assert_eq!(RestUsername::parse("alice"), None);
        assert_eq!(RestUsername::parse(":x"), None);
        assert_eq!(RestUsername::parse("12a:x"), None);
        assert_eq!(RestUsername::parse("99999999999999999999999:x"), None);
        assert_eq!(RestUsername::parse("-5:x"), None);
    }

    #[test]
    fn expiry_and_rotation() {
        let s = RestSecrets::new(["old", "new"]);
        assert_eq!(s.check_username("100:bob", 101), Err(RestError::Expired));
        assert!(s.check_username("100:bob", 100).is_ok());
        assert_eq!(s.check_username("bob", 1), Err(RestError::NotRestUsername));
        let pw: Vec<_> = s.passwords("100:bob").collect();
        assert_eq!(pw.len(), 2);
        assert_eq!(std::str::from_utf8(&pw[1]).unwrap(), password(b"new", "100:bob"));
        assert_ne!(pw[0], pw[1]);
    }

    #[test]
    fn password_matches_coturn_formula() {
        // echo -n "1433895918:user" | openssl dgst -binary -sha1 -hmac "secret" | base64
        assert_eq!(password(b"secret", "1433895918:user"), "duY86vsmGEXM+Ma7pGS//SXJIv0=");
    }
}
