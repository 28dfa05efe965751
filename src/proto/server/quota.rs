//! Allocation quotas shared by all workers: per username, per client IP
//! address and in total.
//! Touched only when an allocation is created or freed, never per packet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Why an allocation is refused for quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// The user has `user_quota` allocations already (486).
    User,
    /// The client's IP address holds `allocations_per_ip` already (486).
    Address,
    /// The server has `total_quota` allocations already (508).
    Total,
    /// The realm has its own `total_quota` allocations already (486).
    Realm,
}

impl QuotaRefusal {
    pub const fn label(self) -> &'static str {
        match self {
            QuotaRefusal::User => "user",
            QuotaRefusal::Address => "ip",
            QuotaRefusal::Total => "total",
            QuotaRefusal::Realm => "realm",
        }
    }
}

/// The quota settings; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Allocations one username may hold (`user_quota`).
    pub per_user: u32,
    /// Allocations in total (`total_quota`).
    pub total: u32,
    /// Allocations one client IP address may hold (`allocations_per_ip`).
    pub per_ip: u32,
}

/// Allocation counts of one realm, for its quotas and its metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RealmCounts {
    /// Allocations it holds now (on this node).
    pub allocations: u32,
    /// Allocations granted since the start.
    pub granted: u64,
    /// Allocations refused for a quota since the start.
    pub refused: u64,
}

#[derive(Debug, Default)]
struct Counts {
    /// By (realm, user).
    per_user: HashMap<(String, String), u32>,
    per_ip: HashMap<IpAddr, u32>,
    per_realm: HashMap<String, RealmCounts>,
    total: u32,
}

#[derive(Debug, Default)]
struct Settings {
    /// The server's: `per_user` for realms without their own, `total` and
    /// `per_ip` across all realms.
    server: QuotaLimits,
    /// Realms with quotas of their own: `per_user`, and `total` within the realm.
    realms: HashMap<String, QuotaLimits>,
}

/// Allocation counts and quotas of every realm, shared by the workers.
#[derive(Debug, Default)]
pub struct Quotas {
    settings: Mutex<Settings>,
    counts: Mutex<Counts>,
    /// What the other nodes of a fleet hold together (from the fleet
    /// store; empty for a node alone).
    remote: Mutex<FleetCounts>,
}

/// Allocations per (realm, user), per realm and in total: what a node
/// publishes in its fleet lease, and what the other nodes hold together.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetCounts {
    pub users: HashMap<(String, String), u32>,
    pub realms: HashMap<String, u32>,
    pub total: u32,
}

impl Quotas {
    /// `user_quota` and `total_quota`; 0 means unlimited.
    pub fn new(user_quota: u32, total_quota: u32) -> Quotas {
        Quotas::with_limits(QuotaLimits {
            per_user: user_quota,
            total: total_quota,
            per_ip: 0,
        })
    }

    pub fn with_limits(limits: QuotaLimits) -> Quotas {
        let q = Quotas::default();
        q.set_limits(limits);
        q
    }

    /// New limits (configuration reload); existing allocations are kept.
    pub fn set_limits(&self, limits: QuotaLimits) {
        if let Ok(mut l) = self.settings.lock() {
            l.server = limits;
        }
    }

    /// The realms: the default one's name, and the quotas of the others
    /// (`per_user` and `total` of each realm; 0 means unlimited). Counts of
    /// realms no longer named are dropped once they hold nothing.
    pub fn set_realms(&self, default_realm: &str, realms: Vec<(String, QuotaLimits)>) {
        let names: Vec<String> = realms.iter().map(|(n, _)| n.clone()).collect();
        if let Ok(mut l) = self.settings.lock() {
            l.realms = realms.into_iter().collect();
        }
        if let Ok(mut c) = self.counts.lock() {
            c.per_realm
                .retain(|name, n| n.allocations > 0 || name == default_realm || names.contains(name));
            // Every configured realm has its series from the start.
            for name in names.into_iter().chain([default_realm.to_owned()]) {
                c.per_realm.entry(name).or_default();
            }
        }
    }

    /// Counts one more allocation for `user` of `realm` from `ip`, or
    /// refuses. The user, realm and total quotas count the other nodes of a
    /// fleet too.
    pub fn acquire(&self, realm: &str, user: &str, ip: IpAddr) -> Result<(), QuotaRefusal> {
        let (server, own) = self
            .settings
            .lock()
            .map(|l| (l.server, l.realms.get(realm).copied()))
            .unwrap_or_default();
        let per_user = own.map_or(server.per_user, |o| o.per_user);
        let realm_total = own.map_or(0, |o| o.total);
        let key = (realm.to_owned(), user.to_owned());
        let (remote_user, remote_realm, remote_total) = self
            .remote
            .lock()
            .map(|r| {
                (
                    r.users.get(&key).copied().unwrap_or(0),
                    r.realms.get(realm).copied().unwrap_or(0),
                    r.total,
                )
            })
            .unwrap_or_default();
        let Ok(mut c) = self.counts.lock() else { return Ok(()) };
        let in_realm = c.per_realm.get(realm).map_or(0, |r| r.allocations);
        let n = c.per_user.get(&key).copied().unwrap_or(0);
        let m = c.per_ip.get(&ip).copied().unwrap_or(0);
        let refusal = if server.total != 0 && c.total + remote_total >= server.total {
            Some(QuotaRefusal::Total)
        } else if realm_total != 0 && in_realm + remote_realm >= realm_total {
            Some(QuotaRefusal::Realm)
        } else if per_user != 0 && n + remote_user >= per_user {
            Some(QuotaRefusal::User)
        } else if server.per_ip != 0 && m >= server.per_ip {
            Some(QuotaRefusal::Address)
        } else {
            None
        };
        let r = c.per_realm.entry(realm.to_owned()).or_default();
        if let Some(q) = refusal {
            r.refused += 1;
            return Err(q);
        }
        r.allocations += 1;
        r.granted += 1;
        c.per_user.insert(key, n + 1);
        c.per_ip.insert(ip, m + 1);
        c.total += 1;
        Ok(())
    }

    /// Counts an allocation handed over by a live upgrade: it exists
    /// already, so no quota refuses it (as a reload that lowers a quota
    /// keeps the allocations above it).
    pub fn restore(&self, realm: &str, user: &str, ip: IpAddr) {
        let Ok(mut c) = self.counts.lock() else { return };
        *c.per_user.entry((realm.to_owned(), user.to_owned())).or_insert(0) += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        c.per_realm.entry(realm.to_owned()).or_default().allocations += 1;
        c.total += 1;
    }

    /// Returns one allocation of `user` of `realm` from `ip`.
    pub fn release(&self, realm: &str, user: &str, ip: IpAddr) {
        let Ok(mut c) = self.counts.lock() else { return };
        c.total = c.total.saturating_sub(1);
        let key = (realm.to_owned(), user.to_owned());
        if let Some(n) = c.per_user.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_user.remove(&key);
            }
        }
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
        if let Some(r) = c.per_realm.get_mut(realm) {
            r.allocations = r.allocations.saturating_sub(1);
        }
    }

    /// What the other nodes of the fleet hold now (replaces the last view).
    pub fn set_remote(&self, remote: FleetCounts) {
        if let Ok(mut r) = self.remote.lock() {
            *r = remote;
        }
    }

    /// This node's allocations per (realm, user), per realm and in total,
    /// to publish.
    pub fn local(&self) -> FleetCounts {
        self.counts
            .lock()
            .map(|c| FleetCounts {
                users: c.per_user.clone(),
                realms: c
                    .per_realm
                    .iter()
                    .filter(|(_, r)| r.allocations > 0)
                    .map(|(name, r)| (name.clone(), r.allocations))
                    .collect(),
                total: c.total,
            })
            .unwrap_or_default()
    }

    /// Each realm's counts (the configured realms, and removed ones while
    /// they still hold allocations), by name.
    pub fn realms(&self) -> Vec<(String, RealmCounts)> {
        let mut v: Vec<(String, RealmCounts)> = self
            .counts
            .lock()
            .map(|c| c.per_realm.iter().map(|(n, r)| (n.clone(), *r)).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether another allocation fits under the total quota.
    pub fn has_capacity(&self) -> bool {
        let total_quota = self.settings.lock().map(|l| l.server.total).unwrap_or(0);
        total_quota == 0 || self.total() < total_quota
    }

    pub fn total(&self) -> u32 {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }
}
