//! Realms: several tenants served by one process, each with its own users
//! and REST secrets, peer policy, per-allocation bandwidth and quotas.
//!
//! A request with no allocation yet is served by the realm its ORIGIN
//! attribute names (when an origin is configured), else by its listener's
//! realm, else by the default realm (index 0). An allocation stays in the
//! realm that created it: its requests authenticate against that realm's
//! credentials whatever listener or ORIGIN they come with.

use std::sync::Arc;

use super::credentials::Credentials;
use super::peer_policy::PeerPolicy;
use super::rate::Rate;
use crate::proto::stun::{Message, kind};

/// One realm's settings, shared by every worker.
#[derive(Debug, Clone)]
pub struct Realm {
    /// Its users and secrets; the realm's name is `credentials.realm()`.
    pub credentials: Arc<Credentials>,
    pub policy: PeerPolicy,
    /// Relayed bytes per allocation, each direction (`max_bps`).
    pub allocation_bandwidth: Rate,
}

impl Realm {
    pub fn name(&self) -> &str {
        self.credentials.realm()
    }
}

/// Index of a realm in a [`Realms`] table; 0 is the default realm.
pub type RealmIndex = u16;

/// The realms of a configuration and how requests find theirs.
#[derive(Debug, Clone)]
pub struct Realms {
    /// Index 0.
    default: Realm,
    /// Indexes 1…
    others: Vec<Realm>,
    /// Realm of each listener, by listener id (absent: the default).
    listeners: Vec<RealmIndex>,
    /// Lower-cased ORIGIN values and the realm each selects.
    origins: Vec<(String, RealmIndex)>,
}

impl Realms {
    /// One realm for every listener and origin.
    pub fn single(realm: Realm) -> Realms {
        Realms {
            default: realm,
            others: Vec::new(),
            listeners: Vec::new(),
            origins: Vec::new(),
        }
    }

    /// `default` and `others`; `listeners` gives each listener id's realm
    /// by name (`None`: the default), `origins` each origin's realm by name.
    /// Names that match no realm are ignored (the configuration was
    /// validated before).
    pub fn new(default: Realm, others: Vec<Realm>, listeners: &[Option<&str>], origins: &[(&str, &str)]) -> Realms {
        let mut r = Realms {
            default,
            others,
            listeners: Vec::new(),
            origins: Vec::new(),
        };
        r.listeners = listeners
            .iter()
            .map(|name| name.and_then(|n| r.index_of(n)).unwrap_or(0))
            .collect();
        r.origins = origins
            .iter()
            .filter_map(|(origin, name)| Some((normalize_origin(origin), r.index_of(name)?)))
            .collect();
        r
    }

    /// Realm `i`, or the default one for an index out of range.
    #[inline]
    pub fn get(&self, i: RealmIndex) -> &Realm {
        match usize::from(i).checked_sub(1) {
            Some(j) => self.others.get(j).unwrap_or(&self.default),
            None => &self.default,
        }
    }

    pub fn index_of(&self, name: &str) -> Option<RealmIndex> {
        self.iter()
            .position(|r| r.name() == name)
            .and_then(|i| RealmIndex::try_from(i).ok())
    }

    /// The default realm first, then the others in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Realm> {
        std::iter::once(&self.default).chain(self.others.iter())
    }

    /// Whether any realm shapes allocations' bandwidth.
    pub fn limits_bandwidth(&self) -> bool {
        self.iter().any(|r| !r.allocation_bandwidth.is_off())
    }

    /// The realm serving a request that belongs to no allocation yet: the
    /// first ORIGIN naming a configured origin, else the listener's realm.
    pub fn select(&self, listener: u16, msg: &Message<'_>) -> RealmIndex {
        if !self.origins.is_empty() {
            for a in msg.raw_attributes().filter(|a| a.kind == kind::ORIGIN) {
                if let Some(i) = std::str::from_utf8(a.value).ok().and_then(|o| self.by_origin(o)) {
                    return i;
                }
            }
        }
        self.listeners.get(usize::from(listener)).copied().unwrap_or(0)
    }

    fn by_origin(&self, origin: &str) -> Option<RealmIndex> {
        let origin = origin.trim_end_matches('/');
        self.origins
            .iter()
            .find(|(o, _)| o.eq_ignore_ascii_case(origin))
            .map(|(_, i)| *i)
    }
}

/// An origin as it is compared: lower case, no trailing slash.
pub fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}
