//! Token buckets in bytes, in virtual time: the per-source budget for
//! answers to unauthenticated requests (amplification), and the bandwidth
//! limits per allocation and per worker.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::time::Instant;

/// A bucket of `burst` bytes refilled at `rate` bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    tokens: u64,
    at: Instant,
}

/// What a bucket is filled with and to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate {
    /// Bytes per second; 0 switches the limit off.
    pub bytes_per_second: u64,
    /// Most bytes that can pass at once.
    pub burst: u64,
}

impl Rate {
    pub const OFF: Rate = Rate {
        bytes_per_second: 0,
        burst: 0,
    };

    pub const fn is_off(&self) -> bool {
        self.bytes_per_second == 0
    }

    /// A bandwidth limit from bits per second: one second's worth may pass
    /// at once, but never less than two full-size datagrams.
    pub const fn from_bits_per_second(bps: u64) -> Rate {
        let bytes = bps / 8;
        let burst = if bytes > 2 * 65_535 { bytes } else { 2 * 65_535 };
        Rate {
            bytes_per_second: bytes,
            burst,
        }
    }

    /// This rate shared out among `n` workers.
    pub fn per_worker(self, n: usize) -> Rate {
        let n = n.max(1) as u64;
        if self.is_off() {
            return self;
        }
        Rate {
            bytes_per_second: (self.bytes_per_second / n).max(1),
            burst: (self.burst / n).max(1),
        }
    }
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: rate.burst,
            at: now,
        }
    }

    /// Its tokens and when they were counted (a live upgrade carries them).
    pub(crate) fn parts(self) -> (u64, Instant) {
        (self.tokens, self.at)
    }

    pub(crate) fn from_parts(tokens: u64, at: Instant) -> TokenBucket {
        TokenBucket { tokens, at }
    }

    /// An empty bucket (a newcomer displacing a busy source starts here).
    pub fn empty(now: Instant) -> TokenBucket {
        TokenBucket { tokens: 0, at: now }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        // Tokens above the burst (earned by a proven source) are kept; time
        // alone refills only up to the burst.
        if self.tokens >= rate.burst {
            self.at = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.at);
        let earned =
            u64::try_from(elapsed.as_nanos().saturating_mul(u128::from(rate.bytes_per_second)) / 1_000_000_000)
                .unwrap_or(u64::MAX);
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(rate.burst);
            self.at = now;
        }
    }

    /// Takes `cost` bytes if the bucket holds them.
    #[inline]
    pub fn take(&mut self, rate: Rate, cost: usize, now: Instant) -> bool {
        if rate.is_off() {
            return true;
        }
        self.refill(rate, now);
        let cost = cost as u64;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has been full since `now` (its source is idle).
    fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= rate.burst
    }
}

/// Budgets per source address in a fixed table: memory does not grow with
/// the number of sources, however many a flood spoofs. A source hashes to
/// one slot (keyed hash, so nobody can aim at another's slot); a newcomer
/// takes a slot whose owner is idle with a full bucket, or else starts with
/// an empty one — under a flood of many sources everyone is held to the
/// refill rate rather than handed a fresh burst.
#[derive(Debug, Clone)]
pub struct SourceBudgets {
    rate: Rate,
    slots: Vec<Option<(IpAddr, TokenBucket)>>,
    seed: u64,
}

/// Slots per worker.
pub const SOURCE_SLOTS: usize = 4096;

/// Bytes of unauthenticated answers a source earns with each request it
/// authenticates: four challenges' worth. Clients behind one address (an
/// office, a campus, a carrier-grade NAT) pay for the next newcomers' 401s
/// by authenticating, which a spoofed source never can.
pub const EARNED_PER_AUTHENTICATION: u64 = 512;
/// Earned bytes a source may hold, as a multiple of the burst.
pub const EARNED_CAP_BURSTS: u64 = 32;

impl SourceBudgets {
    pub fn new(rate: Rate, seed: u64) -> SourceBudgets {
        SourceBudgets {
            rate,
            slots: Vec::new(),
            seed,
        }
    }

    /// Slots in use by the table (0 until the first budgeted answer).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn set_rate(&mut self, rate: Rate) {
        self.rate = rate;
    }

    /// Every source with a budget, for a live upgrade.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (IpAddr, TokenBucket)> + '_ {
        self.slots.iter().flatten().copied()
    }

    /// Takes over budgets from [`SourceBudgets::entries`] of a table with
    /// the same seed.
    pub(crate) fn restore(&mut self, entries: impl Iterator<Item = (IpAddr, TokenBucket)>) {
        for (ip, bucket) in entries {
            if self.slots.is_empty() {
                self.slots = vec![None; SOURCE_SLOTS];
            }
            let index = self.index(ip);
            if let Some(slot) = self.slots.get_mut(index) {
                *slot = Some((ip, bucket));
            }
        }
    }

    /// Whether `source` could not pay even the smallest answer now: its
    /// unauthenticated requests can be dropped before any work is done.
    pub fn is_spent(&mut self, source: IpAddr, now: Instant) -> bool {
        !self.rate.is_off() && self.balance(source, now).is_some_and(|t| t < 32)
    }

    fn balance(&mut self, source: IpAddr, now: Instant) -> Option<u64> {
        let index = self.index(source);
        let rate = self.rate;
        match self.slots.get_mut(index)? {
            Some((ip, bucket)) if *ip == source => {
                bucket.refill(rate, now);
                Some(bucket.tokens)
            }
            _ => None,
        }
    }

    fn index(&self, source: IpAddr) -> usize {
        let mut h = rustc_hash::FxBuildHasher.build_hasher();
        h.write_u64(self.seed);
        match source {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => h.write(&a.octets()),
        }
        (h.finish() as usize) % SOURCE_SLOTS
    }

    /// `source` authenticated a request: it is a real address, whose
    /// unauthenticated answers it pays for in advance
    /// ([`EARNED_PER_AUTHENTICATION`], up to [`EARNED_CAP_BURSTS`] bursts).
    pub fn earn(&mut self, source: IpAddr, now: Instant) {
        if self.rate.is_off() {
            return;
        }
        if self.slots.is_empty() {
            self.slots = vec![None; SOURCE_SLOTS];
        }
        let index = self.index(source);
        let rate = self.rate;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let bucket = match slot {
            Some((ip, bucket)) if *ip == source => bucket,
            Some((_, bucket)) => {
                // Another source's slot: taken over only from an idle owner.
                if !bucket.is_full(rate, now) {
                    return;
                }
                &mut slot.insert((source, TokenBucket::full(rate, now))).1
            }
            None => &mut slot.insert((source, TokenBucket::full(rate, now))).1,
        };
        bucket.refill(rate, now);
        let cap = rate.burst.saturating_mul(EARNED_CAP_BURSTS);
        bucket.tokens = bucket
            .tokens
            .saturating_add(EARNED_PER_AUTHENTICATION)
            .min(cap.max(bucket.tokens));
    }

    /// Takes `cost` bytes from `source`'s budget; false when it is spent.
    pub fn take(&mut self, source: IpAddr, cost: usize, now: Instant) -> bool {
        if self.rate.is_off() {
            return true;
        }
        if self.slots.is_empty() {
            self.slots = vec![None; SOURCE_SLOTS];
        }
        let index = self.index(source);
        let rate = self.rate;
        let Some(slot) = self.slots.get_mut(index) else {
            return true;
        };
        let bucket = match slot {
            Some((ip, bucket)) if *ip == source => bucket,
            Some((_, bucket)) => {
                let fresh = if bucket.is_full(rate, now) {
                    TokenBucket::full(rate, now)
                } else {
                    TokenBucket::empty(now)
                };
                &mut slot.insert((source, fresh)).1
            }
            None => &mut slot.insert((source, TokenBucket::full(rate, now))).1,
        };
        bucket.take(rate, cost, now)
    }
}
