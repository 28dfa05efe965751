//! Outgoing datagrams of one receive batch, sent together: consecutive
//! datagrams from the same socket to the same destination with the same
//! size leave in one sendmsg with UDP GSO (UDP_SEGMENT), gathered from
//! where they already lie — no copy. Anything else goes out one by one.
//!
//! The queue holds buffer offsets, not slices: the caller flushes it with
//! the buffer the offsets point into, before that buffer is reused.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use std::net::UdpSocket;

/// The kernel's limit on segments in one GSO send (UDP_MAX_SEGMENTS).
const MAX_SEGMENTS: usize = 64;
/// Largest UDP payload a GSO send may carry in all.
const MAX_GSO_BYTES: usize = 65_000;

/// Where a queued datagram leaves from.
#[derive(Clone)]
pub enum Source {
    /// A listener socket that outlives the queue's flush.
    Listener(RawFd),
    /// A relay socket, kept open until the flush even if its allocation
    /// ends in the same batch.
    Relay(Rc<UdpSocket>),
}

impl Source {
    fn fd(&self) -> RawFd {
        match self {
            Source::Listener(fd) => *fd,
            Source::Relay(s) => s.as_raw_fd(),
        }
    }
}

struct Entry {
    from: Source,
    to: SocketAddr,
    at: usize,
    len: usize,
}

/// What a flush did, for the worker's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub datagrams: u64,
    /// sendmsg calls that carried more than one datagram (GSO).
    pub gso_sends: u64,
    /// Datagrams the kernel refused (full buffer, unreachable): dropped, as UDP is.
    pub dropped: u64,
}

impl Flushed {
    pub fn add(&mut self, other: Flushed) {
        self.datagrams += other.datagrams;
        self.gso_sends += other.gso_sends;
        self.dropped += other.dropped;
    }
}

pub struct SendQueue {
    entries: Vec<Entry>,
    gso: bool,
}

impl SendQueue {
    /// `gso`: try UDP GSO (switched off for good on the first refusal).
    pub fn new(gso: bool) -> SendQueue {
        SendQueue {
            entries: Vec::with_capacity(128),
            gso,
        }
    }

    pub fn push(&mut self, from: Source, to: SocketAddr, at: usize, len: usize) {
        self.entries.push(Entry { from, to, at, len });
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sends everything queued; `buf` is the buffer the offsets refer to.
    pub fn flush(&mut self, buf: &[u8]) -> Flushed {
        let mut done = Flushed::default();
        let mut i = 0;
        while let Some(first) = self.entries.get(i) {
            let fd = first.from.fd();
            let segment = first.len;
            let mut end = i + 1;
            let mut total = segment;
            if self.gso && segment > 0 {
                while let Some(e) = self.entries.get(end) {
                    let fits = end - i < MAX_SEGMENTS && total + e.len <= MAX_GSO_BYTES;
                    if !fits || e.from.fd() != fd || e.to != first.to || e.len > segment || e.len == 0 {
                        break;
                    }
                    total += e.len;
                    end += 1;
                    // Only the last segment may be shorter.
                    if e.len < segment {
                        break;
                    }
                }
            }
            let group = self.entries.get(i..end).unwrap_or_default();
            done.datagrams += group.len() as u64;
            if group.len() > 1 {
                match send_segments(fd, first.to, group, segment, buf) {
                    Ok(()) => done.gso_sends += 1,
                    Err(e) => {
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                        ) {
                            tracing::info!("UDP GSO refused ({e}); sending datagrams one by one");
                            self.gso = false;
                        }
                        for e in group {
                            if !send_one(e, buf) {
                                done.dropped += 1;
                            }
                        }
                    }
                }
            } else if !send_one(first, buf) {
                done.dropped += 1;
            }
            i = end;
        }
        self.entries.clear();
        done
    }
}

fn send_one(e: &Entry, buf: &[u8]) -> bool {
    let Some(data) = buf.get(e.at..e.at + e.len) else {
        return false;
    };
    let to = socket2::SockAddr::from(e.to);
    // SAFETY: fd is an open socket for the duration of the flush (see Source);
    // data and the address are live for the call.
    let r = unsafe {
        libc::sendto(
            e.from.fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT,
            to.as_ptr().cast(),
            to.len(),
        )
    };
    r >= 0
}

/// One sendmsg of several equal-size datagrams with UDP_SEGMENT.
fn send_segments(fd: RawFd, to: SocketAddr, group: &[Entry], segment: usize, buf: &[u8]) -> io::Result<()> {
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_SEGMENTS];
    let mut n = 0;
    for (iov, e) in iovs.iter_mut().zip(group) {
        let data = buf.get(e.at..e.at + e.len).ok_or(io::ErrorKind::InvalidInput)?;
        *iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        n += 1;
    }
    let to = socket2::SockAddr::from(to);
    // Room for one cmsg carrying a u16, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = iovs.as_mut_ptr();
    msg.msg_iovlen = n;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
    // SAFETY: the control buffer is large enough for one u16 cmsg (checked by CMSG_SPACE above).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment as u16);
    }
    // SAFETY: fd is an open socket; msg points at live buffers.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdp;
    use std::time::Duration;

    fn receiver() -> StdUdp {
        let s = StdUdp::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    fn drain(s: &StdUdp, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let (len, _) = s.recv_from(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    /// Ten datagrams in a buffer, each filled with its own index; where
    /// they go decides what may share a GSO send.
    fn send_all(gso: bool) -> (Flushed, Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let sender = StdUdp::bind("127.0.0.1:0").unwrap();
        let (a, b) = (receiver(), receiver());
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut buf = vec![0u8; 10 * 200];
        let plan: [(SocketAddr, usize); 10] = [
            (to_a, 100),
            (to_a, 100),
            (to_a, 100),
            (to_a, 100),
            (to_a, 100),
            (to_a, 60), // a shorter last segment ends the group
            (to_b, 100),
            (to_b, 100),
            (to_b, 100),
            (to_a, 100),
        ];
        let mut q = SendQueue::new(gso);
        for (i, (to, len)) in plan.iter().enumerate() {
            buf[i * 200..i * 200 + len].fill(i as u8);
            q.push(Source::Listener(sender.as_raw_fd()), *to, i * 200, *len);
        }
        let done = q.flush(&buf);
        assert!(q.is_empty());
        (done, drain(&a, 7), drain(&b, 3))
    }

    fn check(at_a: &[Vec<u8>], at_b: &[Vec<u8>]) {
        let expect_a: Vec<(u8, usize)> = vec![(0, 100), (1, 100), (2, 100), (3, 100), (4, 100), (5, 60), (9, 100)];
        for (d, (fill, len)) in at_a.iter().zip(expect_a) {
            assert_eq!(d.len(), len);
            assert!(d.iter().all(|&x| x == fill), "datagram {fill} intact and in order");
        }
        for (d, fill) in at_b.iter().zip([6u8, 7, 8]) {
            assert_eq!(d.len(), 100);
            assert!(d.iter().all(|&x| x == fill));
        }
    }

    #[test]
    fn equal_datagrams_to_one_destination_share_a_gso_send() {
        let (done, at_a, at_b) = send_all(true);
        assert_eq!(done.datagrams, 10);
        assert_eq!(done.dropped, 0);
        // Groups: 0..=5 to A (GSO), 6..=8 to B (GSO), 9 alone.
        assert_eq!(done.gso_sends, 2);
        check(&at_a, &at_b);
    }

    #[test]
    fn without_gso_every_datagram_goes_alone() {
        let (done, at_a, at_b) = send_all(false);
        assert_eq!(done.datagrams, 10);
        assert_eq!(done.gso_sends, 0);
        check(&at_a, &at_b);
    }
}
