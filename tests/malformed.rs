//! Hostile input against the running server, over UDP, TCP and TLS: every
//! case gets the right error response or a silent drop, while a legitimate
//! client on the side keeps relaying without losing a packet.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::raw::RawClient;
use common::{TestServer, cert, loopback_config, write_cert};
use turnstile::proto::auth::{LongTermKey, PasswordAlgorithm};
use turnstile::proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// What the server must do with a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A response with this code (0: success).
    Answer(u16),
    /// No response.
    Silent,
}
use Expect::*;

/// What a case is sent with.
struct Ctx {
    nonce: String,
    key: LongTermKey,
    peer: SocketAddr,
    seq: u8,
}

impl Ctx {
    fn tid(&mut self) -> TransactionId {
        self.seq = self.seq.wrapping_add(1);
        TransactionId([self.seq; 12])
    }

    /// A message of `class`/`method` with `attrs`, then USERNAME, REALM,
    /// NONCE and MESSAGE-INTEGRITY when `sign`.
    fn msg(&mut self, class: Class, method: Method, sign: bool, attrs: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        let tid = self.tid();
        let mut buf = vec![0u8; 4096];
        let mut w = MessageWriter::new(&mut buf, class, method, tid).unwrap();
        attrs(&mut w);
        if sign {
            w.username("alice").unwrap();
            w.realm("test.local").unwrap();
            w.nonce(&self.nonce).unwrap();
            w.message_integrity(self.key.hmac_sha1()).unwrap();
        }
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    fn req(&mut self, method: Method, sign: bool, attrs: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.msg(Class::Request, method, sign, attrs)
    }
}

/// Patches the 16-bit message length in a STUN header.
fn with_length(mut m: Vec<u8>, len: u16) -> Vec<u8> {
    m[2..4].copy_from_slice(&len.to_be_bytes());
    m
}

/// Appends a raw attribute (type, value, padding) and fixes the header length.
fn append_raw(mut m: Vec<u8>, kind: u16, value: &[u8]) -> Vec<u8> {
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(value.len() as u16).to_be_bytes());
    m.extend_from_slice(value);
    while !m.len().is_multiple_of(4) {
        m.push(0);
    }
    let len = (m.len() - 20) as u16;
    with_length(m, len)
}

fn channel_data(channel: u16, len_field: u16, payload: usize) -> Vec<u8> {
    let mut v = channel.to_be_bytes().to_vec();
    v.extend_from_slice(&len_field.to_be_bytes());
    v.resize(4 + payload, 0x55);
    v
}

struct Case {
    name: &'static str,
    /// Open an allocation on the connection first.
    allocated: bool,
    /// Also meaningful on TCP/TLS (framing is by the message's own length there).
    stream: bool,
    expect: Expect,
    build: fn(&mut Ctx) -> Vec<u8>,
}

const fn case(
    name: &'static str,
    allocated: bool,
    stream: bool,
    expect: Expect,
    build: fn(&mut Ctx) -> Vec<u8>,
) -> Case {
    Case {
        name,
        allocated,
        stream,
        expect,
        build,
    }
}

fn cases() -> Vec<Case> {
    const U: u16 = 0x0000;
    vec![
        // Framing and headers (datagram boundaries only mean something on UDP).
        case("empty datagram", false, false, Silent, |_| vec![]),
        case("one byte", false, false, Silent, |_| vec![0]),
        case("truncated header (19 bytes)", false, false, Silent, |c| {
            c.req(Method::BINDING, false, |_| {})[..19].to_vec()
        }),
        case("wrong magic cookie", false, true, Silent, |c| {
            let mut m = c.req(Method::BINDING, false, |_| {});
            m[4] ^= 0xff;
            m
        }),
        case("length not a multiple of 4", false, false, Silent, |c| {
            let m = c.req(Method::BINDING, false, |w| w.software("x").unwrap());
            with_length(m, 6)
        }),
        case("length past the end of the datagram", false, false, Silent, |c| {
            let m = c.req(Method::BINDING, false, |_| {});
            with_length(m, 64)
        }),
        case("trailing bytes after the message", false, false, Silent, |c| {
            let mut m = c.req(Method::BINDING, false, |_| {});
            m.extend_from_slice(&[0; 8]);
            m
        }),
        case("attribute length past the message", false, true, Silent, |c| {
            let mut m = c.req(Method::BINDING, false, |w| w.software("abcd").unwrap());
            m[22..24].copy_from_slice(&200u16.to_be_bytes());
            m
        }),
        case("missing padding on the last attribute", false, false, Silent, |c| {
            let m = c.req(Method::BINDING, false, |w| w.software("abc").unwrap());
            let n = m.len() - 1;
            with_length(m[..n].to_vec(), (n - 20) as u16)
        }),
        case("success response sent to the server", false, true, Silent, |c| {
            c.msg(Class::Success, Method::BINDING, false, |w| {
                w.xor_mapped_address(&"127.0.0.1:9".parse().unwrap()).unwrap()
            })
        }),
        case("error response sent to the server", false, true, Silent, |c| {
            c.msg(Class::Error, Method::ALLOCATE, false, |w| {
                w.error_code(401, "x").unwrap()
            })
        }),
        case("Data indication from a client", false, true, Silent, |c| {
            c.msg(Class::Indication, Method::DATA, false, |w| w.data(b"hello").unwrap())
        }),
        // Attributes.
        case(
            "unknown comprehension-required attribute",
            false,
            true,
            Answer(420),
            |c| {
                let m = c.req(Method::BINDING, false, |_| {});
                append_raw(m, 0x0005, &[1, 2, 3, 4])
            },
        ),
        case(
            "unknown comprehension-optional attribute",
            false,
            true,
            Answer(0),
            |c| {
                let m = c.req(Method::BINDING, false, |_| {});
                append_raw(m, 0x8100, &[1, 2, 3, 4])
            },
        ),
        case("FINGERPRINT wrong", false, true, Silent, |c| {
            let mut m = c.req(Method::BINDING, false, |w| w.fingerprint().unwrap());
            let n = m.len();
            m[n - 1] ^= 1;
            m
        }),
        case("attribute after FINGERPRINT", false, true, Silent, |c| {
            let m = c.req(Method::BINDING, false, |w| w.fingerprint().unwrap());
            append_raw(m, 0x8022, b"late")
        }),
        case("unknown method", false, true, Answer(400), |c| {
            c.req(Method::new(0x0ff), false, |_| {})
        }),
        case(
            "USERNAME of 600 bytes, unsigned: challenged first",
            false,
            true,
            Answer(401),
            |c| {
                let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
                append_raw(m, 0x0006, &[b'a'; 600])
            },
        ),
        case("USERNAME of 600 bytes, signed", false, true, Answer(400), |c| {
            let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
            let m = append_raw(m, 0x0006, &[b'a'; 600]);
            let m = append_raw(m, 0x0014, b"test.local");
            let nonce = c.nonce.clone();
            let m = append_raw(m, 0x0015, nonce.as_bytes());
            mi_raw(c, m)
        }),
        case("REALM of 800 bytes, signed", false, true, Answer(400), |c| {
            let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
            let m = append_raw(m, 0x0006, b"alice");
            let m = append_raw(m, 0x0014, &[b'r'; 800]);
            let nonce = c.nonce.clone();
            let m = append_raw(m, 0x0015, nonce.as_bytes());
            mi_raw(c, m)
        }),
        case("NONCE of 800 bytes, signed", false, true, Answer(400), |c| {
            let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
            let m = append_raw(m, 0x0006, b"alice");
            let m = append_raw(m, 0x0014, b"test.local");
            let m = append_raw(m, 0x0015, &[b'n'; 800]);
            mi_raw(c, m)
        }),
        case("USERNAME not UTF-8, signed", false, true, Answer(400), |c| {
            let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
            let m = append_raw(m, 0x0006, &[0xff, 0xfe, 0xfd]);
            let m = append_raw(m, 0x0014, b"test.local");
            let nonce = c.nonce.clone();
            let m = append_raw(m, 0x0015, nonce.as_bytes());
            mi_raw(c, m)
        }),
        case("SOFTWARE not UTF-8 in a Binding", false, true, Answer(0), |c| {
            let m = c.req(Method::BINDING, false, |_| {});
            append_raw(m, 0x8022, &[0xc3, 0x28])
        }),
        // Authentication.
        case("Allocate without credentials", false, true, Answer(401), |c| {
            c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap())
        }),
        case("MESSAGE-INTEGRITY wrong", false, true, Answer(401), |c| {
            let mut m = c.req(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
            let n = m.len();
            m[n - 1] ^= 1;
            m
        }),
        case("MESSAGE-INTEGRITY of the wrong length", false, true, Silent, |c| {
            let m = c.req(Method::ALLOCATE, false, |w| {
                w.requested_transport(17).unwrap();
                w.username("alice").unwrap();
                w.realm("test.local").unwrap();
            });
            append_raw(m, 0x0008, &[0; 12])
        }),
        case(
            "attributes after MESSAGE-INTEGRITY are ignored",
            false,
            true,
            Answer(400),
            |c| {
                // REQUESTED-TRANSPORT after MI does not count: a signed Allocate without it.
                let m = c.req(Method::ALLOCATE, true, |_| {});
                append_raw(m, 0x0019, &[17, 0, 0, 0])
            },
        ),
        case(
            "nonce made up: stale, with a fresh one",
            false,
            true,
            Answer(438),
            |c| {
                c.nonce = "obMatJos2AAAAAfakefakefakefake".into();
                c.req(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap())
            },
        ),
        case("unknown user", false, true, Answer(401), |c| {
            let mut buf = vec![0u8; 512];
            let tid = c.tid();
            let mut w = MessageWriter::new(&mut buf, Class::Request, Method::ALLOCATE, tid).unwrap();
            w.requested_transport(17).unwrap();
            w.username("mallory").unwrap();
            w.realm("test.local").unwrap();
            w.nonce(&c.nonce).unwrap();
            w.message_integrity(c.key.hmac_sha1()).unwrap();
            let n = w.finish();
            buf.truncate(n);
            buf
        }),
        // Allocate.
        case("Allocate without REQUESTED-TRANSPORT", false, true, Answer(400), |c| {
            c.req(Method::ALLOCATE, true, |_| {})
        }),
        case("REQUESTED-TRANSPORT not UDP or TCP", false, true, Answer(442), |c| {
            c.req(Method::ALLOCATE, true, |w| w.requested_transport(99).unwrap())
        }),
        case(
            "REQUESTED-TRANSPORT of the wrong length",
            false,
            true,
            Answer(400),
            |c| {
                let m = c.req(Method::ALLOCATE, false, |_| {});
                let m = append_raw(m, 0x0019, &[17, 0]);
                sign_raw(c, m)
            },
        ),
        case(
            "duplicate REQUESTED-TRANSPORT: the first counts",
            false,
            true,
            Answer(0),
            |c| {
                let m = c.req(Method::ALLOCATE, false, |w| {
                    w.requested_transport(17).unwrap();
                    w.requested_transport(99).unwrap();
                });
                sign_raw(c, m)
            },
        ),
        case("LIFETIME of the wrong length", false, true, Answer(400), |c| {
            let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
            let m = append_raw(m, 0x000d, &[0, 1]);
            sign_raw(c, m)
        }),
        case("EVEN-PORT with RESERVATION-TOKEN", false, true, Answer(400), |c| {
            c.req(Method::ALLOCATE, true, |w| {
                w.requested_transport(17).unwrap();
                w.even_port(false).unwrap();
                w.reservation_token(&[1; 8]).unwrap();
            })
        }),
        case("RESERVATION-TOKEN of the wrong length", false, true, Answer(400), |c| {
            let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
            let m = append_raw(m, 0x0022, &[1; 4]);
            sign_raw(c, m)
        }),
        case(
            "REQUESTED-ADDRESS-FAMILY value that is no family",
            false,
            true,
            Answer(400),
            |c| {
                let m = c.req(Method::ALLOCATE, false, |w| w.requested_transport(17).unwrap());
                let m = append_raw(m, 0x0017, &[0x07, 0, 0, 0]);
                sign_raw(c, m)
            },
        ),
        case(
            "second Allocate on an allocated 5-tuple",
            true,
            true,
            Answer(437),
            |c| c.req(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap()),
        ),
        case("Connect on a UDP allocation", true, true, Answer(400), |c| {
            let peer = c.peer;
            c.req(Method::CONNECT, true, |w| w.xor_peer_address(&peer).unwrap())
        }),
        // Requests for an allocation this 5-tuple does not have.
        case("Refresh without an allocation", false, true, Answer(437), |c| {
            c.req(Method::REFRESH, true, |w| w.lifetime(600).unwrap())
        }),
        case(
            "CreatePermission without an allocation",
            false,
            true,
            Answer(437),
            |c| {
                let peer = c.peer;
                c.req(Method::CREATE_PERMISSION, true, |w| w.xor_peer_address(&peer).unwrap())
            },
        ),
        case("ChannelBind without an allocation", false, true, Answer(437), |c| {
            let peer = c.peer;
            c.req(Method::CHANNEL_BIND, true, |w| {
                w.channel_number(0x4000).unwrap();
                w.xor_peer_address(&peer).unwrap();
            })
        }),
        // Permissions and channels.
        case(
            "CreatePermission without XOR-PEER-ADDRESS",
            true,
            true,
            Answer(400),
            |c| c.req(Method::CREATE_PERMISSION, true, |_| {}),
        ),
        case("XOR-PEER-ADDRESS of an unknown family", true, true, Answer(400), |c| {
            let m = c.req(Method::CREATE_PERMISSION, false, |_| {});
            let m = append_raw(m, 0x0012, &[0, 0x05, 0x12, 0x34, 1, 2, 3, 4]);
            sign_raw(c, m)
        }),
        case("XOR-PEER-ADDRESS cut short", true, true, Answer(400), |c| {
            let m = c.req(Method::CREATE_PERMISSION, false, |_| {});
            let m = append_raw(m, 0x0012, &[0, 0x01, 0x12, 0x34]);
            sign_raw(c, m)
        }),
        case("ChannelBind to channel 0x3FFF", true, true, Answer(400), |c| {
            let peer = c.peer;
            c.req(Method::CHANNEL_BIND, true, |w| {
                w.channel_number(0x3fff).unwrap();
                w.xor_peer_address(&peer).unwrap();
            })
        }),
        case(
            "ChannelBind to channel 0x5000 (RFC 8656 range)",
            true,
            true,
            Answer(400),
            |c| {
                let peer = c.peer;
                c.req(Method::CHANNEL_BIND, true, |w| {
                    w.channel_number(0x5000).unwrap();
                    w.xor_peer_address(&peer).unwrap();
                })
            },
        ),
        case("CHANNEL-NUMBER of the wrong length", true, true, Answer(400), |c| {
            let peer = c.peer;
            let m = c.req(Method::CHANNEL_BIND, false, |w| w.xor_peer_address(&peer).unwrap());
            let m = append_raw(m, 0x000c, &[0x40, 0x01]);
            sign_raw(c, m)
        }),
        case("ChannelBind without CHANNEL-NUMBER", true, true, Answer(400), |c| {
            let peer = c.peer;
            c.req(Method::CHANNEL_BIND, true, |w| w.xor_peer_address(&peer).unwrap())
        }),
        case("ChannelBind without XOR-PEER-ADDRESS", true, true, Answer(400), |c| {
            c.req(Method::CHANNEL_BIND, true, |w| w.channel_number(0x4000).unwrap())
        }),
        // Indications and ChannelData (never answered).
        case("Send without an allocation", false, true, Silent, |c| {
            let peer = c.peer;
            c.msg(Class::Indication, Method::SEND, false, |w| {
                w.xor_peer_address(&peer).unwrap();
                w.data(b"x").unwrap();
            })
        }),
        case("Send with no DATA", true, true, Silent, |c| {
            let peer = c.peer;
            c.msg(Class::Indication, Method::SEND, false, |w| {
                w.xor_peer_address(&peer).unwrap()
            })
        }),
        case("Send with no XOR-PEER-ADDRESS", true, true, Silent, |c| {
            c.msg(Class::Indication, Method::SEND, false, |w| w.data(b"x").unwrap())
        }),
        case("Send to a peer without a permission", true, true, Silent, |c| {
            c.msg(Class::Indication, Method::SEND, false, |w| {
                // Permissions are per IP: the channel's peer is 127.0.0.1.
                w.xor_peer_address(&"127.0.0.3:9".parse().unwrap()).unwrap();
                w.data(b"x").unwrap();
            })
        }),
        case("ChannelData on an unbound channel", true, true, Silent, |_| {
            channel_data(0x4001, 8, 8)
        }),
        case("ChannelData longer than its datagram", true, false, Silent, |_| {
            channel_data(0x4000, 200, 50)
        }),
        case("ChannelData without an allocation", false, true, Silent, |_| {
            channel_data(0x4000, 8, 8)
        }),
        case(
            "ChannelData on channel 0x5000 (RFC 8656 range)",
            true,
            true,
            Silent,
            |_| channel_data(0x5000, 8, 8),
        ),
        case(
            "first byte 0xC0 (not STUN, not ChannelData)",
            false,
            false,
            Silent,
            |_| vec![0xc0; 40],
        ),
        case("a Binding that is fine, for contrast", false, true, Answer(U), |c| {
            c.req(Method::BINDING, false, |_| {})
        }),
    ]
}

/// Signs a raw message: appends USERNAME, REALM, NONCE and a correct MESSAGE-INTEGRITY.
fn sign_raw(c: &mut Ctx, m: Vec<u8>) -> Vec<u8> {
    let m = append_raw(m, 0x0006, b"alice");
    let m = append_raw(m, 0x0014, b"test.local");
    let nonce = c.nonce.clone();
    let m = append_raw(m, 0x0015, nonce.as_bytes());
    mi_raw(c, m)
}

/// Appends a MESSAGE-INTEGRITY computed with alice's key over `m`.
fn mi_raw(c: &mut Ctx, mut m: Vec<u8>) -> Vec<u8> {
    // MI covers the message with the length including MI itself.
    let len = (m.len() - 20 + 24) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    let mac = turnstile::proto::stun::integrity::hmac_sha1(c.key.as_bytes());
    use hmac::Mac;
    let mut mac = mac;
    mac.update(&m);
    let tag = mac.finalize().into_bytes();
    m.extend_from_slice(&0x0008u16.to_be_bytes());
    m.extend_from_slice(&20u16.to_be_bytes());
    m.extend_from_slice(&tag);
    m
}

/// One connection of some transport.
trait Conn {
    fn send(&mut self, bytes: &[u8]);
    /// The next message, or None after `wait` of silence (or a closed stream).
    fn recv(&mut self, wait: Duration) -> Option<Vec<u8>>;
}

struct Udp(UdpSocket);

impl Conn for Udp {
    fn send(&mut self, bytes: &[u8]) {
        self.0.send(bytes).unwrap();
    }
    fn recv(&mut self, wait: Duration) -> Option<Vec<u8>> {
        self.0.set_read_timeout(Some(wait)).unwrap();
        let mut buf = vec![0u8; 2048];
        let n = self.0.recv(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

struct Stream<S: Read + Write>(S, Box<dyn Fn(Duration) + Send>);

impl<S: Read + Write> Conn for Stream<S> {
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.0.write_all(bytes);
        let _ = self.0.flush();
    }
    fn recv(&mut self, wait: Duration) -> Option<Vec<u8>> {
        (self.1)(wait);
        let mut head = [0u8; 4];
        self.0.read_exact(&mut head).ok()?;
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let body = if head[0] < 0x40 { 16 + len } else { (len + 3) & !3 };
        let mut rest = vec![0u8; body];
        self.0.read_exact(&mut rest).ok()?;
        let mut m = head.to_vec();
        m.extend_from_slice(&rest);
        Some(m)
    }
}

fn tcp(addr: SocketAddr) -> Box<dyn Conn> {
    let s = TcpStream::connect(addr).unwrap();
    let t = s.try_clone().unwrap();
    Box::new(Stream(s, Box::new(move |d| t.set_read_timeout(Some(d)).unwrap())))
}

fn tls(addr: SocketAddr, cert_der: &[u8]) -> Box<dyn Conn> {
    let config = common::tls_client_config(cert_der);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let s = TcpStream::connect(addr).unwrap();
    let t = s.try_clone().unwrap();
    Box::new(Stream(
        rustls::StreamOwned::new(conn, s),
        Box::new(move |d| t.set_read_timeout(Some(d)).unwrap()),
    ))
}

fn udp(addr: SocketAddr) -> Box<dyn Conn> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(addr).unwrap();
    Box::new(Udp(s))
}

/// Allocates and permits the peer on a fresh connection.
fn prepare(conn: &mut dyn Conn, c: &mut Ctx) {
    let m = c.req(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    conn.send(&m);
    let r = conn.recv(Duration::from_secs(2)).expect("allocate answered");
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success, "allocate");
    let peer = c.peer;
    let m = c.req(Method::CHANNEL_BIND, true, |w| {
        w.channel_number(0x4000).unwrap();
        w.xor_peer_address(&peer).unwrap();
    });
    conn.send(&m);
    let r = conn.recv(Duration::from_secs(2)).expect("channel bind answered");
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success, "channel bind");
}

fn outcome(r: Option<Vec<u8>>) -> Expect {
    match r {
        None => Silent,
        Some(bytes) => match Message::parse(&bytes) {
            Ok(m) if m.class() == Class::Success => Answer(0),
            Ok(m) => Answer(m.error_code().ok().flatten().map_or(1, |e| e.code)),
            Err(_) => Answer(1),
        },
    }
}

#[test]
fn malformed_input_gets_the_right_answer_and_spares_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert();
    write_cert(dir.path(), &c);
    let cert_der = c.der;
    let server = TestServer::start(&loopback_config(&format!(
        r#"
[[listen]]
transport = "tcp"
address = "127.0.0.1:0"

[[listen]]
transport = "tls"
address = "127.0.0.1:0"

[tls]
certificate = "{}"
private_key = "{}"

[relay]
address = "127.0.0.1"
ports = "61200-61399"

[auth]
users = {{ alice = "secret" }}

[peers]
allow = ["127.0.0.0/8"]

[limits]
user_quota = 0
# The suite sends hundreds of unauthenticated requests from one address.
unauthenticated_rate = 0
"#,
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    )));
    let (udp_addr, tcp_addr, tls_addr) = (server.udp[0], server.tcp[0], server.tls[0]);

    // The legitimate client: ChannelData to an echo peer every 2 ms throughout.
    let mut legit = RawClient::connect(udp_addr);
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    legit.request(Method::ALLOCATE, true, |w| w.requested_transport(17).unwrap());
    let r = legit.request(Method::CHANNEL_BIND, true, |w| {
        w.channel_number(0x4000).unwrap();
        w.xor_peer_address(&echo_addr).unwrap();
    });
    assert_eq!(Message::parse(&r).unwrap().class(), Class::Success);
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, back) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let legit_socket = legit.socket.try_clone().unwrap();
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let s = legit_socket.try_clone().unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                s.send_to(&channel_data(0x4000, 100, 100), udp_addr).unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let receiver = {
        let back = back.clone();
        legit_socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok(n) = legit_socket.recv(&mut buf) {
                if n == 104 && buf[0] == 0x40 {
                    back.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // The key for signed cases; each connection fetches its own nonce
    // (a nonce is good on the 5-tuple it was issued to).
    let key = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", "test.local", "secret");

    let cases = cases();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut failures = Vec::new();
    let mut runs = 0;
    for transport in ["udp", "tcp", "tls"] {
        for case in &cases {
            if transport != "udp" && !case.stream {
                continue;
            }
            let mut ctx = Ctx {
                nonce: String::new(),
                key: key.clone(),
                peer: echo_addr,
                seq: 0,
            };
            let mut conn = match transport {
                "udp" => udp(udp_addr),
                "tcp" => tcp(tcp_addr),
                _ => tls(tls_addr, &cert_der),
            };
            let probe = ctx.req(Method::REFRESH, false, |_| {});
            conn.send(&probe);
            let challenge = conn.recv(Duration::from_secs(2)).expect("401 with a nonce");
            ctx.nonce = Message::parse(&challenge).unwrap().nonce().unwrap().unwrap().to_owned();
            if case.allocated {
                prepare(conn.as_mut(), &mut ctx);
            }
            let bytes = (case.build)(&mut ctx);
            conn.send(&bytes);
            let wait = if case.expect == Silent { 300 } else { 2000 };
            let got = outcome(conn.recv(Duration::from_millis(wait)));
            runs += 1;
            if got != case.expect {
                failures.push(format!(
                    "{transport}: {}: expected {:?}, got {got:?}",
                    case.name, case.expect
                ));
            }
        }
    }

    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (sent, back) = (sent.load(Ordering::Relaxed), back.load(Ordering::Relaxed));
    drop(receiver);
    eprintln!("{runs} malformed cases; legitimate client: {back}/{sent} round trips");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(sent > 500, "the legitimate client ran throughout ({sent} sent)");
    assert_eq!(back, sent, "the legitimate client lost packets");
}
