//! The RFC 6062 peer-side driver: accepts peers on TCP relays and makes
//! the connections Connect asks for, then tells the core. The executor
//! hands it work as [`TcpRelayTask`]s; the pipe between a peer connection
//! and its client data connection is the stream driver's.

use std::time::Duration;

use crate::io::executor::{Shared, TcpPeer, TcpRelayTask, feed};
use crate::io::relay;
use crate::proto::server::{Input, RelayId};

/// Runs each task the executor hands over, for as long as the worker lives.
pub async fn run(shared: Shared, mut tasks: tokio::sync::mpsc::UnboundedReceiver<TcpRelayTask>) {
    while let Some(task) = tasks.recv().await {
        match task {
            TcpRelayTask::Accept { relay, listener, close } => {
                let shared = shared.clone();
                tokio::task::spawn_local(async move {
                    tokio::select! {
                        () = accept(shared, relay, listener) => {}
                        () = close.notified() => {}
                    }
                });
            }
            TcpRelayTask::Connect { connection, from, peer } => {
                tokio::task::spawn_local(connect(shared.clone(), connection, from, peer));
            }
        }
    }
}

/// Peers connecting to a TCP relay: with a permission the client hears of
/// them (ConnectionAttempt) and the stream waits for its data connection.
async fn accept(shared: Shared, id: RelayId, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        shared.borrow_mut().accepting = Some(stream);
        feed(&shared, Input::TcpPeerAccepted { relay: id, peer });
        // Neither accepted nor refused (cannot happen): not kept.
        shared.borrow_mut().accepting = None;
    }
}

/// Connect (RFC 6062): a TCP connection from the relayed address to the
/// peer; the core sends the Connect response when it succeeds or fails.
async fn connect(shared: Shared, connection: u32, from: std::net::SocketAddr, peer: std::net::SocketAddr) {
    // The core answers 447 at its own deadline; a connection that comes
    // after it is closed on the core's word.
    let result = async { relay::tcp_socket(from)?.connect(peer).await }.await;
    let connected = result.is_ok();
    if let Ok(stream) = result {
        let _ = stream.set_nodelay(true);
        shared.borrow_mut().tcp_peers.insert(connection, TcpPeer::new(stream));
    }
    feed(&shared, Input::TcpConnected { connection, connected });
}
