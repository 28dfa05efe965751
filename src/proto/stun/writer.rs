//! `MessageWriter`: encodes a STUN message into a caller-provided buffer.
//!
//! No heap allocation: attributes are appended in place, padded with zeros,
//! and the header's length field is kept current after each one so that
//! MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT, appended last, are computed
//! over exactly the bytes RFC 8489 §14.5–14.7 specify.

use std::net::SocketAddr;

use super::address;
use super::attr::kind;
use super::header::{Class, HEADER_LEN, MAGIC_COOKIE, Method, TransactionId, message_type};
use super::integrity::{self, HmacSha1, HmacSha256};
use crate::proto::wire::padded;

/// The message does not fit the buffer, or an attribute value exceeds 65535 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferTooSmall;

/// Builds one message in `buf`.
pub struct MessageWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
    tid: TransactionId,
    pad: u8,
}

impl<'b> MessageWriter<'b> {
    /// Writes the header. The buffer must hold at least 20 bytes.
    pub fn new(buf: &'b mut [u8], class: Class, method: Method, tid: TransactionId) -> Result<Self, BufferTooSmall> {
        let head = buf.get_mut(..HEADER_LEN).ok_or(BufferTooSmall)?;
        let t = message_type(class, method).to_be_bytes();
        head.get_mut(0..2).ok_or(BufferTooSmall)?.copy_from_slice(&t);
        head.get_mut(2..4).ok_or(BufferTooSmall)?.copy_from_slice(&[0, 0]);
        head.get_mut(4..8)
            .ok_or(BufferTooSmall)?
            .copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        head.get_mut(8..20)
            .ok_or(BufferTooSmall)?
            .copy_from_slice(tid.as_bytes());
        Ok(MessageWriter {
            buf,
            len: HEADER_LEN,
            tid,
            pad: 0,
        })
    }

    pub fn transaction_id(&self) -> &TransactionId {
        &self.tid
    }

    /// Sets the byte used for attribute padding (zero unless changed).
    /// Receivers ignore padding; this exists to reproduce messages from
    /// other encoders byte for byte, e.g. RFC 5769's, which pad with spaces.
    pub fn pad_with(&mut self, byte: u8) {
        self.pad = byte;
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Appends an attribute of `value_len` bytes whose value `fill` writes in
    /// place, then its padding.
    pub fn attribute_with(
        &mut self,
        kind: u16,
        value_len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<()>,
    ) -> Result<(), BufferTooSmall> {
        let vlen = u16::try_from(value_len).map_err(|_| BufferTooSmall)?;
        let total = 4 + padded(value_len);
        let end = self.len + total;
        let new_body = u16::try_from(end - HEADER_LEN).map_err(|_| BufferTooSmall)?;
        let pad_byte = self.pad;
        let region = self.buf.get_mut(self.len..end).ok_or(BufferTooSmall)?;
        let (head, rest) = region.split_at_mut(4);
        head.copy_from_slice(&[(kind >> 8) as u8, kind as u8, (vlen >> 8) as u8, vlen as u8]);
        let (value, pad) = rest.split_at_mut(value_len);
        fill(value).ok_or(BufferTooSmall)?;
        pad.fill(pad_byte);
        self.len = end;
        self.set_length(new_body);
        Ok(())
    }

    fn set_length(&mut self, body: u16) {
        if let Some(l) = self.buf.get_mut(2..4) {
            l.copy_from_slice(&body.to_be_bytes());
        }
    }

    /// Appends an attribute with the given value bytes.
    pub fn attribute(&mut self, kind: u16, value: &[u8]) -> Result<(), BufferTooSmall> {
        self.attribute_with(kind, value.len(), |v| {
            v.copy_from_slice(value);
            Some(())
        })
    }

    fn address(&mut self, kind: u16, addr: &SocketAddr, xor: bool) -> Result<(), BufferTooSmall> {
        let tid = self.tid;
        self.attribute_with(kind, address::encoded_len(addr), |v| {
            address::encode(addr, xor.then_some(&tid), v)
        })
    }

    fn u32_attr(&mut self, kind: u16, v: u32) -> Result<(), BufferTooSmall> {
        self.attribute(kind, &v.to_be_bytes())
    }

    pub fn mapped_address(&mut self, addr: &SocketAddr) -> Result<(), BufferTooSmall> {
        self.address(kind::MAPPED_ADDRESS, addr, false)
    }
    pub fn xor_mapped_address(&mut self, addr: &SocketAddr) -> Result<(), BufferTooSmall> {
        self.address(kind::XOR_MAPPED_ADDRESS, addr, true)
    }
    pub fn xor_peer_address(&mut self, addr: &SocketAddr) -> Result<(), BufferTooSmall> {
        self.address(kind::XOR_PEER_ADDRESS, addr, true)
    }
    pub fn xor_relayed_address(&mut self, addr: &SocketAddr) -> Result<(), BufferTooSmall> {
        self.address(kind::XOR_RELAYED_ADDRESS, addr, true)
    }
    pub fn alternate_server(&mut self, addr: &SocketAddr) -> Result<(), BufferTooSmall> {
        self.address(kind::ALTERNATE_SERVER, addr, false)
    }
    pub fn response_origin(&mut self, addr: &SocketAddr) -> Result<(), BufferTooSmall> {
        self.address(kind::RESPONSE_ORIGIN, addr, false)
    }
    pub fn other_address(&mut self, addr: &SocketAddr) -> Result<(), BufferTooSmall> {
        self.address(kind::OTHER_ADDRESS, addr, false)
    }
    pub fn username(&mut self, v: &str) -> Result<(), BufferTooSmall> {
        self.attribute(kind::USERNAME, v.as_bytes())
    }
    pub fn userhash(&mut self, v: &[u8; 32]) -> Result<(), BufferTooSmall> {
        self.attribute(kind::USERHASH, v)
    }
    pub fn realm(&mut self, v: &str) -> Result<(), BufferTooSmall> {
        self.attribute(kind::REALM, v.as_bytes())
    }
    pub fn nonce(&mut self, v: &str) -> Result<(), BufferTooSmall> {
        self.attribute(kind::NONCE, v.as_bytes())
    }
    pub fn software(&mut self, v: &str) -> Result<(), BufferTooSmall> {
        self.attribute(kind::SOFTWARE, v.as_bytes())
    }
    pub fn alternate_domain(&mut self, v: &str) -> Result<(), BufferTooSmall> {
        self.attribute(kind::ALTERNATE_DOMAIN, v.as_bytes())
    }
    pub fn data(&mut self, v: &[u8]) -> Result<(), BufferTooSmall> {
        self.attribute(kind::DATA, v)
    }
    pub fn lifetime(&mut self, seconds: u32) -> Result<(), BufferTooSmall> {
        self.u32_attr(kind::LIFETIME, seconds)
    }
    pub fn channel_number(&mut self, n: u16) -> Result<(), BufferTooSmall> {
        self.u32_attr(kind::CHANNEL_NUMBER, u32::from(n) << 16)
    }
    pub fn requested_transport(&mut self, protocol: u8) -> Result<(), BufferTooSmall> {
        self.u32_attr(kind::REQUESTED_TRANSPORT, u32::from(protocol) << 24)
    }
    pub fn requested_address_family(&mut self, f: address::AddressFamily) -> Result<(), BufferTooSmall> {
        self.u32_attr(kind::REQUESTED_ADDRESS_FAMILY, u32::from(f.to_byte()) << 24)
    }
    pub fn additional_address_family(&mut self, f: address::AddressFamily) -> Result<(), BufferTooSmall> {
        self.u32_attr(kind::ADDITIONAL_ADDRESS_FAMILY, u32::from(f.to_byte()) << 24)
    }
    pub fn even_port(&mut self, reserve: bool) -> Result<(), BufferTooSmall> {
        self.attribute(kind::EVEN_PORT, &[if reserve { 0x80 } else { 0 }])
    }
    pub fn dont_fragment(&mut self) -> Result<(), BufferTooSmall> {
        self.attribute(kind::DONT_FRAGMENT, &[])
    }
    pub fn reservation_token(&mut self, token: &[u8; 8]) -> Result<(), BufferTooSmall> {
        self.attribute(kind::RESERVATION_TOKEN, token)
    }
    pub fn connection_id(&mut self, id: u32) -> Result<(), BufferTooSmall> {
        self.u32_attr(kind::CONNECTION_ID, id)
    }
    pub fn response_port(&mut self, port: u16) -> Result<(), BufferTooSmall> {
        self.u32_attr(kind::RESPONSE_PORT, u32::from(port) << 16)
    }
    pub fn change_request(&mut self, change_ip: bool, change_port: bool) -> Result<(), BufferTooSmall> {
        self.u32_attr(
            kind::CHANGE_REQUEST,
            (u32::from(change_ip) << 2) | (u32::from(change_port) << 1),
        )
    }
    pub fn mobility_ticket(&mut self, ticket: &[u8]) -> Result<(), BufferTooSmall> {
        self.attribute(kind::MOBILITY_TICKET, ticket)
    }
    pub fn padding(&mut self, len: usize) -> Result<(), BufferTooSmall> {
        self.attribute_with(kind::PADDING, len, |v| {
            v.fill(0);
            Some(())
        })
    }

    /// ICMP (RFC 8656 §18.13): type, code and error data of a received ICMP error.
    pub fn icmp(&mut self, icmp_type: u8, icmp_code: u8, error_data: u32) -> Result<(), BufferTooSmall> {
        let e = error_data.to_be_bytes();
        self.attribute(kind::ICMP, &[0, 0, icmp_type, icmp_code, e[0], e[1], e[2], e[3]])
    }

    /// ERROR-CODE with a code in 300..=699.
    pub fn error_code(&mut self, code: u16, reason: &str) -> Result<(), BufferTooSmall> {
        self.error_body(kind::ERROR_CODE, 0, code, reason)
    }

    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    pub fn address_error_code(
        &mut self,
        family: address::AddressFamily,
        code: u16,
        reason: &str,
    ) -> Result<(), BufferTooSmall> {
        self.error_body(kind::ADDRESS_ERROR_CODE, family.to_byte(), code, reason)
    }

    fn error_body(&mut self, kind: u16, first: u8, code: u16, reason: &str) -> Result<(), BufferTooSmall> {
        let class = (code / 100) as u8 & 0x07;
        let number = (code % 100) as u8;
        self.attribute_with(kind, 4 + reason.len(), |v| {
            v.get_mut(..4)?.copy_from_slice(&[first, 0, class, number]);
            v.get_mut(4..)?.copy_from_slice(reason.as_bytes());
            Some(())
        })
    }

    /// UNKNOWN-ATTRIBUTES listing `types`.
    pub fn unknown_attributes(&mut self, types: &[u16]) -> Result<(), BufferTooSmall> {
        self.attribute_with(kind::UNKNOWN_ATTRIBUTES, types.len() * 2, |v| {
            for (chunk, t) in v.chunks_exact_mut(2).zip(types) {
                chunk.copy_from_slice(&t.to_be_bytes());
            }
            Some(())
        })
    }

    /// PASSWORD-ALGORITHMS listing (algorithm, parameters) pairs.
    pub fn password_algorithms(&mut self, algorithms: &[(u16, &[u8])]) -> Result<(), BufferTooSmall> {
        let len: usize = algorithms.iter().map(|(_, p)| 4 + padded(p.len())).sum();
        self.attribute_with(kind::PASSWORD_ALGORITHMS, len, |v| {
            let mut at = 0;
            for (alg, params) in algorithms {
                encode_algorithm(v.get_mut(at..)?, *alg, params)?;
                at += 4 + padded(params.len());
            }
            Some(())
        })
    }

    /// PASSWORD-ALGORITHM.
    pub fn password_algorithm(&mut self, algorithm: u16, parameters: &[u8]) -> Result<(), BufferTooSmall> {
        self.attribute_with(kind::PASSWORD_ALGORITHM, 4 + padded(parameters.len()), |v| {
            encode_algorithm(v, algorithm, parameters)
        })
    }

    /// Appends MESSAGE-INTEGRITY computed with an HMAC keyed with the
    /// long-term (or short-term) key.
    pub fn message_integrity(&mut self, mac: HmacSha1) -> Result<(), BufferTooSmall> {
        let at = self.len;
        let sum = integrity::sha1_over(mac, self.buf, at).ok_or(BufferTooSmall)?;
        self.attribute(kind::MESSAGE_INTEGRITY, &sum)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32 bytes).
    pub fn message_integrity_sha256(&mut self, mac: HmacSha256) -> Result<(), BufferTooSmall> {
        let at = self.len;
        let sum = integrity::sha256_over(mac, self.buf, at, integrity::SHA256_LEN).ok_or(BufferTooSmall)?;
        self.attribute(kind::MESSAGE_INTEGRITY_SHA256, &sum)
    }

    /// Appends FINGERPRINT; it must be the last attribute.
    pub fn fingerprint(&mut self) -> Result<(), BufferTooSmall> {
        let at = self.len;
        // The buffer must have room before we compute: the CRC covers the
        // header with the length patched to include this attribute.
        self.buf.get(at..at + 8).ok_or(BufferTooSmall)?;
        let crc = integrity::fingerprint_over(self.buf, at).ok_or(BufferTooSmall)?;
        self.u32_attr(kind::FINGERPRINT, crc)
    }

    /// Finishes the message and returns its length in bytes.
    pub fn finish(self) -> usize {
        self.len
    }
}

fn encode_algorithm(v: &mut [u8], algorithm: u16, parameters: &[u8]) -> Option<()> {
    let plen = u16::try_from(parameters.len()).ok()?;
    v.get_mut(0..2)?.copy_from_slice(&algorithm.to_be_bytes());
    v.get_mut(2..4)?.copy_from_slice(&plen.to_be_bytes());
    v.get_mut(4..4 + parameters.len())?.copy_from_slice(parameters);
    v.get_mut(4 + parameters.len()..4 + padded(parameters.len()))?.fill(0);
    Some(())
}
