//! `turnstile import-coturn`: turns a coturn `turnserver.conf` into an
//! equivalent turnstile.toml, and names every option it cannot carry over.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};

/// The converted configuration and the notes for the operator.
#[derive(Debug, Clone)]
pub struct Imported {
    pub toml: String,
    pub notes: Vec<String>,
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// coturn's Redis connection string ("ip=… dbname=… password=… port=…")
/// as a redis:// URL.
fn redis_url(db: &str) -> Option<String> {
    let mut host = "127.0.0.1".to_owned();
    let (mut port, mut dbname, mut password) = ("6379".to_owned(), "0".to_owned(), None);
    for part in db.split_whitespace() {
        let (k, v) = part.split_once('=')?;
        match k {
            "ip" | "host" => v.clone_into(&mut host),
            "port" => v.clone_into(&mut port),
            "dbname" | "database" => v.clone_into(&mut dbname),
            "password" => password = Some(v.to_owned()),
            _ => {}
        }
    }
    if port.parse::<u16>().is_err() || dbname.parse::<u32>().is_err() {
        return None;
    }
    let host = match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]"),
        Err(_) => host,
    };
    // Reserved characters of a password are percent-encoded.
    let auth = password.map_or_else(String::new, |p| {
        let encoded: String = p
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!(":{encoded}@")
    });
    Some(format!("redis://{auth}{host}:{port}/{dbname}"))
}

/// "a.b.c.d" or "a.b.c.d-e.f.g.h" (coturn's peer-ip syntax) as CIDRs.
fn ranges(value: &str) -> Option<Vec<IpNet>> {
    let (a, b) = value.split_once('-').unwrap_or((value, value));
    match (a.trim().parse::<IpAddr>().ok()?, b.trim().parse::<IpAddr>().ok()?) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Some(Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect()),
        (IpAddr::V6(a), IpAddr::V6(b)) => Some(Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect()),
        _ => None,
    }
}

/// Options that have no turnstile equivalent or need no setting, with why.
fn not_carried(key: &str) -> Option<&'static str> {
    Some(match key {
        "fingerprint" => return None,  // FINGERPRINT is answered whenever a request carries one
        "lt-cred-mech" => return None, // the long-term mechanism is turnstile's only one
        "no-cli" | "cli-ip" | "cli-port" | "cli-password" | "cli-max-output-sessions" => {
            "turnstile has no telnet CLI; use the metrics and admin listeners"
        }
        "log-file" | "syslog" | "simple-log" | "new-log-timestamp" | "no-stdout-log" | "log-binding" => {
            "turnstile logs to stderr (journald under systemd)"
        }
        "no-dtls" | "dtls-listening-port" => "turnstile has no DTLS listener (browsers do not use TURN over DTLS)",
        "no-stun-backward-compatibility" => {
            "turnstile answers RFC 8489 Binding; RFC 3489 (no magic cookie) is not offered"
        }
        "no-multicast-peers" => "multicast peers are always refused",
        "server-name" => "the realm names the server",
        "check-origin-consistency" => {
            "needs no setting: an allocation stays in the realm it was made in, whatever ORIGIN later requests carry"
        }
        "userdb" | "psql-userdb" | "mysql-userdb" | "mongo-userdb" => {
            "only a Redis user database is read ([store] redis); list users in [auth] users or use REST secrets"
        }
        "redis-statsdb" => "allocation statuses are published to [store] redis, the user database",
        "oauth" | "server-relay" | "no-auth" | "secure-stun" | "stun-only" | "no-stun" => "this mode is not offered",
        "no-tlsv1" | "no-tlsv1_1" => "already the behaviour: TLS 1.0 and 1.1 are never offered",
        "cipher-list" | "ec-curve-name" | "dh-file" | "dh566" | "dh1066" | "no-tlsv1_2" | "ca-file" => {
            "TLS versions and ciphers are rustls's secure defaults (TLS 1.2 and 1.3)"
        }
        "alt-tls-listening-port" => "RFC 5780 runs over UDP only here; the TLS alternative port is not needed",
        "aux-server" | "udp-self-balance" => "load balancing across auxiliary ports is not offered",
        "verbose" | "Verbose" => return None, // carried as the log level
        _ => "unknown to the importer",
    })
}

/// Converts the text of a turnserver.conf.
pub fn import(text: &str) -> Imported {
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut notes = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let line = line.trim_start_matches('-');
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => match line.split_once(char::is_whitespace) {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (line, ""),
            },
        };
        values
            .entry(k.to_owned())
            .or_default()
            .push(v.trim_matches('"').to_owned());
    }
    let one = |k: &str| values.get(k).and_then(|v| v.last()).cloned();
    let all = |k: &str| values.get(k).cloned().unwrap_or_default();
    let has = |k: &str| values.contains_key(k);

    let mut out = String::from("# Converted from a coturn turnserver.conf by `turnstile import-coturn`.\n");
    out.push_str("# Check it with `turnstile check-config FILE`.\n\n");
    let realm = one("realm").unwrap_or_else(|| {
        notes.push("no realm= given: set `realm` to your domain".into());
        "turnstile.local".into()
    });
    out.push_str(&format!("realm = {}\n", quote(&realm)));
    if has("verbose") || has("Verbose") {
        out.push_str("\n[log]\nlevel = \"debug\"\n");
    }

    // Listeners.
    let port: u16 = one("listening-port").and_then(|p| p.parse().ok()).unwrap_or(3478);
    let tls_port: u16 = one("tls-listening-port").and_then(|p| p.parse().ok()).unwrap_or(5349);
    let mut ips: Vec<IpAddr> = all("listening-ip").iter().filter_map(|i| i.parse().ok()).collect();
    if ips.is_empty() {
        ips.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    let cert = one("cert");
    let pkey = one("pkey");
    let tls = !has("no-tls") && cert.is_some() && pkey.is_some();
    if !has("no-tls") && !tls {
        notes.push("no cert= and pkey=: the TLS listener is left out (add [tls] and a tls listener)".into());
    }
    let mut listen = |transport: &str, ip: &IpAddr, port: u16| {
        let addr = match ip {
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            IpAddr::V4(v4) => format!("{v4}:{port}"),
        };
        out.push_str(&format!(
            "\n[[listen]]\ntransport = \"{transport}\"\naddress = \"{addr}\"\n"
        ));
    };
    for ip in &ips {
        if !has("no-udp") {
            listen("udp", ip, port);
        }
        if !has("no-tcp") {
            listen("tcp", ip, port);
        }
        if tls {
            listen("tls", ip, tls_port);
        }
    }
    // coturn offers RFC 5780 when it listens on two addresses of a family.
    let pair = ips.iter().find(|a| !a.is_unspecified()).and_then(|a| {
        ips.iter()
            .find(|b| *b != a && b.is_ipv4() == a.is_ipv4())
            .map(|b| (*a, *b))
    });
    if let (Some((_, b)), false, false) = (pair, has("no-rfc5780"), has("no-udp")) {
        out.push_str(&format!(
            "
[stun]
rfc5780 = true
alternate_address = \"{b}\"\n"
        ));
        if let Some(p) = one("alt-listening-port") {
            out.push_str(&format!("alternate_port = {p}\n"));
        }
    }
    if let Some(p) = one("pidfile") {
        out.push_str(&format!("\n[server]\npid_file = {}\n", quote(&p)));
    }
    if let (true, Some(c), Some(k)) = (tls, &cert, &pkey) {
        out.push_str(&format!(
            "\n[tls]\ncertificate = {}\nprivate_key = {}\n",
            quote(c),
            quote(k)
        ));
    }

    // Relay addresses. external-ip is "PUBLIC" or "PUBLIC/PRIVATE".
    let mut relay_v4: Option<IpAddr> = None;
    let mut relay_v6: Option<IpAddr> = None;
    for r in all("relay-ip").iter().filter_map(|i| i.parse::<IpAddr>().ok()) {
        match r {
            IpAddr::V4(_) if relay_v4.is_none() => relay_v4 = Some(r),
            IpAddr::V6(_) if relay_v6.is_none() => relay_v6 = Some(r),
            _ => notes.push(format!(
                "relay-ip={r}: one relay address per family is used; extra ones are left out"
            )),
        }
    }
    let mut external_v4: Option<IpAddr> = None;
    let mut external_v6: Option<IpAddr> = None;
    for e in all("external-ip") {
        let (public, private) = e.split_once('/').unwrap_or((&e, ""));
        let (Ok(public), private) = (public.parse::<IpAddr>(), private.parse::<IpAddr>().ok()) else {
            notes.push(format!("external-ip={e}: not an address (host names are not resolved)"));
            continue;
        };
        if public.is_ipv4() {
            external_v4 = Some(public);
            if let Some(p) = private.filter(|p| p.is_ipv4()) {
                relay_v4.get_or_insert(p);
            }
        } else {
            external_v6 = Some(public);
            if let Some(p) = private.filter(|p| p.is_ipv6()) {
                relay_v6.get_or_insert(p);
            }
        }
    }
    // external-ip alone is the public address of a NAT'd host (a cloud VM):
    // it cannot be bound there, so relays bind every local address and
    // advertise it.
    let relay_v4 = relay_v4
        .or_else(|| ips.iter().copied().find(|i| i.is_ipv4() && !i.is_unspecified()))
        .or(external_v4.map(|_| IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
        .unwrap_or_else(|| {
            notes.push("no relay-ip=, external-ip= or concrete listening-ip=: set [relay] address to this host's public address".into());
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        });
    out.push_str(&format!("\n[relay]\naddress = \"{relay_v4}\"\n"));
    if let Some(e) = external_v4.filter(|e| *e != relay_v4) {
        out.push_str(&format!("external_address = \"{e}\"\n"));
    }
    if let Some(v6) = relay_v6.or(external_v6) {
        out.push_str(&format!("ipv6_address = \"{v6}\"\n"));
        if let Some(e) = external_v6.filter(|e| *e != v6) {
            out.push_str(&format!("ipv6_external_address = \"{e}\"\n"));
        }
    }
    if has("no-tcp-relay") {
        out.push_str("tcp = false\n");
    }
    let min: u16 = one("min-port").and_then(|p| p.parse().ok()).unwrap_or(49152);
    let max: u16 = one("max-port").and_then(|p| p.parse().ok()).unwrap_or(65535);
    out.push_str(&format!("ports = \"{min}-{max}\"\n"));

    // Credentials.
    out.push_str("\n[auth]\n");
    let mut users = Vec::new();
    for u in all("user") {
        match u.split_once(':') {
            Some((name, pw)) if pw.starts_with("0x") => notes.push(format!(
                "user={name}:0x…: a precomputed key cannot be carried over; set a password for {name}"
            )),
            Some((name, pw)) => users.push(format!("{} = {}", quote(name), quote(pw))),
            None => notes.push(format!("user={u}: expected name:password")),
        }
    }
    out.push_str(&format!("users = {{ {} }}\n", users.join(", ")));
    let secrets: Vec<String> = all("static-auth-secret").iter().map(|s| quote(s)).collect();
    if has("use-auth-secret") && secrets.is_empty() {
        notes.push(
            "use-auth-secret without static-auth-secret (secrets in a database): add them to [auth] secrets".into(),
        );
    }
    out.push_str(&format!("secrets = [{}]\n", secrets.join(", ")));
    if let Some(n) = one("stale-nonce")
        .filter(|n| !n.is_empty())
        .and_then(|n| n.parse::<u64>().ok())
    {
        out.push_str(&format!("nonce_lifetime = {n}\n"));
    }
    if has("mobility") {
        out.push_str("mobility = true\n");
    }

    // Peers.
    let mut allow: Vec<String> = Vec::new();
    let mut deny: Vec<String> = Vec::new();
    for (key, list) in [("allowed-peer-ip", &mut allow), ("denied-peer-ip", &mut deny)] {
        for v in all(key) {
            match ranges(&v) {
                Some(nets) => list.extend(nets.iter().map(|n| quote(&n.to_string()))),
                None => notes.push(format!("{key}={v}: not an address or range")),
            }
        }
    }
    if has("allow-loopback-peers") {
        allow.push(quote("127.0.0.0/8"));
        allow.push(quote(&IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)).to_string()));
    }
    out.push_str(&format!(
        "\n[peers]\nallow = [{}]\ndeny = [{}]\n",
        allow.join(", "),
        deny.join(", ")
    ));

    // Limits.
    out.push_str("\n[limits]\n");
    out.push_str(&format!(
        "user_quota = {}\n",
        one("user-quota").and_then(|q| q.parse::<u32>().ok()).unwrap_or(0)
    ));
    out.push_str("allocations_per_ip = 0\n");
    out.push_str(&format!(
        "total_quota = {}\n",
        one("total-quota").and_then(|q| q.parse::<u32>().ok()).unwrap_or(0)
    ));
    if let Some(l) = one("max-allocate-lifetime").and_then(|l| l.parse::<u32>().ok()) {
        out.push_str(&format!("max_lifetime = {}\n", l.max(600)));
    }
    // coturn's max-bps and bps-capacity are bytes per second despite the
    // names; turnstile's keys are bits per second.
    for (coturn, ours) in [("max-bps", "max_bps"), ("bps-capacity", "bps_capacity")] {
        if let Some(v) = one(coturn).and_then(|v| v.parse::<u64>().ok()) {
            out.push_str(&format!("{ours} = {}\n", v.saturating_mul(8)));
        }
    }

    if ["userdb", "psql-userdb", "mysql-userdb", "mongo-userdb", "redis-userdb"]
        .iter()
        .any(|k| has(k))
    {
        notes.push(
            "realms other than realm= live in coturn's database (turnadmin -r REALM, -O ORIGIN, \
             --set-realm-option): write `realm = ...` as a [[realm]] table (the first is the default) \
             and add one [[realm]] per database realm with its users, secrets, origins and \
             user_quota / total_quota / max_bps (bits/s: coturn's realm max-bps times 8)"
                .into(),
        );
    }

    if let Some(db) = one("redis-userdb") {
        match redis_url(&db) {
            Some(url) => out.push_str(&format!("\n[store]\nredis = {}\n", quote(&url))),
            None => notes.push(format!("redis-userdb={db}: not understood; set [store] redis by hand")),
        }
    }

    if has("prometheus") {
        let port = one("prometheus-port").unwrap_or_else(|| "9641".into());
        out.push_str(&format!("\n[metrics]\nlisten = \"0.0.0.0:{port}\"\n"));
        notes.push(format!(
            "prometheus: metrics listen on all addresses (0.0.0.0:{port}), as coturn's exporter does; \
             set [metrics] listen to 127.0.0.1:{port} or firewall the port"
        ));
    }

    let handled = [
        "realm",
        "listening-port",
        "tls-listening-port",
        "listening-ip",
        "no-rfc5780",
        "rfc5780",
        "response-origin-only-with-rfc5780",
        "alt-listening-port",
        "pidfile",
        "mobility",
        "relay-ip",
        "external-ip",
        "min-port",
        "max-port",
        "user",
        "use-auth-secret",
        "static-auth-secret",
        "cert",
        "pkey",
        "denied-peer-ip",
        "allowed-peer-ip",
        "allow-loopback-peers",
        "user-quota",
        "total-quota",
        "stale-nonce",
        "no-udp",
        "no-tcp",
        "no-tls",
        "no-tcp-relay",
        "prometheus",
        "prometheus-port",
        "max-allocate-lifetime",
        "max-bps",
        "bps-capacity",
        "redis-userdb",
    ];
    for key in values.keys() {
        if handled.contains(&key.as_str()) {
            continue;
        }
        if let Some(why) = not_carried(key) {
            notes.push(format!("{key}: not carried over: {why}"));
        }
    }
    if !notes.is_empty() {
        out.push_str("\n# Not carried over, or needing your attention:\n");
        for n in &notes {
            out.push_str(&format!("# - {n}\n"));
        }
    }
    Imported { toml: out, notes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const PRODUCTION: &str = r#"
# a typical production turnserver.conf
listening-port=3478
tls-listening-port=5349
listening-ip=10.0.0.5
relay-ip=10.0.0.5
external-ip=203.0.113.7/10.0.0.5
min-port=49160
max-port=59200
fingerprint
lt-cred-mech
use-auth-secret
static-auth-secret=first-secret
static-auth-secret=second-secret
user=alice:wonderland
user=bob:0xbc807ee29df3c9ffa736523fb2c4e8ee
realm=turn.example.org
total-quota=1000
user-quota=12
max-bps=64000
stale-nonce=600
cert=/etc/letsencrypt/live/turn.example.org/fullchain.pem
pkey=/etc/letsencrypt/live/turn.example.org/privkey.pem
no-dtls
denied-peer-ip=10.0.0.0-10.255.255.255
denied-peer-ip=192.168.0.0-192.168.255.255
allowed-peer-ip=10.0.0.5
no-cli
prometheus
verbose
"#;

    #[test]
    fn production_file() {
        let i = import(PRODUCTION);
        assert!(i.toml.contains("address = \"10.0.0.5\""), "{}", i.toml);
        assert!(i.toml.contains("external_address = \"203.0.113.7\""));
        assert!(i.toml.contains("ports = \"49160-59200\""));
        assert!(i.toml.contains("secrets = [\"first-secret\", \"second-secret\"]"));
        assert!(i.toml.contains("\"10.0.0.0/8\""));
        assert!(i.toml.contains("\"192.168.0.0/16\""));
        assert!(i.toml.contains("allow = [\"10.0.0.5/32\"]"));
        assert!(i.toml.contains("transport = \"tls\""));
        assert!(
            i.toml.contains("max_bps = 512000"),
            "coturn's bytes become bits: {}",
            i.toml
        );
        assert!(i.notes.iter().any(|n| n.contains("bob")), "{:?}", i.notes);
        assert!(i.notes.iter().any(|n| n.starts_with("no-dtls")), "{:?}", i.notes);
        // The certificate files do not exist here, so only the TOML is checked.
        let c = Config::from_toml(&i.toml, "imported").unwrap();
        assert_eq!(c.realm, "turn.example.org");
        assert_eq!(c.limits.user_quota, 12);
        assert_eq!(c.auth.users.get("alice").map(String::as_str), Some("wonderland"));
        assert_eq!(c.listen.len(), 3);
    }

    #[test]
    fn a_natd_cloud_vm_and_the_options_refused_anyway() {
        let i = import("realm=x\nexternal-ip=203.0.113.7\nno-tcp-relay\nno-tlsv1\nno-tlsv1_1\nprometheus\n");
        let c = Config::from_toml(&i.toml, "imported").unwrap();
        assert_eq!(c.relay.address, IpAddr::V4(Ipv4Addr::UNSPECIFIED), "{}", i.toml);
        assert_eq!(c.relay.external_address, Some("203.0.113.7".parse().unwrap()));
        assert!(!c.relay.tcp, "no-tcp-relay");
        for key in ["no-tlsv1:", "no-tlsv1_1:"] {
            assert!(
                i.notes
                    .iter()
                    .any(|n| n.starts_with(key) && n.contains("already the behaviour")),
                "{:?}",
                i.notes
            );
        }
        assert!(
            i.notes
                .iter()
                .any(|n| n.starts_with("prometheus:") && n.contains("all addresses")),
            "{:?}",
            i.notes
        );
        assert!(!i.notes.iter().any(|n| n.starts_with("no-tcp-relay")), "{:?}", i.notes);
    }

    #[test]
    fn empty_and_minimal_files() {
        let i = import("# nothing\n");
        let c = Config::from_toml(&i.toml, "imported").unwrap();
        assert_eq!(c.listen.len(), 2, "udp and tcp on 0.0.0.0:3478");
        assert!(i.notes.iter().any(|n| n.contains("realm")));
        assert!(i.notes.iter().any(|n| n.contains("[relay] address")));
        let i = import("realm=x\nallow-loopback-peers\nno-tcp\nlistening-ip=127.0.0.1\n");
        let c = Config::from_toml(&i.toml, "imported").unwrap();
        assert_eq!(c.listen.len(), 1);
        assert_eq!(c.peers.allow.len(), 2);
    }

    #[test]
    fn two_listening_addresses_carry_rfc5780_as_coturn_offers_it() {
        let i = import("realm=x\nlistening-ip=192.0.2.1\nlistening-ip=192.0.2.2\nalt-listening-port=3480\n");
        let c = Config::from_toml(&i.toml, "imported").unwrap();
        assert!(c.stun.rfc5780, "{}", i.toml);
        assert_eq!(c.stun.alternate_address, Some("192.0.2.2".parse().unwrap()));
        assert_eq!(c.stun.alternate_port, Some(3480));
        assert!(!i.notes.iter().any(|n| n.contains("5780")), "{:?}", i.notes);
        let i = import("realm=x\nredis-userdb=\"ip=10.0.0.9 dbname=2 password=p@ss port=6380 connect_timeout=30\"\n");
        let c = Config::from_toml(&i.toml, "imported").unwrap();
        assert_eq!(
            c.store.map(|s| s.redis).as_deref(),
            Some("redis://:p%40ss@10.0.0.9:6380/2"),
            "{}",
            i.toml
        );
        assert!(i.notes.iter().any(|n| n.contains("[[realm]]")), "{:?}", i.notes);
        let i = import("realm=x\nuserdb=/var/lib/turn/turndb\ncheck-origin-consistency\n");
        assert!(i.notes.iter().any(|n| n.contains("[[realm]]")), "{:?}", i.notes);
        assert!(
            i.notes
                .iter()
                .any(|n| n.starts_with("check-origin-consistency") && n.contains("stays in the realm")),
            "{:?}",
            i.notes
        );
        let i = import(
            "realm=x\nlistening-ip=192.0.2.1\nlistening-ip=192.0.2.2\nno-rfc5780\npidfile=/run/t.pid\nmobility\n",
        );
        let c = Config::from_toml(&i.toml, "imported").unwrap();
        assert!(!c.stun.rfc5780);
        assert!(c.auth.mobility, "{}", i.toml);
        assert_eq!(c.server.pid_file, Some("/run/t.pid".into()), "{}", i.toml);
    }
}
