//! IO drivers: sockets, threads and timers around the sans-IO core.
//! `start` (in start.rs) composes them: binds the listeners and starts
//! the workers.

pub mod coalesce;
pub mod relay;
pub mod relay_poll;
pub mod send_queue;
mod start;
pub mod stats_export;
pub mod stream;
pub mod tls;
pub mod udp;
pub mod worker;

pub use start::{Started, start};
