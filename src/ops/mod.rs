//! Operating the server, beside the relay: the metrics and admin HTTP
//! listeners (credential API, allocation list), the fleet store, privilege
//! dropping and process limits. Nothing here is on a packet's path.

pub mod admin;
pub mod fleet;
pub mod handover;
pub mod http;
pub mod metrics_http;
pub mod privileges;
pub mod process_limits;
pub mod store;
pub mod upgrade;
