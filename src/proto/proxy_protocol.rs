//! PROXY protocol version 2 (HAProxy): the binary header a load balancer or
//! SNI router puts in front of a TCP connection to carry the original client
//! address. Only v2 is accepted; a connection that does not start with its
//! signature is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::proto::wire::{array_at, u8_at, u16_at};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Fixed part of the header: signature, version/command, family, length.
pub const FIXED_LEN: usize = 16;
/// Longest address block accepted (addresses plus TLVs).
pub const MAX_BODY: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Not a PROXY v2 header.
    BadSignature,
    /// Version other than 2, or an unknown command.
    BadVersion,
    /// The address block is longer than we accept or shorter than its family needs.
    BadLength,
}

/// Parses the 16-byte fixed part; returns the length of the block that follows.
pub fn body_len(fixed: &[u8; FIXED_LEN]) -> Result<usize, ProxyError> {
    if array_at::<12>(fixed, 0) != Some(&SIGNATURE) {
        return Err(ProxyError::BadSignature);
    }
    let ver_cmd = u8_at(fixed, 12).ok_or(ProxyError::BadSignature)?;
    if ver_cmd >> 4 != 2 || ver_cmd & 0x0F > 1 {
        return Err(ProxyError::BadVersion);
    }
    let len = usize::from(u16_at(fixed, 14).ok_or(ProxyError::BadSignature)?);
    if len > MAX_BODY {
        return Err(ProxyError::BadLength);
    }
    Ok(len)
}

/// The client address carried by a header (`fixed` + `body`). `None` for the
/// LOCAL command (health checks) and for non-IP families: the connection's
/// own address applies.
pub fn source(fixed: &[u8; FIXED_LEN], body: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let ver_cmd = u8_at(fixed, 12).ok_or(ProxyError::BadSignature)?;
    if ver_cmd & 0x0F == 0 {
        return Ok(None); // LOCAL
    }
    let family = u8_at(fixed, 13).ok_or(ProxyError::BadSignature)?;
    match family >> 4 {
        1 => {
            let ip = array_at::<4>(body, 0).ok_or(ProxyError::BadLength)?;
            let port = u16_at(body, 8).ok_or(ProxyError::BadLength)?;
            Ok(Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(*ip)), port)))
        }
        2 => {
            let ip = array_at::<16>(body, 0).ok_or(ProxyError::BadLength)?;
            let port = u16_at(body, 32).ok_or(ProxyError::BadLength)?;
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(*ip)), port)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cmd: u8, family: u8, body: &[u8]) -> ([u8; 16], Vec<u8>) {
        let mut f = [0u8; 16];
        f[..12].copy_from_slice(&SIGNATURE);
        f[12] = 0x20 | cmd;
        f[13] = family;
        f[14..16].copy_from_slice(&(body.len() as u16).to_be_bytes());
        (f, body.to_vec())
    }

    #[test]
    fn ipv4_and_ipv6_sources() {
        let mut body = vec![203, 0, 113, 9, 10, 0, 0, 1];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let (f, b) = header(1, 0x11, &body);
        assert_eq!(body_len(&f), Ok(12));
        assert_eq!(source(&f, &b), Ok(Some("203.0.113.9:40000".parse().unwrap())));

        let mut body = vec![0u8; 36];
        body[15] = 1;
        body[32..34].copy_from_slice(&5000u16.to_be_bytes());
        let (f, b) = header(1, 0x21, &body);
        assert_eq!(source(&f, &b), Ok(Some("[::1]:5000".parse().unwrap())));
    }

    #[test]
    fn local_and_errors() {
        let (f, b) = header(0, 0, &[]);
        assert_eq!(source(&f, &b), Ok(None));
        let (mut f, _) = header(1, 0x11, &[0; 12]);
        f[0] = b'G';
        assert_eq!(body_len(&f), Err(ProxyError::BadSignature));
        let (mut f, _) = header(1, 0x11, &[0; 12]);
        f[12] = 0x11;
        assert_eq!(body_len(&f), Err(ProxyError::BadVersion));
        let (f, b) = header(1, 0x11, &[0; 4]);
        assert_eq!(source(&f, &b), Err(ProxyError::BadLength));
        let (mut f, _) = header(1, 0x11, &[]);
        f[14..16].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(body_len(&f), Err(ProxyError::BadLength));
    }
}
