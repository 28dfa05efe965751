//! The TCP/TLS stream framer fed an arbitrary stream in arbitrary chunks:
//! every frame it returns is within the buffer and the size cap, and parses
//! as the kind it claims or is refused cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnstile::proto::channel_data::ChannelData;
use turnstile::proto::framer::{FrameKind, StreamFramer};
use turnstile::proto::stun::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let framer = StreamFramer::new(2048);
    let mut buf: Vec<u8> = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match framer.next_frame(&buf) {
                Ok(Some(f)) => {
                    assert!(f.frame_len <= buf.len() && f.frame_len <= framer.max_frame());
                    assert!(f.message_len <= f.frame_len);
                    let msg = &buf[..f.message_len];
                    match f.kind {
                        FrameKind::Stun => std::hint::black_box(Message::parse(msg).is_ok()),
                        FrameKind::ChannelData => {
                            let cd = ChannelData::parse(msg);
                            assert!(cd.is_ok(), "framed ChannelData must parse");
                            true
                        }
                    };
                    buf.drain(..f.frame_len);
                }
                Ok(None) => {
                    assert!(buf.len() < framer.max_frame() + 4);
                    break;
                }
                Err(_) => return, // the connection would be closed
            }
        }
    }
});
