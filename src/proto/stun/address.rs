//! Address attribute bodies: MAPPED-ADDRESS style (plain) and
//! XOR-MAPPED-ADDRESS style (obfuscated with the magic cookie and, for IPv6,
//! the transaction id), RFC 8489 §14.1–14.2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::header::{MAGIC_COOKIE, TransactionId};
use crate::proto::wire::{array_at, u8_at, u16_at};

/// Address family byte of address attributes and REQUESTED-ADDRESS-FAMILY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    V4,
    V6,
}

impl AddressFamily {
    pub const fn to_byte(self) -> u8 {
        match self {
            AddressFamily::V4 => 0x01,
            AddressFamily::V6 => 0x02,
        }
    }

    pub const fn from_byte(b: u8) -> Option<AddressFamily> {
        match b {
            0x01 => Some(AddressFamily::V4),
            0x02 => Some(AddressFamily::V6),
            _ => None,
        }
    }

    pub const fn of(addr: &SocketAddr) -> AddressFamily {
        match addr {
            SocketAddr::V4(_) => AddressFamily::V4,
            SocketAddr::V6(_) => AddressFamily::V6,
        }
    }
}

/// Encoded size of an address attribute value.
pub const fn encoded_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

/// Decodes a MAPPED-ADDRESS-style value.
pub fn decode_plain(value: &[u8]) -> Option<SocketAddr> {
    decode(value, None)
}

/// Decodes an XOR-*-ADDRESS value.
pub fn decode_xor(value: &[u8], tid: &TransactionId) -> Option<SocketAddr> {
    decode(value, Some(tid))
}

fn decode(value: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = AddressFamily::from_byte(u8_at(value, 1)?)?;
    let mut port = u16_at(value, 2)?;
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match family {
        AddressFamily::V4 => {
            if value.len() != 8 {
                return None;
            }
            let mut o = *array_at::<4>(value, 4)?;
            if xor.is_some() {
                xor_into(&mut o, &MAGIC_COOKIE.to_be_bytes());
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        AddressFamily::V6 => {
            if value.len() != 20 {
                return None;
            }
            let mut o = *array_at::<16>(value, 4)?;
            if let Some(tid) = xor {
                xor_into(&mut o, &xor_mask_v6(tid));
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    };
    Some(SocketAddr::new(ip, port))
}

/// Writes an address value into `out`, which must be exactly
/// [`encoded_len`] bytes.
pub fn encode(addr: &SocketAddr, xor: Option<&TransactionId>, out: &mut [u8]) -> Option<()> {
    let mut port = addr.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let head = [0u8, AddressFamily::of(addr).to_byte(), (port >> 8) as u8, port as u8];
    out.get_mut(0..4)?.copy_from_slice(&head);
    match addr.ip() {
        IpAddr::V4(ip) => {
            let mut o = ip.octets();
            if xor.is_some() {
                xor_into(&mut o, &MAGIC_COOKIE.to_be_bytes());
            }
            out.get_mut(4..8)?.copy_from_slice(&o);
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            if let Some(tid) = xor {
                xor_into(&mut o, &xor_mask_v6(tid));
            }
            out.get_mut(4..20)?.copy_from_slice(&o);
        }
    }
    Some(())
}

fn xor_mask_v6(tid: &TransactionId) -> [u8; 16] {
    let mut mask = [0u8; 16];
    let (cookie, rest) = mask.split_at_mut(4);
    cookie.copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    rest.copy_from_slice(tid.as_bytes());
    mask
}

fn xor_into(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= *y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_round_trip_v4_and_v6() {
        let tid = TransactionId([7; 12]);
        for addr in [
            "192.0.2.1:32853",
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut buf = vec![0u8; encoded_len(&addr)];
            encode(&addr, Some(&tid), &mut buf).unwrap();
            assert_eq!(decode_xor(&buf, &tid), Some(addr));
            encode(&addr, None, &mut buf).unwrap();
            assert_eq!(decode_plain(&buf), Some(addr));
        }
    }

    #[test]
    fn rejects_bad_family_and_lengths() {
        let tid = TransactionId([0; 12]);
        assert_eq!(decode_xor(&[0, 3, 0, 0, 1, 2, 3, 4], &tid), None);
        assert_eq!(decode_xor(&[0, 1, 0, 0, 1, 2, 3], &tid), None);
        assert_eq!(decode_xor(&[0, 1, 0, 0, 1, 2, 3, 4, 5], &tid), None);
        assert_eq!(decode_xor(&[0, 2, 0, 0, 1, 2, 3, 4], &tid), None);
        assert_eq!(decode_xor(&[], &tid), None);
    }
}
