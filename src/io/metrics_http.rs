//! A minimal HTTP endpoint serving Prometheus text at `GET /metrics`.

use std::io;
use std::net::SocketAddr;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Installs the global metrics recorder.
pub fn install_recorder() -> io::Result<PrometheusHandle> {
    PrometheusBuilder::new().install_recorder().map_err(io::Error::other)
}

/// Binds the metrics listener.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves scrapes until the process exits.
pub async fn serve(listener: std::net::TcpListener, handle: PrometheusHandle) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let mut n = 0;
            // Read the request head (bounded); the request line is all we need.
            while n < req.len() {
                match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut req[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(k)) => n += k,
                }
                if req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let (status, body) = if req.starts_with(b"GET /metrics ") {
                ("200 OK", handle.render())
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}
