//! RFC 8016 mobility against the real binary (two workers): a client
//! allocates with a ticket and then moves, socket after socket (new
//! 5-tuples the kernel spreads over both workers); each move keeps the
//! relayed address, the peer's data reaches the newest socket and the
//! client's reaches the peer. coturn's `turnutils_uclient -M` relays with
//! no loss.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::raw::{RawClient, code};
use common::uclient::EchoPeer;
use common::{TestServer, loopback_config};
use turnstile::proto::stun::{Class, Message, Method, kind};

fn config() -> String {
    loopback_config(
        r#"
[relay]
address = "127.0.0.1"
ports = "62400-62599"

[auth]
users = { alice = "secret" }
mobility = true

[peers]
allow = ["127.0.0.0/8"]
"#,
    )
}

#[test]
fn an_allocation_follows_its_client_across_new_addresses_and_workers() {
    let server = TestServer::start(&config());
    let target = server.udp[0];
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();

    let mut client = RawClient::connect(target);
    let resp = client.request(Method::ALLOCATE, true, |w| {
        w.requested_transport(17).unwrap();
        w.mobility_ticket(&[]).unwrap();
    });
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success, "{:?}", m.error_code());
    let relayed: SocketAddr = m.xor_relayed_address().unwrap().unwrap();
    let mut ticket = m.find(kind::MOBILITY_TICKET).expect("a ticket").to_vec();
    let r = client.request(Method::CREATE_PERMISSION, true, |w| {
        w.xor_peer_address(&peer_addr).unwrap()
    });
    assert_eq!(code(&r), 0);

    // Eight moves: each a new socket, so a new 5-tuple the kernel hashes to
    // either worker (all on one worker: 1 in 128).
    for hop in 0..8u8 {
        let mut moved = RawClient::connect(target);
        let resp = moved.request(Method::REFRESH, true, |w| {
            w.lifetime(600).unwrap();
            w.mobility_ticket(&ticket).unwrap();
        });
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.class(), Class::Success, "hop {hop}: {:?}", m.error_code());
        ticket = m.find(kind::MOBILITY_TICKET).expect("a fresh ticket").to_vec();
        // The peer sends to the same relayed address; the newest socket gets it.
        peer.send_to(&[hop, 1, 2, 3], relayed).unwrap();
        let data = moved.try_recv().expect("the peer's data at the new socket");
        let m = Message::parse(&data).unwrap();
        assert_eq!(m.method(), Method::DATA, "hop {hop}");
        assert_eq!(m.data().unwrap(), Some(&[hop, 1, 2, 3][..]));
        // And the client's data reaches the peer from the same relayed address.
        moved.indication(Method::SEND, |w| {
            w.xor_peer_address(&peer_addr).unwrap();
            w.data(&[9, hop]).unwrap();
        });
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((from, &buf[..n]), (relayed, &[9, hop][..]), "hop {hop}");
        client = moved;
    }
    drop(client);
    assert!(server.wait_counter("turnstile_allocations_moved_total", 8.0));
    assert!(server.wait_counter("turnstile_allocations_created_total", 1.0));
}

#[test]
fn turnutils_uclient_with_mobility_relays_without_loss() {
    let server = TestServer::start(&config());
    let peer = EchoPeer::start();
    let r = common::uclient::run_args(&common::uclient::as_alice(
        server.udp[0].port(),
        peer.port,
        &["-M", "-n", "200", "-m", "4", "-l", "120"],
    ));
    assert!(r.sent >= 800, "{}", r.output);
    assert_eq!(r.lost, Some(0), "{}", r.output);
}
