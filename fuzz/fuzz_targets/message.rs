//! STUN message parsing, every typed getter, and MESSAGE-INTEGRITY,
//! MESSAGE-INTEGRITY-SHA256 and FINGERPRINT verification on arbitrary bytes;
//! then the server core's answer to them.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "support.rs"]
mod support;

use turnstile::proto::stun::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::parse(data) {
        for a in m.attributes() {
            std::hint::black_box(a.ok());
        }
        std::hint::black_box((m.username().ok(), m.realm().ok(), m.nonce().ok(), m.software().ok()));
        std::hint::black_box((m.data().ok(), m.error_code().ok(), m.userhash().ok(), m.lifetime().ok()));
        std::hint::black_box(m.xor_peer_addresses().count());
        std::hint::black_box(m.verify_integrity(b"fuzz-key").is_ok());
        std::hint::black_box(m.verify_integrity_sha256(b"fuzz-key").is_ok());
        std::hint::black_box(m.verify_fingerprint().is_ok());
        // What the parser accepted must re-parse from its own bytes.
        assert!(Message::parse(m.as_bytes()).is_ok());
    }
    support::feed_server(data);
});
