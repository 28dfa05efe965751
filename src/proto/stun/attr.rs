//! Attribute type numbers and typed, borrowing decoding of attribute values.

use std::net::SocketAddr;

use super::address::{self, AddressFamily};
use super::header::TransactionId;
use crate::proto::wire::{array_at, u8_at, u16_at, u32_at, u64_at};

/// Attribute type numbers.
pub mod kind {
    // RFC 8489
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    // RFC 8656
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const ICMP: u16 = 0x8004;
    // RFC 6062
    pub const CONNECTION_ID: u16 = 0x002A;
    // RFC 5780
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;
    // RFC 8016
    pub const MOBILITY_TICKET: u16 = 0x8030;
    // draft-ietf-tram-stun-origin (as coturn reads it): the web origin of
    // the page that made the request; it may select a realm.
    pub const ORIGIN: u16 = 0x802F;
    // RFC 8445 (ICE); known so that ICE connectivity checks are not answered with 420.
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;

    /// Types below 0x8000 must be understood or the request is refused (420).
    pub const fn is_comprehension_required(t: u16) -> bool {
        t < 0x8000
    }

    /// Whether this codec knows the type.
    pub const fn is_known(t: u16) -> bool {
        matches!(
            t,
            MAPPED_ADDRESS
                | USERNAME
                | MESSAGE_INTEGRITY
                | ERROR_CODE
                | UNKNOWN_ATTRIBUTES
                | REALM
                | NONCE
                | MESSAGE_INTEGRITY_SHA256
                | PASSWORD_ALGORITHM
                | USERHASH
                | XOR_MAPPED_ADDRESS
                | PASSWORD_ALGORITHMS
                | ALTERNATE_DOMAIN
                | SOFTWARE
                | ALTERNATE_SERVER
                | FINGERPRINT
                | CHANNEL_NUMBER
                | LIFETIME
                | XOR_PEER_ADDRESS
                | DATA
                | XOR_RELAYED_ADDRESS
                | REQUESTED_ADDRESS_FAMILY
                | EVEN_PORT
                | REQUESTED_TRANSPORT
                | DONT_FRAGMENT
                | RESERVATION_TOKEN
                | ADDITIONAL_ADDRESS_FAMILY
                | ADDRESS_ERROR_CODE
                | ICMP
                | CONNECTION_ID
                | CHANGE_REQUEST
                | PADDING
                | RESPONSE_PORT
                | RESPONSE_ORIGIN
                | OTHER_ADDRESS
                | MOBILITY_TICKET
                | PRIORITY
                | USE_CANDIDATE
                | ICE_CONTROLLED
                | ICE_CONTROLLING
        )
    }
}

/// Size limits from RFC 8489 §14 (bytes of the value).
pub mod limits {
    /// USERNAME: "MUST contain a UTF-8-encoded sequence of fewer than 509 bytes".
    pub const USERNAME: usize = 508;
    /// REALM, NONCE, SOFTWARE, ALTERNATE-DOMAIN, reason phrases: fewer than 763 bytes.
    pub const TEXT: usize = 762;
}

/// Password algorithm numbers (RFC 8489 §18.5).
pub mod password_algorithm {
    pub const MD5: u16 = 0x0001;
    pub const SHA256: u16 = 0x0002;
}

/// IP protocol numbers used in REQUESTED-TRANSPORT.
pub mod transport {
    pub const UDP: u8 = 17;
    pub const TCP: u8 = 6;
}

/// Why an attribute value could not be decoded. A server answers 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeError {
    pub kind: u16,
    pub reason: AttributeErrorReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeErrorReason {
    /// The value has the wrong size for its type.
    BadLength,
    /// A text attribute is not UTF-8.
    NotUtf8,
    /// A text attribute exceeds its RFC limit.
    TooLong,
    /// Family byte, error class or similar out of range.
    BadValue,
}

/// One decoded attribute, borrowing from the message buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute<'a> {
    MappedAddress(SocketAddr),
    XorMappedAddress(SocketAddr),
    Username(&'a str),
    UserHash(&'a [u8; 32]),
    MessageIntegrity(&'a [u8; 20]),
    MessageIntegritySha256(&'a [u8]),
    Fingerprint(u32),
    ErrorCode(ErrorCode<'a>),
    Realm(&'a str),
    Nonce(&'a str),
    PasswordAlgorithms(PasswordAlgorithms<'a>),
    PasswordAlgorithm(AlgorithmEntry<'a>),
    UnknownAttributes(UnknownAttributes<'a>),
    Software(&'a str),
    AlternateServer(SocketAddr),
    AlternateDomain(&'a str),
    ChannelNumber(u16),
    Lifetime(u32),
    XorPeerAddress(SocketAddr),
    Data(&'a [u8]),
    XorRelayedAddress(SocketAddr),
    RequestedAddressFamily(AddressFamily),
    EvenPort {
        reserve: bool,
    },
    RequestedTransport(u8),
    DontFragment,
    ReservationToken(&'a [u8; 8]),
    AdditionalAddressFamily(AddressFamily),
    AddressErrorCode {
        family: AddressFamily,
        error: ErrorCode<'a>,
    },
    Icmp {
        icmp_type: u8,
        icmp_code: u8,
        error_data: u32,
    },
    ConnectionId(u32),
    ChangeRequest {
        change_ip: bool,
        change_port: bool,
    },
    ResponseOrigin(SocketAddr),
    OtherAddress(SocketAddr),
    ResponsePort(u16),
    Padding(&'a [u8]),
    MobilityTicket(&'a [u8]),
    Priority(u32),
    UseCandidate,
    IceControlled(u64),
    IceControlling(u64),
    /// A type this codec does not know.
    Other {
        kind: u16,
        value: &'a [u8],
    },
}

/// ERROR-CODE body: a code in 300..=699 and a reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode<'a> {
    pub code: u16,
    pub reason: &'a str,
}

/// UNKNOWN-ATTRIBUTES body, a list of 16-bit types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownAttributes<'a>(&'a [u8]);

impl<'a> UnknownAttributes<'a> {
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0
            .chunks_exact(2)
            .filter_map(|c| c.try_into().ok().map(u16::from_be_bytes))
    }
}

/// One (algorithm, parameters) entry: the PASSWORD-ALGORITHM body, and each
/// item of PASSWORD-ALGORITHMS. (The algorithms themselves are
/// `proto::auth::PasswordAlgorithm`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmEntry<'a> {
    pub algorithm: u16,
    pub parameters: &'a [u8],
}

/// PASSWORD-ALGORITHMS body: a list of (algorithm, parameters), each padded.
/// Validated on decode, so iteration never fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordAlgorithms<'a>(&'a [u8]);

impl<'a> PasswordAlgorithms<'a> {
    pub fn iter(&self) -> PasswordAlgorithmsIter<'a> {
        PasswordAlgorithmsIter(self.0)
    }

    /// The raw value, for byte-exact comparison (RFC 8489 §9.2.4 bid-down check).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    fn validate(value: &[u8]) -> bool {
        let mut it = PasswordAlgorithmsIter(value);
        while it.next().is_some() {}
        it.0.is_empty()
    }
}

pub struct PasswordAlgorithmsIter<'a>(&'a [u8]);

impl<'a> Iterator for PasswordAlgorithmsIter<'a> {
    type Item = AlgorithmEntry<'a>;

    fn next(&mut self) -> Option<AlgorithmEntry<'a>> {
        let algorithm = u16_at(self.0, 0)?;
        let len = u16_at(self.0, 2)? as usize;
        let parameters = self.0.get(4..4 + len)?;
        let rest = self.0.get(4 + crate::proto::wire::padded(len)..)?;
        self.0 = rest;
        Some(AlgorithmEntry { algorithm, parameters })
    }
}

fn text(kind: u16, value: &[u8], limit: usize) -> Result<&str, AttributeError> {
    if value.len() > limit {
        return Err(AttributeError {
            kind,
            reason: AttributeErrorReason::TooLong,
        });
    }
    std::str::from_utf8(value).map_err(|_| AttributeError {
        kind,
        reason: AttributeErrorReason::NotUtf8,
    })
}

fn error_code_body(kind: u16, value: &[u8]) -> Result<ErrorCode<'_>, AttributeError> {
    let bad = AttributeError {
        kind,
        reason: AttributeErrorReason::BadValue,
    };
    let class = u8_at(value, 2).ok_or(AttributeError {
        kind,
        reason: AttributeErrorReason::BadLength,
    })? & 0x07;
    let number = u8_at(value, 3).ok_or(AttributeError {
        kind,
        reason: AttributeErrorReason::BadLength,
    })?;
    if !(3..=6).contains(&class) || number > 99 {
        return Err(bad);
    }
    let reason = text(kind, value.get(4..).unwrap_or_default(), limits::TEXT)?;
    Ok(ErrorCode {
        code: u16::from(class) * 100 + u16::from(number),
        reason,
    })
}

impl<'a> Attribute<'a> {
    /// Decodes the value of an attribute of type `kind`. XOR addresses need the
    /// transaction id of the message.
    pub fn decode(kind: u16, value: &'a [u8], tid: &TransactionId) -> Result<Attribute<'a>, AttributeError> {
        use kind::*;
        let bad_len = AttributeError {
            kind,
            reason: AttributeErrorReason::BadLength,
        };
        let bad_value = AttributeError {
            kind,
            reason: AttributeErrorReason::BadValue,
        };
        let exact = |n: usize| {
            if value.len() == n { Ok(()) } else { Err(bad_len) }
        };
        let addr = |xor: bool| {
            let a = if xor {
                address::decode_xor(value, tid)
            } else {
                address::decode_plain(value)
            };
            a.ok_or(bad_value)
        };
        let family = || {
            exact(4)?;
            AddressFamily::from_byte(u8_at(value, 0).ok_or(bad_len)?).ok_or(bad_value)
        };
        let u32v = || {
            exact(4)?;
            u32_at(value, 0).ok_or(bad_len)
        };
        let u64v = || {
            exact(8)?;
            u64_at(value, 0).ok_or(bad_len)
        };
        Ok(match kind {
            MAPPED_ADDRESS => Attribute::MappedAddress(addr(false)?),
            XOR_MAPPED_ADDRESS => Attribute::XorMappedAddress(addr(true)?),
            USERNAME => Attribute::Username(text(kind, value, limits::USERNAME)?),
            USERHASH => Attribute::UserHash(array_at::<32>(value, 0).filter(|_| value.len() == 32).ok_or(bad_len)?),
            MESSAGE_INTEGRITY => {
                Attribute::MessageIntegrity(array_at::<20>(value, 0).filter(|_| value.len() == 20).ok_or(bad_len)?)
            }
            MESSAGE_INTEGRITY_SHA256 => {
                if value.len() < 16 || value.len() > 32 || !value.len().is_multiple_of(4) {
                    return Err(bad_len);
                }
                Attribute::MessageIntegritySha256(value)
            }
            FINGERPRINT => Attribute::Fingerprint(u32v()?),
            ERROR_CODE => Attribute::ErrorCode(error_code_body(kind, value)?),
            REALM => Attribute::Realm(text(kind, value, limits::TEXT)?),
            NONCE => Attribute::Nonce(text(kind, value, limits::TEXT)?),
            SOFTWARE => Attribute::Software(text(kind, value, limits::TEXT)?),
            ALTERNATE_DOMAIN => Attribute::AlternateDomain(text(kind, value, limits::TEXT)?),
            PASSWORD_ALGORITHMS => {
                if !PasswordAlgorithms::validate(value) {
                    return Err(bad_len);
                }
                Attribute::PasswordAlgorithms(PasswordAlgorithms(value))
            }
            PASSWORD_ALGORITHM => {
                let mut it = PasswordAlgorithmsIter(value);
                let alg = it.next().ok_or(bad_len)?;
                if !it.0.is_empty() {
                    return Err(bad_len);
                }
                Attribute::PasswordAlgorithm(alg)
            }
            UNKNOWN_ATTRIBUTES => {
                if !value.len().is_multiple_of(2) {
                    return Err(bad_len);
                }
                Attribute::UnknownAttributes(UnknownAttributes(value))
            }
            ALTERNATE_SERVER => Attribute::AlternateServer(addr(false)?),
            CHANNEL_NUMBER => {
                exact(4)?;
                Attribute::ChannelNumber(u16_at(value, 0).ok_or(bad_len)?)
            }
            LIFETIME => Attribute::Lifetime(u32v()?),
            XOR_PEER_ADDRESS => Attribute::XorPeerAddress(addr(true)?),
            DATA => Attribute::Data(value),
            XOR_RELAYED_ADDRESS => Attribute::XorRelayedAddress(addr(true)?),
            REQUESTED_ADDRESS_FAMILY => Attribute::RequestedAddressFamily(family()?),
            ADDITIONAL_ADDRESS_FAMILY => Attribute::AdditionalAddressFamily(family()?),
            EVEN_PORT => {
                exact(1)?;
                Attribute::EvenPort {
                    reserve: u8_at(value, 0).ok_or(bad_len)? & 0x80 != 0,
                }
            }
            REQUESTED_TRANSPORT => {
                exact(4)?;
                Attribute::RequestedTransport(u8_at(value, 0).ok_or(bad_len)?)
            }
            DONT_FRAGMENT => {
                exact(0)?;
                Attribute::DontFragment
            }
            RESERVATION_TOKEN => {
                Attribute::ReservationToken(array_at::<8>(value, 0).filter(|_| value.len() == 8).ok_or(bad_len)?)
            }
            ADDRESS_ERROR_CODE => {
                let family = AddressFamily::from_byte(u8_at(value, 0).ok_or(bad_len)?).ok_or(bad_value)?;
                Attribute::AddressErrorCode {
                    family,
                    error: error_code_body(kind, value)?,
                }
            }
            ICMP => {
                exact(8)?;
                Attribute::Icmp {
                    icmp_type: u8_at(value, 2).ok_or(bad_len)?,
                    icmp_code: u8_at(value, 3).ok_or(bad_len)?,
                    error_data: u32_at(value, 4).ok_or(bad_len)?,
                }
            }
            CONNECTION_ID => Attribute::ConnectionId(u32v()?),
            CHANGE_REQUEST => {
                let flags = u32v()?;
                Attribute::ChangeRequest {
                    change_ip: flags & 0x4 != 0,
                    change_port: flags & 0x2 != 0,
                }
            }
            RESPONSE_ORIGIN => Attribute::ResponseOrigin(addr(false)?),
            OTHER_ADDRESS => Attribute::OtherAddress(addr(false)?),
            RESPONSE_PORT => {
                exact(4)?;
                Attribute::ResponsePort(u16_at(value, 0).ok_or(bad_len)?)
            }
            PADDING => Attribute::Padding(value),
            MOBILITY_TICKET => Attribute::MobilityTicket(value),
            PRIORITY => Attribute::Priority(u32v()?),
            USE_CANDIDATE => {
                exact(0)?;
                Attribute::UseCandidate
            }
            ICE_CONTROLLED => Attribute::IceControlled(u64v()?),
            ICE_CONTROLLING => Attribute::IceControlling(u64v()?),
            _ => Attribute::Other { kind, value },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: TransactionId = TransactionId([1; 12]);

    #[test]
    fn every_known_type_is_decoded_not_other() {
        // Feed each known type a value of plausible size; none may come back as Other.
        let samples: &[(u16, &[u8])] = &[
            (kind::USERNAME, b"bob"),
            (kind::LIFETIME, &[0, 0, 2, 88]),
            (kind::CHANNEL_NUMBER, &[0x40, 0, 0, 0]),
            (kind::EVEN_PORT, &[0x80]),
            (kind::REQUESTED_TRANSPORT, &[17, 0, 0, 0]),
            (kind::DONT_FRAGMENT, &[]),
            (kind::RESERVATION_TOKEN, &[1; 8]),
            (kind::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]),
            (kind::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]),
            (kind::ADDRESS_ERROR_CODE, &[2, 0, 4, 40, b'x']),
            (kind::ICMP, &[0, 0, 3, 1, 0, 0, 0, 0]),
            (kind::CONNECTION_ID, &[0, 0, 0, 9]),
            (kind::CHANGE_REQUEST, &[0, 0, 0, 6]),
            (kind::RESPONSE_PORT, &[0x12, 0x34, 0, 0]),
            (kind::ERROR_CODE, &[0, 0, 4, 1, b'U']),
            (kind::UNKNOWN_ATTRIBUTES, &[0, 0x2f, 0, 0x30]),
            (kind::PASSWORD_ALGORITHMS, &[0, 2, 0, 0, 0, 1, 0, 0]),
            (kind::PASSWORD_ALGORITHM, &[0, 2, 0, 0]),
            (kind::MESSAGE_INTEGRITY_SHA256, &[0; 16]),
            (kind::MOBILITY_TICKET, &[1, 2, 3]),
        ];
        for (k, v) in samples {
            assert!(kind::is_known(*k));
            let a = Attribute::decode(*k, v, &TID).unwrap();
            assert!(!matches!(a, Attribute::Other { .. }), "{k:#x} -> {a:?}");
        }
        assert_eq!(
            Attribute::decode(kind::ERROR_CODE, &[0, 0, 4, 1, b'U'], &TID).unwrap(),
            Attribute::ErrorCode(ErrorCode { code: 401, reason: "U" })
        );
        assert_eq!(
            Attribute::decode(kind::ICMP, &[0, 0, 3, 1, 0, 0, 5, 0xdc], &TID).unwrap(),
            Attribute::Icmp {
                icmp_type: 3,
                icmp_code: 1,
                error_data: 1500
            }
        );
    }

    #[test]
    fn bad_values_are_errors() {
        let e = |k, v: &[u8]| Attribute::decode(k, v, &TID).unwrap_err().reason;
        assert_eq!(e(kind::LIFETIME, &[0, 0, 1]), AttributeErrorReason::BadLength);
        assert_eq!(e(kind::USERNAME, &[0xff, 0xfe]), AttributeErrorReason::NotUtf8);
        assert_eq!(e(kind::USERNAME, &[b'a'; 509]), AttributeErrorReason::TooLong);
        assert_eq!(e(kind::REALM, &[b'a'; 763]), AttributeErrorReason::TooLong);
        assert_eq!(e(kind::ERROR_CODE, &[0, 0, 7, 0]), AttributeErrorReason::BadValue);
        assert_eq!(e(kind::ERROR_CODE, &[0, 0, 4, 100]), AttributeErrorReason::BadValue);
        assert_eq!(e(kind::ERROR_CODE, &[0, 0, 4]), AttributeErrorReason::BadLength);
        assert_eq!(
            e(kind::REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0]),
            AttributeErrorReason::BadValue
        );
        assert_eq!(
            e(kind::PASSWORD_ALGORITHMS, &[0, 1, 0, 4, 0]),
            AttributeErrorReason::BadLength
        );
        assert_eq!(
            e(kind::MESSAGE_INTEGRITY_SHA256, &[0; 12]),
            AttributeErrorReason::BadLength
        );
        assert_eq!(
            e(kind::MESSAGE_INTEGRITY_SHA256, &[0; 18]),
            AttributeErrorReason::BadLength
        );
        assert_eq!(e(kind::UNKNOWN_ATTRIBUTES, &[0, 1, 2]), AttributeErrorReason::BadLength);
        assert_eq!(e(kind::DONT_FRAGMENT, &[0]), AttributeErrorReason::BadLength);
    }

    #[test]
    fn password_algorithms_iterate_with_padding() {
        let v = [0, 1, 0, 1, 9, 0, 0, 0, 0, 2, 0, 0];
        let Attribute::PasswordAlgorithms(p) = Attribute::decode(kind::PASSWORD_ALGORITHMS, &v, &TID).unwrap() else {
            panic!()
        };
        let algs: Vec<_> = p.iter().collect();
        assert_eq!(algs.len(), 2);
        assert_eq!(
            algs[0],
            AlgorithmEntry {
                algorithm: 1,
                parameters: &[9]
            }
        );
        assert_eq!(
            algs[1],
            AlgorithmEntry {
                algorithm: 2,
                parameters: &[]
            }
        );
    }
}
