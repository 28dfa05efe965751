//! One way to drive the core without sockets, shared by the core's tests,
//! the fuzz targets and the benches: drain [`Output`]s as a driver would,
//! answering every relay bind at once.

use std::net::SocketAddr;

use super::{BindResult, Input, Now, Output, RelayId, Server};

/// Drains the server's outputs, answering each [`Output::BindRelay`] with
/// `bind(relay, addr, tcp)` (which may ask for more); returns every other
/// output in order.
pub fn settle(
    server: &mut Server,
    now: Now,
    mut bind: impl FnMut(RelayId, SocketAddr, bool) -> BindResult,
) -> Vec<Output> {
    let mut rest = Vec::new();
    while let Some(output) = server.poll_output() {
        match output {
            Output::BindRelay { relay, addr, tcp, .. } => {
                let result = bind(relay, addr, tcp);
                server.handle(now, Input::RelayBound { relay, result });
            }
            other => rest.push(other),
        }
    }
    rest
}

/// Whether an output reports a change of state rather than asking for work.
pub fn is_event(output: &Output) -> bool {
    matches!(
        output,
        Output::AllocationCreated { .. }
            | Output::AllocationRefreshed { .. }
            | Output::AllocationEnded { .. }
            | Output::PermissionInstalled { .. }
            | Output::PermissionExpired { .. }
            | Output::ChannelBound { .. }
            | Output::ChannelExpired { .. }
    )
}
