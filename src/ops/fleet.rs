//! This node as part of a fleet: revocations (the operator's, and those
//! read from the store), kicks that reach every node, and the other nodes'
//! allocation lists for the admin view. Without a store it is a fleet of
//! one: revocations and kicks still apply here.
//!
//! Everything here runs on the main thread (admin API and store task);
//! the workers only ever see the results, as a reload would give them.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::io::{Started, StoreContents};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A user named by a kick or a revocation, as it travels through the
/// store: the user name alone (every realm, as every version writes it),
/// or JSON `{"user", "realm"}` for one realm, or for a name that itself
/// starts with `{`.
pub fn encode_scoped(user: &str, realm: Option<&str>) -> String {
    match realm {
        None if !user.starts_with('{') => user.to_owned(),
        _ => serde_json::json!({ "user": user, "realm": realm }).to_string(),
    }
}

/// The user and realm of a kick or revocation read from the store; `None`
/// for a value that names no user.
pub fn decode_scoped(value: &str) -> Option<(String, Option<String>)> {
    if !value.starts_with('{') {
        return Some((value.to_owned(), None));
    }
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    let user = v.get("user")?.as_str()?.to_owned();
    let realm = v.get("realm").and_then(|r| r.as_str()).map(str::to_owned);
    Some((user, realm))
}

#[derive(Default)]
struct State {
    /// What the store holds (users, secrets, revocations).
    store: StoreContents,
    /// Revocations made on this node: user → end (Unix seconds).
    local_revocations: BTreeMap<String, u64>,
    /// The revoked set the workers have now.
    applied_revoked: BTreeSet<String>,
    /// For the store: revocations (user, seconds) and kicks (encoded) to spread.
    outbox_revocations: Vec<(String, u64)>,
    outbox_kicks: Vec<String>,
    /// Kicks from other nodes already carried out: key → when seen.
    seen_kicks: HashMap<String, u64>,
    /// The other nodes' allocations, as their admin API shows them.
    others: Vec<(String, Vec<serde_json::Value>)>,
}

pub struct Fleet {
    /// This node's name in the store and in the admin view.
    pub node: String,
    /// Where clients reach this node (its first UDP listener), for the
    /// others' 300 Try Alternate.
    pub address: Option<std::net::SocketAddr>,
    started: Rc<Started>,
    state: RefCell<State>,
}

impl Fleet {
    pub fn new(node: String, address: Option<std::net::SocketAddr>, started: Rc<Started>) -> Fleet {
        Fleet {
            node,
            address,
            started,
            state: RefCell::new(State::default()),
        }
    }

    /// Refuses `user` (a REST user by the name after its expiry), in
    /// `realm` or in every realm, on every node for `ttl` seconds, and ends
    /// its allocations.
    pub fn revoke(&self, user: &str, realm: Option<&str>, ttl: u64) {
        self.revoke_scoped(encode_scoped(user, realm), ttl);
    }

    /// The same, for a revocation as the store holds it ([`encode_scoped`]).
    pub fn revoke_scoped(&self, scoped: String, ttl: u64) {
        {
            let mut s = self.state.borrow_mut();
            s.local_revocations.insert(scoped.clone(), unix_now() + ttl);
            s.outbox_revocations.push((scoped, ttl));
        }
        self.apply();
    }

    /// Ends `user`'s allocations (in `realm`, or in every realm) here now
    /// and on the other nodes within a second (through the store); returns
    /// how many ended here.
    pub fn kick_everywhere(&self, user: &str, realm: Option<&str>) -> usize {
        self.state.borrow_mut().outbox_kicks.push(encode_scoped(user, realm));
        self.started.kick(Some(user), None, realm)
    }

    /// What the store task should write: revocations and kicks.
    pub fn take_outbox(&self) -> (Vec<(String, u64)>, Vec<String>) {
        let mut s = self.state.borrow_mut();
        (
            std::mem::take(&mut s.outbox_revocations),
            std::mem::take(&mut s.outbox_kicks),
        )
    }

    /// A fresh read of the store: its users, secrets and revocations, the
    /// kicks posted by other nodes (key, user), and their allocations.
    pub fn store_read(
        &self,
        contents: StoreContents,
        kicks: Vec<(String, String)>,
        others: Vec<(String, Vec<serde_json::Value>)>,
    ) {
        let now = unix_now();
        let mut to_kick = Vec::new();
        {
            let mut s = self.state.borrow_mut();
            s.store = contents;
            s.others = others;
            for (key, value) in kicks {
                if s.seen_kicks.insert(key, now).is_none()
                    && let Some(kick) = decode_scoped(&value)
                {
                    to_kick.push(kick);
                }
            }
            // Kick keys live 10 s in the store; remembered a little longer.
            s.seen_kicks.retain(|_, seen| now.saturating_sub(*seen) < 30);
        }
        for (user, realm) in to_kick {
            let n = self.started.kick(Some(&user), None, realm.as_deref());
            tracing::info!(
                user,
                realm = realm.as_deref().unwrap_or("*"),
                deleted = n,
                "allocations deleted on another node's request"
            );
        }
        self.apply();
    }

    /// The store is away: the other nodes' lists are unknown.
    pub fn store_lost(&self) {
        self.state.borrow_mut().others.clear();
    }

    /// Drops revocations that ran out (once a second or so).
    pub fn tick(&self) {
        let now = unix_now();
        let expired = {
            let mut s = self.state.borrow_mut();
            let before = s.local_revocations.len();
            s.local_revocations.retain(|_, until| *until > now);
            before != s.local_revocations.len()
        };
        if expired {
            self.apply();
        }
    }

    /// The other nodes' allocations (node, list).
    pub fn others(&self) -> Vec<(String, Vec<serde_json::Value>)> {
        self.state.borrow().others.clone()
    }

    /// Hands the workers the store's users and secrets and every revocation
    /// in force; users newly revoked lose their allocations.
    fn apply(&self) {
        let (contents, newly) = {
            let mut s = self.state.borrow_mut();
            let mut revoked: BTreeSet<String> = s.store.revoked.iter().cloned().collect();
            revoked.extend(s.local_revocations.keys().cloned());
            let newly: Vec<String> = revoked.difference(&s.applied_revoked).cloned().collect();
            s.applied_revoked = revoked.clone();
            let mut contents = s.store.clone();
            contents.revoked = revoked.into_iter().collect();
            (contents, newly)
        };
        if let Err(e) = self.started.set_store(contents) {
            tracing::warn!("applying the fleet's users and revocations: {e}");
        }
        for (user, realm) in newly.iter().filter_map(|r| decode_scoped(r)) {
            let n = self.started.kick(Some(&user), None, realm.as_deref());
            tracing::info!(
                user,
                realm = realm.as_deref().unwrap_or("*"),
                deleted = n,
                "user revoked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_and_revocations_travel_as_a_plain_name_or_json_and_come_back_the_same() {
        for (user, realm) in [
            ("alice", None),
            ("1796528208:phone-42", None),
            ("alice", Some("games.example")),
            ("{\"user\":\"x\"}", None),
            ("{odd", Some("r")),
        ] {
            let encoded = encode_scoped(user, realm);
            assert_eq!(
                decode_scoped(&encoded),
                Some((user.to_owned(), realm.map(str::to_owned))),
                "{encoded}"
            );
        }
        // Every version writes a realm-less kick as the bare name.
        assert_eq!(encode_scoped("alice", None), "alice");
        assert_eq!(decode_scoped("{not json"), None);
    }
}
