//! A minimal synchronous TURN client on this crate's codec, for what the
//! off-the-shelf clients cannot show (ICMP, exact errors, reloads).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

pub struct RawClient {
    pub socket: UdpSocket,
    /// Set for a client over TCP: requests and answers go through it instead.
    pub tcp: Option<TcpStream>,
    server: SocketAddr,
    user: String,
    /// The realm of the server's first 401 (the one the key is for).
    pub realm: String,
    pub key: LongTermKey,
    pub nonce: String,
    tid: u8,
}

impl RawClient {
    pub fn connect(server: SocketAddr) -> RawClient {
        RawClient::connect_as(server, "alice", "secret")
    }

    pub fn connect_as(server: SocketAddr, user: &str, password: &str) -> RawClient {
        RawClient::open(server, user, password, None)
    }

    /// A client over TCP to a stream listener.
    pub fn connect_tcp(server: SocketAddr, user: &str, password: &str) -> RawClient {
        let tcp = TcpStream::connect(server).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        RawClient::open(server, user, password, Some(tcp))
    }

    fn open(server: SocketAddr, user: &str, password: &str, tcp: Option<TcpStream>) -> RawClient {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = RawClient {
            socket,
            tcp,
            server,
            user: user.to_owned(),
            realm: String::new(),
            key: LongTermKey::derive(PasswordAlgorithm::Md5, user, "", password),
            nonce: String::new(),
            tid: 0,
        };
        let resp = c.request(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
        let m = Message::parse(&resp).unwrap();
        c.nonce = m.nonce().unwrap().unwrap().to_owned();
        c.realm = m.realm().unwrap().unwrap().to_owned();
        c.key = LongTermKey::derive(PasswordAlgorithm::Md5, user, &c.realm, password);
        c
    }

    pub fn request(&mut self, method: Method, sign: bool, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.tid += 1;
        let mut buf = [0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, TransactionId([self.tid; 12])).unwrap();
        f(&mut w);
        if sign {
            w.username(&self.user).unwrap();
            w.realm(&self.realm).unwrap();
            w.nonce(&self.nonce).unwrap();
            w.message_integrity(self.key.hmac_sha1()).unwrap();
        }
        let n = w.finish();
        if let Some(tcp) = &mut self.tcp {
            tcp.write_all(&buf[..n]).unwrap();
            return self
                .try_recv()
                .unwrap_or_else(|| panic!("no answer to {method:?} over TCP"));
        }
        self.socket.send_to(&buf[..n], self.server).unwrap();
        // UDP is lossy in principle; a request is retransmitted like any client would.
        for _ in 0..3 {
            if let Some(r) = self.try_recv() {
                return r;
            }
            self.socket.send_to(&buf[..n], self.server).unwrap();
        }
        panic!("no answer to {method:?} from {}", self.server)
    }

    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        if let Some(tcp) = &mut self.tcp {
            let mut head = [0u8; 20];
            tcp.read_exact(&mut head).ok()?;
            let len = u16::from_be_bytes([head[2], head[3]]) as usize;
            let mut m = head.to_vec();
            m.resize(20 + len, 0);
            tcp.read_exact(&mut m[20..]).ok()?;
            return Some(m);
        }
        let mut buf = vec![0u8; 1500];
        let (n, _) = self.socket.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    pub fn indication(&mut self, method: Method, f: impl FnOnce(&mut MessageWriter<'_>)) {
        self.tid += 1;
        let mut buf = [0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, Class::Indication, method, TransactionId([self.tid; 12])).unwrap();
        f(&mut w);
        let n = w.finish();
        self.socket.send_to(&buf[..n], self.server).unwrap();
    }
}

/// The error code of an answer, 0 for a success.
pub fn code(answer: &[u8]) -> u16 {
    let m = Message::parse(answer).unwrap();
    match m.class() {
        Class::Success => 0,
        _ => {
            m.error_code()
                .unwrap()
                .expect("an error response carries ERROR-CODE")
                .code
        }
    }
}
