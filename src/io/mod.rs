//! IO drivers: sockets, threads and timers around the sans-IO core.
//!
//! - `executor`: the worker state and the one place outputs run.
//! - Drivers, each depending on `executor` and not on each other:
//!   `listen_udp` (UDP clients), `stream` (TCP/TLS clients, RFC 6062 data
//!   connections), `peer_udp` (UDP relay sockets), `peer_tcp` (RFC 6062
//!   peer connections).
//! - Sockets and buffers they use: `udp`, `relay`, `relay_poll`,
//!   `send_queue`, `stream_queue`, `tls`, `coalesce`, `stats_export`.
//! - `xdp`: the kernel fast path (feature `xdp`) and the mirror that keeps
//!   its maps in step with the core.
//! - `handover`: a worker's half of a live upgrade (export and freeze in
//!   the running process, adopt in the new one).
//! - `worker`: a worker thread, its drivers, timers and control messages.
//! - `start` (in start.rs), the composition root: binds the listeners and
//!   starts the workers.

pub mod coalesce;
pub mod executor;
pub mod handover;
pub mod listen_udp;
pub mod peer_tcp;
pub mod peer_udp;
pub mod relay;
pub mod relay_poll;
pub mod send_queue;
mod start;
pub mod stats_export;
pub mod stream;
pub mod stream_queue;
pub mod tls;
pub mod udp;
pub mod worker;
pub mod xdp;

pub use start::{
    Frozen, Inheritance, RealmContents, Started, StoreContents, WorkerInheritance, start, start_with, transport_name,
};
