//! STUN Binding (RFC 8489 §3): tell the client the address its request came
//! from. No authentication and no state. With RFC 5780 NAT behaviour
//! discovery, also where the answer comes from (RESPONSE-ORIGIN), the
//! address that differs in both IP and port (OTHER-ADDRESS), answers from
//! the other address or port (CHANGE-REQUEST) or to another port of the
//! client (RESPONSE-PORT), and PADDING.

use std::net::SocketAddr;

use super::allocation::ListenerId;
use crate::proto::stun::{Attribute, AttributeError, BufferTooSmall, Class, Message, MessageWriter, Method, kind};

/// RFC 5780: a UDP listener's own address and the listeners that answer a
/// CHANGE-REQUEST received on it, with their addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatDiscovery {
    pub local: SocketAddr,
    /// The other IP address, the same port.
    pub change_ip: (ListenerId, SocketAddr),
    /// The same IP address, the other port.
    pub change_port: (ListenerId, SocketAddr),
    /// Both changed: the OTHER-ADDRESS of the answers.
    pub change_both: (ListenerId, SocketAddr),
}

/// What a Binding request asks of RFC 5780.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Discovery {
    pub change_ip: bool,
    pub change_port: bool,
    pub response_port: Option<u16>,
    /// Length of its PADDING value.
    pub padding: Option<usize>,
}

impl Discovery {
    /// Reads CHANGE-REQUEST, RESPONSE-PORT and PADDING; a malformed one is
    /// an error (400).
    pub fn of(request: &Message<'_>) -> Result<Discovery, AttributeError> {
        let mut d = Discovery::default();
        match request.get(kind::CHANGE_REQUEST) {
            Ok(Some(Attribute::ChangeRequest { change_ip, change_port })) => {
                d.change_ip = change_ip;
                d.change_port = change_port;
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        if let Some(Attribute::ResponsePort(p)) = request.get(kind::RESPONSE_PORT)? {
            d.response_port = Some(p);
        }
        d.padding = request.find(kind::PADDING).map(<[u8]>::len);
        Ok(d)
    }

    /// The RFC 5780 attributes present, for a 420 where the server does not
    /// offer it.
    pub fn requested(request: &Message<'_>) -> Vec<u16> {
        [kind::CHANGE_REQUEST, kind::RESPONSE_PORT]
            .into_iter()
            .filter(|k| request.find(*k).is_some())
            .collect()
    }
}

/// Writes the success response to a Binding request into `out`.
pub fn success(
    request: &Message<'_>,
    client: SocketAddr,
    software: Option<&str>,
    out: &mut [u8],
) -> Result<usize, BufferTooSmall> {
    let mut w = MessageWriter::new(out, Class::Success, Method::BINDING, *request.transaction_id())?;
    w.xor_mapped_address(&client)?;
    if let Some(s) = software {
        w.software(s)?;
    }
    if request.has_fingerprint() {
        w.fingerprint()?;
    }
    Ok(w.finish())
}

/// The success response to a Binding request under RFC 5780: sent from
/// `origin`; PADDING as long as the request's, but never making the answer
/// longer than the request (no amplification).
pub fn discovery_success(
    request: &Message<'_>,
    client: SocketAddr,
    origin: SocketAddr,
    other: SocketAddr,
    padding: Option<usize>,
    software: Option<&str>,
    out: &mut [u8],
) -> Result<usize, BufferTooSmall> {
    let mut w = MessageWriter::new(out, Class::Success, Method::BINDING, *request.transaction_id())?;
    w.xor_mapped_address(&client)?;
    w.response_origin(&origin)?;
    w.other_address(&other)?;
    if let Some(s) = software {
        w.software(s)?;
    }
    if let Some(len) = padding {
        let room = request
            .as_bytes()
            .len()
            .saturating_sub(w.len() + 4 + if request.has_fingerprint() { 8 } else { 0 });
        let len = len.min(room) & !3;
        if len > 0 {
            w.padding(len)?;
        }
    }
    if request.has_fingerprint() {
        w.fingerprint()?;
    }
    Ok(w.finish())
}
