//! The hand-over channel of a live upgrade: an unnamed socketpair between
//! the running process and the new one it starts. Nothing else can connect
//! to it (it has no path), and the secrets in the state (nonce and port
//! keys, long-term keys) stay in memory and on this socket, never on disk.
//!
//! SOCK_SEQPACKET keeps message boundaries, so descriptors (SCM_RIGHTS, at
//! most [`FDS_PER_MESSAGE`] a message) and state bytes (in chunks) arrive
//! in the order they were sent. The running process sends the
//! [`Manifest`] and every socket, then `End`; the new one answers `Ready`
//! (or `Refused` with why) and waits for `Commit` before it serves.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};

/// The environment variable naming the new process's end of the channel.
pub const ENV_FD: &str = "TURNSTILE_UPGRADE_FD";
/// The kernel takes at most 253 descriptors in one message.
pub const FDS_PER_MESSAGE: usize = 250;
/// State bytes per message.
const CHUNK: usize = 60 * 1024;

const TAG_FDS: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_END: u8 = 3;
const TAG_READY: u8 = 4;
const TAG_REFUSED: u8 = 5;
const TAG_COMMIT: u8 = 6;

/// Everything but the descriptors, which travel beside it: `fd` fields
/// are positions in the list of descriptors received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The state format ([`crate::proto::server::snapshot::VERSION`]).
    pub version: u32,
    /// The running process's PID (the new one names it in its logs).
    pub pid: u32,
    /// Keys outstanding nonces and reservation tokens were made with.
    pub nonce_secret: [u8; 32],
    pub port_seed: [u8; 32],
    pub workers: usize,
    pub listeners: Vec<ListenerEntry>,
    /// The metrics and admin HTTP listeners: configured address and fd.
    pub metrics: Option<(SocketAddr, usize)>,
    pub admin: Option<(SocketAddr, usize)>,
    /// One per worker, in worker order.
    pub states: Vec<WorkerState>,
}

/// One listen entry: its listener id in the running workers, the
/// transport and address as configured (how the new configuration finds
/// it) and one socket per worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerEntry {
    pub id: u16,
    /// "udp", "tcp" or "tls".
    pub transport: String,
    pub configured: SocketAddr,
    pub bound: SocketAddr,
    pub fds: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerState {
    /// A [`crate::proto::server::snapshot::Snapshot`], encoded.
    pub core: Vec<u8>,
    /// UDP relay sockets by relay id.
    pub relays: Vec<(u32, usize)>,
    /// Plain TCP client connections, parked between messages.
    pub streams: Vec<StreamEntry>,
    /// RFC 6062 TCP relays' listening sockets by relay id.
    pub tcp_relays: Vec<(u32, usize)>,
    /// RFC 6062 peer connections: id, peer socket, data connection socket.
    pub peers: Vec<(u32, usize, Option<usize>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamEntry {
    /// The client's 5-tuple: listener id in the running workers, address.
    pub listener: u16,
    pub client: SocketAddr,
    pub fd: usize,
    /// Read and not handled (a partial message), and queued for the client.
    pub inbound: Vec<u8>,
    pub outbound: Vec<u8>,
}

/// One end of the channel.
pub struct Channel {
    fd: OwnedFd,
}

/// A socketpair: (the running process's end, the new process's end). Both
/// close on exec; the new process's end is made inheritable in the child
/// only, between fork and exec.
pub fn pair() -> io::Result<(Channel, OwnedFd)> {
    let (a, b) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).map_err(io::Error::from)?;
    Ok((Channel { fd: a }, b))
}

impl Channel {
    /// The new process's end, named by [`ENV_FD`].
    ///
    /// # Safety
    /// `fd` must be an open descriptor this process owns and uses nowhere else.
    pub unsafe fn from_raw(fd: RawFd) -> Channel {
        // SAFETY: the caller guarantees ownership.
        Channel {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }
    }

    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        let s = socket2::SockRef::from(&self.fd);
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))
    }

    fn send(&self, tag: u8, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(1 + body.len());
        msg.push(tag);
        msg.extend_from_slice(body);
        let iov = [std::io::IoSlice::new(&msg)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).map_err(io::Error::from)?;
        Ok(())
    }

    /// One message: its tag, body and descriptors.
    fn recv(&self) -> io::Result<(u8, Vec<u8>, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; CHUNK + 16];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process just now; nothing else owns them.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let n = msg.bytes;
        if truncated {
            return Err(io::Error::other("hand-over message truncated"));
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process went away",
            ));
        }
        let tag = buf.first().copied().unwrap_or(0);
        buf.truncate(n);
        buf.remove(0);
        Ok((tag, buf, fds))
    }

    /// Sends the manifest and the descriptors it names, in order.
    /// `fds` must stay open until this returns.
    pub fn send_state(&self, manifest: &Manifest, fds: &[RawFd]) -> io::Result<()> {
        for chunk in fds.chunks(FDS_PER_MESSAGE) {
            self.send(TAG_FDS, &[], chunk)?;
        }
        let bytes = postcard::to_stdvec(manifest).map_err(io::Error::other)?;
        for chunk in bytes.chunks(CHUNK) {
            self.send(TAG_DATA, chunk, &[])?;
        }
        self.send(TAG_END, &[], &[])
    }

    /// Receives what [`Channel::send_state`] sent.
    pub fn recv_state(&self) -> io::Result<(Manifest, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        let mut bytes = Vec::new();
        loop {
            let (tag, body, received) = self.recv()?;
            fds.extend(received);
            match tag {
                TAG_FDS => {}
                TAG_DATA => bytes.extend_from_slice(&body),
                TAG_END => break,
                other => return Err(io::Error::other(format!("hand-over: unexpected message {other}"))),
            }
        }
        let manifest = postcard::from_bytes(&bytes).map_err(|e| io::Error::other(format!("hand-over state: {e}")))?;
        Ok((manifest, fds))
    }

    /// The new process restored everything and waits for the go-ahead.
    pub fn ready(&self) -> io::Result<()> {
        self.send(TAG_READY, &[], &[])
    }

    /// The new process cannot take over, and why.
    pub fn refuse(&self, why: &str) -> io::Result<()> {
        let why = why.as_bytes();
        self.send(TAG_REFUSED, why.get(..CHUNK.min(why.len())).unwrap_or_default(), &[])
    }

    /// Waits for the new process's answer: `Ok` when it is ready.
    pub fn wait_ready(&self) -> io::Result<()> {
        match self.recv()? {
            (TAG_READY, _, _) => Ok(()),
            (TAG_REFUSED, why, _) => Err(io::Error::other(String::from_utf8_lossy(&why).into_owned())),
            (other, _, _) => Err(io::Error::other(format!("hand-over: unexpected message {other}"))),
        }
    }

    /// The running process let go: the new one serves from now on.
    pub fn commit(&self) -> io::Result<()> {
        self.send(TAG_COMMIT, &[], &[])
    }

    pub fn wait_commit(&self) -> io::Result<()> {
        match self.recv()? {
            (TAG_COMMIT, _, _) => Ok(()),
            (other, _, _) => Err(io::Error::other(format!("hand-over: unexpected message {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_hundreds_of_sockets_cross_in_order() {
        let (old, new) = pair().unwrap();
        // SAFETY: `new` is ours and moves into the channel.
        let new = unsafe { Channel::from_raw(std::os::fd::IntoRawFd::into_raw_fd(new)) };
        let sockets: Vec<std::net::UdpSocket> = (0..600)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let manifest = Manifest {
            version: 1,
            pid: 7,
            nonce_secret: [1; 32],
            port_seed: [2; 32],
            workers: 2,
            listeners: vec![],
            metrics: None,
            admin: None,
            states: vec![WorkerState {
                core: vec![9; 200_000],
                relays: (0..600).map(|i| (i as u32, i)).collect(),
                streams: vec![],
                tcp_relays: vec![],
                peers: vec![],
            }],
        };
        let sender = std::thread::spawn(move || {
            let raw: Vec<RawFd> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
            old.send_state(&manifest, &raw).unwrap();
            old.wait_ready().unwrap();
            old.commit().unwrap();
            sockets.iter().map(|s| s.local_addr().unwrap()).collect::<Vec<_>>()
        });
        let (m, fds) = new.recv_state().unwrap();
        new.ready().unwrap();
        new.wait_commit().unwrap();
        let sent = sender.join().unwrap();
        assert_eq!(m.states[0].core.len(), 200_000);
        assert_eq!(fds.len(), 600);
        for (fd, addr) in fds.into_iter().zip(sent) {
            let s = std::net::UdpSocket::from(fd);
            assert_eq!(s.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn a_refusal_carries_its_reason() {
        let (old, new) = pair().unwrap();
        // SAFETY: as above.
        let new = unsafe { Channel::from_raw(std::os::fd::IntoRawFd::into_raw_fd(new)) };
        new.refuse("state format 2, this turnstile reads 1").unwrap();
        let e = old.wait_ready().unwrap_err();
        assert!(e.to_string().contains("format 2"), "{e}");
        drop(new);
        assert!(old.wait_ready().is_err());
    }
}
