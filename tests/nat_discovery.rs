//! RFC 5780 NAT behaviour discovery against the real binary: coturn's
//! `turnutils_natdiscovery` classifies loopback (no NAT) as endpoint-
//! independent mapping and filtering and sees the other address; each
//! CHANGE-REQUEST is answered from the right address and port; off (the
//! default), Binding carries no OTHER-ADDRESS and CHANGE-REQUEST gets 420.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{TestServer, free_port_pair as free_pair, loopback_config, rfc5780_config as config, udp_client};
use turnstile::proto::stun::{Attribute, Class, Message, MessageWriter, Method, TransactionId, kind};

fn binding(tid: u8, change: Option<(bool, bool)>) -> Vec<u8> {
    let mut buf = [0u8; 128];
    let mut w = MessageWriter::new(&mut buf, Class::Request, Method::BINDING, TransactionId([tid; 12])).unwrap();
    if let Some((ip, port)) = change {
        w.change_request(ip, port).unwrap();
    }
    w.fingerprint().unwrap();
    let n = w.finish();
    buf[..n].to_vec()
}

fn address(m: &Message<'_>, k: u16) -> Option<SocketAddr> {
    match m.get(k).unwrap() {
        Some(Attribute::ResponseOrigin(a) | Attribute::OtherAddress(a)) => Some(a),
        _ => None,
    }
}

#[test]
fn turnutils_natdiscovery_sees_endpoint_independent_mapping_and_filtering_and_the_other_address() {
    let port = free_pair();
    let _server = TestServer::start(&config(port, true));
    let out = Command::new("timeout")
        .args([
            "30",
            "turnutils_natdiscovery",
            "-m",
            "-f",
            "-p",
            &port.to_string(),
            "127.0.0.1",
        ])
        .output()
        .expect("turnutils_natdiscovery (Debian package coturn)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("NAT with Endpoint Independent Mapping"), "{text}");
    assert!(text.contains("NAT with Endpoint Independent Filtering"), "{text}");
    assert!(
        text.contains(&format!("Other addr: : 127.0.0.2:{}", port + 1)),
        "{text}"
    );
    // With padding (fragmentation tests) too.
    let out = Command::new("timeout")
        .args([
            "30",
            "turnutils_natdiscovery",
            "-f",
            "-P",
            "-p",
            &port.to_string(),
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("NAT with Endpoint Independent Filtering"), "{text}");
}

#[test]
fn each_change_request_comes_back_from_the_right_address_and_port() {
    let port = free_pair();
    let server = TestServer::start(&config(port, true));
    let client = udp_client();
    let a = server.udp[0];
    let other = |ip: &str, p: u16| -> SocketAddr { format!("{ip}:{p}").parse().unwrap() };
    for (tid, change, from) in [
        (1, None, a),
        (2, Some((true, false)), other("127.0.0.2", port)),
        (3, Some((false, true)), other("127.0.0.1", port + 1)),
        (4, Some((true, true)), other("127.0.0.2", port + 1)),
    ] {
        client.send_to(&binding(tid, change), a).unwrap();
        let mut buf = [0u8; 1500];
        let (n, src) = client.recv_from(&mut buf).unwrap();
        assert_eq!(src, from, "{change:?}");
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.transaction_id(), &TransactionId([tid; 12]));
        assert_eq!(address(&m, kind::RESPONSE_ORIGIN), Some(from));
        assert_eq!(address(&m, kind::OTHER_ADDRESS), Some(other("127.0.0.2", port + 1)));
        assert_eq!(m.xor_mapped_address().unwrap(), Some(client.local_addr().unwrap()));
    }
    // A request to the other address is answered there, naming the first.
    client.send_to(&binding(5, None), other("127.0.0.2", port + 1)).unwrap();
    let mut buf = [0u8; 1500];
    let (n, src) = client.recv_from(&mut buf).unwrap();
    assert_eq!(src, other("127.0.0.2", port + 1));
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(address(&m, kind::OTHER_ADDRESS), Some(a));
}

#[test]
fn off_by_default_binding_has_no_other_address_and_change_request_is_420() {
    let server = TestServer::start(&loopback_config(""));
    let client = udp_client();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.send_to(&binding(1, None), server.udp[0]).unwrap();
    let mut buf = [0u8; 1500];
    let n = client.recv(&mut buf).unwrap();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert!(m.find(kind::OTHER_ADDRESS).is_none() && m.find(kind::RESPONSE_ORIGIN).is_none());
    client.send_to(&binding(2, Some((true, true))), server.udp[0]).unwrap();
    let n = client.recv(&mut buf).unwrap();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 420);
    // And a configuration asking for it names what is missing.
    let port = free_pair();
    let server = TestServer::start(&config(port, false));
    client.send_to(&binding(3, Some((true, false))), server.udp[0]).unwrap();
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(
        Message::parse(&buf[..n]).unwrap().error_code().unwrap().unwrap().code,
        420
    );
}
