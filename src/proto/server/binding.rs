//! STUN Binding (RFC 8489 §3): tell the client the address its request came
//! from. No authentication and no state.

use std::net::SocketAddr;

use crate::proto::stun::{BufferTooSmall, Class, Message, MessageWriter, Method};

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
