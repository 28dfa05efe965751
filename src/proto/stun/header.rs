//! The 20-byte STUN header (RFC 8489 §5): message type (class + method),
//! length, magic cookie and transaction id.

use crate::proto::wire::{array_at, u16_at, u32_at};

/// Fixed value in bytes 4..8 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;

/// The message class, carried in bits C1 and C0 of the message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    const fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    const fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// A 12-bit STUN method. Unknown methods are representable so a server can
/// answer them with 400 instead of failing to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(u16);

impl Method {
    pub const BINDING: Method = Method(0x001);
    pub const ALLOCATE: Method = Method(0x003);
    pub const REFRESH: Method = Method(0x004);
    pub const SEND: Method = Method(0x006);
    pub const DATA: Method = Method(0x007);
    pub const CREATE_PERMISSION: Method = Method(0x008);
    pub const CHANNEL_BIND: Method = Method(0x009);
    /// RFC 6062.
    pub const CONNECT: Method = Method(0x00A);
    /// RFC 6062.
    pub const CONNECTION_BIND: Method = Method(0x00B);
    /// RFC 6062.
    pub const CONNECTION_ATTEMPT: Method = Method(0x00C);

    /// Builds a method from its 12-bit number; higher bits are discarded.
    pub const fn new(number: u16) -> Method {
        Method(number & 0x0FFF)
    }

    pub const fn number(self) -> u16 {
        self.0
    }

    /// Name for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0x001 => "binding",
            0x003 => "allocate",
            0x004 => "refresh",
            0x006 => "send",
            0x007 => "data",
            0x008 => "create_permission",
            0x009 => "channel_bind",
            0x00A => "connect",
            0x00B => "connection_bind",
            0x00C => "connection_attempt",
            _ => "unknown",
        }
    }
}

/// Packs class and method into the 14-bit message type (RFC 8489 §5, figure 3).
pub const fn message_type(class: Class, method: Method) -> u16 {
    let m = method.0;
    let c = class.bits();
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 0b01) << 4) | ((c & 0b10) << 7)
}

/// Splits a message type into class and method.
pub const fn split_message_type(t: u16) -> (Class, Method) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = ((t >> 4) & 0b01) | ((t >> 7) & 0b10);
    (Class::from_bits(class), Method(method))
}

/// The 96-bit transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    pub const fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

/// What a header check found wrong. Each is a silent drop for a server: a
/// packet that is not a well-formed STUN message gets no STUN answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than 20 bytes.
    TooShort,
    /// One of the two most significant bits is set.
    NotStun,
    /// Bytes 4..8 are not 0x2112A442 (an RFC 3489 or non-STUN packet).
    BadMagicCookie,
    /// The length field is not a multiple of 4.
    UnalignedLength,
    /// The length field points past the end of the buffer.
    Truncated,
}

/// The decoded header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub class: Class,
    pub method: Method,
    /// Length of the attribute section in bytes.
    pub length: u16,
    pub transaction_id: TransactionId,
}

impl Header {
    /// Validates the header at the start of `buf`. `buf` must hold at least the
    /// whole message (header + `length`); trailing bytes are the caller's to judge.
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        let t = u16_at(buf, 0).ok_or(HeaderError::TooShort)?;
        let length = u16_at(buf, 2).ok_or(HeaderError::TooShort)?;
        let cookie = u32_at(buf, 4).ok_or(HeaderError::TooShort)?;
        let tid = array_at::<12>(buf, 8).ok_or(HeaderError::TooShort)?;
        if t & 0xC000 != 0 {
            return Err(HeaderError::NotStun);
        }
        if cookie != MAGIC_COOKIE {
            return Err(HeaderError::BadMagicCookie);
        }
        if length % 4 != 0 {
            return Err(HeaderError::UnalignedLength);
        }
        if buf.len() < HEADER_LEN + length as usize {
            return Err(HeaderError::Truncated);
        }
        let (class, method) = split_message_type(t);
        Ok(Header {
            class,
            method,
            length,
            transaction_id: TransactionId(*tid),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_round_trips_every_class_and_method() {
        for m in 0..0x1000u16 {
            for c in [Class::Request, Class::Indication, Class::Success, Class::Error] {
                let t = message_type(c, Method::new(m));
                assert_eq!(t & 0xC000, 0);
                assert_eq!(split_message_type(t), (c, Method::new(m)));
            }
        }
    }

    #[test]
    fn known_message_types() {
        assert_eq!(message_type(Class::Request, Method::BINDING), 0x0001);
        assert_eq!(message_type(Class::Success, Method::BINDING), 0x0101);
        assert_eq!(message_type(Class::Error, Method::BINDING), 0x0111);
        assert_eq!(message_type(Class::Request, Method::ALLOCATE), 0x0003);
        assert_eq!(message_type(Class::Error, Method::ALLOCATE), 0x0113);
        assert_eq!(message_type(Class::Indication, Method::SEND), 0x0016);
        assert_eq!(message_type(Class::Indication, Method::DATA), 0x0017);
        assert_eq!(message_type(Class::Request, Method::CHANNEL_BIND), 0x0009);
        assert_eq!(message_type(Class::Indication, Method::CONNECTION_ATTEMPT), 0x001C);
    }

    #[test]
    fn header_rejections() {
        let mut b = [0u8; 24];
        b[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
        b[2..4].copy_from_slice(&4u16.to_be_bytes());
        b[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert!(Header::parse(&b).is_ok());
        assert_eq!(Header::parse(&b[..19]), Err(HeaderError::TooShort));
        assert_eq!(Header::parse(&b[..22]), Err(HeaderError::Truncated));
        let mut c = b;
        c[0] = 0x40;
        assert_eq!(Header::parse(&c), Err(HeaderError::NotStun));
        let mut c = b;
        c[4] = 0;
        assert_eq!(Header::parse(&c), Err(HeaderError::BadMagicCookie));
        let mut c = b;
        c[3] = 2;
        assert_eq!(Header::parse(&c), Err(HeaderError::UnalignedLength));
    }
}
