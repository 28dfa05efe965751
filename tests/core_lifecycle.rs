//! The core's state-change outputs (what a kernel fast path or a hand-over
//! mirrors) and the deadlines it keeps for client connections, in virtual
//! time.

use turnstile::proto::server::{CloseReason, Input, ListenerId, Output};
use turnstile::proto::stun::Method;
use turnstile::testing::*;

fn events_of(h: &mut Harness) -> Vec<Output> {
    std::mem::take(&mut h.events)
}

#[test]
fn permissions_and_channels_report_expiry_once_and_refresh_moves_it() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let peer = sa("8.8.4.4:5000");
    let other = sa("9.9.9.9:6000");
    assert_eq!(code(&h.bind_channel(&c, 0x4001, peer)), 0);
    assert_eq!(code(&h.permit(&c, other)), 0);
    let installed = events_of(&mut h);
    assert!(
        installed
            .iter()
            .any(|e| matches!(e, Output::ChannelBound { channel: 0x4001, .. }))
    );
    assert_eq!(
        installed
            .iter()
            .filter(|e| matches!(e, Output::PermissionInstalled { .. }))
            .count(),
        2,
        "{installed:?}"
    );

    // At 200 s the channel refreshes its own permission; the other one is left.
    h.advance(200);
    let c = h.creds("alice", "secret");
    assert_eq!(code(&h.bind_channel(&c, 0x4001, peer)), 0);
    let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(3600).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    events_of(&mut h);

    h.advance(99);
    assert!(events_of(&mut h).is_empty(), "nothing due before 300 s");
    h.advance(2);
    let key = h.key;
    assert_eq!(
        events_of(&mut h),
        vec![Output::PermissionExpired { key, peer: other.ip() }],
        "only the unrefreshed permission ran out at 300 s"
    );

    // The refreshed permission runs out at 500 s, the channel at 800 s.
    h.advance(200);
    assert_eq!(
        events_of(&mut h),
        vec![Output::PermissionExpired { key, peer: peer.ip() }]
    );
    h.advance(300);
    let expired = events_of(&mut h);
    assert!(
        matches!(expired.as_slice(), [Output::ChannelExpired { channel: 0x4001, peer: p, .. }] if *p == peer),
        "{expired:?}"
    );
    // Reported once, though the number stays quarantined.
    h.advance(200);
    assert!(events_of(&mut h).is_empty());
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn refreshing_often_keeps_the_timer_heap_small() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let peer = sa("8.8.4.4:5000");
    for _ in 0..2000 {
        let c = h.creds("alice", "secret");
        assert_eq!(code(&h.permit(&c, peer)), 0);
        let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(600).unwrap());
        assert_eq!(code(&h.exchange(&req)), 0);
    }
    assert!(
        h.server.pending_timers() <= 4,
        "{} timer entries",
        h.server.pending_timers()
    );
}

#[test]
fn an_allocation_ending_reports_itself_not_each_permission() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    assert_eq!(code(&h.permit(&c, sa("8.8.4.4:5000"))), 0);
    events_of(&mut h);
    h.advance(601);
    let events = events_of(&mut h);
    assert!(
        matches!(events.last(), Some(Output::AllocationEnded { .. })),
        "{events:?}"
    );
}

fn stream_harness() -> Harness {
    let mut h = Harness::new();
    h.key.listener = ListenerId(1);
    h.input(Input::StreamOpened { key: h.key });
    h
}

fn closed(h: &Harness) -> Option<CloseReason> {
    h.commands.iter().find_map(|c| match c {
        Output::CloseClient { key, reason } if *key == h.key => Some(*reason),
        _ => None,
    })
}

#[test]
fn a_connection_without_an_allocation_must_complete_a_message_every_idle_timeout() {
    let mut h = stream_harness();
    h.advance(29);
    assert_eq!(closed(&h), None);
    // A complete message (a Binding) restarts the clock.
    let binding = build(turnstile::proto::stun::Class::Request, Method::BINDING, h.tid(), |_| {});
    h.exchange(&binding);
    let key = h.key;
    h.input(Input::StreamProgress {
        key,
        completed: true,
        partial: false,
    });
    h.advance(29);
    assert_eq!(closed(&h), None);
    h.advance(2);
    assert_eq!(closed(&h), Some(CloseReason::Idle));
}

#[test]
fn with_an_allocation_only_an_unfinished_message_has_a_deadline() {
    let mut h = stream_harness();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let key = h.key;
    h.input(Input::StreamProgress {
        key,
        completed: true,
        partial: false,
    });
    h.advance(300);
    assert_eq!(closed(&h), None, "an allocated connection may be quiet");
    // Bytes of a message arrive and the rest never does (slowloris).
    h.input(Input::StreamProgress {
        key,
        completed: false,
        partial: true,
    });
    h.advance(20);
    h.input(Input::StreamProgress {
        key,
        completed: false,
        partial: true,
    });
    h.advance(11);
    assert_eq!(
        closed(&h),
        Some(CloseReason::SlowMessage),
        "trickling bytes do not restart it"
    );
}

#[test]
fn after_refresh_zero_the_idle_rule_applies_again() {
    let mut h = stream_harness();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    h.advance(100);
    let c = h.creds("alice", "secret");
    let req = h.signed(Method::REFRESH, &c, |w| w.lifetime(0).unwrap());
    assert_eq!(code(&h.exchange(&req)), 0);
    let key = h.key;
    h.input(Input::StreamProgress {
        key,
        completed: true,
        partial: false,
    });
    h.advance(31);
    assert_eq!(closed(&h), Some(CloseReason::Idle));
}

#[test]
fn a_closed_connection_has_no_deadline_left() {
    let mut h = stream_harness();
    let key = h.key;
    h.input(Input::ClientClosed { key });
    h.advance(60);
    assert_eq!(closed(&h), None);
    assert_eq!(h.server.pending_timers(), 0, "its entry was dropped when due");
}

#[test]
fn a_reload_that_refuses_a_peer_withdraws_its_permission_and_channel() {
    use std::sync::Arc;
    use turnstile::proto::server::{
        ClientOutcome, DropReason, OwnRelays, PeerPolicy, Rate, Realm, Realms, Reconfiguration,
    };

    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let refused = sa("8.8.4.4:5000");
    let kept = sa("9.9.9.9:6000");
    assert_eq!(code(&h.bind_channel(&c, 0x4001, refused)), 0);
    assert_eq!(code(&h.bind_channel(&c, 0x4002, kept)), 0);
    events_of(&mut h);

    let deny = PeerPolicy::new(vec![], vec!["8.8.4.4/32".parse().unwrap()], OwnRelays::default());
    h.server.reconfigure(Reconfiguration {
        realms: Arc::new(Realms::single(Realm {
            credentials: Arc::new(credentials()),
            policy: deny,
            allocation_bandwidth: Rate::OFF,
        })),
        revoke: false,
        limits: allocation_limits(),
        rates: [Rate::OFF; 2],
    });
    h.drain();
    let key = h.key;
    let events = events_of(&mut h);
    assert!(
        events.contains(&Output::PermissionExpired {
            key,
            peer: refused.ip()
        }),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Output::ChannelExpired { channel: 0x4001, .. })),
        "{events:?}"
    );
    assert_eq!(events.len(), 2, "the allowed peer keeps its channel: {events:?}");

    let mut cd = turnstile::proto::channel_data::header(0x4001, 4).to_vec();
    cd.extend_from_slice(b"data");
    assert_eq!(h.send(&cd), ClientOutcome::Drop(DropReason::UnboundChannel));
    let mut cd = turnstile::proto::channel_data::header(0x4002, 4).to_vec();
    cd.extend_from_slice(b"data");
    assert!(matches!(h.send(&cd), ClientOutcome::Forward { .. }));
}
