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
    classify_in(packet, ChannelRange::Rfc8656)
}

/// Classifies with an explicit channel range: RFC 5766's range extends
/// ChannelData to first bytes 64–127.
#[inline]
pub fn classify_in(packet: &[u8], range: ChannelRange) -> PacketKind {
    match (packet.first(), range) {
        (Some(0..=3), _) => PacketKind::Stun,
        (Some(64..=79), _) => PacketKind::ChannelData,
        (Some(80..=127), ChannelRange::Rfc5766) => PacketKind::ChannelData,
        _ => PacketKind::Other,
    }
}

use crate::proto::channel_data::ChannelRange;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_range_extends_channel_data() {
        assert_eq!(classify_in(&[0x7f], ChannelRange::Rfc5766), PacketKind::ChannelData);
        assert_eq!(classify_in(&[0x7f], ChannelRange::Rfc8656), PacketKind::Other);
        assert_eq!(classify_in(&[0x80], ChannelRange::Rfc5766), PacketKind::Other);
    }

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
