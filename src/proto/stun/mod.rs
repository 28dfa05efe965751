//! The STUN/TURN wire codec (RFC 8489, RFC 8656, RFC 6062, RFC 5780, RFC 8016).
//!
//! Reading is zero-copy: [`Message`] borrows the received buffer. Writing goes
//! into a caller-provided buffer through [`MessageWriter`].

pub mod address;
pub mod attr;
pub mod header;
pub mod integrity;
pub mod message;
pub mod writer;

pub use address::AddressFamily;
pub use attr::{Attribute, AttributeError, AttributeErrorReason, ErrorCode, kind};
pub use header::{Class, HEADER_LEN, Header, HeaderError, MAGIC_COOKIE, Method, TransactionId};
pub use integrity::{HmacSha1, HmacSha256, IntegrityError};
pub use message::{Message, ParseError, RawAttribute};
pub use writer::{BufferTooSmall, MessageWriter};
