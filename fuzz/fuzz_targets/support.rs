//! What the fuzz targets share: a server core to feed client packets to,
//! through the core's test harness.

use turnstile::testing::Harness;

/// Hands `packet` to a fresh server core as a client datagram; the answer,
/// if any, is discarded (the point is that nothing panics).
pub fn feed_server(packet: &[u8]) {
    std::hint::black_box(Harness::new().send(packet));
}
