//! turnstile: a TURN/STUN relay server.
//!
//! [`proto`] is the sans-IO protocol core (codec, credentials, server state
//! machines); [`io`] holds the thin drivers that move bytes between sockets
//! and the core; [`ops`] the operator's endpoints (metrics, admin API);
//! [`config`] reads the operator's TOML; [`testing`] drives the core in
//! virtual time for tests, fuzz targets and benches.

pub mod config;
pub mod coturn_import;
pub mod io;
pub mod logging;
pub mod ops;
pub mod proto;
pub mod testing;
