//! Property tests: hostile bytes never panic anything that reads network
//! input, and RFC 8489 attribute-ordering rules hold.

use std::net::SocketAddr;

use proptest::prelude::*;
use turnstile::proto::auth::{NonceBinding, NonceKey, NonceScope, RestUsername};
use turnstile::proto::channel_data::ChannelData;
use turnstile::proto::framer::StreamFramer;

use turnstile::proto::stun::{Class, Message, MessageWriter, Method, ParseError, TransactionId, integrity, kind};
use turnstile::testing::Harness;

/// Exercises every reader on `bytes`; the test passes if nothing panics.
fn read_everything(bytes: &[u8]) {
    if let Ok(m) = Message::parse(bytes) {
        for a in m.attributes() {
            let _ = a;
        }
        let _ = m.username();
        let _ = m.realm();
        let _ = m.nonce();
        let _ = m.software();
        let _ = m.data();
        let _ = m.error_code();
        let _ = m.userhash();
        let _ = m.lifetime();
        let _ = m.xor_mapped_address();
        let _ = m.xor_peer_addresses().count();
        let _ = m.verify_integrity(b"key");
        let _ = m.verify_integrity_sha256(b"key");
        let _ = m.verify_fingerprint();
        let _ = m.unknown_comprehension_required();
    }
    let _ = ChannelData::parse(bytes);
    let _ = StreamFramer::default().next_frame(bytes);
    let text = String::from_utf8_lossy(bytes);
    let client: SocketAddr = "192.0.2.1:1000".parse().unwrap();
    let scope = NonceScope { client, listener: 0 };
    let _ = NonceKey::new(&[0; 32]).validate(&text, 1000, &scope, NonceBinding::FiveTuple, 600);
    let _ = RestUsername::parse(&text);
    let _ = Harness::new().send(bytes);
}

fn valid_message() -> Vec<u8> {
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId([5; 12])).unwrap();
    w.username("user").unwrap();
    w.realm("realm").unwrap();
    w.nonce("nonce").unwrap();
    w.requested_transport(17).unwrap();
    w.xor_peer_address(&"[2001:db8::1]:9".parse().unwrap()).unwrap();
    w.lifetime(600).unwrap();
    w.message_integrity(integrity::hmac_sha1(b"key")).unwrap();
    w.message_integrity_sha256(integrity::hmac_sha256(b"key")).unwrap();
    w.fingerprint().unwrap();
    let n = w.finish();
    buf[..n].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        read_everything(&bytes);
    }

    #[test]
    fn stun_shaped_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..400), t in 0u16..0x3FFF) {
        // A valid header in front of random attribute bytes reaches the TLV walk.
        let mut m = t.to_be_bytes().to_vec();
        m.extend_from_slice(&((body.len() & !3) as u16).to_be_bytes());
        m.extend_from_slice(&0x2112A442u32.to_be_bytes());
        m.extend_from_slice(&[1; 12]);
        m.extend_from_slice(&body[..body.len() & !3]);
        read_everything(&m);
    }

    #[test]
    fn mutated_valid_messages_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut m = valid_message();
        for (at, x) in flips {
            let i = at % m.len();
            m[i] ^= x;
        }
        let cut = cut % (m.len() + 1);
        read_everything(&m);
        read_everything(&m[..cut]);
    }

    #[test]
    fn writer_output_always_parses_and_verifies(
        user in "[ -~]{0,100}", data in prop::collection::vec(any::<u8>(), 0..1200), key in prop::collection::vec(any::<u8>(), 0..64)
    ) {
        let mut buf = vec![0u8; 2048];
        let mut w = MessageWriter::new(&mut buf, Class::Indication, Method::SEND, TransactionId([9; 12])).unwrap();
        w.username(&user).unwrap();
        w.data(&data).unwrap();
        w.message_integrity(integrity::hmac_sha1(&key)).unwrap();
        w.fingerprint().unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(m.username().unwrap(), Some(user.as_str()));
        prop_assert_eq!(m.data().unwrap(), Some(data.as_slice()));
        prop_assert!(m.verify_integrity(&key).is_ok());
        prop_assert!(m.verify_fingerprint().is_ok());
    }
}

#[test]
fn attributes_after_integrity_are_ignored_except_sha256_and_fingerprint() {
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([1; 12])).unwrap();
    w.username("before").unwrap();
    w.message_integrity(integrity::hmac_sha1(b"k")).unwrap();
    w.realm("after-mi").unwrap();
    w.attribute(0x7001, b"unknown-after-mi").unwrap();
    w.message_integrity_sha256(integrity::hmac_sha256(b"k")).unwrap();
    w.fingerprint().unwrap();
    let n = w.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.username().unwrap(), Some("before"));
    assert_eq!(
        m.realm().unwrap(),
        None,
        "REALM after MESSAGE-INTEGRITY must be ignored"
    );
    assert!(
        m.unknown_comprehension_required().is_empty(),
        "ignored attributes are not reported"
    );
    let kinds: Vec<u16> = m.raw_attributes().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        vec![
            kind::USERNAME,
            kind::MESSAGE_INTEGRITY,
            kind::MESSAGE_INTEGRITY_SHA256,
            kind::FINGERPRINT
        ]
    );
    assert!(m.verify_integrity(b"k").is_ok());
    assert!(m.verify_integrity_sha256(b"k").is_ok());
    assert!(m.verify_fingerprint().is_ok());
}

#[test]
fn nothing_may_follow_fingerprint() {
    let mut buf = [0u8; 128];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([1; 12])).unwrap();
    w.fingerprint().unwrap();
    w.software("late").unwrap();
    let n = w.finish();
    assert_eq!(
        Message::parse(&buf[..n]).unwrap_err(),
        ParseError::AttributeAfterFingerprint
    );
}

#[test]
fn unknown_comprehension_required_is_reported_optional_is_not() {
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId([1; 12])).unwrap();
    w.attribute(0x7ff0, b"a").unwrap();
    w.attribute(0xfff0, b"b").unwrap();
    w.attribute(0x0002, b"").unwrap(); // RESPONSE-ADDRESS, RFC 3489 only: unknown here
    let n = w.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.unknown_comprehension_required(), &[0x7ff0, 0x0002]);
}
