//! Shared by the benches: a server core with one allocation, a channel and
//! a permission, set up through real authenticated requests by the core's
//! test harness (`turnstile::testing`).
#![allow(dead_code)]

use std::net::SocketAddr;

use turnstile::proto::auth::LongTermKey;
use turnstile::proto::server::{ClientKey, Now, OwnRelays, PeerPolicy, Quotas, Server, ServerConfig};
use turnstile::proto::stun::{Class, MessageWriter, Method, TransactionId};
use turnstile::testing::{Harness, code};

pub struct Setup {
    pub server: Server,
    pub now: Now,
    pub key: ClientKey,
    pub nonce: String,
}

pub fn request(
    method: Method,
    tid: u8,
    nonce: &str,
    key: &LongTermKey,
    f: impl FnOnce(&mut MessageWriter<'_>),
) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(&mut buf, Class::Request, method, TransactionId([tid; 12])).unwrap();
    f(&mut w);
    if !nonce.is_empty() {
        w.username("alice").unwrap();
        w.realm("bench").unwrap();
        w.nonce(nonce).unwrap();
        w.message_integrity(key.hmac_sha1()).unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// A server with one allocation, a channel 0x4001 to `channel_peer` and a
/// permission for `plain_peer`, made by the core's test harness.
pub fn setup(channel_peer: SocketAddr, plain_peer: SocketAddr) -> Setup {
    let policy = PeerPolicy::new(vec!["0.0.0.0/0".parse().unwrap()], vec![], OwnRelays::default());
    let mut h = Harness::with(ServerConfig::default(), policy, Quotas::new(0, 0));
    let c = h.creds("alice", "secret");
    h.allocate(&c);
    assert_eq!(code(&h.bind_channel(&c, 0x4001, channel_peer)), 0);
    assert_eq!(code(&h.permit(&c, plain_peer)), 0);
    Setup {
        server: h.server,
        now: h.now,
        key: h.key,
        nonce: c.nonce,
    }
}
