//! IO drivers: sockets, threads and timers around the sans-IO core.

pub mod metrics_http;
pub mod udp;
pub mod worker;

use std::io;
use std::net::SocketAddr;

use crate::config::{Config, Transport};
use crate::proto::server::ServerConfig;

/// Binds every listener for every worker and starts the workers. Port 0 in
/// a listen address is resolved once, so all workers share the port.
pub fn start(config: &Config) -> io::Result<Vec<SocketAddr>> {
    let workers = config.worker_count();
    let mut per_worker: Vec<Vec<std::net::UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for listen in config.listen.iter().filter(|l| l.transport == Transport::Udp) {
        let first = udp::bind_reuseport(listen.address)?;
        let addr = first.local_addr()?;
        tracing::info!("listening udp {addr}");
        bound.push(addr);
        let mut sockets = vec![first];
        for _ in 1..workers {
            sockets.push(udp::bind_reuseport(addr)?);
        }
        for (slot, socket) in per_worker.iter_mut().zip(sockets) {
            slot.push(socket);
        }
    }
    let software = (!config.software.is_empty()).then(|| config.software.clone());
    for (index, udp) in per_worker.into_iter().enumerate() {
        worker::spawn(worker::WorkerSetup {
            index,
            udp,
            server: ServerConfig {
                software: software.clone(),
            },
        })?;
    }
    Ok(bound)
}
