//! Allocation quotas shared by all workers: per username and in total.
//! Touched only when an allocation is created or freed, never per packet.

use std::collections::HashMap;
use std::sync::Mutex;

/// Why an allocation is refused for quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// The user has `user_quota` allocations already (486).
    User,
    /// The server has `total_quota` allocations already (508).
    Total,
}

#[derive(Debug, Default)]
struct Counts {
    per_user: HashMap<String, u32>,
    total: u32,
}

#[derive(Debug, Default)]
pub struct Quotas {
    limits: Mutex<(u32, u32)>,
    counts: Mutex<Counts>,
}

impl Quotas {
    /// `user_quota` and `total_quota`; 0 means unlimited.
    pub fn new(user_quota: u32, total_quota: u32) -> Quotas {
        Quotas {
            limits: Mutex::new((user_quota, total_quota)),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// New limits (configuration reload); existing allocations are kept.
    pub fn set_limits(&self, user_quota: u32, total_quota: u32) {
        if let Ok(mut l) = self.limits.lock() {
            *l = (user_quota, total_quota);
        }
    }

    /// Counts one more allocation for `user`, or refuses.
    pub fn acquire(&self, user: &str) -> Result<(), QuotaRefusal> {
        let (user_quota, total_quota) = self.limits.lock().map(|l| *l).unwrap_or((0, 0));
        let Ok(mut c) = self.counts.lock() else { return Ok(()) };
        if total_quota != 0 && c.total >= total_quota {
            return Err(QuotaRefusal::Total);
        }
        let n = c.per_user.get(user).copied().unwrap_or(0);
        if user_quota != 0 && n >= user_quota {
            return Err(QuotaRefusal::User);
        }
        c.per_user.insert(user.to_owned(), n + 1);
        c.total += 1;
        Ok(())
    }

    /// Returns one allocation of `user`.
    pub fn release(&self, user: &str) {
        let Ok(mut c) = self.counts.lock() else { return };
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_user.remove(user);
            }
        }
    }

    /// Whether another allocation fits under the total quota.
    pub fn has_capacity(&self) -> bool {
        let total_quota = self.limits.lock().map(|l| l.1).unwrap_or(0);
        total_quota == 0 || self.total() < total_quota
    }

    pub fn total(&self) -> u32 {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }
}
