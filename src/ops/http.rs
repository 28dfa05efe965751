//! A small HTTP/1.1 server for the metrics and admin listeners: one request
//! per connection, bounded head and body, a handler that maps a request to
//! a response. These endpoints see a few requests a minute; they never share
//! a thread with relaying (they run on the main thread's runtime).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Largest request body.
const MAX_BODY: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    /// The bearer token of an `Authorization: Bearer …` header.
    pub bearer: Option<String>,
    pub body: Vec<u8>,
    /// Who sent it (for the admin API's log lines).
    pub peer: Option<SocketAddr>,
}

impl Request {
    /// A query parameter's value, decoded as a form would encode it (`%XX`
    /// escapes, `+` for a space): a name with `+`, `%`, `&` or `#` arrives
    /// intact when the caller encoded it.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Binds a listener for `serve`.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let l =
        std::net::TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("http listen {addr}: {e}")))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Connections served at once; beyond, new ones are closed at accept. The
/// endpoints see a few requests a minute, so a full table is an attack or
/// a stuck client, and must not cost the descriptors the relay needs.
const MAX_CONNECTIONS: usize = 64;
/// How long one connection may take to send its request and read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves requests with `handler` until the process exits. Runs on a
/// current-thread runtime (`spawn_local`), so the handler need not be `Send`.
/// A failed accept (no descriptors left, say) is logged and retried after a
/// pause: the listener never stops serving.
pub async fn serve<H>(listener: std::net::TcpListener, handler: H) -> io::Result<()>
where
    H: Fn(Request) -> Response + 'static,
{
    let listener = TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    let handler = Rc::new(handler);
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(listener = %local, "http accept failed, retrying in 100 ms: {e}");
                metrics::counter!("turnstile_http_connections_refused_total", "reason" => "accept_error").increment(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.get() >= MAX_CONNECTIONS {
            metrics::counter!("turnstile_http_connections_refused_total", "reason" => "limit").increment(1);
            continue;
        }
        open.set(open.get() + 1);
        let handler = handler.clone();
        let open = open.clone();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, one(stream, &*handler)).await;
            open.set(open.get() - 1);
        });
    }
}

/// What the bytes read so far hold.
#[derive(Debug)]
pub enum Head {
    Complete {
        /// The request, its body still empty.
        request: Request,
        /// Bytes of request line and headers.
        head_len: usize,
        content_length: usize,
    },
    /// More bytes are needed.
    Partial,
    Invalid,
}

/// Parses a request head (request line and headers) from network bytes.
pub fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let header = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
            };
            let bearer = header("authorization")
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(|t| t.trim().to_owned());
            let content_length = header("content-length")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            Head::Complete {
                request: Request {
                    method: req.method.unwrap_or("GET").to_owned(),
                    path: path.to_owned(),
                    query: query.to_owned(),
                    bearer,
                    body: Vec::new(),
                    peer: None,
                },
                head_len,
                content_length,
            }
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Invalid,
    }
}

async fn one<H: Fn(Request) -> Response>(mut stream: tokio::net::TcpStream, handler: &H) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (request, head_len, content_length) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match parse_head(&buf) {
            Head::Complete {
                request,
                head_len,
                content_length,
            } => break (request, head_len, content_length),
            Head::Partial if buf.len() < MAX_HEAD => continue,
            Head::Partial | Head::Invalid => return write(&mut stream, &Response::text(400, "bad request\n")).await,
        }
    };
    if content_length > MAX_BODY {
        return write(&mut stream, &Response::text(413, "body too large\n")).await;
    }
    let mut body = buf.split_off(head_len.min(buf.len()));
    while body.len() < content_length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    body.truncate(content_length);
    let peer = stream.peer_addr().ok();
    let response = handler(Request { body, peer, ..request });
    write(&mut stream, &response).await
}

async fn write(stream: &mut tokio::net::TcpStream, r: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(r.body.as_bytes()).await?;
    stream.shutdown().await
}
