//! Which peer addresses an allocation may talk to.
//!
//! A TURN server is an open proxy for its users; left unchecked it relays
//! into the operator's own networks (loopback, cloud metadata at
//! 169.254.169.254, RFC 1918 ranges). Every peer address is canonicalised
//! first — every way of writing an IPv4 address inside IPv6 is unwrapped — and
//! then refused by default when it is in a special-purpose range. Operators
//! open ranges with `[peers] allow` (allow wins) and close more with `deny`.
//!
//! One exception holds whatever the ranges: a peer that is this server's own
//! relay address with a port in its relay range is another allocation on
//! this server (two WebRTC clients both on relay candidates) and is allowed.
//! Any other port on the server's own addresses is refused unless the
//! operator allowed that address explicitly, and the server's own service
//! sockets (listeners, metrics) are refused always.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Why a peer address is refused (403 Forbidden).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    /// In a range denied by default (loopback, private, link-local, …).
    SpecialPurpose,
    /// In a range the operator listed under `[peers] deny`.
    OperatorDenied,
    /// A port on one of this server's own addresses outside the relay range.
    ServerOwnPort,
}

impl PeerRefusal {
    pub const fn label(self) -> &'static str {
        match self {
            PeerRefusal::SpecialPurpose => "special_purpose",
            PeerRefusal::OperatorDenied => "operator_denied",
            PeerRefusal::ServerOwnPort => "server_own_port",
        }
    }
}

/// The IPv6 forms that carry an IPv4 address, each with an example that
/// embeds 192.0.2.33 (c000:221). [`canonical`] unwraps every one but the
/// local-use NAT64 prefix, whose embedding depends on a prefix length only
/// the local translator knows: that whole /48 is refused instead, and so is
/// an ISATAP interface identifier around a refused IPv4 address.
pub const IPV4_EMBEDDINGS: &[(&str, &str)] = &[
    ("IPv4-mapped ::ffff:0:0/96", "::ffff:192.0.2.33"),
    ("IPv4-translated (SIIT) ::ffff:0:0:0/96", "::ffff:0:c000:221"),
    ("IPv4-compatible ::/96", "::c000:221"),
    ("NAT64 well-known 64:ff9b::/96", "64:ff9b::c000:221"),
    ("NAT64 local-use 64:ff9b:1::/48", "64:ff9b:1::c000:221"),
    ("6to4 2002::/16", "2002:c000:221::1"),
    (
        "Teredo 2001::/32 (client, inverted)",
        "2001:0:4136:e378:8000:63bf:3fff:fdde",
    ),
    ("ISATAP ::0:5efe:0:0/96 interface id", "2001:db9::5efe:c000:221"),
    ("ISATAP ::200:5efe:0:0/96 interface id", "2001:db9::200:5efe:c000:221"),
];

/// Unwraps IPv4 addresses carried inside IPv6: IPv4-mapped (::ffff:0:0/96),
/// IPv4-translated (::ffff:0:0:0/96, SIIT), IPv4-compatible (::/96,
/// deprecated but routable on some stacks), 6to4 (2002::/16), NAT64
/// (64:ff9b::/96) and Teredo (2001::/32, client address obfuscated). Others
/// are returned as is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let s = v6.segments();
    let o = v6.octets();
    let v4 = |a: u8, b: u8, c: u8, d: u8| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    match s {
        // ::ffff:a.b.c.d
        [0, 0, 0, 0, 0, 0xffff, _, _] => v4(o[12], o[13], o[14], o[15]),
        // ::ffff:0:a.b.c.d (RFC 2765 SIIT): a translator delivers it to a.b.c.d
        [0, 0, 0, 0, 0xffff, 0, _, _] => v4(o[12], o[13], o[14], o[15]),
        // ::a.b.c.d, but not :: and ::1, which are IPv6's own unspecified and loopback
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => v4(o[12], o[13], o[14], o[15]),
        // 64:ff9b::a.b.c.d (well-known NAT64 prefix)
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => v4(o[12], o[13], o[14], o[15]),
        // 2002:AABB:CCDD::/48 (6to4)
        [0x2002, ..] => v4(o[2], o[3], o[4], o[5]),
        // 2001:0000::/32 Teredo: client IPv4 is the last 32 bits inverted
        [0x2001, 0, ..] => v4(!o[12], !o[13], !o[14], !o[15]),
        _ => ip,
    }
}

/// Ranges refused unless the operator allows them: not globally routable, or
/// pointing back into the server's own host or network.
fn special_purpose(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [b0, b1, b2, _] = a.octets();
            a.is_unspecified()
                || b0 == 0                                   // 0.0.0.0/8 "this network"
                || a.is_loopback()                           // 127.0.0.0/8
                || a.is_private()                            // 10/8, 172.16/12, 192.168/16
                || a.is_link_local()                         // 169.254/16 (cloud metadata)
                || (b0 == 100 && (b1 & 0xc0) == 64)          // 100.64.0.0/10 CGNAT
                || (b0 == 192 && b1 == 0 && b2 == 0)         // 192.0.0.0/24 IETF protocol assignments
                || a.is_documentation()                      // 192.0.2/24, 198.51.100/24, 203.0.113/24
                || (b0 == 198 && (b1 & 0xfe) == 18)          // 198.18.0.0/15 benchmarking
                || (b0 == 192 && b1 == 88 && b2 == 99)       // 192.88.99.0/24 6to4 relay anycast
                || a.is_multicast()                          // 224/4
                || b0 >= 240 // 240/4 reserved, incl. 255.255.255.255 broadcast
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()                          // ff00::/8
                || (s[0] & 0xfe00) == 0xfc00                 // fc00::/7 unique local
                || (s[0] & 0xffc0) == 0xfe80                 // fe80::/10 link-local
                || (s[0] & 0xffc0) == 0xfec0                 // fec0::/10 site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8)        // 2001:db8::/32 documentation
                || (s[0] == 0x3fff && s[1] < 0x1000)         // 3fff::/20 documentation
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])  // 100::/64 discard-only
                || (s[0] == 0x2001 && s[1] < 0x0200)         // 2001::/23 IETF protocol assignments
                || s[..6] == [0, 0, 0, 0, 0, 0xffff]         // mapped (only reached if not unwrapped)
                || s[..3] == [0x64, 0xff9b, 1]               // 64:ff9b:1::/48 local-use NAT64 (RFC 8215)
                || isatap_v4(&s).is_some_and(|v4| special_purpose(IpAddr::V4(v4)))
                || (s[0] == 0x5f00) // 5f00::/16 SRv6 SIDs
        }
    }
}

/// The IPv4 address in an ISATAP interface identifier (RFC 5214:
/// `::0:5efe:a.b.c.d`, or `::200:5efe:a.b.c.d` for a global IPv4 address).
fn isatap_v4(s: &[u16; 8]) -> Option<Ipv4Addr> {
    match s {
        [_, _, _, _, 0 | 0x0200, 0x5efe, hi, lo] => Some(Ipv4Addr::from((u32::from(*hi) << 16) | u32::from(*lo))),
        _ => None,
    }
}

/// The relay addresses and port range that identify "another allocation on
/// this server".
#[derive(Debug, Clone, Default)]
pub struct OwnRelays {
    /// Addresses relay sockets bind to and addresses advertised to clients.
    pub addresses: Vec<IpAddr>,
    pub port_low: u16,
    pub port_high: u16,
    /// The server's own service sockets (listeners, metrics). An unspecified
    /// address stands for every local address.
    pub services: Vec<SocketAddr>,
}

/// The decision procedure for peer addresses.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    own: OwnRelays,
}

impl PeerPolicy {
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>, own: OwnRelays) -> PeerPolicy {
        PeerPolicy { allow, deny, own }
    }

    /// Decides whether `peer` may be a permission, channel or Send target.
    /// The port matters only for the server's own addresses.
    pub fn check(&self, peer: &SocketAddr) -> Result<(), PeerRefusal> {
        let ip = canonical(peer.ip());
        let own = self.is_own(ip);
        if self.is_service(ip, own, peer.port()) {
            return Err(PeerRefusal::ServerOwnPort);
        }
        if own {
            return if (self.own.port_low..=self.own.port_high).contains(&peer.port())
                || self.allow.iter().any(|n| n.contains(&ip))
            {
                Ok(())
            } else {
                Err(PeerRefusal::ServerOwnPort)
            };
        }
        self.check_ip(ip)
    }

    fn is_service(&self, ip: IpAddr, own: bool, port: u16) -> bool {
        self.own.services.iter().any(|s| {
            s.port() == port && (canonical(s.ip()) == ip || (s.ip().is_unspecified() && (own || ip.is_loopback())))
        })
    }

    /// Decides for an address alone (CreatePermission installs per IP).
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), PeerRefusal> {
        let ip = canonical(ip);
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(PeerRefusal::OperatorDenied);
        }
        if special_purpose(ip) {
            return Err(PeerRefusal::SpecialPurpose);
        }
        Ok(())
    }

    /// Whether a permission for `ip` is acceptable: an ordinary allowed address,
    /// or one of the server's own relay addresses (the port is checked per packet).
    pub fn check_permission(&self, ip: IpAddr) -> Result<(), PeerRefusal> {
        let ip = canonical(ip);
        if self.is_own(ip) { Ok(()) } else { self.check_ip(ip) }
    }

    fn is_own(&self, ip: IpAddr) -> bool {
        self.own.addresses.iter().any(|a| canonical(*a) == ip)
    }
}

/// IPv6 helper for tests and callers that build addresses from segments.
pub fn v6(segments: [u16; 8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PeerPolicy {
        PeerPolicy::new(
            vec![],
            vec!["203.0.113.128/25".parse().unwrap()],
            OwnRelays {
                addresses: vec!["198.51.100.10".parse().unwrap()],
                port_low: 49152,
                port_high: 65535,
                services: vec!["0.0.0.0:3478".parse().unwrap(), "127.0.0.1:9641".parse().unwrap()],
            },
        )
    }

    fn refused(p: &PeerPolicy, a: &str) -> bool {
        let ip: IpAddr = a.parse().unwrap();
        p.check(&SocketAddr::new(ip, 5000)).is_err()
    }

    #[test]
    fn every_bypass_encoding_is_refused_by_default() {
        let p = policy();
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "::10.0.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::7f00:1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo for 127.0.0.1
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "2001:db8::1",
            "fec0::1",
        ] {
            assert!(refused(&p, a), "{a} must be refused");
        }
    }

    #[test]
    fn public_addresses_pass() {
        let p = policy();
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!refused(&p, a), "{a} must pass");
        }
    }

    #[test]
    fn operator_deny_and_allow() {
        let p = policy();
        assert_eq!(
            p.check(&"203.0.113.200:1".parse().unwrap()),
            Err(PeerRefusal::OperatorDenied),
            "deny list applies"
        );
        let p = PeerPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap(), "203.0.113.200/32".parse().unwrap()],
            vec!["203.0.113.128/25".parse().unwrap()],
            OwnRelays::default(),
        );
        assert!(p.check(&"127.0.0.1:9".parse().unwrap()).is_ok());
        assert!(
            p.check(&"[::ffff:127.0.0.1]:9".parse().unwrap()).is_ok(),
            "allow applies to canonical form"
        );
        assert!(
            p.check(&"203.0.113.200:9".parse().unwrap()).is_ok(),
            "allow wins over deny"
        );
        assert!(p.check(&"10.0.0.1:9".parse().unwrap()).is_err());
    }

    #[test]
    fn own_relay_addresses_only_in_the_relay_range() {
        let p = policy();
        assert!(p.check(&"198.51.100.10:50000".parse().unwrap()).is_ok());
        assert!(p.check(&"[::ffff:198.51.100.10]:50000".parse().unwrap()).is_ok());
        assert_eq!(
            p.check(&"198.51.100.10:3478".parse().unwrap()),
            Err(PeerRefusal::ServerOwnPort)
        );
        assert_eq!(
            p.check(&"198.51.100.10:9641".parse().unwrap()),
            Err(PeerRefusal::ServerOwnPort)
        );
        // The exception holds even when the relay address is loopback.
        let own = OwnRelays {
            addresses: vec!["127.0.0.1".parse().unwrap()],
            port_low: 50000,
            port_high: 50100,
            services: vec!["127.0.0.1:3478".parse().unwrap()],
        };
        let lo = PeerPolicy::new(vec![], vec![], own.clone());
        assert!(lo.check(&"127.0.0.1:50050".parse().unwrap()).is_ok());
        assert!(lo.check(&"127.0.0.1:3478".parse().unwrap()).is_err());
        assert!(lo.check(&"127.0.0.1:3480".parse().unwrap()).is_err());
        assert!(lo.check(&"127.0.0.2:50050".parse().unwrap()).is_err());
        assert!(lo.check_permission("127.0.0.1".parse().unwrap()).is_ok());
        // An operator who allows loopback reaches other loopback ports, never the listeners.
        let allowed = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], own);
        assert!(allowed.check(&"127.0.0.1:3480".parse().unwrap()).is_ok());
        assert_eq!(
            allowed.check(&"127.0.0.1:3478".parse().unwrap()),
            Err(PeerRefusal::ServerOwnPort)
        );
        // Unspecified listener addresses cover every local address.
        let p = policy();
        assert_eq!(
            p.check(&"198.51.100.10:3478".parse().unwrap()),
            Err(PeerRefusal::ServerOwnPort)
        );
    }

    /// Every IPv4-embedding form, around every kind of address that must
    /// stay unreachable, is refused; around a public address the unwrapped
    /// forms pass and the local-use NAT64 prefix does not.
    #[test]
    fn every_ipv4_embedding_of_a_refused_address_is_refused() {
        let p = policy();
        let embed = |example: &str, v4: Ipv4Addr| -> IpAddr {
            let IpAddr::V6(e) = example.parse::<IpAddr>().unwrap() else {
                panic!()
            };
            let mut o = e.octets();
            if example.starts_with("2001:0:") {
                // Teredo stores the client address inverted.
                o[12..].copy_from_slice(&(!u32::from(v4)).to_be_bytes());
            } else if example.starts_with("2002:") {
                o[2..6].copy_from_slice(&v4.octets());
            } else {
                o[12..].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        };
        for (form, example) in IPV4_EMBEDDINGS {
            // The example itself embeds 192.0.2.33 (documentation: refused).
            assert!(refused(&p, example), "{form}: {example}");
            for inner in [
                "127.0.0.1",
                "169.254.169.254",
                "10.0.0.1",
                "172.16.0.1",
                "192.168.0.1",
                "100.64.0.1",
            ] {
                let a = embed(example, inner.parse().unwrap());
                assert!(
                    refused(&p, &a.to_string()),
                    "{form} around {inner}: {a} must be refused"
                );
            }
            let public = embed(example, "8.8.8.8".parse().unwrap());
            let expect_refused = form.contains("local-use");
            assert_eq!(
                refused(&p, &public.to_string()),
                expect_refused,
                "{form} around 8.8.8.8: {public}"
            );
        }
        // The SIIT spellings the attack used.
        assert!(refused(&p, "::ffff:0:127.0.0.1"));
        assert!(refused(&p, "::ffff:0:169.254.169.254"));
        assert_eq!(canonical("::ffff:0:1.2.3.4".parse().unwrap()).to_string(), "1.2.3.4");
    }

    #[test]
    fn canonical_forms() {
        let c = |s: &str| canonical(s.parse().unwrap()).to_string();
        assert_eq!(c("::ffff:1.2.3.4"), "1.2.3.4");
        assert_eq!(c("::1.2.3.4"), "1.2.3.4");
        assert_eq!(c("::1"), "::1");
        assert_eq!(c("::"), "::");
        assert_eq!(c("2002:102:304::5"), "1.2.3.4");
        assert_eq!(c("64:ff9b::102:304"), "1.2.3.4");
        assert_eq!(c("2001:0:4136:e378:8000:63bf:fefd:fcfb"), "1.2.3.4");
        assert_eq!(c("2606:4700::1"), "2606:4700::1");
        assert_eq!(v6([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]).to_string(), "::ffff:127.0.0.1");
    }
}
