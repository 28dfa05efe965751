//! STUN message parsing, every typed getter, and MESSAGE-INTEGRITY,
//! MESSAGE-INTEGRITY-SHA256 and FINGERPRINT verification on arbitrary bytes;
//! then the server core's answer to them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

use turnstile::proto::server::{Credentials, Now, PeerPolicy, Quotas, Server, ServerConfig};
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
    let mut out = [0u8; 1500];
    let client = "192.0.2.1:4000".parse().unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
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
