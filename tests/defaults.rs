//! The configuration as shipped, tried as real apps and operators use it:
//! each test here failed on the defaults or edges that came before it.

mod common;

use common::TestServer;
use common::raw::RawClient;
use turnstile::proto::stun::{Class, Message, Method};

/// A configuration with users and a REST secret and nothing else set.
fn plain(extra: &str) -> String {
    format!(
        r#"realm = "test.local"
workers = 1

[[listen]]
transport = "udp"
address = "127.0.0.1:0"

[relay]
address = "127.0.0.1"
ports = "62300-62399"

[auth]
users = {{ alice = "secret" }}
secrets = ["defaults-rest-secret"]

[metrics]
listen = "127.0.0.1:0"

{extra}
"#
    )
}

fn code(answer: &[u8]) -> u16 {
    let m = Message::parse(answer).unwrap();
    match m.class() {
        Class::Success => 0,
        _ => m.error_code().unwrap().map(|e| e.code).unwrap_or(1),
    }
}

fn bind_channel(c: &mut RawClient, number: u16) -> u16 {
    // One peer per channel number (a peer has one channel at a time).
    let peer = std::net::SocketAddr::from(([8, 8, 8, 8], number));
    code(&c.request(Method::CHANNEL_BIND, true, |w| {
        w.channel_number(number).unwrap();
        w.xor_peer_address(&peer).unwrap();
    }))
}

/// RFC 5766-era clients pick channel numbers up to 0x7FFF: accepted by
/// default, refused only when the operator asks for RFC 8656's range.
#[test]
fn channel_numbers_up_to_0x7fff_are_accepted_by_default() {
    let server = TestServer::start(&plain(""));
    let mut c = RawClient::connect(server.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    assert_eq!(bind_channel(&mut c, 0x4000), 0);
    assert_eq!(bind_channel(&mut c, 0x7FFF), 0, "0x7FFF on the default configuration");
    assert_eq!(bind_channel(&mut c, 0x8000), 400);
    // ChannelData on 0x7FFF is relayed, not taken for something else.
    let data = [0x7f, 0xff, 0x00, 0x04, 1, 2, 3, 4];
    c.socket.send_to(&data, server.udp[0]).unwrap();
    assert!(server.wait_counter("turnstile_relayed_packets_total{direction=\"client_to_peer\"}", 1.0));

    let strict = TestServer::start(&plain("[compat]\nlegacy_channel_numbers = false"));
    let mut c = RawClient::connect(strict.udp[0]);
    assert_eq!(
        code(&c.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())),
        0
    );
    assert_eq!(bind_channel(&mut c, 0x4FFF), 0);
    assert_eq!(bind_channel(&mut c, 0x5000), 400, "RFC 8656 only, when asked");
}
