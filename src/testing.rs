//! The one way to drive the core without sockets, shared by the core's
//! integration tests, the fuzz targets and the benches (as quinn-proto's
//! test pair and Firezone's relay tests do): a [`Harness`] owns a
//! [`Server`] in virtual time, speaks TURN to it with this crate's codec as
//! the client, carries out its outputs as a driver would (answering relay
//! binds from a script or a closure) and keeps what came out, sorted into
//! work, state changes and messages sent.
//!
//! It is a driver (it owns the virtual clock), so it lives outside the
//! sans-IO `proto`. Test code: it panics on what a test should not meet.
//! Nothing in the server uses it.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::auth::{LongTermKey, PasswordAlgorithm};
use crate::proto::server::{
    BindResult, ClientKey, ClientOutcome, Credentials, DropReason, Input, ListenerId, ListenerKind, Now, Output,
    OwnRelays, PeerPolicy, Quotas, Realms, RelayAddress, RelayId, Server, ServerConfig,
};
use crate::proto::stun::{Class, Message, MessageWriter, Method, TransactionId, integrity};

pub const REALM: &str = "example.org";
pub const SECRET: &str = "rest-secret";
pub const OLD_SECRET: &str = "old-secret";
pub const EXTERNAL: &str = "198.51.100.1";

pub fn config() -> ServerConfig {
    ServerConfig {
        software: Some("turnstile-test".into()),
        relay_v4: Some(RelayAddress {
            bind: "127.0.0.1".parse().unwrap(),
            external: Some(EXTERNAL.parse().unwrap()),
        }),
        relay_v6: None,
        ports: (50000, 50999),
        max_lifetime: 3600,
        max_permissions: 8,
        max_channels: 4,
        ..ServerConfig::default()
    }
}

/// The limits of [`config`], as a reload hands them over.
pub fn allocation_limits() -> crate::proto::server::AllocationLimits {
    let c = config();
    crate::proto::server::AllocationLimits {
        max_lifetime: c.max_lifetime,
        max_permissions: c.max_permissions,
        max_channels: c.max_channels,
        max_connections: c.max_connections,
        tcp_relay: c.tcp_relay,
        idle_timeout: c.idle_timeout,
        mobility: c.mobility,
    }
}

/// The harness's users (alice/secret, bob/hunter2) and REST secrets.
pub fn credentials() -> Credentials {
    Credentials::new(
        REALM,
        [("alice", "secret"), ("bob", "hunter2")],
        &[SECRET.to_owned(), OLD_SECRET.to_owned()],
        &[9; 32],
        600,
    )
    .unwrap()
}

pub fn policy(allow: &[&str]) -> PeerPolicy {
    PeerPolicy::new(
        allow.iter().map(|a| a.parse().unwrap()).collect(),
        vec![],
        OwnRelays {
            addresses: vec!["127.0.0.1".parse().unwrap(), EXTERNAL.parse().unwrap()],
            port_low: 50000,
            port_high: 50999,
            services: vec!["127.0.0.1:3478".parse().unwrap()],
        },
    )
}

pub struct Harness {
    pub server: Server,
    pub now: Now,
    pub base: Instant,
    pub key: ClientKey,
    pub out: Vec<u8>,
    /// Work the core asked of the driver (closing sockets, connecting…).
    pub commands: Vec<Output>,
    /// State changes it reported (allocation, permission, channel events).
    pub events: Vec<Output>,
    /// Messages the core sent to clients outside a direct reply.
    pub sent: Vec<(ClientKey, Vec<u8>)>,
    /// What the driver answers to bind requests, in order (then Bound).
    pub bind_script: Vec<BindResult>,
    pub bind_requests: Vec<SocketAddr>,
    /// Relay sockets bound and not yet closed, as a driver holds them.
    pub open_relays: BTreeSet<RelayId>,
    /// RFC 6062 peer connections asked for or accepted and not yet closed.
    pub tcp_connections: BTreeSet<u32>,
    next_tid: u64,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with(config(), policy(&[]), Quotas::new(10, 0))
    }

    pub fn with(config: ServerConfig, policy: PeerPolicy, quotas: Quotas) -> Harness {
        Harness::with_credentials(config, credentials(), policy, quotas)
    }

    /// A harness around a core with these credentials; listener 0 is UDP,
    /// listener 1 TCP, and the client is `self.key` (on listener 0).
    pub fn with_credentials(config: ServerConfig, creds: Credentials, policy: PeerPolicy, quotas: Quotas) -> Harness {
        Harness::around(Server::new(config, Arc::new(creds), policy, Arc::new(quotas)))
    }

    /// A harness around a core serving several realms (listeners as in
    /// [`Harness::with_credentials`]).
    pub fn with_realms(config: ServerConfig, realms: Realms, quotas: Arc<Quotas>) -> Harness {
        Harness::around(Server::with_realms(config, Arc::new(realms), quotas))
    }

    fn around(mut server: Server) -> Harness {
        server.add_listener(ListenerKind::Udp, "udp");
        server.add_listener(ListenerKind::Stream, "tcp");
        let base = Instant::now();
        Harness {
            server,
            now: Now {
                instant: base,
                unix: 1_700_000_000,
            },
            base,
            key: ClientKey {
                listener: ListenerId(0),
                client: "192.0.2.10:40000".parse().unwrap(),
            },
            out: vec![0; 2048],
            commands: Vec::new(),
            events: Vec::new(),
            sent: Vec::new(),
            bind_script: Vec::new(),
            bind_requests: Vec::new(),
            open_relays: BTreeSet::new(),
            tcp_connections: BTreeSet::new(),
            next_tid: 0,
        }
    }

    /// Moves virtual time on and runs whatever came due.
    pub fn advance(&mut self, secs: u64) {
        self.advance_by(Duration::from_secs(secs));
    }

    pub fn advance_by(&mut self, d: Duration) {
        self.now.instant += d;
        self.now.unix = self.now.unix.saturating_add(d.as_secs());
        if self.server.poll_timeout().is_some_and(|t| t <= self.now.instant) {
            self.server.handle_timeout(self.now);
        }
        self.drain();
    }

    /// Carries out the core's outputs as a driver would (binding relay
    /// sockets as the script says) and sorts the rest.
    pub fn drain(&mut self) {
        let script = &mut self.bind_script;
        let requests = &mut self.bind_requests;
        let outputs = settle(&mut self.server, self.now, |_, addr, _| {
            requests.push(addr);
            if script.is_empty() {
                BindResult::Bound
            } else {
                script.remove(0)
            }
        });
        self.sort(outputs);
    }

    /// Like [`Harness::drain`], with each relay bind answered by `bind`.
    /// The core must not bind a socket twice, close one it does not hold,
    /// or retry binds forever.
    pub fn drain_with(&mut self, mut bind: impl FnMut(RelayId, SocketAddr, bool) -> BindResult) {
        let open = &mut self.open_relays;
        let mut binds = 0;
        let outputs = settle(&mut self.server, self.now, |relay, addr, tcp| {
            binds += 1;
            assert!(binds < 64, "bind retries never end");
            let result = bind(relay, addr, tcp);
            if result == BindResult::Bound {
                assert!(open.insert(relay), "relay {relay:?} bound twice");
            }
            result
        });
        self.sort(outputs);
    }

    fn sort(&mut self, outputs: Vec<Output>) {
        for o in outputs {
            match &o {
                Output::CloseRelay(id) => {
                    assert!(self.open_relays.remove(id), "closing relay {id:?} that is not open");
                }
                Output::TcpConnect { connection, .. } | Output::PeerConnectionAccepted { connection, .. } => {
                    self.tcp_connections.insert(*connection);
                }
                Output::CloseConnection(id) => {
                    self.tcp_connections.remove(id);
                }
                _ => {}
            }
            match o {
                Output::Transmit { key, bytes } => self.sent.push((key, bytes)),
                o if is_event(&o) => self.events.push(o),
                o => self.commands.push(o),
            }
        }
    }

    /// Feeds an input and carries out what follows.
    pub fn input(&mut self, input: Input) {
        self.server.handle(self.now, input);
        self.drain();
    }

    /// A transaction id never used before by this harness.
    pub fn tid(&mut self) -> TransactionId {
        self.next_tid += 1;
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&self.next_tid.to_be_bytes());
        TransactionId(t)
    }

    /// Sends a packet from `self.key`; binds relays as the script says. An
    /// answer that came through the outputs (an Allocate's, after its relay
    /// sockets) is returned as the reply, in `self.out`.
    pub fn send(&mut self, packet: &[u8]) -> ClientOutcome {
        let script = std::mem::take(&mut self.bind_script);
        let mut script = script.into_iter();
        let mut requests = Vec::new();
        let outcome = self.send_with(packet, |_, addr, _| {
            requests.push(addr);
            script.next().unwrap_or(BindResult::Bound)
        });
        self.bind_script = script.collect();
        self.bind_requests.extend(requests);
        outcome
    }

    /// Like [`Harness::send`], with each relay bind answered by `bind`.
    pub fn send_with(
        &mut self,
        packet: &[u8],
        bind: impl FnMut(RelayId, SocketAddr, bool) -> BindResult,
    ) -> ClientOutcome {
        let outcome = self
            .server
            .handle_client_packet(self.now, self.key, packet, &mut self.out);
        let before = self.sent.len();
        self.drain_with(bind);
        if outcome == ClientOutcome::Consumed
            && let Some(i) = (before..self.sent.len()).find(|&i| self.sent[i].0 == self.key)
        {
            let (_, bytes) = self.sent.remove(i);
            self.out[..bytes.len()].copy_from_slice(&bytes);
            return ClientOutcome::Reply { len: bytes.len() };
        }
        outcome
    }

    /// Sends and parses the reply.
    pub fn exchange(&mut self, packet: &[u8]) -> Vec<u8> {
        match self.send(packet) {
            ClientOutcome::Reply { len } => self.out[..len].to_vec(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}

pub fn build(class: Class, method: Method, tid: TransactionId, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 1500];
    let mut w = MessageWriter::new(&mut buf, class, method, tid).unwrap();
    f(&mut w);
    let n = w.finish();
    buf.truncate(n);
    buf
}

pub fn key_for(user: &str, password: &str) -> LongTermKey {
    LongTermKey::derive(PasswordAlgorithm::Md5, user, REALM, password)
}

/// Credentials a request is signed with.
#[derive(Clone)]
pub struct Creds {
    pub user: String,
    pub key: LongTermKey,
    pub nonce: String,
}

impl Harness {
    /// Gets a nonce with an unauthenticated Allocate (expects 401).
    pub fn nonce(&mut self) -> String {
        let tid = self.tid();
        let req = build(Class::Request, Method::ALLOCATE, tid, |w| {
            w.requested_transport(17).unwrap()
        });
        let resp = self.exchange(&req);
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.error_code().unwrap().unwrap().code, 401);
        m.nonce().unwrap().unwrap().to_owned()
    }

    pub fn creds(&mut self, user: &str, password: &str) -> Creds {
        Creds {
            user: user.to_owned(),
            key: key_for(user, password),
            nonce: self.nonce(),
        }
    }

    /// An authenticated request with MESSAGE-INTEGRITY (SHA-1) and FINGERPRINT.
    pub fn signed(&mut self, method: Method, c: &Creds, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.signed_in(method, REALM, c, f)
    }

    /// Like [`Harness::signed`], in `realm` (`c.key` derived for it).
    pub fn signed_in(
        &mut self,
        method: Method,
        realm: &str,
        c: &Creds,
        f: impl FnOnce(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        let tid = self.tid();
        build(Class::Request, method, tid, |w| {
            f(w);
            w.username(&c.user).unwrap();
            w.realm(realm).unwrap();
            w.nonce(&c.nonce).unwrap();
            w.message_integrity(c.key.hmac_sha1()).unwrap();
            w.fingerprint().unwrap();
        })
    }

    /// Allocates for `self.key` with alice's credentials; returns the relayed address.
    pub fn allocate(&mut self, c: &Creds) -> SocketAddr {
        let req = self.signed(Method::ALLOCATE, c, |w| w.requested_transport(17).unwrap());
        let resp = self.exchange(&req);
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.class(), Class::Success, "allocate failed: {:?}", m.error_code());
        m.xor_relayed_address().unwrap().unwrap()
    }

    pub fn permit(&mut self, c: &Creds, peer: SocketAddr) -> Vec<u8> {
        let req = self.signed(Method::CREATE_PERMISSION, c, |w| w.xor_peer_address(&peer).unwrap());
        self.exchange(&req)
    }

    pub fn bind_channel(&mut self, c: &Creds, number: u16, peer: SocketAddr) -> Vec<u8> {
        let req = self.signed(Method::CHANNEL_BIND, c, |w| {
            w.channel_number(number).unwrap();
            w.xor_peer_address(&peer).unwrap();
        });
        self.exchange(&req)
    }
}

/// The error code of a response, or 0 for success.
pub fn code(resp: &[u8]) -> u16 {
    let m = Message::parse(resp).unwrap();
    match m.class() {
        Class::Success => 0,
        Class::Error => m.error_code().unwrap().unwrap().code,
        c => panic!("not a response: {c:?}"),
    }
}

pub fn verify_sha1(resp: &[u8], key: &LongTermKey) -> bool {
    Message::parse(resp)
        .unwrap()
        .verify_integrity_with(key.hmac_sha1())
        .is_ok()
}

pub fn hmac_sha1(key: &[u8]) -> crate::proto::stun::HmacSha1 {
    integrity::hmac_sha1(key)
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// RFC 6062 and relay-socket events, as a driver reports them.
impl Harness {
    /// Sends a signed Connect; returns the TCP connection the core asked for.
    pub fn connect(&mut self, c: &Creds, peer: SocketAddr) -> (RelayId, SocketAddr, u32) {
        let req = self.signed(Method::CONNECT, c, |w| w.xor_peer_address(&peer).unwrap());
        self.commands.clear();
        assert_eq!(self.send(&req), ClientOutcome::Consumed, "Connect is answered later");
        self.commands
            .iter()
            .find_map(|o| match o {
                Output::TcpConnect {
                    relay,
                    peer,
                    connection,
                } => Some((*relay, *peer, *connection)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no TcpConnect in {:?}", self.commands))
    }

    /// Reports how the TCP connection of a Connect went; returns what the
    /// core sent, and to whom.
    pub fn tcp_connected(&mut self, connection: u32, connected: bool) -> Option<(ClientKey, Vec<u8>)> {
        let before = self.sent.len();
        self.input(Input::TcpConnected { connection, connected });
        self.sent.get(before).cloned()
    }

    /// A peer connects to a TCP relay: the connection id and the
    /// ConnectionAttempt sent, or why the core refused it.
    pub fn peer_accepted(&mut self, relay: RelayId, peer: SocketAddr) -> Result<(ClientKey, u32, Vec<u8>), DropReason> {
        let (before_sent, before) = (self.sent.len(), self.commands.len());
        self.input(Input::TcpPeerAccepted { relay, peer });
        let decision = self.commands[before..]
            .iter()
            .find_map(|o| match o {
                Output::PeerConnectionAccepted { connection, .. } => Some(Ok(*connection)),
                Output::PeerConnectionRefused { reason, .. } => Some(Err(*reason)),
                _ => None,
            })
            .expect("the core decides on an accepted peer at once");
        let connection = decision?;
        let (key, bytes) = self.sent[before_sent].clone();
        Ok((key, connection, bytes))
    }

    /// An ICMP error on a relay socket: the Data indication sent, if any.
    pub fn icmp(
        &mut self,
        relay: RelayId,
        peer: SocketAddr,
        (icmp_type, icmp_code, info): (u8, u8, u32),
    ) -> Option<(ClientKey, Vec<u8>)> {
        let before = self.sent.len();
        self.input(Input::RelayIcmp {
            relay,
            peer,
            icmp_type,
            icmp_code,
            info,
        });
        self.sent.get(before).cloned()
    }
}

/// Drains the server's outputs, answering each [`Output::BindRelay`] with
/// `bind(relay, addr, tcp)` (which may ask for more); returns every other
/// output in order.
pub fn settle(
    server: &mut Server,
    now: Now,
    mut bind: impl FnMut(RelayId, SocketAddr, bool) -> BindResult,
) -> Vec<Output> {
    let mut rest = Vec::new();
    while let Some(output) = server.poll_output() {
        match output {
            Output::BindRelay { relay, addr, tcp, .. } => {
                let result = bind(relay, addr, tcp);
                server.handle(now, Input::RelayBound { relay, result });
            }
            other => rest.push(other),
        }
    }
    rest
}

/// Whether an output reports a change of state rather than asking for work.
pub fn is_event(output: &Output) -> bool {
    matches!(
        output,
        Output::AllocationCreated { .. }
            | Output::AllocationRefreshed { .. }
            | Output::AllocationEnded { .. }
            | Output::PermissionInstalled { .. }
            | Output::PermissionExpired { .. }
            | Output::ChannelBound { .. }
            | Output::ChannelExpired { .. }
    )
}
