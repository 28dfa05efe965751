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

/// Sends a datagram from a relay socket straight to the kernel (a new
/// socket has no readiness in the runtime yet, and UDP needs none: a full
/// buffer is a drop). False when the datagram was not sent.
pub fn send_to(socket: &tokio::net::UdpSocket, data: &[u8], peer: SocketAddr) -> bool {
    socket2::SockRef::from(socket).send_to(data, &peer.into()).is_ok()
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
