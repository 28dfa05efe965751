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
}

impl QuotaRefusal {
    pub const fn label(self) -> &'static str {
        match self {
            QuotaRefusal::User => "user",
            QuotaRefusal::Address => "ip",
            QuotaRefusal::Total => "total",
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

#[derive(Debug, Default)]
struct Counts {
    per_user: HashMap<String, u32>,
    per_ip: HashMap<IpAddr, u32>,
    total: u32,
}

#[derive(Debug, Default)]
pub struct Quotas {
    limits: Mutex<QuotaLimits>,
    counts: Mutex<Counts>,
    /// What the other nodes of a fleet hold, per user and in total (from
    /// the fleet store; empty for a node alone).
    remote: Mutex<(HashMap<String, u32>, u32)>,
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
        Quotas {
            limits: Mutex::new(limits),
            counts: Mutex::new(Counts::default()),
            remote: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// New limits (configuration reload); existing allocations are kept.
    pub fn set_limits(&self, limits: QuotaLimits) {
        if let Ok(mut l) = self.limits.lock() {
            *l = limits;
        }
    }

    /// Counts one more allocation for `user` from `ip`, or refuses. The
    /// user and total quotas count the other nodes of a fleet too.
    pub fn acquire(&self, user: &str, ip: IpAddr) -> Result<(), QuotaRefusal> {
        let limits = self.limits.lock().map(|l| *l).unwrap_or_default();
        let (remote_user, remote_total) = self
            .remote
            .lock()
            .map(|r| (r.0.get(user).copied().unwrap_or(0), r.1))
            .unwrap_or((0, 0));
        let Ok(mut c) = self.counts.lock() else { return Ok(()) };
        if limits.total != 0 && c.total + remote_total >= limits.total {
            return Err(QuotaRefusal::Total);
        }
        let n = c.per_user.get(user).copied().unwrap_or(0);
        if limits.per_user != 0 && n + remote_user >= limits.per_user {
            return Err(QuotaRefusal::User);
        }
        let m = c.per_ip.get(&ip).copied().unwrap_or(0);
        if limits.per_ip != 0 && m >= limits.per_ip {
            return Err(QuotaRefusal::Address);
        }
        c.per_user.insert(user.to_owned(), n + 1);
        c.per_ip.insert(ip, m + 1);
        c.total += 1;
        Ok(())
    }

    /// Counts an allocation handed over by a live upgrade: it exists
    /// already, so no quota refuses it (as a reload that lowers a quota
    /// keeps the allocations above it).
    pub fn restore(&self, user: &str, ip: IpAddr) {
        let Ok(mut c) = self.counts.lock() else { return };
        *c.per_user.entry(user.to_owned()).or_insert(0) += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        c.total += 1;
    }

    /// Returns one allocation of `user` from `ip`.
    pub fn release(&self, user: &str, ip: IpAddr) {
        let Ok(mut c) = self.counts.lock() else { return };
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_user.remove(user);
            }
        }
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }

    /// What the other nodes of the fleet hold now (replaces the last view).
    pub fn set_remote(&self, per_user: HashMap<String, u32>, total: u32) {
        if let Ok(mut r) = self.remote.lock() {
            *r = (per_user, total);
        }
    }

    /// This node's allocations per user, and in total, to publish.
    pub fn local(&self) -> (Vec<(String, u32)>, u32) {
        self.counts
            .lock()
            .map(|c| (c.per_user.iter().map(|(u, n)| (u.clone(), *n)).collect(), c.total))
            .unwrap_or_default()
    }

    /// Whether another allocation fits under the total quota.
    pub fn has_capacity(&self) -> bool {
        let total_quota = self.limits.lock().map(|l| l.total).unwrap_or(0);
        total_quota == 0 || self.total() < total_quota
    }

    pub fn total(&self) -> u32 {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }
}
