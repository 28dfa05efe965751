//! ChannelData parsing and the server core's handling of ChannelData-shaped
//! datagrams: the data slice always lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnstile::proto::channel_data::{ChannelData, HEADER_LEN, is_valid_channel};
use std::sync::Arc;

use turnstile::proto::server::{Credentials, Now, PeerPolicy, Quotas, Server, ServerConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(cd) = ChannelData::parse(data) {
        assert!(is_valid_channel(cd.channel));
        assert!(HEADER_LEN + cd.data.len() <= data.len());
        assert_eq!(cd.data.as_ptr(), data[HEADER_LEN..].as_ptr());
    }
    let mut out = [0u8; 1500];
    let client = std::net::SocketAddr::from(([192, 0, 2, 1], 4000));
    std::hint::black_box(test_server().handle_client_packet(now(), key(client), data, &mut out));
});

fn test_server() -> Server {
    let creds = Credentials::new("realm", [("user", "pass")], &["secret".to_owned()], &[1; 32], 600).unwrap();
    Server::new(ServerConfig::default(), Arc::new(creds), PeerPolicy::default(), Arc::new(Quotas::new(10, 0)))
}

fn key(client: std::net::SocketAddr) -> turnstile::proto::server::ClientKey {
    turnstile::proto::server::ClientKey { listener: turnstile::proto::server::ListenerId(0), client }
}

fn now() -> Now {
    Now { instant: std::time::Instant::now(), unix: 1_700_000_000 }
}
