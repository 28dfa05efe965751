//! The long-term credential mechanism on the server side (RFC 8489 §9.2):
//! 401 challenges with REALM and a stateless NONCE, 438 for stale nonces,
//! static users and TURN REST shared secrets at once, the SHA-256 suite with
//! bid-down protection, and USERHASH.

use rustc_hash::FxHashMap;

use super::super::auth::nonce::{
    NonceBinding, NonceError, NonceKey, NonceScope, SecurityFeatures, nonce_cookie_features,
};
use super::super::auth::{LongTermKey, PasswordAlgorithm, RestError, RestSecrets, prepare_password, userhash};
use crate::proto::stun::attr::{Attribute, password_algorithm};
use crate::proto::stun::{IntegrityError, Message, MessageWriter, kind};

/// What the server offers in PASSWORD-ALGORITHMS, in preference order.
pub const OFFERED_ALGORITHMS: [(u16, &[u8]); 2] = [(password_algorithm::SHA256, &[]), (password_algorithm::MD5, &[])];
/// The same, as it appears on the wire, for the byte-exact bid-down check.
const OFFERED_ALGORITHMS_WIRE: [u8; 8] = [0, 2, 0, 0, 0, 1, 0, 0];

/// Which MESSAGE-INTEGRITY a request carried; the response uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegritySuite {
    Sha1,
    Sha256,
}

/// Keys for one static user.
#[derive(Debug, Clone)]
struct StaticUser {
    md5: LongTermKey,
    /// `None` for a user known by its MD5 key only (from the fleet store).
    sha256: Option<LongTermKey>,
}

/// A request that passed authentication.
#[derive(Debug, Clone)]
pub struct Authenticated<'a> {
    /// The username (resolved from USERHASH if that was sent).
    pub username: &'a str,
    pub key: LongTermKey,
    pub algorithm: PasswordAlgorithm,
    pub suite: IntegritySuite,
    /// REST expiry, when the username is a REST credential.
    pub rest_expiry: Option<u64>,
}

/// Why a request is refused; each maps to one STUN error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No MESSAGE-INTEGRITY at all: the first request of a session (401).
    Challenge,
    /// MESSAGE-INTEGRITY present but USERNAME/USERHASH, REALM or NONCE missing (400).
    MissingAttributes,
    /// Nonce not ours, or too old (438).
    StaleNonce(NonceError),
    /// PASSWORD-ALGORITHM(S) altered or inconsistent: a bid-down attempt (400).
    AlgorithmMismatch,
    /// No such user (401).
    UnknownUser,
    /// REST credential past its expiry (401).
    Expired,
    /// MESSAGE-INTEGRITY does not verify (401).
    BadIntegrity,
    /// REALM differs from ours (401).
    WrongRealm,
    /// The operator revoked this user (`POST /v1/revocations`) (401).
    Revoked,
}

impl AuthFailure {
    pub const fn code(self) -> u16 {
        match self {
            AuthFailure::MissingAttributes | AuthFailure::AlgorithmMismatch => 400,
            AuthFailure::StaleNonce(_) => 438,
            _ => 401,
        }
    }

    pub const fn reason(self) -> &'static str {
        match self.code() {
            400 => "Bad Request",
            438 => "Stale Nonce",
            _ => "Unauthenticated",
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            AuthFailure::Challenge => "challenge",
            AuthFailure::MissingAttributes => "auth_missing_attributes",
            AuthFailure::StaleNonce(NonceError::Invalid) => "nonce_invalid",
            AuthFailure::StaleNonce(NonceError::Expired) => "nonce_expired",
            AuthFailure::AlgorithmMismatch => "password_algorithm_mismatch",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Expired => "rest_credential_expired",
            AuthFailure::BadIntegrity => "bad_integrity",
            AuthFailure::WrongRealm => "wrong_realm",
            AuthFailure::Revoked => "revoked",
        }
    }

    /// Whether the error response carries a fresh REALM and NONCE.
    pub const fn sends_nonce(self) -> bool {
        !matches!(self, AuthFailure::MissingAttributes | AuthFailure::AlgorithmMismatch)
    }
}

/// The server's credential store and nonce issuer.
#[derive(Debug, Clone)]
pub struct Credentials {
    realm: String,
    users: FxHashMap<String, StaticUser>,
    userhashes: FxHashMap<[u8; 32], String>,
    rest: RestSecrets,
    /// Users refused until the operator's revocation runs out (a REST
    /// name is matched by the part after its expiry).
    revoked: Vec<String>,
    nonce_key: NonceKey,
    nonce_lifetime: u64,
    features: SecurityFeatures,
}

/// A password in the configuration could not be prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPassword(pub String);

impl Credentials {
    /// Builds the store. `users` holds (name, password) pairs.
    pub fn new<'a>(
        realm: &str,
        users: impl IntoIterator<Item = (&'a str, &'a str)>,
        rest_secrets: &[String],
        nonce_secret: &[u8; 32],
        nonce_lifetime_secs: u64,
    ) -> Result<Credentials, BadPassword> {
        let mut map = FxHashMap::default();
        let mut hashes = FxHashMap::default();
        for (name, password) in users {
            let p = prepare_password(password).map_err(|_| BadPassword(name.to_owned()))?;
            map.insert(
                name.to_owned(),
                StaticUser {
                    md5: LongTermKey::derive(PasswordAlgorithm::Md5, name, realm, &p),
                    sha256: Some(LongTermKey::derive(PasswordAlgorithm::Sha256, name, realm, &p)),
                },
            );
            hashes.insert(userhash(name, realm), name.to_owned());
        }
        Ok(Credentials {
            realm: realm.to_owned(),
            users: map,
            userhashes: hashes,
            rest: RestSecrets::new(rest_secrets),
            revoked: Vec::new(),
            nonce_key: NonceKey::new(nonce_secret),
            nonce_lifetime: nonce_lifetime_secs,
            features: SecurityFeatures::PASSWORD_ALGORITHMS.union(SecurityFeatures::USERNAME_ANONYMITY),
        })
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Refuses these users (revocations in force).
    pub fn with_revoked(mut self, users: impl IntoIterator<Item = String>) -> Credentials {
        self.revoked = users.into_iter().collect();
        self
    }

    /// Whether `username` (or, for a REST name, the user after its expiry)
    /// is revoked.
    pub fn is_revoked(&self, username: &str) -> bool {
        !self.revoked.is_empty()
            && self.revoked.iter().any(|r| {
                r == username || crate::proto::auth::RestUsername::parse(username).and_then(|u| u.user) == Some(r)
            })
    }

    /// Adds users known by their MD5 long-term key only (a fleet store in
    /// coturn's layout keeps no password). A name already configured with a
    /// password keeps it.
    pub fn with_md5_users(mut self, users: impl IntoIterator<Item = (String, [u8; 16])>) -> Credentials {
        for (name, key) in users {
            if self.users.contains_key(&name) {
                continue;
            }
            self.userhashes.insert(userhash(&name, &self.realm), name.clone());
            self.users.insert(
                name,
                StaticUser {
                    md5: LongTermKey::md5_from_bytes(key),
                    sha256: None,
                },
            );
        }
        self
    }

    /// Appends REALM, a fresh NONCE and PASSWORD-ALGORITHMS to an error
    /// response (401/438).
    pub fn write_challenge(
        &self,
        w: &mut MessageWriter<'_>,
        scope: &NonceScope,
        now_unix: u64,
    ) -> Result<(), crate::proto::stun::BufferTooSmall> {
        let nonce = self.nonce_key.issue(now_unix, scope, self.features);
        w.realm(&self.realm)?;
        w.nonce(nonce.as_str())?;
        w.password_algorithms(&OFFERED_ALGORITHMS)
    }

    /// Authenticates a request. `known` is the username and key of the
    /// allocation the request belongs to, when there is one: its key is tried
    /// first, so a REST user's key is derived once per allocation.
    pub fn authenticate<'r, 's: 'r, 'm: 'r>(
        &'s self,
        msg: &Message<'m>,
        scope: &NonceScope,
        now_unix: u64,
        known: Option<(&str, &LongTermKey, PasswordAlgorithm)>,
    ) -> Result<Authenticated<'r>, AuthFailure> {
        let suite = if msg.has_integrity_sha256() {
            IntegritySuite::Sha256
        } else if msg.has_integrity() {
            IntegritySuite::Sha1
        } else {
            return Err(AuthFailure::Challenge);
        };
        let realm = msg.realm().ok().flatten();
        let nonce = msg.nonce().ok().flatten();
        let username: Option<&'r str> = match msg.username().ok().flatten() {
            Some(u) => Some(u),
            None => match msg.userhash().ok().flatten() {
                // A USERHASH we cannot resolve is an unknown user, not a malformed request.
                Some(h) => Some(self.userhash_name(h).ok_or(AuthFailure::UnknownUser)?),
                None => None,
            },
        };
        let (Some(username), Some(realm), Some(nonce)) = (username, realm, nonce) else {
            return Err(AuthFailure::MissingAttributes);
        };
        // RFC 6062 data connections come from another port of the client.
        let binding = if msg.method() == crate::proto::stun::Method::CONNECTION_BIND {
            NonceBinding::Address
        } else {
            NonceBinding::FiveTuple
        };
        let features = self
            .nonce_key
            .validate(nonce, now_unix, scope, binding, self.nonce_lifetime)
            .map_err(AuthFailure::StaleNonce)?;
        let algorithm = self.algorithm(msg, features)?;
        if realm != self.realm {
            return Err(AuthFailure::WrongRealm);
        }

        if self.is_revoked(username) {
            return Err(AuthFailure::Revoked);
        }
        let rest_expiry = match self.rest.check_username(username, now_unix) {
            Ok(r) if !self.users.contains_key(username) => Some(r.expiry),
            Err(RestError::Expired) if !self.users.contains_key(username) => return Err(AuthFailure::Expired),
            _ => None,
        };
        let verify = |key: &LongTermKey| -> Result<(), IntegrityError> {
            match suite {
                IntegritySuite::Sha1 => msg.verify_integrity_with(key.hmac_sha1()),
                IntegritySuite::Sha256 => msg.verify_integrity_sha256_with(key.hmac_sha256()),
            }
        };
        let done = |key: LongTermKey| Authenticated {
            username,
            key,
            algorithm,
            suite,
            rest_expiry,
        };

        if let Some((known_user, key, alg)) = known
            && known_user == username
            && alg == algorithm
            && verify(key).is_ok()
        {
            return Ok(done(key.clone()));
        }
        if let Some(user) = self.users.get(username) {
            let key = match algorithm {
                PasswordAlgorithm::Md5 => Some(&user.md5),
                PasswordAlgorithm::Sha256 => user.sha256.as_ref(),
            };
            return match key {
                Some(key) => verify(key)
                    .map(|_| done(key.clone()))
                    .map_err(|_| AuthFailure::BadIntegrity),
                // Known by its MD5 key only: SHA-256 cannot be checked.
                None => Err(AuthFailure::BadIntegrity),
            };
        }
        if rest_expiry.is_none() {
            return Err(AuthFailure::UnknownUser);
        }
        for password in self.rest.passwords(username) {
            let password = std::str::from_utf8(&password).unwrap_or_default();
            let key = LongTermKey::derive(algorithm, username, &self.realm, password);
            if verify(&key).is_ok() {
                return Ok(done(key));
            }
        }
        Err(AuthFailure::BadIntegrity)
    }

    /// Whether an allocation made with `key` would still authenticate
    /// against these credentials: the static user still exists with the same
    /// password, or a REST secret still in the list gives the same key.
    pub fn still_verifies(&self, username: &str, algorithm: PasswordAlgorithm, key: &LongTermKey) -> bool {
        if self.is_revoked(username) {
            return false;
        }
        let same = |k: &LongTermKey| crate::proto::stun::integrity::ct_eq(k.as_bytes(), key.as_bytes());
        if let Some(user) = self.users.get(username) {
            return match algorithm {
                PasswordAlgorithm::Md5 => same(&user.md5),
                PasswordAlgorithm::Sha256 => user.sha256.as_ref().is_some_and(same),
            };
        }
        if crate::proto::auth::RestUsername::parse(username).is_none() {
            return false;
        }
        self.rest.passwords(username).any(|password| {
            let password = std::str::from_utf8(&password).unwrap_or_default();
            same(&LongTermKey::derive(algorithm, username, &self.realm, password))
        })
    }

    fn userhash_name(&self, hash: &[u8; 32]) -> Option<&str> {
        self.userhashes.get(hash).map(String::as_str)
    }

    /// RFC 8489 §9.2.4: which password algorithm the request uses, refusing
    /// bid-down attempts when our nonce advertised PASSWORD-ALGORITHMS.
    fn algorithm(&self, msg: &Message<'_>, features: SecurityFeatures) -> Result<PasswordAlgorithm, AuthFailure> {
        let offered = msg.find(kind::PASSWORD_ALGORITHMS);
        let chosen = match msg.get(kind::PASSWORD_ALGORITHM) {
            Ok(Some(Attribute::PasswordAlgorithm(a))) => Some(a.algorithm),
            Ok(_) => None,
            Err(_) => return Err(AuthFailure::AlgorithmMismatch),
        };
        match (offered, chosen) {
            (None, None) => Ok(PasswordAlgorithm::Md5),
            (Some(list), Some(alg)) if features.contains(SecurityFeatures::PASSWORD_ALGORITHMS) => {
                if list != OFFERED_ALGORITHMS_WIRE {
                    return Err(AuthFailure::AlgorithmMismatch);
                }
                PasswordAlgorithm::from_number(alg).ok_or(AuthFailure::AlgorithmMismatch)
            }
            _ => Err(AuthFailure::AlgorithmMismatch),
        }
    }

    /// Whether a nonce came from a server offering PASSWORD-ALGORITHMS.
    pub fn nonce_offers_algorithms(nonce: &str) -> bool {
        nonce_cookie_features(nonce).is_some_and(|f| f.contains(SecurityFeatures::PASSWORD_ALGORITHMS))
    }
}
