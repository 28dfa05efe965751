//! One epoll set per worker for all of its UDP relay sockets, itself
//! watched by the worker's runtime as a single file descriptor. One task
//! serves every relay socket: no task, waker or runtime registration per
//! allocation (memory per idle allocation stays small), and a wake-up finds
//! every socket that has data at once.
//!
//! Relay sockets are registered edge-triggered: after a socket is reported
//! it is read until the kernel has nothing more (or its budget runs out and
//! it is carried over), so the set's own readiness can be dropped without
//! one more epoll_wait to hear that nothing is left.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::proto::server::RelayId;

pub struct RelayPoll {
    epoll: OwnedFd,
}

/// What epoll reported for one relay socket.
#[derive(Debug, Clone, Copy)]
pub struct RelayEvent {
    pub relay: RelayId,
    pub readable: bool,
    /// The socket's error queue holds ICMP errors (IP_RECVERR).
    pub error: bool,
}

impl RelayPoll {
    pub fn new() -> io::Result<RelayPoll> {
        // SAFETY: plain system call; a valid descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RelayPoll { epoll })
    }

    /// A second handle to the set, for the runtime to watch.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.epoll.try_clone()
    }

    pub fn add(&self, socket: RawFd, relay: RelayId) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: u64::from(relay.0),
        };
        // SAFETY: both descriptors are open; ev is live for the call.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, socket, &mut ev) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Stops watching a socket (before it is closed, so a queued send that
    /// keeps it open a little longer cannot report for a reused relay id).
    pub fn remove(&self, socket: RawFd) {
        // SAFETY: plain system call; a socket not in the set only returns an error.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                socket,
                std::ptr::null_mut(),
            )
        };
    }

    /// Collects ready sockets without waiting; returns how many epoll
    /// reported (fewer than `space` means it reported all it had).
    pub fn poll(&self, space: &mut [libc::epoll_event], out: &mut Vec<RelayEvent>) -> io::Result<usize> {
        let max = i32::try_from(space.len()).unwrap_or(i32::MAX);
        // SAFETY: space is a live buffer of at least `max` events.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), space.as_mut_ptr(), max, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = n as usize;
        for ev in space.iter().take(n) {
            let flags = ev.events;
            out.push(RelayEvent {
                relay: RelayId(ev.u64 as u32),
                readable: flags & (libc::EPOLLIN as u32) != 0,
                error: flags & (libc::EPOLLERR as u32) != 0,
            });
        }
        Ok(n)
    }
}
