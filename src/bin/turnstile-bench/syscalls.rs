//! The few Linux calls the generator and the forwarder batch with:
//! recvmmsg/sendmmsg, epoll, timerfd and CPU pinning.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// Receive slots for one recvmmsg call: the server's own peer batch
/// (`BATCH` slots, each read after `headroom` bytes), with "nothing waiting"
/// as zero datagrams.
pub struct RecvSlots {
    batch: turnstile::io::relay::PeerBatch,
    headroom: usize,
}

impl RecvSlots {
    pub fn new(slot: usize, headroom: usize) -> RecvSlots {
        RecvSlots {
            batch: turnstile::io::relay::PeerBatch::new(headroom, slot - headroom, 0),
            headroom,
        }
    }

    /// One recvmmsg on a non-blocking socket; returns how many slots were
    /// filled (0 when nothing was waiting).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        match self.batch.recv(fd, 0) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }

    /// The datagram in slot `i` (after the headroom).
    pub fn datagram(&self, i: usize) -> &[u8] {
        self.batch.datagram(i, false)
    }

    /// Slot `i` from its start: headroom followed by the datagram.
    pub fn with_headroom(&self, i: usize) -> &[u8] {
        self.batch.datagram(i, true)
    }

    pub fn with_headroom_mut(&mut self, i: usize) -> &mut [u8] {
        let end = self.headroom + self.batch.len(i);
        match self.batch.slot_mut(i) {
            Some((_, slot, _)) => &mut slot[..end],
            None => &mut [],
        }
    }

    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        self.batch.source(i)
    }
}

/// Sends up to `BATCH` datagrams with one sendmmsg (`to` is `None` on a
/// connected socket). Returns how many the kernel took.
pub fn send_batch(fd: RawFd, datagrams: &[(&[u8], Option<SocketAddr>)]) -> io::Result<usize> {
    let n = datagrams.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut names: [libc::sockaddr_storage; BATCH] =
        // SAFETY: an all-zero sockaddr_storage is a valid value.
        unsafe { MaybeUninit::zeroed().assume_init() };
    let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|_| libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    });
    // SAFETY: zeroed mmsghdr is valid; the pointers set below outlive the call.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, (data, to)) in datagrams.iter().take(n).enumerate() {
        iovs[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        if let Some(to) = to {
            let len = std_to_sockaddr(to, &mut names[i]);
            hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = len;
        }
    }
    // SAFETY: fd is a socket; hdrs point at live buffers.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(r as usize)
}

/// Sends `data` as datagrams of `segment` bytes with one sendmsg (UDP GSO)
/// on a connected socket. Returns whether the kernel took it.
pub fn send_gso(fd: RawFd, data: &[u8], segment: u16) -> io::Result<bool> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    // SAFETY: the control buffer holds one cmsg with a u16 (CMSG_SPACE above).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
    // SAFETY: fd is a socket; msg points at live buffers.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(true)
}

fn std_to_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    let s = socket2::SockAddr::from(*addr);
    let len = s.len();
    // SAFETY: SockAddr holds `len` valid bytes of a sockaddr; out is large enough for any.
    unsafe {
        std::ptr::copy_nonoverlapping(
            s.as_ptr().cast::<u8>(),
            (out as *mut libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        )
    };
    len
}

/// A level-triggered epoll set; tokens are caller-chosen u64s.
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
        })
    }

    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open; ev is live for the call.
        check(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    pub fn remove(&self, fd: RawFd) {
        // SAFETY: plain syscall; an fd not in the set only returns an error.
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Waits up to `timeout_ms` (0 polls) and calls `each` with every ready token.
    pub fn wait(&mut self, timeout_ms: i32, mut each: impl FnMut(u64)) -> io::Result<()> {
        // SAFETY: events is a live buffer of the length passed.
        let r = unsafe { libc::epoll_wait(self.fd, self.events.as_mut_ptr(), self.events.len() as i32, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        for ev in self.events.iter().take(r as usize) {
            each(ev.u64);
        }
        Ok(())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: fd is owned by this value.
        unsafe { libc::close(self.fd) };
    }
}

/// A periodic timer as a file descriptor (for epoll), with nanosecond periods.
pub struct Ticker {
    pub fd: RawFd,
}

impl Ticker {
    pub fn new(period_ns: u64) -> io::Result<Ticker> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) })?;
        let ts = libc::timespec {
            tv_sec: (period_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (period_ns % 1_000_000_000) as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: fd is a timerfd; spec is live for the call.
        check(unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) })?;
        Ok(Ticker { fd })
    }

    /// Clears the expirations that made the timer readable.
    pub fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        unsafe { libc::read(self.fd, (&mut n as *mut u64).cast(), 8) };
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // SAFETY: fd is owned by this value.
        unsafe { libc::close(self.fd) };
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; the call reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        check(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set))?;
    }
    Ok(())
}

/// Raises the open-file limit to its hard maximum (thousands of sockets).
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write a live struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            return lim.rlim_cur;
        }
    }
    0
}
