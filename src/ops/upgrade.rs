//! Live upgrade: the running process starts the binary at its own path
//! (by then the new version) with the same arguments, hands it every
//! listener, every UDP relay socket, every plain TCP client connection and
//! RFC 6062 relay and connection, and its workers' state, and lets go once
//! the new process has restored everything. TLS connections (and what
//! else cannot move) stay with the running process, which serves them as
//! in a drain and then exits.
//!
//! Safety: until the commit the running process only holds still; if the
//! new binary does not start, refuses the state or is not ready within
//! `[server] upgrade_timeout`, it is killed and the running process serves
//! on as if nothing happened.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::Transport;
use crate::io::handover::StreamExport;
use crate::io::{Inheritance, Started};
use crate::ops::handover::{self, Channel, ListenerEntry, Manifest, StreamEntry, WorkerState};
use crate::proto::server::RelayId;
use crate::proto::server::snapshot::{self, Snapshot};
use crate::proto::server::{ClientKey, ListenerId};

/// How this process was started, to start its successor the same way.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The binary's path as started (a package upgrade replaces the file
    /// there; `/proc/self/exe` would still name the old one).
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl Invocation {
    pub fn current() -> Invocation {
        let mut args = std::env::args_os();
        let argv0 = args.next().map(PathBuf::from).unwrap_or_default();
        // A bare name was found on PATH: resolve it now, as the working
        // directory or PATH may differ by the time of the upgrade.
        let program = if argv0.components().count() > 1 {
            std::path::absolute(&argv0).unwrap_or(argv0)
        } else {
            std::env::current_exe()
                .map(|p| {
                    let s = p.to_string_lossy();
                    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned())
                })
                .unwrap_or(argv0)
        };
        Invocation {
            program,
            args: args.collect(),
        }
    }
}

/// The HTTP listeners of the main thread, handed over with the rest.
pub struct HttpListeners {
    /// Configured address and a duplicate of the socket.
    pub metrics: Option<(SocketAddr, OwnedFd)>,
    pub admin: Option<(SocketAddr, OwnedFd)>,
}

/// What came of an upgrade that went through.
pub struct Handed {
    pub pid: u32,
    pub allocations: usize,
    /// From the workers' export to the new process's go-ahead: how long
    /// nothing was read from the handed-over sockets.
    pub frozen: Duration,
    /// Where that time went: exporting, sending, the new process restoring.
    pub phases: Phases,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub export: Duration,
    pub send: Duration,
    pub restore: Duration,
}

/// Starts the successor and hands over. On error the running process is
/// unchanged (and serving) and the successor is gone.
pub fn upgrade(
    started: &Started,
    invocation: &Invocation,
    http: &HttpListeners,
    timeout: Duration,
) -> io::Result<Handed> {
    let (channel, theirs) = handover::pair()?;
    let mut child = spawn(invocation, &theirs)?;
    drop(theirs);
    let result = hand_over(started, &channel, http, timeout);
    match result {
        Ok((allocations, frozen, phases)) => Ok(Handed {
            pid: child.id(),
            allocations,
            frozen,
            phases,
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn spawn(invocation: &Invocation, theirs: &OwnedFd) -> io::Result<std::process::Child> {
    let fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new(&invocation.program);
    command
        .args(&invocation.args)
        .env(handover::ENV_FD, fd.to_string())
        // systemd's watchdog names the process it watches; the successor
        // is watched once it is the main process.
        .env_remove("WATCHDOG_PID");
    // SAFETY: between fork and exec only fcntl runs, which is
    // async-signal-safe; it lets the child's end survive exec.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", invocation.program.display())))
}

/// The descriptors to send, in order: duplicates owned here, and
/// descriptors borrowed from the frozen workers (relay sockets, which they
/// close only after the verdict, so after every send) or from `http`. A
/// relay socket is not duplicated: with tens of thousands of allocations,
/// a copy of each would take as many descriptors again.
#[derive(Default)]
struct Outgoing {
    raw: Vec<RawFd>,
    owned: Vec<OwnedFd>,
}

impl Outgoing {
    fn owned(&mut self, fd: OwnedFd) -> usize {
        self.raw.push(fd.as_raw_fd());
        self.owned.push(fd);
        self.raw.len() - 1
    }

    fn borrowed(&mut self, fd: RawFd) -> usize {
        self.raw.push(fd);
        self.raw.len() - 1
    }
}

fn hand_over(
    started: &Started,
    channel: &Channel,
    http: &HttpListeners,
    timeout: Duration,
) -> io::Result<(usize, Duration, Phases)> {
    channel.set_timeout(timeout)?;
    // Workers hold still from here until the verdict (or timeout + slack).
    let began = Instant::now();
    let mut frozen = started.freeze(timeout + Duration::from_secs(5))?;
    let exported = Instant::now();
    let mut fds = Outgoing::default();
    let entries: Vec<ListenerEntry> = std::mem::take(&mut frozen.listeners)
        .into_iter()
        .map(|(id, transport, configured, bound, sockets)| ListenerEntry {
            id,
            transport: crate::io::transport_name(transport).to_owned(),
            configured,
            bound,
            fds: sockets.into_iter().map(|s| fds.owned(s)).collect(),
        })
        .collect();
    let metrics = http.metrics.as_ref().map(|(a, fd)| (*a, fds.borrowed(fd.as_raw_fd())));
    let admin = http.admin.as_ref().map(|(a, fd)| (*a, fds.borrowed(fd.as_raw_fd())));
    let mut allocations = 0;
    let mut states = Vec::new();
    let workers = frozen.exports.len();
    let (nonce_secret, port_seed) = (frozen.nonce_secret, frozen.port_seed);
    for e in std::mem::take(&mut frozen.exports) {
        allocations += e.core.allocations.len();
        states.push(WorkerState {
            core: e.core.to_bytes(),
            relays: e.relays.into_iter().map(|(id, fd)| (id.0, fds.borrowed(fd))).collect(),
            streams: e
                .streams
                .into_iter()
                .map(|s| StreamEntry {
                    listener: s.key.listener.0,
                    client: s.key.client,
                    fd: fds.owned(s.socket),
                    inbound: s.inbound,
                    outbound: s.outbound,
                })
                .collect(),
            tcp_relays: e
                .tcp_relays
                .into_iter()
                .map(|(id, fd)| (id.0, fds.borrowed(fd)))
                .collect(),
            peers: e
                .peers
                .into_iter()
                .map(|p| (p.connection, fds.borrowed(p.peer), p.client.map(|c| fds.borrowed(c))))
                .collect(),
        });
    }
    let manifest = Manifest {
        version: snapshot::VERSION,
        pid: std::process::id(),
        nonce_secret,
        port_seed,
        workers,
        listeners: entries,
        metrics,
        admin,
        states,
    };
    let mut times = (exported, exported);
    let sent = channel
        .send_state(&manifest, &fds.raw)
        .and_then(|()| {
            times.0 = Instant::now();
            channel.wait_ready()
        })
        .inspect(|()| times.1 = Instant::now())
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::other(format!("the new process was not ready within {} s", timeout.as_secs()))
            }
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                io::Error::other("the new process exited before taking over (its log says why)")
            }
            _ => io::Error::other(format!("the new process did not take over: {e}")),
        })
        .and_then(|()| channel.commit());
    drop(fds);
    match sent {
        Ok(()) => {
            let frozen_for = began.elapsed();
            frozen.commit();
            let phases = Phases {
                export: exported - began,
                send: times.0 - exported,
                restore: times.1 - times.0,
            };
            Ok((allocations, frozen_for, phases))
        }
        Err(e) => {
            frozen.resume();
            Err(e)
        }
    }
}

/// The new process's side: reads the running process's state from the
/// channel named in the environment, if there is one.
pub fn inherit() -> io::Result<Option<(Channel, Inheritance, InheritedHttp)>> {
    let Some(fd) = std::env::var_os(handover::ENV_FD) else {
        return Ok(None);
    };
    // SAFETY: removing a variable before any other thread exists.
    unsafe { std::env::remove_var(handover::ENV_FD) };
    let fd: i32 = fd
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{} is not a descriptor", handover::ENV_FD)))?;
    // SAFETY: the running process passed this descriptor for us alone.
    let channel = unsafe { Channel::from_raw(fd) };
    // Close on exec again: nothing this process starts inherits it.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    channel.set_timeout(Duration::from_secs(60))?;
    let (manifest, fds) = channel.recv_state()?;
    match restore(manifest, fds) {
        Ok((inheritance, http)) => Ok(Some((channel, inheritance, http))),
        Err(e) => {
            let _ = channel.refuse(&e.to_string());
            Err(e)
        }
    }
}

/// The main thread's HTTP listeners, as handed over.
pub struct InheritedHttp {
    pub metrics: Option<(SocketAddr, std::net::TcpListener)>,
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    pub from_pid: u32,
}

fn restore(manifest: Manifest, fds: Vec<OwnedFd>) -> io::Result<(Inheritance, InheritedHttp)> {
    if manifest.version != snapshot::VERSION {
        return Err(io::Error::other(format!(
            "state format {}, this turnstile reads {}",
            manifest.version,
            snapshot::VERSION
        )));
    }
    let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take = |i: usize| -> io::Result<OwnedFd> {
        slots
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other("hand-over: a socket is missing"))
    };
    let mut listeners = Vec::new();
    for l in manifest.listeners {
        let transport = match l.transport.as_str() {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            "tls" => Transport::Tls,
            other => return Err(io::Error::other(format!("hand-over: unknown transport {other}"))),
        };
        let sockets = l.fds.into_iter().map(&mut take).collect::<io::Result<Vec<_>>>()?;
        listeners.push((l.id, transport, l.configured, sockets));
    }
    let mut http = |x: Option<(SocketAddr, usize)>| -> io::Result<Option<(SocketAddr, std::net::TcpListener)>> {
        Ok(match x {
            Some((a, i)) => Some((a, std::net::TcpListener::from(take(i)?))),
            None => None,
        })
    };
    let metrics = http(manifest.metrics)?;
    let admin = http(manifest.admin)?;
    let mut states = Vec::new();
    for s in manifest.states {
        let core = Snapshot::from_bytes(&s.core).map_err(|e| io::Error::other(e.to_string()))?;
        let relays = s
            .relays
            .into_iter()
            .map(|(id, i)| take(i).map(|fd| (RelayId(id), fd)))
            .collect::<io::Result<Vec<_>>>()?;
        let streams = s
            .streams
            .into_iter()
            .map(|c| {
                take(c.fd).map(|socket| StreamExport {
                    key: ClientKey {
                        listener: ListenerId(c.listener),
                        client: c.client,
                    },
                    socket,
                    inbound: c.inbound,
                    outbound: c.outbound,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let tcp_relays = s
            .tcp_relays
            .into_iter()
            .map(|(id, i)| take(i).map(|fd| (RelayId(id), fd)))
            .collect::<io::Result<Vec<_>>>()?;
        let peers = s
            .peers
            .into_iter()
            .map(|(connection, peer, client)| Ok((connection, take(peer)?, client.map(&mut take).transpose()?)))
            .collect::<io::Result<Vec<_>>>()?;
        states.push(crate::io::WorkerInheritance {
            core,
            relays,
            streams,
            tcp_relays,
            peers,
        });
    }
    Ok((
        Inheritance {
            nonce_secret: manifest.nonce_secret,
            port_seed: manifest.port_seed,
            workers: manifest.workers,
            listeners,
            states,
        },
        InheritedHttp {
            metrics,
            admin,
            from_pid: manifest.pid,
        },
    ))
}
