//! Relay sockets: bound on demand for each allocation, with DF when the
//! client asked for DONT-FRAGMENT and the kernel's ICMP error queue enabled
//! (IP_RECVERR) so unreachable peers can be reported to the client.

use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::proto::server::BindResult;

/// Binds a non-blocking relay socket.
pub fn bind(addr: SocketAddr, dont_fragment: bool) -> Result<std::net::UdpSocket, BindResult> {
    let classify = |e: io::Error| {
        tracing::debug!("relay bind {addr}: {e}");
        match e.raw_os_error() {
            Some(libc::EADDRINUSE) | Some(libc::EACCES) => BindResult::InUse,
            _ => BindResult::Failed,
        }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(classify)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(classify)?;
    }
    socket.set_nonblocking(true).map_err(classify)?;
    socket.bind(&addr.into()).map_err(classify)?;
    let fd = socket.as_raw_fd();
    let (level, recverr, mtu_level, mtu_opt, mtu_do) = if addr.is_ipv6() {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVERR,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    // Best effort: a relay works without either.
    let _ = setsockopt_int(fd, level, recverr, 1);
    if dont_fragment {
        let _ = setsockopt_int(fd, mtu_level, mtu_opt, mtu_do);
    }
    Ok(socket.into())
}

/// A TCP socket bound to a relayed address (RFC 6062). The relay's
/// listener and its outgoing connections share the address, so all set
/// SO_REUSEADDR and SO_REUSEPORT.
pub fn tcp_socket(addr: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    Ok(s)
}

/// Sends a datagram from a relay socket straight to the kernel (a new
/// socket has no readiness in the runtime yet, and UDP needs none: a full
/// buffer is a drop). False when the datagram was not sent.
pub fn send_to(socket: &std::net::UdpSocket, data: &[u8], peer: SocketAddr) -> bool {
    socket2::SockRef::from(socket).send_to(data, &peer.into()).is_ok()
}

/// Datagrams read from a relay socket per system call.
pub const RECV_BATCH: usize = 32;

/// Receive slots for recvmmsg on relay sockets, shared by all of a worker's
/// relays (one thread, one batch at a time). Each slot leaves `headroom`
/// bytes in front of the datagram and `tailroom` after it, so the core can
/// frame it for the client in place.
pub struct PeerBatch {
    storage: Vec<u8>,
    slot: usize,
    headroom: usize,
    addrs: Vec<libc::sockaddr_storage>,
    lens: [usize; RECV_BATCH],
}

impl PeerBatch {
    pub fn new(headroom: usize, max_datagram: usize, tailroom: usize) -> PeerBatch {
        let slot = headroom + max_datagram + tailroom;
        PeerBatch {
            storage: vec![0u8; slot * RECV_BATCH],
            slot,
            headroom,
            // SAFETY: an all-zero sockaddr_storage is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; RECV_BATCH],
            lens: [0; RECV_BATCH],
        }
    }

    /// One recvmmsg into slots `first..`; WouldBlock when nothing is waiting.
    /// Returns how many slots (from `first`) were filled.
    pub fn recv(&mut self, fd: RawFd, first: usize) -> io::Result<usize> {
        let room = self.slot - self.headroom;
        let free = RECV_BATCH.saturating_sub(first);
        if free == 0 {
            return Ok(0);
        }
        let mut iovs: [libc::iovec; RECV_BATCH] = std::array::from_fn(|_| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        for (iov, chunk) in iovs.iter_mut().zip(self.storage.chunks_mut(self.slot).skip(first)) {
            if let Some(tail) = chunk.get_mut(self.headroom..) {
                iov.iov_base = tail.as_mut_ptr().cast();
                // The tailroom stays free for the core.
                iov.iov_len = room.min(tail.len());
            }
        }
        // SAFETY: zeroed mmsghdr is valid; the pointers set below outlive the call.
        let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
        for ((h, iov), addr) in hdrs
            .iter_mut()
            .zip(iovs.iter_mut())
            .zip(self.addrs.iter_mut().skip(first))
        {
            h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: fd is an open socket; the first `free` hdrs point at live buffers of the sizes given.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                free as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = r as usize;
        for (len, h) in self.lens.iter_mut().skip(first).zip(hdrs.iter()).take(n) {
            *len = h.msg_len as usize;
        }
        for (h, addr) in hdrs.iter().zip(self.addrs.iter_mut().skip(first)).take(n) {
            if h.msg_hdr.msg_namelen == 0 {
                addr.ss_family = 0;
            }
        }
        Ok(n)
    }

    /// Datagram `i` of the last receive: its source, its slot (headroom,
    /// datagram, tailroom), and where in the whole buffer that slot starts.
    pub fn slot_mut(&mut self, i: usize) -> Option<(SocketAddr, &mut [u8], usize)> {
        let peer = self.source(i)?;
        let at = i * self.slot;
        let slot = self.storage.get_mut(at..at + self.slot)?;
        Some((peer, slot, at))
    }

    /// Where datagram `i` of the last receive came from.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let addr = self.addrs.get(i)?;
        // SAFETY: the kernel wrote a socket address of the family it set (zeroed otherwise).
        unsafe { sockaddr_to_std(addr, std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t) }
    }

    /// Datagram `i` of the last receive, after `headroom` bytes of its slot
    /// (`with_headroom`: from the slot's start).
    pub fn datagram(&self, i: usize, with_headroom: bool) -> &[u8] {
        let at = i * self.slot + if with_headroom { 0 } else { self.headroom };
        let end = i * self.slot + self.headroom + self.len(i);
        self.storage.get(at..end).unwrap_or_default()
    }

    /// Length of datagram `i` of the last receive.
    pub fn len(&self, i: usize) -> usize {
        self.lens.get(i).copied().unwrap_or(0)
    }

    /// The whole buffer, for sending what the core framed in place.
    pub fn storage(&self) -> &[u8] {
        &self.storage
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: fd is an open socket; the option value is a live i32 of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An ICMP error the kernel queued for a datagram this socket sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    /// The destination of the datagram that failed: the peer.
    pub peer: SocketAddr,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// ee_info: the next-hop MTU for "fragmentation needed" / "packet too big".
    pub info: u32,
}

/// Reads one entry of the socket's error queue (MSG_ERRQUEUE), if any.
/// Entries that did not come from ICMP are consumed and skipped.
pub fn recv_icmp_error(fd: RawFd) -> io::Result<Option<IcmpError>> {
    loop {
        let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut control = [0u64; 64];
        let mut data = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: zeroed msghdr is a valid "empty" value; pointers set below stay live for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = name.as_mut_ptr().cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: fd is an open socket and msg points at live buffers.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // SAFETY: the kernel filled msg_name up to msg_namelen.
        let Some(peer) = (unsafe { sockaddr_to_std(name.as_ptr(), msg.msg_namelen) }) else {
            continue;
        };
        // SAFETY: CMSG_* walk the control buffer the kernel filled, bounded by msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and within the control buffer.
            let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
            let is_err = (level == libc::IPPROTO_IP && kind == libc::IP_RECVERR)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_RECVERR);
            if is_err {
                // SAFETY: a RECVERR cmsg carries a sock_extended_err; read_unaligned copes with alignment.
                let ee: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>()) };
                if ee.ee_origin == libc::SO_EE_ORIGIN_ICMP || ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6 {
                    return Ok(Some(IcmpError {
                        peer,
                        icmp_type: ee.ee_type,
                        icmp_code: ee.ee_code,
                        info: ee.ee_info,
                    }));
                }
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
}

/// Converts a kernel socket address.
///
/// # Safety
/// `addr` must point at `len` initialised bytes of a socket address.
unsafe fn sockaddr_to_std(addr: *const libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees addr is initialised for len bytes; family is read first.
    unsafe {
        match i32::from((*addr).ss_family) {
            libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                let a = &*addr.cast::<libc::sockaddr_in>();
                Some(SocketAddr::V4(SocketAddrV4::new(
                    u32::from_be(a.sin_addr.s_addr).into(),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let a = &*addr.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::V6(SocketAddrV6::new(
                    a.sin6_addr.s6_addr.into(),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}
