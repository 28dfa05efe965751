//! Rate limits in the server core, in virtual time: the per-source budget
//! for unauthenticated answers (amplification) and the bandwidth limits.

use std::net::IpAddr;
use std::time::Duration;
use std::time::Instant;
use turnstile::proto::channel_data;
use turnstile::proto::server::rate::SOURCE_SLOTS;
use turnstile::proto::server::{
    ClientKey, ClientOutcome, DropReason, ListenerId, PEER_HEADROOM, PEER_TAILROOM, PeerOutcome, Quotas, Rate, RelayId,
    ServerConfig, SourceBudgets, TokenBucket,
};
use turnstile::proto::stun::{Class, Method};
use turnstile::testing::*;

fn binding(h: &mut Harness) -> Vec<u8> {
    let tid = h.tid();
    build(Class::Request, Method::BINDING, tid, |_| {})
}

fn budget_config() -> ServerConfig {
    ServerConfig {
        unauthenticated: Rate {
            bytes_per_second: 320,
            burst: 640,
        },
        ..config()
    }
}

#[test]
fn unauthenticated_answers_stop_at_the_source_budget() {
    let mut h = Harness::with(budget_config(), policy(&["0.0.0.0/0"]), Quotas::new(10, 0));
    let req = binding(&mut h);
    // Binding success (XOR-MAPPED-ADDRESS, SOFTWARE): 52 bytes; 640 bytes of burst.
    let (mut answered, mut suppressed, mut size) = (0, 0, 0);
    for _ in 0..100 {
        match h.send(&req) {
            ClientOutcome::Reply { len } => {
                size = len;
                answered += 1;
            }
            ClientOutcome::Drop(DropReason::RateLimited) => suppressed += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(size, 52);
    assert_eq!((answered, suppressed), (12, 88));
    assert_eq!(h.server.stats().responses_suppressed, 88);
    assert_eq!(h.server.stats().unauthenticated_bytes_out, 12 * 52);
    // 401 challenges count against the same budget.
    let tid = h.tid();
    let alloc = build(Class::Request, Method::ALLOCATE, tid, |w| {
        w.requested_transport(17).unwrap()
    });
    assert!(matches!(h.send(&alloc), ClientOutcome::Drop(DropReason::RateLimited)));
    // A second later 320 bytes more (with the 16 left over): six answers.
    h.advance(1);
    let answered: usize = (0..20)
        .filter(|_| matches!(h.send(&req), ClientOutcome::Reply { .. }))
        .count();
    assert_eq!(answered, 6);
    // Another source has its own budget.
    h.key = ClientKey {
        listener: ListenerId(0),
        client: sa("192.0.2.77:5000"),
    };
    assert!(matches!(h.send(&req), ClientOutcome::Reply { .. }));
    // Over TCP/TLS the source cannot be spoofed: no budget.
    h.key = ClientKey {
        listener: ListenerId(1),
        client: sa("192.0.2.10:40000"),
    };
    for _ in 0..100 {
        assert!(matches!(h.send(&req), ClientOutcome::Reply { .. }));
    }
}

#[test]
fn signed_answers_are_not_budgeted() {
    let mut h = Harness::with(
        ServerConfig {
            unauthenticated: Rate {
                bytes_per_second: 1,
                burst: 200,
            },
            ..config()
        },
        policy(&["0.0.0.0/0"]),
        Quotas::new(10, 0),
    );
    let c = h.creds("alice", "secret"); // one 401 (~130 bytes) of the 200
    h.allocate(&c);
    for _ in 0..50 {
        let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(600).unwrap());
        assert_eq!(code(&h.exchange(&req)), 0);
    }
}

#[test]
fn an_unauthenticated_flood_gets_back_less_than_it_sends() {
    // The default budget (8 KiB/s, 16 KiB burst) against 10 000 unauthenticated
    // Allocates a second from one address for 5 virtual seconds.
    let mut h = Harness::with(
        ServerConfig {
            unauthenticated: Rate {
                bytes_per_second: 8192,
                burst: 16384,
            },
            ..config()
        },
        policy(&[]),
        Quotas::new(10, 0),
    );
    let (mut bytes_in, mut bytes_out) = (0usize, 0usize);
    for i in 0..50_000u32 {
        h.now.instant += Duration::from_micros(100);
        let tid = h.tid();
        let req = build(Class::Request, Method::ALLOCATE, tid, |w| {
            w.requested_transport(17).unwrap()
        });
        bytes_in += req.len();
        h.key.client.set_port(10_000 + (i % 50_000) as u16);
        if let ClientOutcome::Reply { len } = h.send(&req) {
            bytes_out += len;
        }
    }
    let ratio = bytes_out as f64 / bytes_in as f64;
    assert!(ratio < 0.1, "out/in = {ratio:.3} ({bytes_out} / {bytes_in})");
}

fn bandwidth_setup(config: ServerConfig) -> (Harness, Creds, std::net::SocketAddr) {
    let mut h = Harness::with(config, policy(&["0.0.0.0/0"]), Quotas::new(10, 0));
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let peer = sa("198.51.100.9:7000");
    assert_eq!(code(&h.bind_channel(&c, 0x4000, peer)), 0);
    (h, c, peer)
}

fn channel_data_of(len: usize) -> Vec<u8> {
    let mut cd = channel_data::header(0x4000, len as u16).to_vec();
    cd.resize(4 + len, 7);
    cd
}

#[test]
fn max_bps_drops_beyond_the_allocation_rate_each_way() {
    // 8 Mbit/s = 1 MB/s, one second of burst.
    let (mut h, _c, peer) = bandwidth_setup(ServerConfig {
        allocation_bandwidth: Rate::from_bits_per_second(8_000_000),
        ..config()
    });
    let cd = channel_data_of(1000);
    let passed = |h: &mut Harness| {
        (0..2000)
            .filter(|_| matches!(h.send(&cd), ClientOutcome::Forward { .. }))
            .count()
    };
    assert_eq!(passed(&mut h), 1000, "one second of burst");
    h.now.instant += Duration::from_millis(500);
    assert_eq!(passed(&mut h), 500, "half a second of rate");
    assert_eq!(h.server.stats().bandwidth_dropped_packets, 2500);
    // The other direction has its own bucket.
    let mut buf = vec![0u8; PEER_HEADROOM + 1000 + PEER_TAILROOM];
    let now = h.now.instant;
    let to_client = (0..2000)
        .filter(|_| {
            matches!(
                h.server
                    .handle_peer_packet(now, RelayId(0), peer, &mut buf, PEER_HEADROOM, 1000),
                PeerOutcome::ToClient { .. }
            )
        })
        .count();
    assert_eq!(to_client, 1000);
    assert!(matches!(
        h.server
            .handle_peer_packet(now, RelayId(0), peer, &mut buf, PEER_HEADROOM, 1000),
        PeerOutcome::Drop(DropReason::BandwidthLimit)
    ));
}

#[test]
fn bps_capacity_is_shared_by_all_allocations() {
    let (mut h, _c, _peer) = bandwidth_setup(ServerConfig {
        worker_bandwidth: Rate::from_bits_per_second(8_000_000),
        ..config()
    });
    let cd = channel_data_of(1000);
    let first = (0..700)
        .filter(|_| matches!(h.send(&cd), ClientOutcome::Forward { .. }))
        .count();
    // A second client's allocation draws on what is left.
    h.key.client = sa("192.0.2.11:40000");
    let c2 = h.creds("bob", "hunter2");
    h.allocate(&c2);
    assert_eq!(code(&h.bind_channel(&c2, 0x4000, sa("198.51.100.10:7000"))), 0);
    let second = (0..700)
        .filter(|_| matches!(h.send(&cd), ClientOutcome::Forward { .. }))
        .count();
    assert_eq!((first, second), (700, 300));
}

#[test]
fn without_limits_nothing_is_dropped() {
    let (mut h, _c, _peer) = bandwidth_setup(config());
    let cd = channel_data_of(1200);
    for _ in 0..10_000 {
        assert!(matches!(h.send(&cd), ClientOutcome::Forward { .. }));
    }
    assert_eq!(h.server.stats().bandwidth_dropped_packets, 0);
}

// ----- The buckets themselves -----

const R: Rate = Rate {
    bytes_per_second: 1000,
    burst: 3000,
};

#[test]
fn a_bucket_passes_its_burst_then_its_rate() {
    let t0 = Instant::now();
    let mut b = TokenBucket::full(R, t0);
    assert!(b.take(R, 2000, t0));
    assert!(b.take(R, 1000, t0));
    assert!(!b.take(R, 1, t0));
    // Half a second earns 500 bytes.
    assert!(!b.take(R, 600, t0 + Duration::from_millis(500)));
    assert!(b.take(R, 500, t0 + Duration::from_millis(500)));
    // Never more than the burst, however long it rests.
    assert!(!b.take(R, 3001, t0 + Duration::from_secs(100)));
    assert!(b.take(R, 3000, t0 + Duration::from_secs(100)));
    // Off: everything passes.
    assert!(TokenBucket::empty(t0).take(Rate::OFF, 1_000_000, t0));
}

#[test]
fn small_steps_still_earn_tokens() {
    // 1000 B/s polled every 100 µs: each step earns 0.1 byte; the bucket
    // keeps its start time until a whole byte is earned.
    let t0 = Instant::now();
    let mut b = TokenBucket::empty(t0);
    let mut passed = 0;
    for i in 1..=10_000u64 {
        if b.take(R, 10, t0 + Duration::from_micros(100 * i)) {
            passed += 10;
        }
    }
    assert!((990..=1000).contains(&passed), "{passed} bytes in one second");
}

#[test]
fn sources_have_separate_budgets_and_a_flood_cannot_reset_one() {
    let t0 = Instant::now();
    let mut s = SourceBudgets::new(R, 42);
    let victim: IpAddr = "198.51.100.1".parse().unwrap();
    let other: IpAddr = "198.51.100.2".parse().unwrap();
    assert!(s.take(victim, 3000, t0));
    assert!(!s.take(victim, 100, t0));
    assert!(s.take(other, 3000, t0), "another source has its own budget");
    // A flood of spoofed sources: whatever they displace, the victim
    // never gets more than the refill rate.
    let mut out = 0;
    for i in 0..100_000u32 {
        let now = t0 + Duration::from_micros(u64::from(i) * 10); // 1 s in all
        let spoofed = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
        s.take(spoofed, 100, now);
        if s.take(victim, 100, now) {
            out += 100;
        }
    }
    assert!(out <= 1000 + 100, "victim got {out} bytes in one second");
    assert_eq!(s.slot_count(), SOURCE_SLOTS, "the table does not grow");
    // Off: no table, everything passes.
    let mut off = SourceBudgets::new(Rate::OFF, 1);
    assert!(off.take(victim, 1_000_000, t0));
    assert_eq!(off.slot_count(), 0);
}

mod earned_budgets {
    use std::net::IpAddr;
    use std::time::{Duration, Instant};
    use turnstile::proto::server::Rate;
    use turnstile::proto::server::rate::{EARNED_CAP_BURSTS, SourceBudgets};

    const RATE: Rate = Rate {
        bytes_per_second: 1000,
        burst: 2000,
    };

    #[test]
    fn authenticating_sources_earn_answers_and_spoofed_ones_do_not() {
        let t0 = Instant::now();
        let mut b = SourceBudgets::new(RATE, 1);
        let (real, spoofed): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        // Both spend their burst.
        for ip in [real, spoofed] {
            assert!(b.take(ip, 2000, t0));
            assert!(!b.take(ip, 100, t0));
        }
        // The real one authenticates ten requests: 5120 bytes earned, above the burst.
        for _ in 0..10 {
            b.earn(real, t0);
        }
        assert!(b.take(real, 5000, t0));
        assert!(!b.take(spoofed, 100, t0));
        // Earned bytes are capped at EARNED_CAP_BURSTS bursts, and kept over time.
        for _ in 0..10_000 {
            b.earn(real, t0);
        }
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(real, 2000 * EARNED_CAP_BURSTS as usize, later));
        assert!(!b.take(real, 1, later), "nothing beyond the cap");
    }
}
