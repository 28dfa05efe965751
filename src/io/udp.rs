//! UDP listener sockets: SO_REUSEPORT per worker, batched receive (recvmmsg,
//! GRO trains split by stride) through quinn-udp.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams received per system call.
pub const BATCH: usize = 32;
/// Largest UDP payload.
pub const MAX_DATAGRAM: usize = 65_535;

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
    // Every client of a worker arrives through this one socket: room for a
    // burst, and for the datagrams that wait while a live upgrade holds the
    // workers still. The kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(LISTENER_RECEIVE_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Receive buffer asked for on each UDP listener socket.
pub const LISTENER_RECEIVE_BUFFER: usize = 4 << 20;

/// A listener socket with its quinn-udp state.
pub struct UdpListener {
    socket: UdpSocket,
    state: UdpSocketState,
}

/// Receive buffers for one listener: a slot per datagram of a batch.
pub struct RecvBatch {
    storage: Vec<u8>,
    slot: usize,
    meta: [RecvMeta; BATCH],
}

impl RecvBatch {
    /// The buffer the offsets given by [`UdpListener::recv`] refer to.
    pub fn storage(&self) -> &[u8] {
        &self.storage
    }
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

    pub fn batch(&self) -> RecvBatch {
        let slot = MAX_DATAGRAM.max(1500 * self.state.gro_segments());
        RecvBatch {
            storage: vec![0u8; slot * BATCH],
            slot,
            meta: [RecvMeta::default(); BATCH],
        }
    }

    /// The socket, for sends batched outside this type.
    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }

    /// Waits for datagrams and calls `each(source, offset, datagram)` for
    /// every one; `offset` is where the datagram lies in `batch.storage()`.
    pub async fn recv(&self, batch: &mut RecvBatch, mut each: impl FnMut(SocketAddr, usize, &[u8])) -> io::Result<()> {
        let RecvBatch { storage, slot, meta } = batch;
        let mut bufs: [IoSliceMut<'_>; BATCH] = {
            let mut chunks = storage.chunks_mut(*slot);
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
        };
        let n = self
            .socket
            .async_io(Interest::READABLE, || {
                self.state.recv((&self.socket).into(), &mut bufs, meta)
            })
            .await?;
        if n < BATCH {
            // A short batch drained the queue: drop the readiness now rather
            // than pay a system call to hear EAGAIN. Edge-triggered epoll
            // reports anything that arrived since, so nothing is stranded.
            let _ = self
                .socket
                .try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        }
        for (i, (m, buf)) in meta.iter().zip(bufs.iter()).take(n).enumerate() {
            let stride = m.stride.max(1);
            for (j, datagram) in buf.get(..m.len).unwrap_or_default().chunks(stride).enumerate() {
                each(m.addr, i * *slot + j * stride, datagram);
            }
        }
        Ok(())
    }

    /// Sends without waiting: a full socket buffer drops the datagram, as
    /// UDP would, and reports false.
    pub fn send(&self, destination: SocketAddr, contents: &[u8]) -> bool {
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        };
        // Straight to the kernel, not through the runtime's readiness cache
        // (which knows nothing about a socket before its first event): a full
        // buffer is a drop, as for any UDP router.
        self.state.try_send((&self.socket).into(), &t).is_ok()
    }
}
