//! `Message<'a>`: a validated, borrowing view of one STUN message.
//!
//! Parsing walks the attribute TLVs once, bounds-checked, and records where
//! MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT sit. It applies
//! RFC 8489 §14 ordering: attributes after MESSAGE-INTEGRITY are ignored except
//! MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, attributes after
//! MESSAGE-INTEGRITY-SHA256 are ignored except FINGERPRINT, and FINGERPRINT
//! must be last. Nothing is copied and nothing is allocated.

use std::net::SocketAddr;

use super::attr::{Attribute, AttributeError, AttributeErrorReason, ErrorCode, kind};
use super::header::{Class, HEADER_LEN, Header, HeaderError, Method, TransactionId};
use super::integrity::{self, HmacSha1, HmacSha256, IntegrityError};
use crate::proto::wire::{padded, u16_at, u32_at};

/// How many unknown comprehension-required types are remembered for a 420
/// answer; a request with more is still refused, listing the first ones.
pub const MAX_UNKNOWN: usize = 8;

/// Why a buffer is not a well-formed STUN message. A server drops such
/// packets silently (RFC 8489 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Header(HeaderError),
    /// The buffer holds bytes past the end given by the length field.
    TrailingBytes,
    /// An attribute header or value runs past the end of the message.
    AttributeOverrun,
    /// An attribute follows FINGERPRINT.
    AttributeAfterFingerprint,
    /// MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 or FINGERPRINT has the wrong size.
    BadIntegrityAttribute,
}

impl From<HeaderError> for ParseError {
    fn from(e: HeaderError) -> Self {
        ParseError::Header(e)
    }
}

impl ParseError {
    /// Short label for logs and metrics.
    pub const fn label(self) -> &'static str {
        match self {
            ParseError::Header(HeaderError::TooShort) => "too_short",
            ParseError::Header(HeaderError::NotStun) => "not_stun",
            ParseError::Header(HeaderError::BadMagicCookie) => "bad_magic_cookie",
            ParseError::Header(HeaderError::UnalignedLength) => "unaligned_length",
            ParseError::Header(HeaderError::Truncated) => "truncated",
            ParseError::TrailingBytes => "trailing_bytes",
            ParseError::AttributeOverrun => "attribute_overrun",
            ParseError::AttributeAfterFingerprint => "attribute_after_fingerprint",
            ParseError::BadIntegrityAttribute => "bad_integrity_attribute",
        }
    }
}

/// One attribute as it sits on the wire: its type and its unpadded value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    pub kind: u16,
    pub value: &'a [u8],
    /// Offset of the attribute header within the message.
    pub offset: usize,
}

/// A validated view of one STUN message.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    header: Header,
    /// Offset of the first attribute that is ignored (the first integrity
    /// attribute); attributes from here on are only seen if they are one of the
    /// three recorded below.
    ignore_from: usize,
    integrity: Option<usize>,
    integrity_sha256: Option<usize>,
    fingerprint: Option<usize>,
    unknown: [u16; MAX_UNKNOWN],
    unknown_len: u8,
}

impl<'a> Message<'a> {
    /// Validates `buf` as exactly one STUN message.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        let header = Header::parse(buf)?;
        let end = HEADER_LEN + header.length as usize;
        if buf.len() != end {
            return Err(ParseError::TrailingBytes);
        }
        let mut msg = Message {
            buf,
            header,
            ignore_from: end,
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
            unknown: [0; MAX_UNKNOWN],
            unknown_len: 0,
        };
        let mut at = HEADER_LEN;
        while at < end {
            if msg.fingerprint.is_some() {
                return Err(ParseError::AttributeAfterFingerprint);
            }
            let t = u16_at(buf, at).ok_or(ParseError::AttributeOverrun)?;
            let len = u16_at(buf, at + 2).ok_or(ParseError::AttributeOverrun)? as usize;
            let next = at + 4 + padded(len);
            if next > end {
                return Err(ParseError::AttributeOverrun);
            }
            match t {
                kind::FINGERPRINT => {
                    if len != 4 {
                        return Err(ParseError::BadIntegrityAttribute);
                    }
                    msg.fingerprint = Some(at);
                }
                kind::MESSAGE_INTEGRITY_SHA256 if msg.integrity_sha256.is_none() => {
                    if !(16..=32).contains(&len) || !len.is_multiple_of(4) {
                        return Err(ParseError::BadIntegrityAttribute);
                    }
                    msg.integrity_sha256 = Some(at);
                    msg.ignore_from = msg.ignore_from.min(at);
                }
                kind::MESSAGE_INTEGRITY if msg.integrity.is_none() && msg.integrity_sha256.is_none() => {
                    if len != integrity::SHA1_LEN {
                        return Err(ParseError::BadIntegrityAttribute);
                    }
                    msg.integrity = Some(at);
                    msg.ignore_from = at;
                }
                _ if at >= msg.ignore_from => {} // after an integrity attribute: ignored
                _ if kind::is_comprehension_required(t) && !kind::is_known(t) => {
                    if let Some(slot) = msg.unknown.get_mut(msg.unknown_len as usize) {
                        *slot = t;
                        msg.unknown_len += 1;
                    }
                }
                _ => {}
            }
            at = next;
        }
        Ok(msg)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn class(&self) -> Class {
        self.header.class
    }

    pub fn method(&self) -> Method {
        self.header.method
    }

    pub fn transaction_id(&self) -> &TransactionId {
        &self.header.transaction_id
    }

    /// The whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Comprehension-required attribute types this codec does not know
    /// (answer a request carrying any with 420 and UNKNOWN-ATTRIBUTES).
    pub fn unknown_comprehension_required(&self) -> &[u16] {
        self.unknown.get(..self.unknown_len as usize).unwrap_or_default()
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint.is_some()
    }

    /// The attributes that RFC 8489 ordering says to process, in order.
    pub fn raw_attributes(&self) -> RawAttributes<'a> {
        RawAttributes {
            buf: self.buf,
            at: HEADER_LEN,
            ignore_from: self.ignore_from,
            keep: [self.integrity, self.integrity_sha256, self.fingerprint],
        }
    }

    /// The processed attributes, decoded.
    pub fn attributes(&self) -> impl Iterator<Item = Result<Attribute<'a>, AttributeError>> + 'a {
        let tid = self.header.transaction_id;
        self.raw_attributes()
            .map(move |a| Attribute::decode(a.kind, a.value, &tid))
    }

    /// Value of the first processed attribute of type `kind`.
    pub fn find(&self, kind: u16) -> Option<&'a [u8]> {
        self.raw_attributes().find(|a| a.kind == kind).map(|a| a.value)
    }

    /// The first processed attribute of type `kind`, decoded.
    pub fn get(&self, kind: u16) -> Result<Option<Attribute<'a>>, AttributeError> {
        self.find(kind)
            .map(|v| Attribute::decode(kind, v, &self.header.transaction_id))
            .transpose()
    }

    /// Every XOR-PEER-ADDRESS, in order (the attribute is repeatable).
    pub fn xor_peer_addresses(&self) -> impl Iterator<Item = Result<SocketAddr, AttributeError>> + 'a {
        let tid = self.header.transaction_id;
        self.raw_attributes()
            .filter(|a| a.kind == kind::XOR_PEER_ADDRESS)
            .map(move |a| match Attribute::decode(a.kind, a.value, &tid)? {
                Attribute::XorPeerAddress(addr) => Ok(addr),
                _ => Err(AttributeError {
                    kind: a.kind,
                    reason: AttributeErrorReason::BadValue,
                }),
            })
    }

    /// Checks MESSAGE-INTEGRITY with a key.
    pub fn verify_integrity(&self, key: &[u8]) -> Result<(), IntegrityError> {
        self.verify_integrity_with(integrity::hmac_sha1(key))
    }

    /// Checks MESSAGE-INTEGRITY with an HMAC already keyed (a clone of a
    /// per-user state saves re-keying on every request).
    pub fn verify_integrity_with(&self, mac: HmacSha1) -> Result<(), IntegrityError> {
        let at = self.integrity.ok_or(IntegrityError::Missing)?;
        let want = self
            .buf
            .get(at + 4..at + 4 + integrity::SHA1_LEN)
            .ok_or(IntegrityError::Missing)?;
        let got = integrity::sha1_over(mac, self.buf, at).ok_or(IntegrityError::Mismatch)?;
        if integrity::ct_eq(&got, want) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (possibly truncated, RFC 8489 §14.6) with a key.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> Result<(), IntegrityError> {
        self.verify_integrity_sha256_with(integrity::hmac_sha256(key))
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 with an HMAC already keyed.
    pub fn verify_integrity_sha256_with(&self, mac: HmacSha256) -> Result<(), IntegrityError> {
        let at = self.integrity_sha256.ok_or(IntegrityError::Missing)?;
        let len = u16_at(self.buf, at + 2).ok_or(IntegrityError::Missing)? as usize;
        let want = self.buf.get(at + 4..at + 4 + len).ok_or(IntegrityError::Missing)?;
        let got = integrity::sha256_over(mac, self.buf, at, len).ok_or(IntegrityError::Mismatch)?;
        let got = got.get(..len).ok_or(IntegrityError::Mismatch)?;
        if integrity::ct_eq(got, want) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// Checks FINGERPRINT.
    pub fn verify_fingerprint(&self) -> Result<(), IntegrityError> {
        let at = self.fingerprint.ok_or(IntegrityError::Missing)?;
        let want = u32_at(self.buf, at + 4).ok_or(IntegrityError::Missing)?;
        match integrity::fingerprint_over(self.buf, at) {
            Some(got) if got == want => Ok(()),
            _ => Err(IntegrityError::Mismatch),
        }
    }
}

macro_rules! getters {
    ($($(#[$doc:meta])* $name:ident: $kind:expr => $variant:ident($ty:ty);)*) => {
        impl<'a> Message<'a> {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> Result<Option<$ty>, AttributeError> {
                    Ok(match self.get($kind)? {
                        Some(Attribute::$variant(v)) => Some(v),
                        _ => None,
                    })
                }
            )*
        }
    };
}

getters! {
    /// USERNAME.
    username: kind::USERNAME => Username(&'a str);
    /// USERHASH.
    userhash: kind::USERHASH => UserHash(&'a [u8; 32]);
    /// REALM.
    realm: kind::REALM => Realm(&'a str);
    /// NONCE.
    nonce: kind::NONCE => Nonce(&'a str);
    /// SOFTWARE.
    software: kind::SOFTWARE => Software(&'a str);
    /// DATA.
    data: kind::DATA => Data(&'a [u8]);
    /// ERROR-CODE.
    error_code: kind::ERROR_CODE => ErrorCode(ErrorCode<'a>);
    /// LIFETIME in seconds.
    lifetime: kind::LIFETIME => Lifetime(u32);
    /// CHANNEL-NUMBER.
    channel_number: kind::CHANNEL_NUMBER => ChannelNumber(u16);
    /// REQUESTED-TRANSPORT protocol number.
    requested_transport: kind::REQUESTED_TRANSPORT => RequestedTransport(u8);
    /// XOR-MAPPED-ADDRESS.
    xor_mapped_address: kind::XOR_MAPPED_ADDRESS => XorMappedAddress(SocketAddr);
    /// XOR-RELAYED-ADDRESS (the first one; a dual allocation has two).
    xor_relayed_address: kind::XOR_RELAYED_ADDRESS => XorRelayedAddress(SocketAddr);
    /// CONNECTION-ID.
    connection_id: kind::CONNECTION_ID => ConnectionId(u32);
}

/// Iterator over processed attributes (see [`Message::raw_attributes`]). The
/// message was validated at parse time, so the walk cannot go out of bounds.
#[derive(Debug, Clone)]
pub struct RawAttributes<'a> {
    buf: &'a [u8],
    at: usize,
    ignore_from: usize,
    keep: [Option<usize>; 3],
}

impl<'a> Iterator for RawAttributes<'a> {
    type Item = RawAttribute<'a>;

    fn next(&mut self) -> Option<RawAttribute<'a>> {
        loop {
            let at = self.at;
            let kind = u16_at(self.buf, at)?;
            let len = u16_at(self.buf, at + 2)? as usize;
            let value = self.buf.get(at + 4..at + 4 + len)?;
            self.at = at + 4 + padded(len);
            if at < self.ignore_from || self.keep.contains(&Some(at)) {
                return Some(RawAttribute {
                    kind,
                    value,
                    offset: at,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hmac::Mac;

    use super::*;
    use crate::proto::stun::{Class, MessageWriter, Method};

    #[test]
    fn truncated_sha256_integrity_verifies() {
        // RFC 8489 §14.6: MESSAGE-INTEGRITY-SHA256 may be truncated to 16..32
        // bytes; the HMAC is computed with the length covering the truncated value.
        let mut buf = [0u8; 256];
        let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([4; 12])).unwrap();
        w.username("u").unwrap();
        let at = w.len();
        w.attribute(kind::MESSAGE_INTEGRITY_SHA256, &[0; 16]).unwrap();
        let n = w.finish();
        let mut mac = integrity::hmac_sha256(b"k");
        mac.update(&buf[..at]);
        let full = mac.finalize().into_bytes();
        buf[at + 4..at + 20].copy_from_slice(&full[..16]);
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.verify_integrity_sha256(b"k"), Ok(()));
        assert_eq!(m.verify_integrity_sha256(b"x"), Err(IntegrityError::Mismatch));
    }

    #[test]
    fn integrity_attributes_of_the_wrong_size_are_malformed() {
        for (k, len) in [
            (kind::MESSAGE_INTEGRITY, 16),
            (kind::MESSAGE_INTEGRITY_SHA256, 12),
            (kind::FINGERPRINT, 8),
        ] {
            let mut buf = [0u8; 128];
            let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([4; 12])).unwrap();
            w.attribute(k, &vec![0; len]).unwrap();
            let n = w.finish();
            assert_eq!(
                Message::parse(&buf[..n]).unwrap_err(),
                ParseError::BadIntegrityAttribute,
                "{k:#x}"
            );
        }
    }

    #[test]
    fn missing_integrity_is_reported_as_missing() {
        let mut buf = [0u8; 64];
        let w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([4; 12])).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.verify_integrity(b"k"), Err(IntegrityError::Missing));
        assert_eq!(m.verify_integrity_sha256(b"k"), Err(IntegrityError::Missing));
        assert_eq!(m.verify_fingerprint(), Err(IntegrityError::Missing));
        assert_eq!(
            Message::parse(&[&buf[..n], &[0u8; 4][..]].concat()).unwrap_err(),
            ParseError::TrailingBytes
        );
    }
}
