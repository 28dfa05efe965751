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

#[derive(Default)]
struct State {
    /// What the store holds (users, secrets, revocations).
    store: StoreContents,
    /// Revocations made on this node: user → end (Unix seconds).
    local_revocations: BTreeMap<String, u64>,
    /// The revoked set the workers have now.
    applied_revoked: BTreeSet<String>,
    /// For the store: revocations (user, seconds) and kicks (user) to spread.
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

    /// Refuses `user` (a REST user by the name after its expiry) on every
    /// node for `ttl` seconds, and ends its allocations.
    pub fn revoke(&self, user: &str, ttl: u64) {
        {
            let mut s = self.state.borrow_mut();
            s.local_revocations.insert(user.to_owned(), unix_now() + ttl);
            s.outbox_revocations.push((user.to_owned(), ttl));
        }
        self.apply();
    }

    /// Ends `user`'s allocations here now and on the other nodes within a
    /// second (through the store); returns how many ended here.
    pub fn kick_everywhere(&self, user: &str) -> usize {
        self.state.borrow_mut().outbox_kicks.push(user.to_owned());
        self.started.kick(Some(user), None)
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
            for (key, user) in kicks {
                if s.seen_kicks.insert(key, now).is_none() {
                    to_kick.push(user);
                }
            }
            // Kick keys live 10 s in the store; remembered a little longer.
            s.seen_kicks.retain(|_, seen| now.saturating_sub(*seen) < 30);
        }
        for user in to_kick {
            let n = self.started.kick(Some(&user), None);
            tracing::info!(user, deleted = n, "allocations deleted on another node's request");
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
        for user in newly {
            let n = self.started.kick(Some(&user), None);
            tracing::info!(user, deleted = n, "user revoked");
        }
    }
}
