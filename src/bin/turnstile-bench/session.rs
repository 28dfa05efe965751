//! Setting up TURN allocations on any server: the 401 round, Allocate,
//! CreatePermission and ChannelBind, with retransmission, over one
//! connected UDP socket per allocation (each its own 5-tuple).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// Long-term credentials, given or derived from a REST shared secret.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    /// TURN REST API: username `expiry:user`, password base64(HMAC-SHA1(secret, username)).
    pub fn rest(secret: &str, user: &str, ttl: Duration) -> Credentials {
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + ttl;
        let username = format!("{}:{user}", expiry.as_secs());
        let password = turnstile::proto::auth::rest::password(secret.as_bytes(), &username);
        Credentials { username, password }
    }
}

/// A signed-in client: its socket, the realm/nonce the server gave and the key.
pub struct Session {
    pub socket: UdpSocket,
    credentials: Credentials,
    realm: String,
    nonce: String,
    key: Option<LongTermKey>,
    next_tid: u64,
    /// Set when the server answered Allocate without asking for credentials.
    pub unauthenticated: bool,
}

/// A request that failed, with the server's code when it gave one.
#[derive(Debug)]
pub struct Refused {
    pub method: Method,
    pub code: Option<u16>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "{} refused with {c}", self.method.name()),
            None => write!(f, "{} got no answer", self.method.name()),
        }
    }
}

impl std::error::Error for Refused {}

pub fn tid(n: u64, salt: u32) -> TransactionId {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&n.to_be_bytes());
    t[8..].copy_from_slice(&salt.to_be_bytes());
    TransactionId(t)
}

impl Session {
    pub fn new(local: SocketAddr, server: SocketAddr, credentials: Credentials) -> io::Result<Session> {
        let socket = UdpSocket::bind(local)?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(Session {
            socket,
            credentials,
            realm: String::new(),
            nonce: String::new(),
            key: None,
            next_tid: 1,
            unauthenticated: false,
        })
    }

    /// Moves to a fresh local port (a new 5-tuple), keeping realm and nonce;
    /// on `ip` when given, else on the current address.
    pub fn new_port(&mut self, ip: Option<std::net::IpAddr>) -> io::Result<()> {
        let local = self.socket.local_addr()?;
        let server = self.socket.peer_addr()?;
        let socket = UdpSocket::bind(SocketAddr::new(ip.unwrap_or(local.ip()), 0))?;
        socket.connect(server)?;
        socket.set_read_timeout(self.socket.read_timeout()?)?;
        self.socket = socket;
        Ok(())
    }

    /// Forgets the credentials' key, so the next request goes unsigned
    /// and meets the 401 challenge, as a new client's first request does.
    pub fn forget_key(&mut self) {
        self.key = None;
    }

    /// Copies the nonce and realm of another session (servers that do not
    /// bind nonces to the client's port accept them), skipping one 401 round.
    pub fn share_auth(&mut self, other: &Session) {
        self.realm.clone_from(&other.realm);
        self.nonce.clone_from(&other.nonce);
        self.key.clone_from(&other.key);
        self.unauthenticated = other.unauthenticated;
    }

    /// Writes a request (signed once a realm is known) into `buf`.
    pub fn write_request(
        &mut self,
        buf: &mut [u8],
        method: Method,
        attrs: impl FnOnce(&mut MessageWriter<'_>),
    ) -> (TransactionId, usize) {
        // Random, as RFC 8489 asks: a server recognises a retransmitted
        // Allocate by 5-tuple and transaction id, and a new client on a
        // reused port must not look like the old one retransmitting.
        let mut id = tid(self.next_tid, std::process::id());
        let _ = getrandom::fill(&mut id.0);
        self.next_tid += 1;
        let mut w = MessageWriter::new(buf, Class::Request, method, id).expect("buffer");
        attrs(&mut w);
        if let Some(key) = &self.key {
            w.username(&self.credentials.username).expect("buffer");
            w.realm(&self.realm).expect("buffer");
            w.nonce(&self.nonce).expect("buffer");
            w.message_integrity(key.hmac_sha1()).expect("buffer");
        }
        w.fingerprint().expect("buffer");
        (id, w.finish())
    }

    /// Takes a 401/438 answer's realm and nonce; true when a retry makes sense.
    pub fn learn(&mut self, m: &Message<'_>) -> bool {
        let code = m.error_code().ok().flatten().map(|e| e.code);
        if !matches!(code, Some(401) | Some(438)) {
            return false;
        }
        let Some(nonce) = m.nonce().ok().flatten() else {
            return false;
        };
        self.nonce = nonce.to_owned();
        if let Some(realm) = m.realm().ok().flatten()
            && (realm != self.realm || self.key.is_none())
        {
            self.realm = realm.to_owned();
            self.key = Some(LongTermKey::derive(
                PasswordAlgorithm::Md5,
                &self.credentials.username,
                &self.realm,
                &self.credentials.password,
            ));
        }
        true
    }

    /// One transaction, retransmitted, with the 401/438 round handled.
    pub fn transact(&mut self, method: Method, attrs: impl Fn(&mut MessageWriter<'_>)) -> Result<Vec<u8>, Refused> {
        let mut buf = [0u8; 1500];
        let mut recv = [0u8; 1500];
        for _round in 0..3 {
            let (id, n) = self.write_request(&mut buf, method, &attrs);
            let mut answer = None;
            'tries: for _ in 0..4 {
                let _ = self.socket.send(&buf[..n]);
                loop {
                    match self.socket.recv(&mut recv) {
                        Ok(len) => {
                            if let Ok(m) = Message::parse(&recv[..len])
                                && *m.transaction_id() == id
                            {
                                answer = Some(len);
                                break 'tries;
                            }
                            // Anything else (relayed data, an old answer) is skipped.
                        }
                        Err(_) => continue 'tries,
                    }
                }
            }
            let Some(len) = answer else {
                return Err(Refused { method, code: None });
            };
            let m = Message::parse(&recv[..len]).map_err(|_| Refused { method, code: None })?;
            match m.class() {
                Class::Success => {
                    if self.key.is_none() {
                        self.unauthenticated = true;
                    }
                    return Ok(recv[..len].to_vec());
                }
                _ if self.learn(&m) => continue,
                _ => {
                    let code = m.error_code().ok().flatten().map(|e| e.code);
                    return Err(Refused { method, code });
                }
            }
        }
        Err(Refused {
            method,
            code: Some(401),
        })
    }

    /// Allocate a UDP relay; returns the relayed address.
    pub fn allocate(&mut self, lifetime: u32) -> Result<SocketAddr, Refused> {
        let resp = self.transact(Method::ALLOCATE, |w| {
            w.requested_transport(17).expect("buffer");
            w.lifetime(lifetime).expect("buffer");
        })?;
        let m = Message::parse(&resp).map_err(|_| Refused {
            method: Method::ALLOCATE,
            code: None,
        })?;
        m.xor_relayed_address().ok().flatten().ok_or(Refused {
            method: Method::ALLOCATE,
            code: None,
        })
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<(), Refused> {
        self.transact(Method::CREATE_PERMISSION, |w| {
            w.xor_peer_address(&peer).expect("buffer")
        })
        .map(|_| ())
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Result<(), Refused> {
        self.transact(Method::CHANNEL_BIND, |w| {
            w.channel_number(channel).expect("buffer");
            w.xor_peer_address(&peer).expect("buffer");
        })
        .map(|_| ())
    }

    pub fn refresh(&mut self, lifetime: u32) -> Result<(), Refused> {
        self.transact(Method::REFRESH, |w| w.lifetime(lifetime).expect("buffer"))
            .map(|_| ())
    }
}
