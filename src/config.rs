//! The operator's configuration (`/etc/turnstile/turnstile.toml`).
//!
//! Key names are a contract with operators and their tooling: unknown keys
//! are refused, so a typo fails loudly instead of being ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

/// The configuration used when `turnstile` starts without `--config`.
pub const DEMO_CONFIG: &str = include_str!("../etc/demo.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `realm = "name"`, or `[[realm]]` tables for several.
    #[serde(rename = "realm")]
    realm_entry: RealmEntry,
    /// The default realm's name: REALM in 401 responses to requests no
    /// other realm claims, and in its users' long-term keys.
    #[serde(skip)]
    pub realm: String,
    /// The `[[realm]]` tables, the default realm (the first) included;
    /// empty for `realm = "name"`.
    #[serde(skip)]
    pub realms: Vec<RealmTable>,
    /// Worker threads; 0 means one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// When started as root: the user (and group) to switch to once the
    /// listeners are bound.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    /// Sent in 300 Try Alternate to new Allocates while draining.
    #[serde(default)]
    pub alternate_server: Option<SocketAddr>,
    /// Seconds existing allocations keep relaying after the first SIGTERM.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: u64,
    /// SOFTWARE attribute in responses; empty sends none.
    #[serde(default = "default_software")]
    pub software: String,
    #[serde(default)]
    pub listen: Vec<Listen>,
    #[serde(default)]
    pub relay: Relay,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub peers: Peers,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub compat: Compat,
    #[serde(default)]
    pub performance: Performance,
    /// Certificate for tls listeners.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Admin listener with the credential API; absent means none.
    #[serde(default)]
    pub admin: Option<Admin>,
    /// Prometheus endpoint; absent means no metrics listener.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// The kernel fast path; absent means none.
    #[serde(default)]
    pub xdp: Option<Xdp>,
    /// The fleet store shared by several nodes; absent means this node alone.
    #[serde(default)]
    pub store: Option<Store>,
    /// The process: PID file, live upgrade.
    #[serde(default)]
    pub server: ServerProcess,
    /// STUN beyond Binding: RFC 5780 NAT behaviour discovery.
    #[serde(default)]
    pub stun: Stun,
}

/// `realm = "name"`, or `[[realm]]` tables.
#[derive(Debug, Clone)]
enum RealmEntry {
    Name(String),
    Tables(Vec<RealmTable>),
}

/// By hand rather than `untagged`, so that a mistake inside a `[[realm]]`
/// table is reported as itself (unknown key, wrong type) with its place.
impl<'de> Deserialize<'de> for RealmEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = RealmEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a realm name (realm = \"example.org\") or [[realm]] tables")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RealmEntry, E> {
                Ok(RealmEntry::Name(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<RealmEntry, A::Error> {
                Vec::<RealmTable>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(RealmEntry::Tables)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// One `[[realm]]`: a tenant with its own users, secrets, quotas,
/// bandwidth and peers. What it leaves out comes from the top-level
/// sections (`[limits]`, `[peers]`), except users and secrets.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealmTable {
    /// REALM of its 401 responses and its users' long-term keys.
    pub name: String,
    /// Static long-term users: name = password.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// REST shared secrets.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Web origins whose ORIGIN attribute selects this realm on any
    /// listener, e.g. "https://app.example".
    #[serde(default)]
    pub origins: Vec<String>,
    /// Allocations per username in this realm (absent: `limits.user_quota`).
    #[serde(default)]
    pub user_quota: Option<u32>,
    /// Allocations this realm may hold in all (absent or 0: only
    /// `limits.total_quota`, which counts every realm, applies).
    #[serde(default)]
    pub total_quota: Option<u32>,
    /// Bits per second one allocation may relay, each direction (absent:
    /// `limits.max_bps`; 0: unlimited).
    #[serde(default)]
    pub max_bps: Option<u64>,
    /// Peers allowed and denied in addition to `[peers]`.
    #[serde(default)]
    pub peers: Peers,
}

impl RealmTable {
    /// Its quotas as the core counts them.
    pub fn quota_limits(&self, limits: &Limits) -> crate::proto::server::QuotaLimits {
        crate::proto::server::QuotaLimits {
            per_user: self.user_quota.unwrap_or(limits.user_quota),
            total: self.total_quota.unwrap_or(0),
            per_ip: 0,
        }
    }

    /// Per-allocation bandwidth.
    pub fn allocation_bandwidth(&self, limits: &Limits) -> crate::proto::server::Rate {
        match self.max_bps.unwrap_or(limits.max_bps) {
            0 => crate::proto::server::Rate::OFF,
            bps => crate::proto::server::Rate::from_bits_per_second(bps),
        }
    }
}

/// `[stun]`: RFC 5780 NAT behaviour discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stun {
    /// Answer CHANGE-REQUEST and RESPONSE-PORT, and tell clients the other
    /// address (OTHER-ADDRESS, RESPONSE-ORIGIN). Off: such requests get 420.
    #[serde(default)]
    pub rfc5780: bool,
    /// A second local address of this host, of the UDP listeners' family.
    #[serde(default)]
    pub alternate_address: Option<IpAddr>,
    /// The second port; absent: each UDP listener's port + 1.
    #[serde(default)]
    pub alternate_port: Option<u16>,
}

/// What an RFC 5780 listen entry the configuration derives is to its UDP
/// listener: the socket on the other address, the other port, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alternate {
    /// The configured UDP listener it belongs to.
    pub of: SocketAddr,
}

/// `[server]`: the process itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerProcess {
    /// Where the running server writes its PID (`turnstile upgrade` finds
    /// it there); absent means none.
    #[serde(default)]
    pub pid_file: Option<std::path::PathBuf>,
    /// Seconds a live upgrade's new process has to take over before the
    /// running one gives up on it and serves on.
    #[serde(default = "default_upgrade_timeout")]
    pub upgrade_timeout: u64,
}

impl Default for ServerProcess {
    fn default() -> Self {
        ServerProcess {
            pid_file: None,
            upgrade_timeout: default_upgrade_timeout(),
        }
    }
}

fn default_upgrade_timeout() -> u64 {
    10
}

/// Where a fleet's shared users and secrets live (docs/FLEET.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// `redis://[:PASSWORD@]HOST:PORT/DB`, or `rediss://…` for TLS (the
    /// server's certificate is checked against the system's roots).
    pub redis: String,
    /// A node out of relay ports, or draining (without its own
    /// `alternate_server`), answers Allocate with 300 Try Alternate to the
    /// least loaded live node of the fleet, instead of 508.
    #[serde(default = "yes")]
    pub redirect: bool,
}

/// The XDP fast path: bound channels relayed in the kernel (build feature
/// `xdp`, CAP_BPF and CAP_NET_ADMIN).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xdp {
    /// The interfaces carrying client and peer traffic.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub mode: XdpMode,
}

/// How the program is attached: in the driver (native), or after the
/// kernel built its socket buffer (generic, for drivers without XDP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Native,
    Generic,
}

/// The certificate chain and key of tls listeners (PEM files). They are
/// re-read on SIGHUP and when the files change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub certificate: std::path::PathBuf,
    pub private_key: std::path::PathBuf,
}

/// Interoperability with clients of older RFCs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compat {
    /// Accept channel numbers 0x4000–0x7FFF (RFC 5766), as coturn does: on
    /// by default, because pjnath, re/baresip and coturn's own test client
    /// pick numbers above 0x4FFF, and on a TURN port nothing else can start
    /// with bytes 0x50–0x7F. `false` keeps to RFC 8656's 0x4000–0x4FFF.
    #[serde(default = "yes")]
    pub legacy_channel_numbers: bool,
}

fn yes() -> bool {
    true
}

impl Default for Compat {
    fn default() -> Self {
        Compat {
            legacy_channel_numbers: true,
        }
    }
}

/// Trade-offs between CPU and latency.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Performance {
    /// At moderate load, a worker about to sleep right after a short busy
    /// spell waits this long first, so it wakes to a batch rather than to
    /// every packet: less CPU per packet, up to this much more latency per
    /// pass through the relay. 0 (the default) never waits.
    #[serde(default)]
    pub coalesce_wakeups_us: u32,
}

/// The admin HTTP listener: bearer-token protected, loopback by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin listener, e.g. "127.0.0.1:9642".
    pub listen: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer …`).
    pub token: String,
    /// Host name put in the URLs the credential API returns (e.g.
    /// "turn.example.org", which a turns: certificate names). Default: each
    /// listener's address.
    #[serde(default)]
    pub public_host: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address of the HTTP listener serving `GET /metrics`.
    pub listen: SocketAddr,
}

fn default_drain_timeout() -> u64 {
    30
}

fn default_software() -> String {
    "turnstile".to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub transport: Transport,
    pub address: SocketAddr,
    /// TLS listeners only: also accept plain TCP on the same port (a TLS
    /// connection starts with byte 0x16, a TURN message never does).
    #[serde(default)]
    pub autodetect: bool,
    /// TCP and TLS listeners: expect a PROXY protocol v2 header first and take
    /// the client address from it (behind HAProxy or an SNI router).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The realm of the clients it serves (a `[[realm]]` name); absent:
    /// the default realm. A known ORIGIN attribute still selects its own.
    #[serde(default)]
    pub realm: Option<String>,
    /// Not from the file: set on the UDP listeners `[stun] rfc5780` adds.
    #[serde(skip)]
    pub alternate: Option<Alternate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// Address relay sockets bind to.
    #[serde(default = "default_relay_address")]
    pub address: IpAddr,
    /// Address advertised in XOR-RELAYED-ADDRESS when behind 1:1 NAT.
    #[serde(default)]
    pub external_address: Option<IpAddr>,
    /// Relay port range, "low-high".
    #[serde(default)]
    pub ports: PortRange,
    /// Where IPv6 relay sockets bind; absent means no IPv6 relaying (440).
    #[serde(default)]
    pub ipv6_address: Option<IpAddr>,
    /// Advertised IPv6 relay address when it differs from `ipv6_address`.
    #[serde(default)]
    pub ipv6_external_address: Option<IpAddr>,
    /// Offer RFC 6062 TCP allocations (Connect to TCP peers). `false`
    /// refuses them with 442, as coturn's `no-tcp-relay`.
    #[serde(default = "yes")]
    pub tcp: bool,
}

fn default_relay_address() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            address: default_relay_address(),
            external_address: None,
            ports: PortRange::default(),
            ipv6_address: None,
            ipv6_external_address: None,
            tcp: true,
        }
    }
}

/// An inclusive port range written "49152-65535".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            low: 49152,
            high: 65535,
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("port range {s:?} is not \"low-high\""))?;
        let low: u16 = a.trim().parse().map_err(|_| format!("bad port {a:?} in range {s:?}"))?;
        let high: u16 = b.trim().parse().map_err(|_| format!("bad port {b:?} in range {s:?}"))?;
        if low == 0 || low > high {
            return Err(format!("port range {s:?} must satisfy 1 <= low <= high"));
        }
        Ok(PortRange { low, high })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// Static long-term users: name = password.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// REST shared secrets; every one verifies, so secrets can be rotated.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Seconds a nonce stays valid before a request gets 438 Stale Nonce.
    #[serde(default = "default_nonce_lifetime")]
    pub nonce_lifetime: u64,
    /// On a configuration reload, end the allocations whose credentials no
    /// longer verify (a user removed or given a new password, a REST secret
    /// taken out). Off: they live on until they expire, as in coturn.
    #[serde(default)]
    pub revoke_on_reload: bool,
    /// RFC 8016 mobility: a client that asks gets a ticket with its
    /// allocation, and keeps the allocation (and its relayed address) when
    /// its own address changes. Off: such requests get 405.
    #[serde(default)]
    pub mobility: bool,
}

fn default_nonce_lifetime() -> u64 {
    600
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            users: BTreeMap::new(),
            secrets: Vec::new(),
            nonce_lifetime: default_nonce_lifetime(),
            revoke_on_reload: false,
            mobility: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peers {
    /// Ranges allowed although denied by default (allow wins over deny).
    /// CIDRs, or bare addresses for one host.
    #[serde(default, deserialize_with = "nets")]
    pub allow: Vec<IpNet>,
    /// Ranges denied in addition to the defaults.
    #[serde(default, deserialize_with = "nets")]
    pub deny: Vec<IpNet>,
}

/// One `[peers]` entry: a CIDR, or a bare address meaning that host alone.
pub fn parse_net(entry: &str) -> Result<IpNet, String> {
    let t = entry.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("{entry:?} is not an address or CIDR (e.g. \"192.0.2.7\", \"10.0.0.0/8\", \"2001:db8::/32\")")
        })
}

fn nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let entries = Vec::<String>::deserialize(d)?;
    entries
        .iter()
        .map(|e| parse_net(e).map_err(serde::de::Error::custom))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Allocations per username (0 = unlimited, the default: apps such as
    /// Foundry VTT, Mattermost and eXo give every participant one shared
    /// static credential). Meant for per-user (REST) credentials.
    #[serde(default)]
    pub user_quota: u32,
    /// Allocations held by one client IP address (0 = unlimited).
    #[serde(default)]
    pub allocations_per_ip: u32,
    /// Allocations in total (0 = unlimited).
    #[serde(default)]
    pub total_quota: u32,
    /// Longest allocation lifetime granted, in seconds.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: u32,
    /// Live permissions one allocation may hold (508 beyond).
    #[serde(default = "default_per_allocation")]
    pub permissions_per_allocation: usize,
    /// Channels one allocation may bind (508 beyond).
    #[serde(default = "default_per_allocation")]
    pub channels_per_allocation: usize,
    /// RFC 6062 peer connections one TCP allocation may hold, made by
    /// Connect or accepted from peers (508 beyond; extra peers are closed).
    #[serde(default = "default_connections_per_allocation")]
    pub connections_per_allocation: usize,
    /// TCP and TLS connections in total.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TCP and TLS connections from one IP address.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Seconds a TCP/TLS connection may stay without an allocation, or idle.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,
    /// Seconds a TLS handshake may take.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: u64,
    /// Bytes queued towards one TCP/TLS client before relayed data to it is dropped.
    #[serde(default = "default_stream_send_buffer")]
    pub stream_send_buffer: usize,
    /// Bytes per second of unauthenticated answers over UDP (Binding, 401
    /// challenges, errors before authentication) one source address may
    /// receive; beyond it they are not sent. 0 turns the limit off.
    #[serde(default = "default_unauthenticated_rate")]
    pub unauthenticated_rate: u64,
    /// Bytes of such answers a source may receive at once.
    #[serde(default = "default_unauthenticated_burst")]
    pub unauthenticated_burst: u64,
    /// Bits per second one allocation may relay, in each direction; packets
    /// beyond it are dropped. 0: unlimited.
    #[serde(default)]
    pub max_bps: u64,
    /// Bits per second the whole server may relay, in each direction. 0: unlimited.
    #[serde(default)]
    pub bps_capacity: u64,
}

fn default_unauthenticated_rate() -> u64 {
    8 * 1024
}

fn default_unauthenticated_burst() -> u64 {
    16 * 1024
}

fn default_max_connections() -> usize {
    20_000
}

fn default_max_connections_per_ip() -> usize {
    256
}

fn default_idle_timeout() -> u64 {
    30
}

fn default_handshake_timeout() -> u64 {
    10
}

fn default_stream_send_buffer() -> usize {
    256 * 1024
}

fn default_per_allocation() -> usize {
    128
}

fn default_connections_per_allocation() -> usize {
    64
}

fn default_max_lifetime() -> u32 {
    3600
}

impl Limits {
    /// The allocation quotas, as the core counts them.
    pub fn quota_limits(&self) -> crate::proto::server::QuotaLimits {
        crate::proto::server::QuotaLimits {
            per_user: self.user_quota,
            total: self.total_quota,
            per_ip: self.allocations_per_ip,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            user_quota: 0,
            allocations_per_ip: 0,
            total_quota: 0,
            max_lifetime: default_max_lifetime(),
            permissions_per_allocation: default_per_allocation(),
            channels_per_allocation: default_per_allocation(),
            connections_per_allocation: default_connections_per_allocation(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            idle_timeout: default_idle_timeout(),
            handshake_timeout: default_handshake_timeout(),
            stream_send_buffer: default_stream_send_buffer(),
            unauthenticated_rate: default_unauthenticated_rate(),
            unauthenticated_burst: default_unauthenticated_burst(),
            max_bps: 0,
            bps_capacity: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// trace, debug, info, warn or error (or a tracing filter directive).
    #[serde(default = "default_log_level")]
    pub level: String,
    /// "text" (default) or "json" (one object per line, for log shippers).
    #[serde(default)]
    pub format: LogFormat,
}

/// The levels `[log] level` takes.
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A level, or comma-separated `target=level` directives with known levels:
/// anything else (`"warning"`, say) would be read by the filter as the name
/// of a module and silence every line, errors included.
pub fn check_log_level(level: &str) -> Result<(), String> {
    let known = |l: &str| LOG_LEVELS.iter().any(|k| k.eq_ignore_ascii_case(l.trim()));
    let ok = !level.trim().is_empty()
        && level.split(',').all(|directive| match directive.rsplit_once('=') {
            Some((target, l)) => !target.trim().is_empty() && known(l),
            None => known(directive),
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "log.level = {level:?} is not a level: use one of {} (or target=level directives, e.g. \"info,turnstile::io=debug\")",
            LOG_LEVELS.join(", ")
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_log_level() -> String {
    "info".to_owned()
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

/// A configuration that could not be loaded; the message names the file,
/// line and column where TOML parsing failed.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Limits {
    /// The unauthenticated answer budget of one source, in one worker's share.
    pub fn unauthenticated(&self, workers: usize) -> crate::proto::server::Rate {
        crate::proto::server::Rate {
            bytes_per_second: self.unauthenticated_rate,
            burst: self.unauthenticated_burst.max(self.unauthenticated_rate.min(1)),
        }
        .per_worker(workers)
    }

    /// Per-allocation bandwidth (an allocation lives on one worker).
    pub fn allocation_bandwidth(&self) -> crate::proto::server::Rate {
        if self.max_bps == 0 {
            return crate::proto::server::Rate::OFF;
        }
        crate::proto::server::Rate::from_bits_per_second(self.max_bps)
    }

    /// One worker's share of the server's bandwidth.
    pub fn worker_bandwidth(&self, workers: usize) -> crate::proto::server::Rate {
        if self.bps_capacity == 0 {
            return crate::proto::server::Rate::OFF;
        }
        crate::proto::server::Rate::from_bits_per_second(self.bps_capacity).per_worker(workers)
    }
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        match &config.realm_entry {
            RealmEntry::Name(name) => config.realm.clone_from(name),
            RealmEntry::Tables(tables) => {
                config.realm = tables.first().map(|t| t.name.clone()).unwrap_or_default();
                config.realms.clone_from(tables);
            }
        }
        config.validate().map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        config.add_alternates();
        Ok(config)
    }

    /// RFC 5780: for each UDP listener A:P, the sockets that answer a
    /// CHANGE-REQUEST — B:P (other address), A:P' (other port) and B:P'
    /// (both) — as listen entries of their own, after the configured ones.
    fn add_alternates(&mut self) {
        let (true, Some(other)) = (self.stun.rfc5780, self.stun.alternate_address) else {
            return;
        };
        for a in self.nat_primaries() {
            let port = self.alternate_port(a);
            for address in [
                SocketAddr::new(other, a.port()),
                SocketAddr::new(a.ip(), port),
                SocketAddr::new(other, port),
            ] {
                // A socket the file already lists serves both ways.
                if self
                    .listen
                    .iter()
                    .any(|l| l.transport == Transport::Udp && l.address == address)
                {
                    continue;
                }
                let realm = self
                    .listen
                    .iter()
                    .find(|l| l.transport == Transport::Udp && l.address == a)
                    .and_then(|l| l.realm.clone());
                self.listen.push(Listen {
                    transport: Transport::Udp,
                    address,
                    autodetect: false,
                    proxy_protocol: false,
                    realm,
                    alternate: Some(Alternate { of: a }),
                });
            }
        }
    }

    /// The UDP listeners RFC 5780 answers for (with `[stun] rfc5780`): the
    /// configured ones not on the alternate address.
    pub fn nat_primaries(&self) -> Vec<SocketAddr> {
        let (true, Some(other)) = (self.stun.rfc5780, self.stun.alternate_address) else {
            return Vec::new();
        };
        self.listen
            .iter()
            .filter(|l| l.transport == Transport::Udp && l.alternate.is_none() && l.address.ip() != other)
            .map(|l| l.address)
            .collect()
    }

    /// The RFC 5780 alternate port of a UDP listener.
    pub fn alternate_port(&self, listener: SocketAddr) -> u16 {
        self.stun
            .alternate_port
            .unwrap_or_else(|| listener.port().wrapping_add(1))
    }

    /// Settings that are valid but probably not what the operator meant;
    /// `check-config` prints them and the server logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (low, high) = (self.relay.ports.low, self.relay.ports.high);
        let relay_ips = [Some(self.relay.address), self.relay.ipv6_address];
        for l in &self.listen {
            let port = l.address.port();
            let same_host = relay_ips
                .iter()
                .flatten()
                .any(|r| r.is_unspecified() || l.address.ip().is_unspecified() || *r == l.address.ip());
            if (low..=high).contains(&port) && same_host {
                out.push(format!(
                    "relay.ports {low}-{high} includes port {port} of the {} listener {}: \
                     the relay range should not overlap the listeners' ports",
                    format!("{:?}", l.transport).to_lowercase(),
                    l.address
                ));
            }
        }
        if self.store.is_none() {
            for t in self.realm_tables().iter().skip(usize::from(self.realms.is_empty())) {
                if t.users.is_empty() && t.secrets.is_empty() {
                    out.push(format!(
                        "realm {:?} has no users and no secrets: no client can authenticate in it",
                        t.name
                    ));
                }
            }
        }
        if let Some(m) = &self.metrics
            && !m.listen.ip().is_loopback()
        {
            out.push(format!(
                "metrics.listen {} is not a loopback address: /metrics is served to anyone who can reach it",
                m.listen
            ));
        }
        out
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// The embedded demo configuration.
    pub fn demo() -> Config {
        match Config::from_toml(DEMO_CONFIG, "embedded demo configuration") {
            Ok(c) => c,
            Err(e) => unreachable!("the embedded configuration is valid: {e}"),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.realm.is_empty() {
            return Err(match self.realm_entry {
                RealmEntry::Tables(_) => "[[realm]]: the first one (the default realm) needs a name".into(),
                RealmEntry::Name(_) => "realm must not be empty".into(),
            });
        }
        self.validate_realms()?;
        check_log_level(&self.log.level)?;
        if self.performance.coalesce_wakeups_us > 10_000 {
            return Err("performance.coalesce_wakeups_us must be at most 10000 (10 ms)".into());
        }
        if self.listen.is_empty() {
            return Err("at least one [[listen]] is required".into());
        }
        for l in &self.listen {
            if l.autodetect && l.transport != Transport::Tls {
                return Err(format!(
                    "listen {}: autodetect applies to tls listeners only",
                    l.address
                ));
            }
            if l.proxy_protocol && l.transport == Transport::Udp {
                return Err(format!(
                    "listen {}: proxy_protocol applies to tcp and tls listeners only",
                    l.address
                ));
            }
            if l.transport == Transport::Tls && self.tls.is_none() {
                return Err(format!("listen {}: a tls listener needs a [tls] section", l.address));
            }
        }
        for (user, password) in &self.auth.users {
            crate::proto::auth::prepare_password(password)
                .map_err(|_| format!("auth.users.{user}: the password holds prohibited characters"))?;
        }
        if self.relay.address.is_unspecified() && self.relay.external_address.is_none() {
            return Err("relay.address is unspecified: set relay.external_address to the address clients reach".into());
        }
        if !self.relay.address.is_ipv4() {
            return Err("relay.address must be an IPv4 address; use relay.ipv6_address for IPv6".into());
        }
        if let Some(a) = self.relay.ipv6_address {
            if !a.is_ipv6() {
                return Err("relay.ipv6_address must be an IPv6 address".into());
            }
            if a.is_unspecified() && self.relay.ipv6_external_address.is_none() {
                return Err("relay.ipv6_address is unspecified: set relay.ipv6_external_address".into());
            }
        }
        if self.worker_count() > 255 {
            return Err("workers must be at most 255".into());
        }
        if let Some(st) = &self.store
            && !(st.redis.starts_with("redis://") || st.redis.starts_with("rediss://"))
        {
            return Err("store.redis must be a redis://[:PASSWORD@]HOST:PORT/DB or rediss:// URL".into());
        }
        if let Some(x) = &self.xdp {
            if !cfg!(feature = "xdp") {
                return Err("[xdp] is set, but this turnstile was built without the xdp feature \
                            (cargo build --release --features xdp)"
                    .into());
            }
            if x.interfaces.is_empty() {
                return Err("xdp.interfaces must name at least one interface".into());
            }
        }
        let ports = usize::from(self.relay.ports.high - self.relay.ports.low) + 1;
        if ports < self.worker_count() {
            return Err(format!(
                "relay.ports holds {ports} ports, fewer than the {} workers",
                self.worker_count()
            ));
        }
        if let Some(a) = &self.admin
            && a.token.len() < 16
        {
            return Err("admin.token must be at least 16 characters".into());
        }
        if self.stun.rfc5780 {
            let Some(other) = self.stun.alternate_address else {
                return Err("stun.rfc5780 needs stun.alternate_address: a second address of this host".into());
            };
            // Listeners on the alternate address itself are the pair's other half.
            for l in self
                .listen
                .iter()
                .filter(|l| l.transport == Transport::Udp && l.address.ip() != other)
            {
                let a = l.address;
                if a.ip().is_unspecified() || a.port() == 0 {
                    return Err(format!(
                        "stun.rfc5780: the udp listener {a} needs a specific address and port (responses name the address they come from)"
                    ));
                }
                if a.is_ipv4() != other.is_ipv4() {
                    return Err(format!(
                        "stun.alternate_address {other} must be another address of the udp listener {a}'s family"
                    ));
                }
                let port = self.alternate_port(a);
                if port == 0 || port == a.port() {
                    return Err(format!(
                        "stun.alternate_port: the udp listener {a} needs a second port (its port + 1 by default)"
                    ));
                }
            }
        }
        if !(1..=300).contains(&self.server.upgrade_timeout) {
            return Err("server.upgrade_timeout must be 1 to 300 seconds".into());
        }
        if self.auth.nonce_lifetime < 30 {
            return Err("auth.nonce_lifetime must be at least 30 seconds".into());
        }
        if self.limits.max_lifetime < 600 {
            return Err("limits.max_lifetime must be at least 600 seconds (RFC 8656 default lifetime)".into());
        }
        Ok(())
    }

    /// `[[realm]]` names unique and set, origins well-formed and claimed
    /// once, listeners naming configured realms, passwords usable.
    fn validate_realms(&self) -> Result<(), String> {
        let mut origins: Vec<String> = Vec::new();
        for (i, r) in self.realms.iter().enumerate() {
            if r.name.is_empty() || r.name.len() > 762 {
                return Err(format!("realm #{}: name must be 1 to 762 bytes", i + 1));
            }
            if self.realms.iter().take(i).any(|o| o.name == r.name) {
                return Err(format!("realm {:?} is configured twice", r.name));
            }
            for (user, password) in &r.users {
                crate::proto::auth::prepare_password(password).map_err(|_| {
                    format!(
                        "realm {:?}: users.{user}: the password holds prohibited characters",
                        r.name
                    )
                })?;
            }
            for o in &r.origins {
                let n = crate::proto::server::realm::normalize_origin(o);
                let Some((scheme, host)) = n.split_once("://") else {
                    return Err(format!(
                        "realm {:?}: origin {o:?} is not scheme://host[:port] (e.g. \"https://app.example\")",
                        r.name
                    ));
                };
                if scheme.is_empty() || host.is_empty() || host.contains('/') {
                    return Err(format!(
                        "realm {:?}: origin {o:?} is not scheme://host[:port] (e.g. \"https://app.example\")",
                        r.name
                    ));
                }
                if origins.contains(&n) {
                    return Err(format!("origin {o:?} selects two realms"));
                }
                origins.push(n);
            }
        }
        for l in &self.listen {
            if let Some(name) = &l.realm
                && *name != self.realm
                && !self.realms.iter().any(|r| &r.name == name)
            {
                return Err(format!(
                    "listen {}: realm {name:?} is not configured (add a [[realm]] with that name)",
                    l.address
                ));
            }
        }
        Ok(())
    }

    /// Each realm's name, users, secrets, origins, quotas, bandwidth and
    /// extra peers, the default first: the `[[realm]]` tables, or one realm
    /// from `realm = "name"`. The top-level `[auth]` users and secrets are
    /// the default realm's.
    pub fn realm_tables(&self) -> Vec<RealmTable> {
        let mut tables = if self.realms.is_empty() {
            vec![RealmTable {
                name: self.realm.clone(),
                users: BTreeMap::new(),
                secrets: Vec::new(),
                origins: Vec::new(),
                user_quota: None,
                total_quota: None,
                max_bps: None,
                peers: Peers::default(),
            }]
        } else {
            self.realms.clone()
        };
        if let Some(default) = tables.first_mut() {
            for (u, p) in &self.auth.users {
                default.users.entry(u.clone()).or_insert_with(|| p.clone());
            }
            let mut secrets = self.auth.secrets.clone();
            secrets.extend(
                default
                    .secrets
                    .iter()
                    .filter(|s| !self.auth.secrets.contains(s))
                    .cloned(),
            );
            default.secrets = secrets;
        }
        tables
    }

    /// How many workers to start.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5780_adds_the_other_address_and_port_and_needs_what_it_names() {
        let base = "realm = \"r\"\n[[listen]]\ntransport = \"udp\"\naddress = \"192.0.2.1:3478\"\n";
        let c = Config::from_toml(
            &format!("{base}[stun]\nrfc5780 = true\nalternate_address = \"192.0.2.2\"\n"),
            "t",
        )
        .unwrap();
        let udp: Vec<String> = c.listen.iter().map(|l| l.address.to_string()).collect();
        assert_eq!(
            udp,
            ["192.0.2.1:3478", "192.0.2.2:3478", "192.0.2.1:3479", "192.0.2.2:3479"]
        );
        assert!(c.listen[1..].iter().all(|l| l.alternate.is_some()));
        // A socket the file lists already is not added twice.
        let both = format!(
            "{base}[[listen]]\ntransport = \"udp\"\naddress = \"192.0.2.2:3478\"\n[stun]\nrfc5780 = true\nalternate_address = \"192.0.2.2\"\nalternate_port = 3480\n"
        );
        let c = Config::from_toml(&both, "t").unwrap();
        assert_eq!(c.listen.len(), 4);
        assert!(c.listen.iter().any(|l| l.address.to_string() == "192.0.2.2:3480"));
        // Off: nothing added.
        let c = Config::from_toml(&format!("{base}[stun]\nalternate_address = \"192.0.2.2\"\n"), "t").unwrap();
        assert_eq!(c.listen.len(), 1);
        for (bad, says) in [
            ("[stun]\nrfc5780 = true\n", "alternate_address"),
            (
                "[stun]\nrfc5780 = true\nalternate_address = \"2001:db8::1\"\n",
                "family",
            ),
        ] {
            let e = Config::from_toml(&format!("{base}{bad}"), "t").unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        let any = "realm = \"r\"\n[[listen]]\ntransport = \"udp\"\naddress = \"0.0.0.0:3478\"\n[stun]\nrfc5780 = true\nalternate_address = \"192.0.2.2\"\n";
        let e = Config::from_toml(any, "t").unwrap_err().to_string();
        assert!(e.contains("specific address"), "{e}");
    }

    #[test]
    fn demo_config_is_valid_and_loopback() {
        let c = Config::demo();
        assert_eq!(c.listen.len(), 2);
        assert!(c.listen.iter().all(|l| l.address.ip().is_loopback()));
        assert!(c.listen[0].address.ip().is_loopback());
        assert!(c.auth.users.contains_key("alice"));
        assert_eq!(c.limits.max_lifetime, 3600);
    }

    #[test]
    fn shipped_example_needs_the_public_address_and_then_is_valid() {
        let shipped = include_str!("../etc/turnstile.toml");
        let e = Config::from_toml(shipped, "etc/turnstile.toml").unwrap_err();
        assert!(e.to_string().contains("relay.external_address"), "{e}");
        let set = shipped.replace(
            "# external_address = \"203.0.113.7\"",
            "external_address = \"203.0.113.7\"",
        );
        let c = Config::from_toml(&set, "etc/turnstile.toml").unwrap();
        assert_eq!(c.realm, "example.org");
        assert!(c.metrics.is_none());
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        assert!(c.store.is_none() && c.xdp.is_none());
        // The commented [store] example, switched on as an operator would.
        let fleet = set
            .replace("# [store]", "[store]")
            .replace("# redis = \"redis://", "redis = \"redis://")
            .replace("# redirect = true", "redirect = true");
        let c = Config::from_toml(&fleet, "etc/turnstile.toml").unwrap();
        let store = c.store.unwrap();
        assert_eq!(
            (store.redis.as_str(), store.redirect),
            ("redis://127.0.0.1:6379/0", true)
        );
        // The commented [xdp] example: valid in a build with the feature.
        let xdp = set
            .replace("# [xdp]", "[xdp]")
            .replace("# interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]")
            .replace("# mode = \"native\"", "mode = \"native\"");
        let c = Config::from_toml(&xdp, "etc/turnstile.toml");
        assert_eq!(c.is_ok(), cfg!(feature = "xdp"), "{:?}", c.err());
    }

    #[test]
    fn an_xdp_section_needs_the_feature_and_an_interface() {
        let base = "realm = \"r\"\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n\
                    [relay]\naddress = \"127.0.0.1\"\n";
        let with = |xdp: &str| Config::from_toml(&format!("{base}{xdp}"), "t");
        let one = with("[xdp]\ninterfaces = [\"eth0\"]\nmode = \"generic\"\n");
        if cfg!(feature = "xdp") {
            let c = one.unwrap();
            let x = c.xdp.unwrap();
            assert_eq!((x.interfaces, x.mode), (vec!["eth0".to_owned()], XdpMode::Generic));
        } else {
            let e = one.unwrap_err().to_string();
            assert!(e.contains("without the xdp feature"), "{e}");
        }
        assert!(with("[xdp]\ninterfaces = []\n").is_err());
        assert!(with("[xdp]\ninterfaces = [\"eth0\"]\nmode = \"fast\"\n").is_err());
        assert!(with("").unwrap().xdp.is_none());
    }

    #[test]
    fn issue_contract_example_parses() {
        let text = r#"
realm = "example.org"

[[listen]]
transport = "udp"
address = "127.0.0.1:3478"

[relay]
address = "127.0.0.1"
ports = "49152-65535"

[auth]
users = { alice = "secret" }
secrets = ["restsecret"]

[peers]
allow = ["127.0.0.0/8"]
deny = []

[limits]
user_quota = 10
total_quota = 0
max_lifetime = 3600
"#;
        let c = Config::from_toml(text, "t").unwrap();
        assert_eq!(
            c.relay.ports,
            PortRange {
                low: 49152,
                high: 65535
            }
        );
        assert_eq!(c.peers.allow.len(), 1);
    }

    #[test]
    fn errors_name_the_place() {
        let e = Config::from_toml("realm = \"x\"\nbogus = 1\n", "f.toml").unwrap_err().0;
        assert!(
            e.contains("f.toml") && e.contains("bogus") && e.contains("line 2"),
            "{e}"
        );
        let e = Config::from_toml("realm = \"x\"\n[relay]\nports = \"9-1\"\n", "f")
            .unwrap_err()
            .0;
        assert!(e.contains("low <= high"), "{e}");
        let e = Config::from_toml("realm = \"x\"\n", "f").unwrap_err().0;
        assert!(e.contains("[[listen]]"), "{e}");
        let e = Config::from_toml("realm = \"x\"\n[peers]\nallow = [\"10.0.0.0/33\"]\n", "f")
            .unwrap_err()
            .0;
        assert!(e.contains("line 3"), "{e}");
    }

    const LISTEN: &str = "[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n";

    #[test]
    fn realm_tables_give_the_default_realm_first_with_the_top_level_users() {
        let text = format!(
            "[[realm]]\nname = \"a.example\"\nusers = {{ alice = \"one\" }}\n\
             [[realm]]\nname = \"b.example\"\nusers = {{ alice = \"two\" }}\nsecrets = [\"s\"]\n\
             origins = [\"https://b.example\"]\nuser_quota = 2\ntotal_quota = 9\nmax_bps = 8000\n\
             [realm.peers]\nallow = [\"10.0.0.0/8\"]\n\
             {LISTEN}realm = \"b.example\"\n[auth]\nusers = {{ carol = \"three\" }}\nsecrets = [\"top\"]\n"
        );
        let c = Config::from_toml(&text, "f").unwrap();
        assert_eq!(c.realm, "a.example");
        let t = c.realm_tables();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].users.len(), 2, "[auth] users are the default realm's");
        assert_eq!(t[0].secrets, vec!["top".to_owned()]);
        assert_eq!(t[1].users.get("alice").map(String::as_str), Some("two"));
        assert_eq!(t[1].quota_limits(&c.limits).per_user, 2);
        assert_eq!(t[1].quota_limits(&c.limits).total, 9);
        assert_eq!(t[1].allocation_bandwidth(&c.limits).bytes_per_second, 1000);
        assert_eq!(t[0].allocation_bandwidth(&c.limits), crate::proto::server::Rate::OFF);
        assert_eq!(c.listen[0].realm.as_deref(), Some("b.example"));
        // The single-realm form still reads, as one realm.
        let c = Config::from_toml(&format!("realm = \"x\"\n{LISTEN}"), "f").unwrap();
        assert_eq!(c.realm_tables().len(), 1);
        assert_eq!(c.realm_tables()[0].name, "x");
    }

    #[test]
    fn realm_mistakes_are_refused_by_name() {
        let bad = |extra: &str| {
            Config::from_toml(&format!("[[realm]]\nname = \"a\"\n{extra}{LISTEN}"), "f.toml")
                .unwrap_err()
                .0
        };
        let e = bad("users = 5\n");
        assert!(e.contains("f.toml") && e.contains("users"), "{e}");
        let e = bad("bogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = bad("[[realm]]\nname = \"a\"\n");
        assert!(e.contains("twice"), "{e}");
        let e = bad("origins = [\"app.example\"]\n");
        assert!(e.contains("scheme://host"), "{e}");
        let e = bad("origins = [\"https://x\"]\n[[realm]]\nname = \"b\"\norigins = [\"HTTPS://X/\"]\n");
        assert!(e.contains("two realms"), "{e}");
        let e = Config::from_toml(&format!("realm = \"a\"\n{LISTEN}realm = \"nope\"\n"), "f")
            .unwrap_err()
            .0;
        assert!(e.contains("\"nope\" is not configured"), "{e}");
        // Naming the one realm of `realm = "a"` is fine.
        Config::from_toml(&format!("realm = \"a\"\n{LISTEN}realm = \"a\"\n"), "f").unwrap();
        let e = bad("[[realm]]\nname = \"\"\n");
        assert!(e.contains("name"), "{e}");
        // Valid, but nobody could use realm b.
        let c = Config::from_toml(
            &format!("[[realm]]\nname = \"a\"\nsecrets = [\"s\"]\n[[realm]]\nname = \"b\"\n{LISTEN}"),
            "f",
        )
        .unwrap();
        let w = c.warnings();
        assert!(w.iter().any(|w| w.contains("realm \"b\" has no users")), "{w:?}");
        assert!(!w.iter().any(|w| w.contains("realm \"a\"")), "{w:?}");
    }
}
