//! The running relay allocates nothing per packet: the server is started in
//! this process (UDP listener, one worker), warmed up, and then ChannelData
//! round trips go client → relay → peer → relay → client in bursts (so the
//! batched receive and the GSO send path are both taken) while a global
//! allocator counts every allocation on every thread.

mod common;
mod counting_alloc;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::raw::RawClient;
use counting_alloc::{COUNT, COUNTING};
use turnstile::proto::stun::{Class, Message, Method};

const CONFIG: &str = r#"
realm = "test.local"
workers = 1

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "61700-61799"

[auth]
users = { alice = "secret" }

[peers]
allow = ["127.0.0.0/8"]

[log]
level = "error"
"#;

const BURST: usize = 16;
const PAYLOAD: usize = 160;

/// `bursts` bursts of ChannelData through the relay and back; returns the
/// datagrams that came back. Touches no heap: stack buffers, std sockets.
fn round_trips(client: &UdpSocket, server: SocketAddr, peer: &UdpSocket, bursts: usize) -> usize {
    let mut out = [0u8; 4 + PAYLOAD];
    out[..2].copy_from_slice(&0x4000u16.to_be_bytes());
    out[2..4].copy_from_slice(&(PAYLOAD as u16).to_be_bytes());
    let mut buf = [0u8; 2048];
    let mut back = 0;
    for b in 0..bursts {
        for i in 0..BURST {
            out[4..12].copy_from_slice(&((b * BURST + i) as u64).to_be_bytes());
            client.send_to(&out, server).unwrap();
        }
        for _ in 0..BURST {
            let Ok((n, relay)) = peer.recv_from(&mut buf) else {
                break;
            };
            assert_eq!(n, PAYLOAD);
            peer.send_to(&buf[..n], relay).unwrap();
        }
        for _ in 0..BURST {
            let Ok((n, _)) = client.recv_from(&mut buf) else { break };
            assert_eq!(n, 4 + PAYLOAD);
            assert_eq!(buf[..2], 0x4000u16.to_be_bytes());
            back += 1;
        }
    }
    back
}

#[test]
fn relaying_allocates_nothing_in_the_running_server() {
    let config = turnstile::config::Config::from_toml(CONFIG, "test").unwrap();
    let started = turnstile::io::start(&config, &[]).unwrap();
    let server = started.udp[0];

    let mut c = RawClient::connect(server);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let resp = c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
    let resp = c.request(Method::CHANNEL_BIND, true, |w| {
        w.channel_number(0x4000).unwrap();
        w.xor_peer_address(&peer_addr).unwrap();
    });
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
    c.socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    // Warm-up: every buffer, table and queue reaches its working size.
    assert_eq!(round_trips(&c.socket, server, &peer, 200), 200 * BURST);

    COUNT.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let back = round_trips(&c.socket, server, &peer, 1000);
    COUNTING.store(false, Ordering::SeqCst);
    let allocations = COUNT.load(Ordering::SeqCst);

    assert_eq!(back, 1000 * BURST, "every datagram came back");
    assert_eq!(
        allocations,
        0,
        "{allocations} allocations while relaying {} datagrams",
        2 * back
    );
}
