//! The peer policy over any address: an address and its canonical form
//! (IPv4 unwrapped from mapped, compatible, 6to4, NAT64 and Teredo forms)
//! are judged alike, canonicalising is idempotent, and no special-purpose
//! IPv4 address is let through in any wrapping.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use turnstile::proto::server::{OwnRelays, PeerPolicy, peer_policy::canonical};

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..16) else {
        return;
    };
    let octets: [u8; 16] = bytes.try_into().unwrap();
    let policy = PeerPolicy::new(Vec::new(), Vec::new(), OwnRelays::default());
    for ip in [
        IpAddr::V6(Ipv6Addr::from(octets)),
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
    ] {
        let c = canonical(ip);
        assert_eq!(canonical(c), c, "canonical form of {ip} is stable");
        assert_eq!(
            policy.check_ip(ip).is_ok(),
            policy.check_ip(c).is_ok(),
            "{ip} and its canonical {c} judged alike"
        );
        if let IpAddr::V4(v4) = c {
            if v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() {
                assert!(policy.check_ip(ip).is_err(), "{ip} ({c}) let through");
            }
        }
    }
});
