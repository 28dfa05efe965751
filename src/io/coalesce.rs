//! Wake-up coalescing at moderate load: a worker that is about to sleep
//! right after handling a few packets, and slept only briefly before that,
//! waits `delay` first, so the next wake-up finds a batch instead of one
//! packet. Sparse traffic (long sleeps) and saturation (no sleeps) are left
//! alone. Costs at most `delay` of latency per pass through the relay.

use std::cell::Cell;
use std::time::{Duration, Instant};

thread_local! {
    static STATE: Cell<State> = const { Cell::new(State { delay_ns: 0, handled: 0, last_park: None, last_unpark: None }) };
}

#[derive(Clone, Copy)]
struct State {
    delay_ns: u64,
    handled: u32,
    last_park: Option<Instant>,
    last_unpark: Option<Instant>,
}

/// Sets this worker thread's delay (zero switches coalescing off).
pub fn configure(delay: Duration) {
    STATE.with(|s| {
        let mut st = s.get();
        st.delay_ns = delay.as_nanos() as u64;
        s.set(st);
    });
}

/// Counts packets handled since the last sleep.
#[inline]
pub fn handled(n: usize) {
    STATE.with(|s| {
        let mut st = s.get();
        st.handled = st.handled.saturating_add(n as u32);
        s.set(st);
    });
}

/// The runtime is about to sleep.
pub fn on_park() {
    let st = STATE.with(Cell::get);
    if st.delay_ns == 0 {
        return;
    }
    let delay = Duration::from_nanos(st.delay_ns);
    let slept = match (st.last_park, st.last_unpark) {
        (Some(p), Some(u)) => Some(u.saturating_duration_since(p)),
        _ => None,
    };
    if should_wait(st.handled, slept, delay) {
        std::thread::sleep(delay);
    }
    STATE.with(|s| {
        let mut st = s.get();
        st.handled = 0;
        st.last_park = Some(Instant::now());
        s.set(st);
    });
}

/// A pass that handled a few packets (not none, not a full batch) after a
/// sleep shorter than a few delays means packets arrive faster than one per
/// sleep-wake cycle: gather some before sleeping again.
fn should_wait(handled: u32, last_sleep: Option<Duration>, delay: Duration) -> bool {
    !delay.is_zero() && (1..16).contains(&handled) && last_sleep.is_some_and(|s| s < delay * 4)
}

/// The runtime woke up.
pub fn on_unpark() {
    STATE.with(|s| {
        let mut st = s.get();
        if st.delay_ns != 0 {
            st.last_unpark = Some(Instant::now());
        }
        s.set(st);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_micros(100);

    #[test]
    fn waits_only_between_close_packets() {
        // Moderate load: one packet after a 50 µs sleep.
        assert!(should_wait(1, Some(Duration::from_micros(50)), D));
        // Sparse traffic: a long sleep before the packet.
        assert!(!should_wait(1, Some(Duration::from_millis(5)), D));
        // Nothing handled (a timer), or a full batch (saturation).
        assert!(!should_wait(0, Some(Duration::from_micros(50)), D));
        assert!(!should_wait(32, Some(Duration::from_micros(50)), D));
        // No sleep seen yet, or switched off.
        assert!(!should_wait(1, None, D));
        assert!(!should_wait(1, Some(Duration::from_micros(50)), Duration::ZERO));
    }
}
