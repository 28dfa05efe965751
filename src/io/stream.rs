//! TCP and TLS listeners: each worker owns a SO_REUSEPORT listener per
//! address; every connection carries STUN messages and ChannelData frames,
//! split by the sans-IO stream framer and handed to the same core as UDP.
//!
//! Robustness: connection caps (total and per source IP), a TLS handshake
//! timeout, the core's idle and slow-message deadlines (the driver reports
//! what each read did and closes when the core says), a bounded send queue
//! per connection (a slow reader loses relayed data, counted, as UDP would,
//! and never stalls anyone else), and a garbage or oversized frame closes
//! only its own connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::io::executor::{Handled, Shared, feed, handle_client, now};
use crate::io::stream_queue::StreamOut;
use crate::proto::channel_data::ChannelRange;
use crate::proto::framer::StreamFramer;
use crate::proto::proxy_protocol;
use crate::proto::server::{ClientKey, Input, ListenerId, connection_owner};
use crate::proto::stun::{Class, Message, Method};

/// Binds a listening TCP socket with SO_REUSEPORT.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Connection counts shared by all workers (touched on accept and close only).
#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Holds one connection's place in the counts until dropped.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            counts: Mutex::new((0, HashMap::new())),
        })
    }

    /// Admits a connection from `ip`, or refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let mut c = self.counts.lock().ok()?;
        let per_ip = c.1.get(&ip).copied().unwrap_or(0);
        if c.0 >= self.max_total || per_ip >= self.max_per_ip {
            return None;
        }
        c.0 += 1;
        c.1.insert(ip, per_ip + 1);
        Some(ConnGuard {
            limits: Arc::clone(self),
            ip,
        })
    }

    pub fn total(&self) -> usize {
        self.counts.lock().map(|c| c.0).unwrap_or(0)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = self.limits.counts.lock() {
            c.0 = c.0.saturating_sub(1);
            if let Some(n) = c.1.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.1.remove(&self.ip);
                }
            }
        }
    }
}

/// How a stream listener behaves.
pub struct StreamSettings {
    pub tls: Option<TlsAcceptor>,
    /// TLS listener that also takes plain TCP (first byte not 0x16).
    pub autodetect: bool,
    pub proxy_protocol: bool,
    pub limits: Arc<ConnLimits>,
    pub handshake_timeout: Duration,
    pub send_buffer: usize,
    pub channel_range: ChannelRange,
}

/// A client connection after PROXY and TLS: plain TCP or TLS, sendable to
/// another worker.
pub trait Stream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Stream for T {}

pub type BoxedStream = Pin<Box<dyn Stream>>;

/// A client connection handed to the worker that owns the RFC 6062
/// connection id its ConnectionBind names.
pub struct Handoff {
    io: BoxedStream,
    /// The socket, when plain TCP.
    fd: Option<std::os::fd::RawFd>,
    key: ClientKey,
    /// Bytes read but not yet handled, starting with the ConnectionBind.
    buf: BytesMut,
    guard: ConnGuard,
}

pub type HandoffSender = tokio::sync::mpsc::UnboundedSender<Handoff>;
pub type HandoffReceiver = tokio::sync::mpsc::UnboundedReceiver<Handoff>;

/// What the stream tasks of one worker share: where to hand connections
/// over, and each listener's settings by listener id.
pub struct Streams {
    index: usize,
    handoff: Vec<HandoffSender>,
    settings: RefCell<Vec<Option<Rc<StreamSettings>>>>,
}

impl Streams {
    pub fn new(index: usize, handoff: Vec<HandoffSender>) -> Streams {
        Streams {
            index,
            handoff,
            settings: RefCell::new(Vec::new()),
        }
    }

    /// Records a listener's settings (`None` for UDP) under its id.
    pub fn register(&self, id: ListenerId, settings: Option<Rc<StreamSettings>>) {
        let mut all = self.settings.borrow_mut();
        let i = usize::from(id.0);
        if all.len() <= i {
            all.resize(i + 1, None);
        }
        if let Some(slot) = all.get_mut(i) {
            *slot = settings;
        }
    }

    /// The connection caps (shared by every stream listener).
    fn any_limits(&self) -> Option<Arc<ConnLimits>> {
        self.settings.borrow().iter().flatten().next().map(|s| s.limits.clone())
    }

    fn settings(&self, id: ListenerId) -> Option<Rc<StreamSettings>> {
        self.settings.borrow().get(usize::from(id.0)).cloned().flatten()
    }
}

/// Accepts connections on one listener until the socket fails.
pub async fn accept_loop(
    shared: Shared,
    streams: Rc<Streams>,
    id: ListenerId,
    listener: TcpListener,
    settings: Rc<StreamSettings>,
) -> io::Result<()> {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                tracing::warn!("accept: {e}");
                metrics::counter!("turnstile_connections_refused_total", "reason" => "accept_error").increment(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(guard) = settings.limits.admit(remote.ip()) else {
            metrics::counter!("turnstile_connections_refused_total", "reason" => "limit").increment(1);
            continue;
        };
        tokio::task::spawn_local(connection(
            shared.clone(),
            streams.clone(),
            id,
            tcp,
            remote,
            settings.clone(),
            guard,
        ));
    }
}

async fn connection(
    shared: Shared,
    streams: Rc<Streams>,
    id: ListenerId,
    mut tcp: TcpStream,
    remote: SocketAddr,
    settings: Rc<StreamSettings>,
    guard: ConnGuard,
) {
    let _ = tcp.set_nodelay(true);
    let setup = async {
        let client = if settings.proxy_protocol {
            read_proxy_header(&mut tcp).await?.unwrap_or(remote)
        } else {
            remote
        };
        let use_tls = match &settings.tls {
            None => false,
            Some(_) if !settings.autodetect => true,
            Some(_) => {
                let mut first = [0u8; 1];
                tcp.peek(&mut first).await? == 1 && first[0] == 0x16
            }
        };
        let (io, fd): (BoxedStream, _) = match (&settings.tls, use_tls) {
            (Some(acceptor), true) => (Box::pin(acceptor.accept(tcp).await?), None),
            _ => {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
                (Box::pin(tcp), Some(fd))
            }
        };
        Ok::<_, io::Error>((client, io, fd))
    };
    let (client, io, fd) = match tokio::time::timeout(settings.handshake_timeout, setup).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "connection setup failed: {e}");
            metrics::counter!("turnstile_connections_refused_total", "reason" => "handshake").increment(1);
            return;
        }
        Err(_) => {
            metrics::counter!("turnstile_connections_refused_total", "reason" => "handshake_timeout").increment(1);
            return;
        }
    };
    serve(
        shared,
        streams,
        ClientKey { listener: id, client },
        io,
        BytesMut::with_capacity(4096),
        settings,
        guard,
        Resumed { fd, outbound: None },
    )
    .await;
}

/// A connection's socket, when a live upgrade may hand it over, and bytes
/// already owed to the client (a connection taken over from the running
/// process).
pub struct Resumed {
    pub fd: Option<std::os::fd::RawFd>,
    pub outbound: Option<Vec<u8>>,
}

/// Serves a plain TCP connection taken over from the running process,
/// with the bytes it had read and not handled, and those it had queued.
pub fn adopt_connection(
    shared: &Shared,
    streams: &Rc<Streams>,
    key: ClientKey,
    socket: std::net::TcpStream,
    inbound: &[u8],
    outbound: Vec<u8>,
) -> io::Result<()> {
    let settings = streams
        .settings(key.listener)
        .ok_or_else(|| io::Error::other("no such stream listener"))?;
    socket.set_nonblocking(true)?;
    let tcp = TcpStream::from_std(socket)?;
    let Some(guard) = settings.limits.admit(key.client.ip()) else {
        metrics::counter!("turnstile_connections_refused_total", "reason" => "limit").increment(1);
        return Ok(());
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let mut buf = BytesMut::with_capacity(inbound.len().max(4096));
    buf.extend_from_slice(inbound);
    tokio::task::spawn_local(serve(
        shared.clone(),
        streams.clone(),
        key,
        Box::pin(tcp),
        buf,
        settings,
        guard,
        Resumed {
            fd: Some(fd),
            outbound: Some(outbound),
        },
    ));
    Ok(())
}

/// Receives connections other workers hand over.
pub async fn receive_handoffs(shared: Shared, streams: Rc<Streams>, mut rx: HandoffReceiver) {
    while let Some(h) = rx.recv().await {
        if let Some(settings) = streams.settings(h.key.listener) {
            tokio::task::spawn_local(serve(
                shared.clone(),
                streams.clone(),
                h.key,
                h.io,
                h.buf,
                settings,
                h.guard,
                Resumed {
                    fd: h.fd,
                    outbound: None,
                },
            ));
        }
    }
}

/// How a connection's reading ended.
enum ReadEnd {
    Closed(&'static str),
    /// ConnectionBind succeeded: pipe to this peer connection.
    Bound(u32, BytesMut),
    /// A ConnectionBind for a connection id another worker owns.
    Handoff(usize, BytesMut),
    /// A live upgrade parks the connection; these bytes are unhandled.
    Park(BytesMut),
}

/// Serves one client connection: STUN and ChannelData frames through the
/// core, then, after an RFC 6062 ConnectionBind, raw bytes to its peer.
#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: Shared,
    streams: Rc<Streams>,
    key: ClientKey,
    mut io: BoxedStream,
    mut buf: BytesMut,
    settings: Rc<StreamSettings>,
    guard: ConnGuard,
    resumed: Resumed,
) {
    let out = Rc::new(StreamOut::new(settings.send_buffer).with_handover(resumed.fd));
    if let Some(bytes) = resumed.outbound.filter(|b| !b.is_empty()) {
        out.push(&bytes);
    }
    shared.borrow_mut().streams.insert(key, out.clone());
    feed(&shared, Input::StreamOpened { key });
    metrics::gauge!("turnstile_connections").increment(1.0);
    let (end, rd, writer) = loop {
        let (rd, wr) = tokio::io::split(io);
        let writer = tokio::task::spawn_local(write_loop(wr, out.clone()));
        let (end, rd) = read_loop(&shared, streams.index, key, rd, buf, &settings, &out).await;
        let ReadEnd::Park(unhandled) = end else {
            break (end, rd, writer);
        };
        // The writer stops before its next write (it is not in one: the
        // reader does not park a connection that is).
        let wr = match writer.await {
            Ok(Some(wr)) => wr,
            _ => {
                out.decide(false);
                let _ = out.verdict().await;
                break (
                    ReadEnd::Closed("write_error"),
                    rd,
                    tokio::task::spawn_local(async { None }),
                );
            }
        };
        shared.borrow_mut().parked.insert(
            key,
            crate::io::executor::Parked {
                inbound: unhandled.to_vec(),
            },
        );
        let handed_over = out.verdict().await;
        shared.borrow_mut().parked.remove(&key);
        if handed_over {
            // The new process serves it: close this process's descriptor
            // only (no shutdown, which would end the connection for both).
            shared.borrow_mut().streams.remove(&key);
            metrics::gauge!("turnstile_connections").decrement(1.0);
            drop(guard);
            return;
        }
        io = rd.unsplit(wr);
        buf = unhandled;
    };

    out.close();
    shared.borrow_mut().streams.remove(&key);
    feed(&shared, Input::ClientClosed { key });
    metrics::gauge!("turnstile_connections").decrement(1.0);
    // Let queued answers go out (an error response, a ConnectionBind success).
    let wr = match tokio::time::timeout(Duration::from_secs(2), writer).await {
        Ok(Ok(Some(wr))) => wr,
        _ => return,
    };
    match end {
        // A park ends inside the loop above.
        ReadEnd::Park(_) => {}
        ReadEnd::Closed(reason) => {
            tracing::debug!(client = %key.client, reason, "connection closed");
            let mut wr = wr;
            let _ = wr.shutdown().await;
        }
        ReadEnd::Bound(connection, leftover) => {
            pipe(shared, connection, rd.unsplit(wr), out.handover_fd(), leftover, guard).await
        }
        ReadEnd::Handoff(owner, buf) => {
            if let Some(sender) = streams.handoff.get(owner) {
                let _ = sender.send(Handoff {
                    io: rd.unsplit(wr),
                    fd: out.handover_fd(),
                    key,
                    buf,
                    guard,
                });
            }
        }
    }
}

/// An RFC 6062 data connection joined to its peer connection: bytes both
/// ways until either side closes or the allocation goes.
/// Pipes an RFC 6062 data connection taken over from the running process
/// to its peer connection (already in the worker's table).
pub fn adopt_pipe(
    shared: &Shared,
    streams: &Rc<Streams>,
    connection: u32,
    client: std::net::TcpStream,
) -> io::Result<()> {
    client.set_nonblocking(true)?;
    let client = TcpStream::from_std(client)?;
    let ip = client.peer_addr()?.ip();
    let limits = streams
        .any_limits()
        .ok_or_else(|| io::Error::other("no stream listener for a data connection"))?;
    let Some(guard) = limits.admit(ip) else {
        metrics::counter!("turnstile_connections_refused_total", "reason" => "limit").increment(1);
        return Ok(());
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
    tokio::task::spawn_local(pipe(
        shared.clone(),
        connection,
        Box::pin(client),
        Some(fd),
        BytesMut::new(),
        guard,
    ));
    Ok(())
}

/// `client_fd`: the data connection's socket when it is plain TCP (a live
/// upgrade can then hand the pair over).
pub(crate) async fn pipe(
    shared: Shared,
    connection: u32,
    client: BoxedStream,
    client_fd: Option<std::os::fd::RawFd>,
    leftover: BytesMut,
    _guard: ConnGuard,
) {
    let peer = shared.borrow_mut().tcp_peers.get_mut(&connection).and_then(|p| {
        let close = p.close.clone();
        p.stream.take().map(|s| (s, close))
    });
    let mut handed_over = false;
    if let Some((mut peer, close)) = peer
        && peer.write_all(&leftover).await.is_ok()
    {
        let state = Rc::new(crate::io::executor::Pipe {
            client_fd,
            peer_fd: std::os::fd::AsRawFd::as_raw_fd(&peer),
            parking: Default::default(),
        });
        shared.borrow_mut().pipes.insert(connection, state.clone());
        let (mut crd, mut cwr) = tokio::io::split(client);
        let (mut prd, mut pwr) = peer.split();
        let both = async {
            let (a, b) = tokio::join!(
                pump(&mut crd, &mut pwr, &state.parking),
                pump(&mut prd, &mut cwr, &state.parking)
            );
            a || b
        };
        tokio::select! {
            moved = both => handed_over = moved,
            _ = close.notified() => {}
        }
        shared.borrow_mut().pipes.remove(&connection);
    }
    // Handed over: the new process serves both sockets; this one only
    // closes its descriptors (no shutdown) and the core forgot the pair.
    if !handed_over {
        shared.borrow_mut().tcp_peers.remove(&connection);
        feed(&shared, Input::TcpConnectionClosed { connection });
    }
}

/// One direction of a pipe: read, write it all, again; at end of stream
/// the far side's write half is shut (as copy_bidirectional does). A live
/// upgrade pauses it between chunks, so no bytes are in flight inside this
/// process. Returns whether the pipe was handed over.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    parking: &crate::io::stream_queue::Parking,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => r,
            () = parking.requested() => {
                parking.pause();
                if parking.verdict().await {
                    return true;
                }
                continue;
            }
        };
        match n {
            Ok(0) | Err(_) => {
                let _ = wr.shutdown().await;
                return false;
            }
            Ok(n) => {
                if wr.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Reads the PROXY v2 header; `None` means "use the connection's address".
async fn read_proxy_header(tcp: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let mut fixed = [0u8; proxy_protocol::FIXED_LEN];
    tcp.read_exact(&mut fixed).await?;
    let len = proxy_protocol::body_len(&fixed).map_err(|e| io::Error::other(format!("PROXY header: {e:?}")))?;
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await?;
    proxy_protocol::source(&fixed, &body).map_err(|e| io::Error::other(format!("PROXY header: {e:?}")))
}

/// The worker owning the connection id of a ConnectionBind request, if the
/// frame is one.
fn connection_bind_target(frame: &[u8]) -> Option<u32> {
    let m = Message::parse(frame).ok()?;
    if m.method() != Method::CONNECTION_BIND || m.class() != Class::Request {
        return None;
    }
    m.connection_id().ok().flatten()
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    me: usize,
    key: ClientKey,
    mut rd: R,
    mut buf: BytesMut,
    settings: &StreamSettings,
    out: &StreamOut,
) -> (ReadEnd, R) {
    let framer = StreamFramer::default().with_channel_range(settings.channel_range);
    loop {
        let mut consumed = 0;
        loop {
            match framer.next_frame(buf.get(consumed..).unwrap_or_default()) {
                Ok(Some(f)) => {
                    let frame = buf.get(consumed..consumed + f.message_len).unwrap_or_default();
                    if let Some(owner) = connection_bind_target(frame).map(connection_owner)
                        && owner != me
                    {
                        buf.advance(consumed);
                        return (ReadEnd::Handoff(owner, buf), rd);
                    }
                    let handled = handle_client(shared, now(), key, frame, None);
                    consumed += f.frame_len;
                    if let Handled::Bound(connection) = handled {
                        buf.advance(consumed);
                        return (ReadEnd::Bound(connection, buf), rd);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    metrics::counter!("turnstile_dropped_packets_total", "reason" => e.label()).increment(1);
                    return (ReadEnd::Closed(e.label()), rd);
                }
            }
        }
        buf.advance(consumed);
        if buf.capacity() - buf.len() < 2048 {
            buf.reserve(4096);
        }
        // Progress, not traffic, keeps a connection open: the core closes
        // one that trickles bytes (slowloris) without finishing a message.
        feed(
            shared,
            Input::StreamProgress {
                key,
                completed: consumed > 0,
                partial: !buf.is_empty(),
            },
        );
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            // Idle, too slow, or its allocation ended (counted by the executor).
            reason = out.ended() => return (ReadEnd::Closed(reason.label()), rd),
            // A live upgrade: stop here, between messages read, unless a
            // write is under way (that connection stays with this process).
            _ = out.park_requested() => {
                if out.is_writing() {
                    out.decide(false);
                    let _ = out.verdict().await;
                    continue;
                }
                return (ReadEnd::Park(buf), rd);
            }
        };
        match n {
            Ok(0) => return (ReadEnd::Closed("eof"), rd),
            Ok(_) => {}
            Err(_) => return (ReadEnd::Closed("read_error"), rd),
        }
    }
}

/// Writes queued bytes until the queue is closed; hands the write half
/// back so the connection can become an RFC 6062 data connection.
async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, out: Rc<StreamOut>) -> Option<W> {
    loop {
        // Parked for a live upgrade: what is queued goes with the connection.
        if out.is_parking() {
            return Some(wr);
        }
        match out.take() {
            Some(c) => {
                out.set_writing(true);
                let written = wr.write_all(&c).await;
                out.set_writing(false);
                if written.is_err() {
                    out.fail();
                    return None;
                }
            }
            None if out.is_closed() => return Some(wr),
            None => out.queued().await,
        }
    }
}
