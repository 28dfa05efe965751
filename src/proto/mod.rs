//! The sans-IO protocol core: wire codec, credentials and server state
//! machines. Nothing here touches a socket, a runtime or a clock — time is a
//! parameter — so every branch is testable in virtual time, and the
//! `sans_io_boundary` test keeps it that way.
//!
//! Every byte handled here comes from the network, so panicking constructs
//! (indexing, unwrap, expect, panic) are denied outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod auth;
pub mod channel_data;
pub mod demux;
pub mod framer;
pub mod proxy_protocol;
pub mod server;
pub mod stun;
pub(crate) mod wire;
