//! Workers: one thread each, with its own single-threaded runtime, its own
//! SO_REUSEPORT listener sockets and its own server core. Nothing on the
//! packet path is shared between workers.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::thread::JoinHandle;

use crate::io::udp::UdpListener;
use crate::proto::server::{Server, ServerConfig};

/// What one worker is handed at start-up.
pub struct WorkerSetup {
    pub index: usize,
    pub udp: Vec<std::net::UdpSocket>,
    pub server: ServerConfig,
}

/// Starts a worker thread. It runs until the process exits.
pub fn spawn(setup: WorkerSetup) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("turnstile-w{}", setup.index))
        .spawn(move || {
            let index = setup.index;
            if let Err(e) = run(setup) {
                tracing::error!(worker = index, "worker stopped: {e}");
                std::process::exit(1);
            }
        })
}

fn run(setup: WorkerSetup) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let server = Rc::new(RefCell::new(Server::new(setup.server)));
        let mut tasks = Vec::new();
        for socket in setup.udp {
            let listener = UdpListener::new(socket)?;
            tasks.push(tokio::task::spawn_local(listener.run(server.clone())));
        }
        for t in tasks {
            t.await.map_err(io::Error::other)??;
        }
        Ok(())
    })
}
