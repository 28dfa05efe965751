//! First-byte demultiplexing of packets arriving on a TURN port (RFC 7983 §7,
//! with ChannelData numbers narrowed to RFC 8656's 0x4000–0x4FFF).

/// What the first byte says a packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// 0–3: a STUN message.
    Stun,
    /// 64–79: a ChannelData message.
    ChannelData,
    /// Anything else (DTLS, RTP, ZRTP, QUIC, garbage): dropped by a TURN server.
    Other,
}

/// Classifies a packet by its first byte; an empty packet is `Other`.
#[inline]
pub fn classify(packet: &[u8]) -> PacketKind {
    match packet.first() {
        Some(0..=3) => PacketKind::Stun,
        Some(64..=79) => PacketKind::ChannelData,
        _ => PacketKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_first_byte() {
        assert_eq!(classify(&[]), PacketKind::Other);
        for b in 0..=255u8 {
            let want = match b {
                0..=3 => PacketKind::Stun,
                64..=79 => PacketKind::ChannelData,
                _ => PacketKind::Other,
            };
            assert_eq!(classify(&[b]), want, "{b}");
        }
    }
}
