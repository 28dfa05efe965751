//! ChannelData messages (RFC 8656 §12.4): a 4-byte header (channel number,
//! length) in front of application data.

use crate::proto::wire::{padded, u16_at};

/// Size of the ChannelData header.
pub const HEADER_LEN: usize = 4;
/// Lowest valid channel number.
pub const MIN_CHANNEL: u16 = 0x4000;
/// Highest valid channel number (0x5000–0x7FFF are reserved, RFC 8656 §12).
pub const MAX_CHANNEL: u16 = 0x4FFF;

/// Highest channel number of RFC 5766, which RFC 8656 narrowed. Many
/// deployed clients (pjnath, re, coturn's tools) still pick numbers up to here.
pub const MAX_LEGACY_CHANNEL: u16 = 0x7FFF;

/// Whether `n` is a channel number a client may bind (RFC 8656).
pub const fn is_valid_channel(n: u16) -> bool {
    n >= MIN_CHANNEL && n <= MAX_CHANNEL
}

/// Which channel numbers a server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelRange {
    /// 0x4000–0x4FFF (RFC 8656).
    #[default]
    Rfc8656,
    /// 0x4000–0x7FFF (RFC 5766), for legacy clients.
    Rfc5766,
}

impl ChannelRange {
    pub const fn contains(self, n: u16) -> bool {
        match self {
            ChannelRange::Rfc8656 => is_valid_channel(n),
            ChannelRange::Rfc5766 => n >= MIN_CHANNEL && n <= MAX_LEGACY_CHANNEL,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelDataError {
    /// Fewer than 4 bytes.
    TooShort,
    /// Channel number outside 0x4000–0x4FFF.
    InvalidChannel,
    /// The length field claims more data than the buffer holds.
    Truncated,
}

impl ChannelDataError {
    pub const fn label(self) -> &'static str {
        match self {
            ChannelDataError::TooShort => "channel_data_too_short",
            ChannelDataError::InvalidChannel => "channel_data_invalid_channel",
            ChannelDataError::Truncated => "channel_data_truncated",
        }
    }
}

/// A borrowed ChannelData message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    pub channel: u16,
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData message at the start of `buf`. Bytes after the
    /// data (UDP padding) are ignored, as RFC 8656 §12.5 allows.
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Result<ChannelData<'a>, ChannelDataError> {
        Self::parse_in(buf, ChannelRange::Rfc8656)
    }

    /// Parses with an explicit accepted channel range.
    #[inline]
    pub fn parse_in(buf: &'a [u8], range: ChannelRange) -> Result<ChannelData<'a>, ChannelDataError> {
        let channel = u16_at(buf, 0).ok_or(ChannelDataError::TooShort)?;
        let len = u16_at(buf, 2).ok_or(ChannelDataError::TooShort)? as usize;
        if !range.contains(channel) {
            return Err(ChannelDataError::InvalidChannel);
        }
        let data = buf
            .get(HEADER_LEN..HEADER_LEN + len)
            .ok_or(ChannelDataError::Truncated)?;
        Ok(ChannelData { channel, data })
    }

    /// Bytes this message occupies on a stream transport, where it is padded
    /// to a multiple of four (RFC 8656 §12.5).
    pub fn stream_len(&self) -> usize {
        HEADER_LEN + padded(self.data.len())
    }
}

/// Writes a ChannelData header for `len` bytes of data.
#[inline]
pub fn header(channel: u16, len: u16) -> [u8; HEADER_LEN] {
    let c = channel.to_be_bytes();
    let l = len.to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_limits() {
        let mut m = header(0x4001, 3).to_vec();
        m.extend_from_slice(b"abc\0");
        let cd = ChannelData::parse(&m).unwrap();
        assert_eq!(
            cd,
            ChannelData {
                channel: 0x4001,
                data: b"abc"
            }
        );
        assert_eq!(cd.stream_len(), 8);
        assert_eq!(ChannelData::parse(&m[..6]), Err(ChannelDataError::Truncated));
        assert_eq!(ChannelData::parse(&m[..3]), Err(ChannelDataError::TooShort));
        assert_eq!(
            ChannelData::parse(&header(0x5000, 0)),
            Err(ChannelDataError::InvalidChannel)
        );
        assert_eq!(
            ChannelData::parse(&header(0x3FFF, 0)),
            Err(ChannelDataError::InvalidChannel)
        );
        assert!(ChannelData::parse(&header(0x4FFF, 0)).is_ok());
        assert!(!is_valid_channel(0x7FFF));
        assert!(ChannelData::parse_in(&header(0x7FFF, 0), ChannelRange::Rfc5766).is_ok());
        assert!(ChannelData::parse_in(&header(0x8000, 0), ChannelRange::Rfc5766).is_err());
    }
}
