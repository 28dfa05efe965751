//! The relay ports one worker hands out: its slice of the configured range,
//! picked in a scrambled order, EVEN-PORT pairs, and RESERVATION-TOKENs.
//!
//! The kernel has the last word on whether a port is free (another process
//! may hold it); a port the driver failed to bind is held back for a while.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hmac::Mac;

use crate::proto::stun::integrity::{self, HmacSha256};

/// How long an EVEN-PORT reservation of port+1 lasts (RFC 8656 suggests ~30 s).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How long a port the kernel refused is skipped.
pub const BUSY_HOLD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct RelayPorts {
    low: u16,
    high: u16,
    used: Vec<u64>,
    in_use: usize,
    /// State of the scrambled walk over the slice.
    cursor: u32,
    step: u32,
    /// Ports held back until a deadline (reservations and kernel refusals).
    holds: VecDeque<(Instant, u16)>,
    token_key: HmacSha256,
}

impl RelayPorts {
    /// A slice `low..=high`; `seed` scrambles the order and keys the tokens.
    pub fn new(low: u16, high: u16, seed: &[u8; 32]) -> RelayPorts {
        let n = u32::from(high.saturating_sub(low)) + 1;
        let s = u32::from_le_bytes([seed[0], seed[1], seed[2], seed[3]]);
        // A step coprime with n visits every port once per lap.
        let mut step = (s % n) | 1;
        while gcd(step, n) != 1 {
            step += 2;
        }
        RelayPorts {
            low,
            high,
            used: vec![0; (n as usize).div_ceil(64)],
            in_use: 0,
            cursor: s.rotate_left(13) % n,
            step,
            holds: VecDeque::new(),
            token_key: integrity::hmac_sha256(seed),
        }
    }

    pub fn size(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    fn bit(&self, port: u16) -> Option<(usize, u64)> {
        if !self.contains(port) {
            return None;
        }
        let i = usize::from(port - self.low);
        Some((i / 64, 1u64 << (i % 64)))
    }

    pub fn is_free(&self, port: u16) -> bool {
        self.bit(port)
            .is_some_and(|(w, m)| self.used.get(w).is_some_and(|x| x & m == 0))
    }

    fn set(&mut self, port: u16, used: bool) {
        if let Some((w, m)) = self.bit(port)
            && let Some(x) = self.used.get_mut(w)
        {
            let was = *x & m != 0;
            if used {
                *x |= m
            } else {
                *x &= !m
            }
            match (was, used) {
                (false, true) => self.in_use += 1,
                (true, false) => self.in_use -= 1,
                _ => {}
            }
        }
    }

    /// Takes a free port; `even` asks for an even one, `pair` additionally
    /// holds port+1 for a reservation.
    pub fn take(&mut self, now: Instant, even: bool, pair: bool) -> Option<u16> {
        let n = self.size() as u32;
        for _ in 0..n {
            self.cursor = (self.cursor + self.step) % n;
            let port = self.low + self.cursor as u16;
            if !self.is_free(port) || (even && !port.is_multiple_of(2)) {
                continue;
            }
            if pair {
                let Some(next) = port.checked_add(1) else { continue };
                if !self.is_free(next) {
                    continue;
                }
                self.set(next, true);
                self.holds.push_back((now + RESERVATION_LIFETIME, next));
            }
            self.set(port, true);
            return Some(port);
        }
        None
    }

    /// Marks a specific port used (a redeemed reservation). Ports outside the
    /// slice belong to another worker and are not tracked here.
    pub fn take_specific(&mut self, port: u16) {
        self.set(port, true);
    }

    /// Where the scrambled walk stands, and the ports held back with their
    /// deadlines (a live upgrade carries them).
    pub fn walk(&self) -> (u32, &VecDeque<(Instant, u16)>) {
        (self.cursor, &self.holds)
    }

    /// Continues the walk where another process left it, holding its ports.
    pub fn set_walk(&mut self, cursor: u32, holds: impl Iterator<Item = (Instant, u16)>) {
        self.cursor = cursor % self.size() as u32;
        for (deadline, port) in holds {
            if self.is_free(port) {
                self.set(port, true);
                self.holds.push_back((deadline, port));
            }
        }
    }

    /// Returns a port to the pool.
    pub fn release(&mut self, port: u16) {
        self.set(port, false);
    }

    /// The kernel refused `port` (someone else holds it): skip it for a while.
    pub fn hold_busy(&mut self, now: Instant, port: u16) {
        self.set(port, true);
        self.holds.push_back((now + BUSY_HOLD, port));
    }

    /// Releases holds whose time has come (the queue mixes two hold lengths,
    /// so it is scanned whole; it holds few entries).
    pub fn expire(&mut self, now: Instant) {
        let mut keep = VecDeque::with_capacity(self.holds.len());
        while let Some((deadline, port)) = self.holds.pop_front() {
            if deadline <= now {
                self.set(port, false);
            } else {
                keep.push_back((deadline, port));
            }
        }
        self.holds = keep;
    }

    /// The earliest hold deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.holds.iter().map(|(d, _)| *d).min()
    }

    /// A RESERVATION-TOKEN for `port`, for `username`: the port, the low 16
    /// bits of the Unix second the reservation ends, and a MAC over the
    /// port, the whole end time and the user, so any worker redeems it
    /// without state, only for the user it was issued to, and only while
    /// the reservation lasts.
    pub fn token(&self, port: u16, now_unix: u64, username: &str) -> [u8; 8] {
        let ends = now_unix + RESERVATION_LIFETIME.as_secs();
        let tag = self.tag(port, ends, username);
        let p = port.to_be_bytes();
        let e = (ends as u16).to_be_bytes();
        [p[0], p[1], e[0], e[1], tag[0], tag[1], tag[2], tag[3]]
    }

    /// The port a token reserves, if the token is ours, issued to
    /// `username` and its reservation has not ended.
    pub fn redeem(&self, token: &[u8; 8], now_unix: u64, username: &str) -> Option<u16> {
        let port = u16::from_be_bytes([token[0], token[1]]);
        let low = u64::from(u16::from_be_bytes([token[2], token[3]]));
        // The end time is the one with these low bits in the reservation's
        // span from now: anything else is not a live reservation.
        let ends = (now_unix & !0xffff) | low;
        let ends = if ends < now_unix { ends + 0x1_0000 } else { ends };
        if ends > now_unix + RESERVATION_LIFETIME.as_secs() {
            return None;
        }
        integrity::ct_eq(&self.tag(port, ends, username), &token[4..8]).then_some(port)
    }

    fn tag(&self, port: u16, ends: u64, username: &str) -> [u8; 4] {
        let mut mac = self.token_key.clone();
        mac.update(&port.to_be_bytes());
        mac.update(&ends.to_be_bytes());
        mac.update(username.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; 4];
        t.copy_from_slice(full.get(..4).unwrap_or(&[0; 4]));
        t
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_live_as_long_as_the_reservation_across_the_16_bit_wrap() {
        let ports = RelayPorts::new(50000, 50999, &[3; 32]);
        for issued in [1_000_000u64, 0x1_ffff - 10, 0x2_0000 - 30, 0x2_0000] {
            let t = ports.token(50001, issued, "alice");
            for later in 0..=30 {
                assert_eq!(
                    ports.redeem(&t, issued + later, "alice"),
                    Some(50001),
                    "{issued}+{later}"
                );
            }
            assert_eq!(ports.redeem(&t, issued + 31, "alice"), None);
            assert_eq!(ports.redeem(&t, issued, "mallory"), None);
            assert_eq!(ports.redeem(&t, issued.saturating_sub(65536), "alice"), None);
        }
    }
}
