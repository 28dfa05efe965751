//! The UDP listener driver: batched receive (recvmmsg, GRO) through
//! quinn-udp, each datagram handed to the worker's sans-IO core, answers sent
//! straight back from the same socket.

use std::cell::RefCell;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::rc::Rc;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::proto::server::{ClientOutcome, Server};

/// Datagrams received per system call.
const BATCH: usize = 32;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Binds a UDP socket with SO_REUSEPORT so every worker can own one on the
/// same address and the kernel spreads clients across them.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A listener socket with its quinn-udp state.
pub struct UdpListener {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl UdpListener {
    /// Wraps a bound, non-blocking socket; must run inside the worker's runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<UdpListener> {
        let state = UdpSocketState::new((&socket).into())?;
        let socket = UdpSocket::from_std(socket)?;
        Ok(UdpListener { socket, state })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Receives and answers until the socket fails.
    pub async fn run(self, server: Rc<RefCell<Server>>) -> io::Result<()> {
        // One slot per datagram of the batch, large enough for GRO trains.
        let slot = MAX_DATAGRAM.max(1500 * self.state.gro_segments());
        let mut storage = vec![0u8; slot * BATCH];
        let mut meta = [RecvMeta::default(); BATCH];
        let mut out = vec![0u8; 2048];
        loop {
            let mut bufs: [IoSliceMut<'_>; BATCH] = {
                let mut chunks = storage.chunks_mut(slot);
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
            };
            let n = self
                .socket
                .async_io(Interest::READABLE, || {
                    self.state.recv((&self.socket).into(), &mut bufs, &mut meta)
                })
                .await?;
            let mut server = server.borrow_mut();
            for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                let stride = m.stride.max(1);
                for datagram in buf.get(..m.len).unwrap_or_default().chunks(stride) {
                    match server.handle_client_packet(m.addr, datagram, &mut out) {
                        ClientOutcome::Reply { len } => self.send(m.addr, out.get(..len).unwrap_or_default()),
                        ClientOutcome::Consumed => {}
                        ClientOutcome::Drop(reason) => {
                            metrics::counter!("turnstile_dropped_packets_total", "reason" => reason.label())
                                .increment(1);
                        }
                    }
                }
            }
        }
    }

    /// Sends without waiting: a full socket buffer drops the datagram, as UDP would.
    fn send(&self, destination: SocketAddr, contents: &[u8]) {
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        };
        if self
            .socket
            .try_io(Interest::WRITABLE, || self.state.try_send((&self.socket).into(), &t))
            .is_err()
        {
            metrics::counter!("turnstile_send_dropped_total").increment(1);
        }
    }
}
