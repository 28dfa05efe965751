//! ChannelData parsing and the server core's handling of ChannelData-shaped
//! datagrams: the data slice always lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnstile::proto::channel_data::{ChannelData, HEADER_LEN, is_valid_channel};
use turnstile::proto::server::{Server, ServerConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(cd) = ChannelData::parse(data) {
        assert!(is_valid_channel(cd.channel));
        assert!(HEADER_LEN + cd.data.len() <= data.len());
        assert_eq!(cd.data.as_ptr(), data[HEADER_LEN..].as_ptr());
    }
    let mut out = [0u8; 1500];
    let client = std::net::SocketAddr::from(([192, 0, 2, 1], 4000));
    std::hint::black_box(Server::new(ServerConfig::default()).handle_client_packet(client, data, &mut out));
});
