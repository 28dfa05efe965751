//! Differential tests against the `stun-rs` crate as an independent oracle:
//! what we write decodes the same there (with integrity and fingerprint
//! checked), and what it writes decodes the same here. stun-rs is lenient, so
//! this only runs with well-formed messages; rejection is tested elsewhere.

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;
use stun_rs::attributes::stun::{
    ErrorCode as RsErrorCode, Fingerprint, MessageIntegrity, Nonce, Realm, Software, UserName, XorMappedAddress,
};
use stun_rs::attributes::turn::{ChannelNumber, Data, LifeTime, RequestedTrasport, XorPeerAddress};
use stun_rs::{
    DecoderContextBuilder, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder,
};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId, integrity};

#[derive(Debug, Clone)]
struct Fields {
    tid: [u8; 12],
    username: String,
    realm: String,
    nonce: String,
    software: String,
    lifetime: u32,
    channel: u16,
    peers: Vec<SocketAddr>,
    mapped: SocketAddr,
    data: Vec<u8>,
    error: (u16, String),
    password: String,
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    (
        any::<[u8; 12]>(),
        "[a-z0-9@.:]{1,60}",
        "[a-z0-9.]{1,40}",
        "[A-Za-z0-9/+]{1,60}",
        "[A-Za-z0-9 .]{1,60}",
        any::<u32>(),
        0x4000u16..=0x4FFF,
        prop::collection::vec(addr(), 1..4),
        addr(),
        prop::collection::vec(any::<u8>(), 0..300),
        (300u16..700, "[A-Za-z ]{0,40}"),
        "[A-Za-z0-9]{1,30}",
    )
        .prop_map(
            |(tid, username, realm, nonce, software, lifetime, channel, peers, mapped, data, error, password)| Fields {
                tid,
                username,
                realm,
                nonce,
                software,
                lifetime,
                channel,
                peers,
                mapped,
                data,
                error,
                password,
            },
        )
}

fn ours(f: &Fields) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId(f.tid)).unwrap();
    w.username(&f.username).unwrap();
    w.realm(&f.realm).unwrap();
    w.nonce(&f.nonce).unwrap();
    w.software(&f.software).unwrap();
    w.lifetime(f.lifetime).unwrap();
    w.channel_number(f.channel).unwrap();
    for p in &f.peers {
        w.xor_peer_address(p).unwrap();
    }
    w.xor_mapped_address(&f.mapped).unwrap();
    w.data(&f.data).unwrap();
    w.requested_transport(17).unwrap();
    w.error_code(f.error.0, &f.error.1).unwrap();
    w.message_integrity(integrity::hmac_sha1(f.password.as_bytes()))
        .unwrap();
    w.fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn theirs(f: &Fields) -> Vec<u8> {
    let key = HMACKey::new_short_term(&f.password).unwrap();
    let mut b = StunMessageBuilder::new(stun_rs::methods::ALLOCATE, MessageClass::Request)
        .with_transaction_id(stun_rs::TransactionId::from(f.tid))
        .with_attribute(UserName::new(&f.username).unwrap())
        .with_attribute(Realm::new(&f.realm).unwrap())
        .with_attribute(Nonce::new(&f.nonce).unwrap())
        .with_attribute(Software::new(&f.software).unwrap())
        .with_attribute(LifeTime::new(f.lifetime))
        .with_attribute(ChannelNumber::new(f.channel));
    for p in &f.peers {
        b = b.with_attribute(XorPeerAddress::from(*p));
    }
    let msg = b
        .with_attribute(XorMappedAddress::from(f.mapped))
        .with_attribute(Data::new(f.data.clone()))
        .with_attribute(RequestedTrasport::new(stun_rs::protocols::UDP))
        .with_attribute(RsErrorCode::new(
            stun_rs::ErrorCode::new(f.error.0, &f.error.1).unwrap(),
        ))
        .with_attribute(MessageIntegrity::new(key))
        .with_attribute(Fingerprint::default())
        .build();
    let mut buf = vec![0u8; 2048];
    let n = MessageEncoderBuilder::default().build().encode(&mut buf, &msg).unwrap();
    buf.truncate(n);
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn what_we_write_stun_rs_reads_and_verifies(f in fields()) {
        let bytes = ours(&f);
        let ctx = DecoderContextBuilder::default()
            .with_key(HMACKey::new_short_term(&f.password).unwrap())
            .with_validation()
            .build();
        let (msg, used) = MessageDecoderBuilder::default().with_context(ctx).build().decode(&bytes)
            .map_err(|e| TestCaseError::fail(format!("stun-rs refused our message: {e:?}")))?;
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(msg.transaction_id().as_bytes(), &f.tid);
        prop_assert_eq!(msg.get::<UserName>().unwrap().as_user_name().unwrap().as_str(), f.username.as_str());
        prop_assert_eq!(msg.get::<Realm>().unwrap().as_realm().unwrap().as_str(), f.realm.as_str());
        prop_assert_eq!(msg.get::<Nonce>().unwrap().as_nonce().unwrap().as_str(), f.nonce.as_str());
        prop_assert_eq!(msg.get::<Software>().unwrap().as_software().unwrap().as_str(), f.software.as_str());
        prop_assert_eq!(msg.get::<LifeTime>().unwrap().as_life_time().unwrap().as_u32(), f.lifetime);
        prop_assert_eq!(msg.get::<ChannelNumber>().unwrap().as_channel_number().unwrap().number(), f.channel);
        let peers: Vec<SocketAddr> = msg.attributes().iter()
            .filter_map(|a| a.as_xor_peer_address().ok().map(|p| *p.socket_address()))
            .collect();
        prop_assert_eq!(peers, f.peers.clone());
        prop_assert_eq!(*msg.get::<XorMappedAddress>().unwrap().as_xor_mapped_address().unwrap().socket_address(), f.mapped);
        prop_assert_eq!(msg.get::<Data>().unwrap().as_data().unwrap().as_bytes(), f.data.as_slice());
        let e = msg.get::<RsErrorCode>().unwrap().as_error_code().unwrap().error_code().clone();
        prop_assert_eq!((e.error_code(), e.reason()), (f.error.0, f.error.1.as_str()));
    }

    #[test]
    fn what_stun_rs_writes_we_read_and_verify(f in fields()) {
        let bytes = theirs(&f);
        let m = Message::parse(&bytes).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(m.transaction_id(), &TransactionId(f.tid));
        prop_assert_eq!((m.class(), m.method()), (Class::Request, Method::ALLOCATE));
        prop_assert!(m.verify_integrity(f.password.as_bytes()).is_ok());
        prop_assert!(m.verify_integrity(b"not the password").is_err());
        prop_assert!(m.verify_fingerprint().is_ok());
        prop_assert_eq!(m.username().unwrap(), Some(f.username.as_str()));
        prop_assert_eq!(m.realm().unwrap(), Some(f.realm.as_str()));
        prop_assert_eq!(m.nonce().unwrap(), Some(f.nonce.as_str()));
        prop_assert_eq!(m.software().unwrap(), Some(f.software.as_str()));
        prop_assert_eq!(m.lifetime().unwrap(), Some(f.lifetime));
        prop_assert_eq!(m.channel_number().unwrap(), Some(f.channel));
        prop_assert_eq!(m.requested_transport().unwrap(), Some(17));
        let peers: Vec<SocketAddr> = m.xor_peer_addresses().map(|p| p.unwrap()).collect();
        prop_assert_eq!(peers, f.peers.clone());
        prop_assert_eq!(m.xor_mapped_address().unwrap(), Some(f.mapped));
        prop_assert_eq!(m.data().unwrap(), Some(f.data.as_slice()));
        let e = m.error_code().unwrap().unwrap();
        prop_assert_eq!((e.code, e.reason), (f.error.0, f.error.1.as_str()));
        prop_assert!(m.unknown_comprehension_required().is_empty());
    }

    #[test]
    fn both_encoders_agree_byte_for_byte(f in fields()) {
        prop_assert_eq!(ours(&f), theirs(&f));
    }
}
