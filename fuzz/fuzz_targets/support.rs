//! What the fuzz targets share: a server core to feed client packets to.

use std::sync::Arc;

use turnstile::proto::server::{ClientKey, Credentials, ListenerId, Now, PeerPolicy, Quotas, Server, ServerConfig};

/// Hands `packet` to a fresh server core as a client datagram; the answer,
/// if any, is discarded (the point is that nothing panics).
pub fn feed_server(packet: &[u8]) {
    let Ok(creds) = Credentials::new("realm", [("user", "pass")], &["secret".to_owned()], &[1; 32], 600) else {
        return;
    };
    let mut server = Server::new(
        ServerConfig::default(),
        Arc::new(creds),
        PeerPolicy::default(),
        Arc::new(Quotas::new(10, 0)),
    );
    let now = Now {
        instant: std::time::Instant::now(),
        unix: 1_700_000_000,
    };
    let key = ClientKey {
        listener: ListenerId(0),
        client: std::net::SocketAddr::from(([192, 0, 2, 1], 4000)),
    };
    let mut out = [0u8; 1500];
    std::hint::black_box(server.handle_client_packet(now, key, packet, &mut out));
}
