//! Splits a TCP or TLS byte stream into STUN messages and ChannelData frames
//! (RFC 8656 §12.5: on streams ChannelData is padded to a multiple of 4).
//!
//! Sans-IO: the driver accumulates bytes and asks [`StreamFramer::next_frame`]
//! whether a whole frame is at the front of its buffer.

use crate::proto::channel_data::{self, ChannelRange};
use crate::proto::demux::{PacketKind, classify_in};
use crate::proto::stun::HEADER_LEN;
use crate::proto::stun::header::MAGIC_COOKIE;
use crate::proto::wire::{padded, u16_at, u32_at};

/// Largest frame accepted by default: a STUN message or ChannelData frame
/// carrying a full 64 KiB payload.
pub const DEFAULT_MAX_FRAME: usize = 65_536 + HEADER_LEN;

/// What the front of the stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Stun,
    ChannelData,
}

/// A complete frame at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    /// Bytes of the message itself (ChannelData: header + data, no padding).
    pub message_len: usize,
    /// Bytes to consume from the stream (ChannelData: including padding).
    pub frame_len: usize,
}

/// The stream cannot be framed; the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The first byte is neither STUN nor ChannelData (0x4000–0x4FFF).
    NotTurn,
    /// A STUN header with a bad magic cookie or unaligned length.
    BadStunHeader,
    /// The frame would exceed the configured maximum.
    TooLarge,
}

impl FrameError {
    pub const fn label(self) -> &'static str {
        match self {
            FrameError::NotTurn => "stream_not_turn",
            FrameError::BadStunHeader => "stream_bad_stun_header",
            FrameError::TooLarge => "stream_frame_too_large",
        }
    }
}

/// Frame boundary finder with a size cap.
#[derive(Debug, Clone, Copy)]
pub struct StreamFramer {
    max_frame: usize,
    range: ChannelRange,
}

impl Default for StreamFramer {
    fn default() -> Self {
        StreamFramer {
            max_frame: DEFAULT_MAX_FRAME,
            range: ChannelRange::Rfc8656,
        }
    }
}

impl StreamFramer {
    pub fn new(max_frame: usize) -> StreamFramer {
        StreamFramer {
            max_frame,
            range: ChannelRange::Rfc8656,
        }
    }

    /// Accepts ChannelData in `range` (RFC 5766's wider range for legacy clients).
    pub fn with_channel_range(self, range: ChannelRange) -> StreamFramer {
        StreamFramer { range, ..self }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Looks at the front of `buf`: `Ok(None)` means more bytes are needed,
    /// `Ok(Some(frame))` that `frame.frame_len` bytes form one frame.
    pub fn next_frame(&self, buf: &[u8]) -> Result<Option<Frame>, FrameError> {
        let kind = match classify_in(buf, self.range) {
            _ if buf.is_empty() => return Ok(None),
            PacketKind::Stun => FrameKind::Stun,
            PacketKind::ChannelData => FrameKind::ChannelData,
            PacketKind::Other => return Err(FrameError::NotTurn),
        };
        let (message_len, frame_len) = match kind {
            FrameKind::Stun => {
                // The length is in bytes 2..4; validate the cookie as soon as it
                // is there so garbage is refused before we wait for a body.
                let Some(len) = u16_at(buf, 2) else {
                    return Ok(None);
                };
                if len % 4 != 0 {
                    return Err(FrameError::BadStunHeader);
                }
                if let Some(cookie) = u32_at(buf, 4)
                    && cookie != MAGIC_COOKIE
                {
                    return Err(FrameError::BadStunHeader);
                }
                let n = HEADER_LEN + len as usize;
                (n, n)
            }
            FrameKind::ChannelData => {
                // The first byte already places the number in the accepted range.
                let Some(len) = u16_at(buf, 2) else {
                    return Ok(None);
                };
                let n = channel_data::HEADER_LEN + len as usize;
                (n, channel_data::HEADER_LEN + padded(len as usize))
            }
        };
        if frame_len > self.max_frame {
            return Err(FrameError::TooLarge);
        }
        if buf.len() < frame_len {
            return Ok(None);
        }
        Ok(Some(Frame {
            kind,
            message_len,
            frame_len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(len: u16) -> Vec<u8> {
        let mut m = vec![0, 1];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&[9; 12]);
        m.resize(20 + len as usize, 0);
        m
    }

    #[test]
    fn splits_mixed_stream_byte_by_byte() {
        let mut stream = stun(8);
        stream.extend_from_slice(&channel_data::header(0x4000, 5));
        stream.extend_from_slice(b"hello\0\0\0");
        stream.extend(stun(0));
        let f = StreamFramer::default();
        let mut frames = vec![];
        let mut start = 0;
        for end in 0..=stream.len() {
            if let Some(fr) = f.next_frame(&stream[start..end]).unwrap() {
                frames.push(fr);
                start += fr.frame_len;
            }
        }
        assert_eq!(start, stream.len());
        assert_eq!(
            frames,
            vec![
                Frame {
                    kind: FrameKind::Stun,
                    message_len: 28,
                    frame_len: 28
                },
                Frame {
                    kind: FrameKind::ChannelData,
                    message_len: 9,
                    frame_len: 12
                },
                Frame {
                    kind: FrameKind::Stun,
                    message_len: 20,
                    frame_len: 20
                },
            ]
        );
    }

    #[test]
    fn refuses_garbage_and_oversize() {
        let f = StreamFramer::new(100);
        assert_eq!(f.next_frame(b"POST / HTTP/1.1"), Err(FrameError::NotTurn));
        // 'G' (0x47) falls in the ChannelData range; "T " then reads as a huge length.
        assert_eq!(f.next_frame(b"GET / HTTP/1.1"), Err(FrameError::TooLarge));
        assert_eq!(f.next_frame(&[0x16, 3, 1]), Err(FrameError::NotTurn));
        assert_eq!(f.next_frame(&stun(84)), Err(FrameError::TooLarge));
        assert_eq!(
            f.next_frame(&channel_data::header(0x4000, 97)),
            Err(FrameError::TooLarge)
        );
        assert_eq!(f.next_frame(&channel_data::header(0x5000, 1)), Err(FrameError::NotTurn));
        let mut bad = stun(0);
        bad[4] = 0;
        assert_eq!(f.next_frame(&bad), Err(FrameError::BadStunHeader));
        assert_eq!(f.next_frame(&[0, 1, 0, 3]), Err(FrameError::BadStunHeader));
        assert_eq!(f.next_frame(&[0, 1]), Ok(None));
        assert_eq!(f.next_frame(&[]), Ok(None));
    }
}
