//! Shared by the benches: a server core with one allocation, a channel and
//! a permission, set up through real authenticated requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::server::{
    BindResult, ClientKey, ClientOutcome, Credentials, ListenerId, ListenerKind, Now, OwnRelays, PeerPolicy, Quotas,
    Server, ServerConfig,
};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

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
/// permission for `plain_peer`.
pub fn setup(channel_peer: SocketAddr, plain_peer: SocketAddr) -> Setup {
    let creds = Credentials::new("bench", [("alice", "secret")], &[], &[3; 32], 600).unwrap();
    let policy = PeerPolicy::new(vec!["0.0.0.0/0".parse().unwrap()], vec![], OwnRelays::default());
    let mut server = Server::new(
        ServerConfig::default(),
        Arc::new(creds),
        policy,
        Arc::new(Quotas::new(0, 0)),
    );
    server.add_listener(ListenerKind::Udp);
    let now = Now {
        instant: Instant::now(),
        unix: 1_700_000_000,
    };
    let key = ClientKey {
        listener: ListenerId(0),
        client: "192.0.2.1:5000".parse().unwrap(),
    };
    let lt = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", "bench", "secret");
    let mut out = vec![0u8; 1500];
    let challenge = request(Method::ALLOCATE, 1, "", &lt, |w| w.requested_transport(17).unwrap());
    let ClientOutcome::Reply { len } = server.handle_client_packet(now, key, &challenge, &mut out) else {
        panic!()
    };
    let nonce = Message::parse(&out[..len])
        .unwrap()
        .nonce()
        .unwrap()
        .unwrap()
        .to_owned();
    let alloc = request(Method::ALLOCATE, 2, &nonce, &lt, |w| w.requested_transport(17).unwrap());
    let ClientOutcome::Consumed = server.handle_client_packet(now, key, &alloc, &mut out) else {
        panic!()
    };
    let outputs = turnstile::proto::server::testing::settle(&mut server, now, |_, _, _| BindResult::Bound);
    assert!(
        outputs
            .iter()
            .any(|o| matches!(o, turnstile::proto::server::Output::Transmit { .. }))
    );
    let bind = request(Method::CHANNEL_BIND, 3, &nonce, &lt, |w| {
        w.channel_number(0x4001).unwrap();
        w.xor_peer_address(&channel_peer).unwrap();
    });
    server.handle_client_packet(now, key, &bind, &mut out);
    let perm = request(Method::CREATE_PERMISSION, 4, &nonce, &lt, |w| {
        w.xor_peer_address(&plain_peer).unwrap()
    });
    server.handle_client_packet(now, key, &perm, &mut out);
    Setup {
        server,
        now,
        key,
        nonce,
    }
}
