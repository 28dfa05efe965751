//! Hot-path codec benchmarks, with the same inputs through stun-rs for
//! comparison. Run: `cargo bench --bench codec`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use stun_rs::attributes::stun::{Fingerprint, MessageIntegrity, XorMappedAddress};
use stun_rs::attributes::turn::{LifeTime, XorRelayedAddress};
use stun_rs::{DecoderContextBuilder, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder};
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::channel_data::{self, ChannelData};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

const USER: &str = "1700000000:alice";
const REALM: &str = "example.org";
const PASSWORD: &str = "secret";

/// An Allocate request as a browser sends it on its second try.
fn allocate_request(key: &LongTermKey) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId([7; 12])).unwrap();
    w.requested_transport(17).unwrap();
    w.lifetime(600).unwrap();
    w.username(USER).unwrap();
    w.realm(REALM).unwrap();
    w.nonce("obMatJos2gAAAAAAAGVgYFpTvQ3W3y6uEdCQ8rgj3lnWa").unwrap();
    w.message_integrity(key.hmac_sha1()).unwrap();
    w.fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn bench(c: &mut Criterion) {
    let key = LongTermKey::derive(PasswordAlgorithm::Md5, USER, REALM, PASSWORD);
    let req = allocate_request(&key);
    let keyed = key.hmac_sha1();
    let rs_key = HMACKey::new_long_term(
        USER,
        REALM,
        PASSWORD,
        stun_rs::Algorithm::from(stun_rs::AlgorithmId::MD5),
    )
    .unwrap();

    let mut g = c.benchmark_group("parse_allocate");
    g.bench_function("turnstile", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).unwrap();
            black_box((
                m.username().unwrap(),
                m.realm().unwrap(),
                m.nonce().unwrap(),
                m.requested_transport().unwrap(),
                m.lifetime().unwrap(),
            ));
            black_box(m.verify_fingerprint().is_ok())
        })
    });
    let rs_plain = MessageDecoderBuilder::default().build();
    g.bench_function("stun-rs", |b| {
        b.iter(|| black_box(rs_plain.decode(black_box(&req)).unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("parse_verify_allocate");
    g.bench_function("turnstile", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).unwrap();
            black_box((
                m.username().unwrap(),
                m.realm().unwrap(),
                m.nonce().unwrap(),
                m.requested_transport().unwrap(),
                m.lifetime().unwrap(),
            ));
            black_box(m.verify_fingerprint().is_ok() && m.verify_integrity_with(keyed.clone()).is_ok())
        })
    });
    let ctx = DecoderContextBuilder::default()
        .with_key(rs_key.clone())
        .with_validation()
        .build();
    let rs_verify = MessageDecoderBuilder::default().with_context(ctx).build();
    g.bench_function("stun-rs", |b| {
        b.iter(|| black_box(rs_verify.decode(black_box(&req)).unwrap()))
    });
    g.finish();

    let m = Message::parse(&req).unwrap();
    c.bench_function("verify_message_integrity/turnstile", |b| {
        b.iter(|| black_box(m.verify_integrity_with(black_box(&keyed).clone()).is_ok()))
    });

    let mut cd = channel_data::header(0x4001, 100).to_vec();
    cd.resize(104, 0xab);
    c.bench_function("channel_data_parse/turnstile", |b| {
        b.iter(|| {
            let p = ChannelData::parse(black_box(&cd)).unwrap();
            black_box((p.channel, p.data.len()))
        })
    });

    let relayed: SocketAddr = "203.0.113.7:49152".parse().unwrap();
    let mapped: SocketAddr = "198.51.100.20:53211".parse().unwrap();
    let mut g = c.benchmark_group("encode_allocate_success");
    let mut out = [0u8; 512];
    g.bench_function("turnstile", |b| {
        b.iter(|| {
            let mut w = MessageWriter::new(&mut out, Class::Success, Method::ALLOCATE, TransactionId([7; 12])).unwrap();
            w.xor_relayed_address(black_box(&relayed)).unwrap();
            w.lifetime(600).unwrap();
            w.xor_mapped_address(black_box(&mapped)).unwrap();
            w.message_integrity(keyed.clone()).unwrap();
            w.fingerprint().unwrap();
            black_box(w.finish())
        })
    });
    let encoder = MessageEncoderBuilder::default().build();
    g.bench_function("stun-rs", |b| {
        b.iter(|| {
            let msg = stun_rs::StunMessageBuilder::new(stun_rs::methods::ALLOCATE, MessageClass::SuccessResponse)
                .with_transaction_id(stun_rs::TransactionId::from([7u8; 12]))
                .with_attribute(XorRelayedAddress::from(relayed))
                .with_attribute(LifeTime::new(600))
                .with_attribute(XorMappedAddress::from(mapped))
                .with_attribute(MessageIntegrity::new(rs_key.clone()))
                .with_attribute(Fingerprint::default())
                .build();
            black_box(encoder.encode(&mut out, &msg).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
