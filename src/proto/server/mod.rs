//! The sans-IO server core: packets and time in, decisions out. It owns no
//! socket and reads no clock; the IO drivers in `crate::io` feed it.

pub mod binding;

use std::net::SocketAddr;

use crate::proto::channel_data::{ChannelData, ChannelDataError};
use crate::proto::demux::{PacketKind, classify};
use crate::proto::stun::{Class, Message, MessageWriter, ParseError};

/// What to do with one packet from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Send `out[..len]` back to the client.
    Reply { len: usize },
    /// Nothing to send; the packet was handled (an indication, a keepalive).
    Consumed,
    /// The packet was refused without an answer; count it under this reason.
    Drop(DropReason),
}

/// Why a packet got no answer. Each maps to one metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Neither STUN nor ChannelData by its first byte.
    NotTurn,
    /// Not a well-formed STUN message.
    Malformed(ParseError),
    /// FINGERPRINT present but wrong.
    BadFingerprint,
    /// A response or error arrived at the server.
    UnexpectedClass,
    /// ChannelData that does not parse.
    BadChannelData(ChannelDataError),
    /// ChannelData for a channel that is not bound.
    UnboundChannel,
    /// The answer did not fit the output buffer.
    OutputTooSmall,
}

impl DropReason {
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::NotTurn => "not_turn",
            DropReason::Malformed(e) => e.label(),
            DropReason::BadFingerprint => "bad_fingerprint",
            DropReason::UnexpectedClass => "unexpected_class",
            DropReason::BadChannelData(e) => e.label(),
            DropReason::UnboundChannel => "unbound_channel",
            DropReason::OutputTooSmall => "output_too_small",
        }
    }
}

/// Server-wide settings the core needs.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Sent as SOFTWARE in responses, if set.
    pub software: Option<String>,
}

/// The protocol state of one worker.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
}

impl Server {
    pub fn new(config: ServerConfig) -> Server {
        Server { config }
    }

    /// Handles one packet received from `client`; any answer is written into `out`.
    pub fn handle_client_packet(&mut self, client: SocketAddr, packet: &[u8], out: &mut [u8]) -> ClientOutcome {
        match classify(packet) {
            PacketKind::Stun => self.handle_stun(client, packet, out),
            PacketKind::ChannelData => match ChannelData::parse(packet) {
                Ok(_) => ClientOutcome::Drop(DropReason::UnboundChannel),
                Err(e) => ClientOutcome::Drop(DropReason::BadChannelData(e)),
            },
            PacketKind::Other => ClientOutcome::Drop(DropReason::NotTurn),
        }
    }

    fn handle_stun(&mut self, client: SocketAddr, packet: &[u8], out: &mut [u8]) -> ClientOutcome {
        let msg = match Message::parse(packet) {
            Ok(m) => m,
            Err(e) => return ClientOutcome::Drop(DropReason::Malformed(e)),
        };
        if msg.has_fingerprint() && msg.verify_fingerprint().is_err() {
            return ClientOutcome::Drop(DropReason::BadFingerprint);
        }
        match msg.class() {
            Class::Request => {}
            // Binding indications are keepalives; other indications need an allocation.
            Class::Indication => return ClientOutcome::Consumed,
            Class::Success | Class::Error => {
                return ClientOutcome::Drop(DropReason::UnexpectedClass);
            }
        }
        let written = if !msg.unknown_comprehension_required().is_empty() {
            error_response(&msg, 420, "Unknown Attribute", out, |w| {
                w.unknown_attributes(msg.unknown_comprehension_required())
            })
        } else if msg.method() == crate::proto::stun::Method::BINDING {
            binding::success(&msg, client, self.config.software.as_deref(), out).ok()
        } else {
            error_response(&msg, 400, "Unsupported Method", out, |_| Ok(()))
        };
        match written {
            Some(len) => ClientOutcome::Reply { len },
            None => ClientOutcome::Drop(DropReason::OutputTooSmall),
        }
    }
}

/// Writes an error response to `request` with `code`, extra attributes from
/// `extra`, and FINGERPRINT when the request had one.
fn error_response(
    request: &Message<'_>,
    code: u16,
    reason: &str,
    out: &mut [u8],
    extra: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), crate::proto::stun::BufferTooSmall>,
) -> Option<usize> {
    let mut w = MessageWriter::new(out, Class::Error, request.method(), *request.transaction_id()).ok()?;
    w.error_code(code, reason).ok()?;
    extra(&mut w).ok()?;
    if request.has_fingerprint() {
        w.fingerprint().ok()?;
    }
    Some(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::stun::{Method, TransactionId};

    fn request(method: Method, extra: impl FnOnce(&mut MessageWriter<'_>), fingerprint: bool) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, TransactionId([3; 12])).unwrap();
        extra(&mut w);
        if fingerprint {
            w.fingerprint().unwrap();
        }
        let n = w.finish();
        buf[..n].to_vec()
    }

    #[test]
    fn binding_answers_with_mapped_address_and_fingerprint() {
        let mut s = Server::new(ServerConfig {
            software: Some("t".into()),
        });
        let client: SocketAddr = "198.51.100.4:4444".parse().unwrap();
        let req = request(Method::BINDING, |_| {}, true);
        let mut out = [0u8; 256];
        let ClientOutcome::Reply { len } = s.handle_client_packet(client, &req, &mut out) else {
            panic!()
        };
        let resp = Message::parse(&out[..len]).unwrap();
        assert_eq!(resp.class(), Class::Success);
        assert_eq!(resp.transaction_id(), &TransactionId([3; 12]));
        assert_eq!(resp.xor_mapped_address().unwrap(), Some(client));
        assert_eq!(resp.software().unwrap(), Some("t"));
        assert!(resp.verify_fingerprint().is_ok());

        let req = request(Method::BINDING, |_| {}, false);
        let ClientOutcome::Reply { len } = s.handle_client_packet(client, &req, &mut out) else {
            panic!()
        };
        assert!(!Message::parse(&out[..len]).unwrap().has_fingerprint());
    }

    #[test]
    fn refusals() {
        let mut s = Server::new(ServerConfig::default());
        let client: SocketAddr = "198.51.100.4:4444".parse().unwrap();
        let mut out = [0u8; 256];
        // Unknown comprehension-required attribute: 420 listing it.
        let req = request(Method::BINDING, |w| w.attribute(0x7777, b"x").unwrap(), false);
        let ClientOutcome::Reply { len } = s.handle_client_packet(client, &req, &mut out) else {
            panic!()
        };
        let resp = Message::parse(&out[..len]).unwrap();
        assert_eq!(resp.error_code().unwrap().unwrap().code, 420);
        let Some(crate::proto::stun::Attribute::UnknownAttributes(u)) =
            resp.get(crate::proto::stun::kind::UNKNOWN_ATTRIBUTES).unwrap()
        else {
            panic!()
        };
        assert_eq!(u.iter().collect::<Vec<_>>(), vec![0x7777]);
        // Bad fingerprint: dropped.
        let mut req = request(Method::BINDING, |_| {}, true);
        let n = req.len();
        req[n - 1] ^= 1;
        assert_eq!(
            s.handle_client_packet(client, &req, &mut out),
            ClientOutcome::Drop(DropReason::BadFingerprint)
        );
        // Garbage and truncation: dropped.
        assert_eq!(
            s.handle_client_packet(client, b"\x16\x03\x01", &mut out),
            ClientOutcome::Drop(DropReason::NotTurn)
        );
        let req = request(Method::BINDING, |_| {}, false);
        assert!(matches!(
            s.handle_client_packet(client, &req[..19], &mut out),
            ClientOutcome::Drop(DropReason::Malformed(_))
        ));
        // Indication: consumed silently.
        let mut ind = request(Method::BINDING, |_| {}, false);
        ind[1] = 0x11;
        assert_eq!(s.handle_client_packet(client, &ind, &mut out), ClientOutcome::Consumed);
        // Output too small.
        let req = request(Method::BINDING, |_| {}, false);
        assert_eq!(
            s.handle_client_packet(client, &req, &mut out[..20]),
            ClientOutcome::Drop(DropReason::OutputTooSmall)
        );
    }
}
