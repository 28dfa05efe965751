//! The kernel fast path: bound channels of UDP clients relayed in XDP
//! (relay.bpf.c), the rest passed to userspace unchanged. `mirror` keeps
//! the program's maps in step with the core's lifecycle outputs; `kernel`
//! (feature `xdp`) loads the program and writes the maps.

pub mod mirror;

#[cfg(feature = "xdp")]
pub mod kernel;

pub use mirror::{Binding, BindingTable, Mirror};

/// Whether this build carries the fast path.
pub const BUILT: bool = cfg!(feature = "xdp");
