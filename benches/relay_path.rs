//! The per-packet work of the server core on the relay path: ChannelData
//! from a client to its peer, and a peer datagram to the client (ChannelData
//! header or Data indication written in place). Run:
//! `cargo bench --bench relay_path`.

mod support;

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use turnstile::proto::channel_data;
use turnstile::proto::server::{ClientOutcome, PEER_HEADROOM, PEER_TAILROOM, PeerOutcome, RelayId};

use support::{Setup, setup};

fn bench(c: &mut Criterion) {
    let channel_peer: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let plain_peer: SocketAddr = "198.51.100.8:40000".parse().unwrap();
    let Setup {
        mut server, now, key, ..
    } = setup(channel_peer, plain_peer);
    let mut out = vec![0u8; 1500];

    let mut cd = channel_data::header(0x4001, 160).to_vec();
    cd.resize(164, 0x55);
    assert!(matches!(
        server.handle_client_packet(now, key, &cd, &mut out),
        ClientOutcome::Forward { .. }
    ));
    c.bench_function("core/client_channel_data_to_peer", |b| {
        b.iter(|| black_box(server.handle_client_packet(now, key, black_box(&cd), &mut out)))
    });

    let mut buf = vec![0u8; PEER_HEADROOM + 1500 + PEER_TAILROOM];
    assert!(matches!(
        server.handle_peer_packet(now.instant, RelayId(0), channel_peer, &mut buf, PEER_HEADROOM, 160),
        PeerOutcome::ToClient { .. }
    ));
    c.bench_function("core/peer_to_client_channel_data", |b| {
        b.iter(|| {
            black_box(server.handle_peer_packet(now.instant, RelayId(0), channel_peer, &mut buf, PEER_HEADROOM, 160))
        })
    });
    c.bench_function("core/peer_to_client_data_indication", |b| {
        b.iter(|| {
            black_box(server.handle_peer_packet(now.instant, RelayId(0), plain_peer, &mut buf, PEER_HEADROOM, 160))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
