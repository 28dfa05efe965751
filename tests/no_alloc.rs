//! The relay hot path allocates nothing: ChannelData and Send from clients,
//! ChannelData and Data indications to clients, counted with a global
//! allocator that tallies allocations made on the test's own thread
//! (`counting_alloc::counted`).

mod counting_alloc;

use counting_alloc::counted;
use turnstile::proto::channel_data;
use turnstile::proto::server::{ClientOutcome, PEER_HEADROOM, PEER_TAILROOM, PeerOutcome, RelayId};
use turnstile::proto::stun::{Class, Method};
use turnstile::testing::*;

#[test]
fn relaying_allocates_nothing() {
    let mut h = Harness::new();
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    let channel_peer = sa("8.8.8.8:5004");
    let send_peer = sa("1.1.1.1:5004");
    assert_eq!(code(&h.bind_channel(&c, 0x4001, channel_peer)), 0);
    assert_eq!(code(&h.permit(&c, send_peer)), 0);

    let mut cdm = channel_data::header(0x4001, 160).to_vec();
    cdm.resize(164, 0x55);
    let tid = h.tid();
    let send = build(Class::Indication, Method::SEND, tid, |w| {
        w.xor_peer_address(&send_peer).unwrap();
        w.data(&[0x66; 160]).unwrap();
    });
    let mut peer_buf = vec![0u8; PEER_HEADROOM + 1500 + PEER_TAILROOM];
    let mut out = vec![0u8; 1500];
    let (now, key) = (h.now, h.key);
    let server = &mut h.server;

    let (forwarded, allocations) = counted(|| {
        let mut forwarded = 0;
        for _ in 0..10_000 {
            if let ClientOutcome::Forward { .. } = server.handle_client_packet(now, key, &cdm, &mut out) {
                forwarded += 1;
            }
            if let ClientOutcome::Forward { .. } = server.handle_client_packet(now, key, &send, &mut out) {
                forwarded += 1;
            }
            for peer in [channel_peer, send_peer] {
                if let PeerOutcome::ToClient { .. } =
                    server.handle_peer_packet(now.instant, RelayId(0), peer, &mut peer_buf, PEER_HEADROOM, 160)
                {
                    forwarded += 1;
                }
            }
        }
        forwarded
    });
    assert_eq!(forwarded, 40_000, "every packet was relayed");
    assert_eq!(allocations, 0, "the relay path must not allocate");

    // The counter works: a control-plane request does allocate.
    let req = h.signed(Method::REFRESH, &c, |_| {});
    let (_, control) = counted(|| h.exchange(&req));
    assert!(control > 0);
}

#[test]
fn the_counter_sees_an_allocation() {
    let (v, n) = counted(|| std::hint::black_box(vec![1u8; 16]));
    assert_eq!((v.len(), n), (16, 1));
}
