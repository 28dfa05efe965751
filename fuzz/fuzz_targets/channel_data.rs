//! ChannelData parsing and the server core's handling of ChannelData-shaped
//! datagrams: the data slice always lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "support.rs"]
mod support;

use turnstile::proto::channel_data::{ChannelData, HEADER_LEN, is_valid_channel};

fuzz_target!(|data: &[u8]| {
    if let Ok(cd) = ChannelData::parse(data) {
        assert!(is_valid_channel(cd.channel));
        assert!(HEADER_LEN + cd.data.len() <= data.len());
        assert_eq!(cd.data.as_ptr(), data[HEADER_LEN..].as_ptr());
    }
    support::feed_server(data);
});
