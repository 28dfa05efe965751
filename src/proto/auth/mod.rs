//! Credentials: long-term keys, REST shared secrets and stateless nonces.

pub mod long_term;
pub mod nonce;
pub mod rest;

pub use long_term::{LongTermKey, PasswordAlgorithm, prepare_password, userhash};
pub use nonce::{Nonce, NonceBinding, NonceError, NonceKey, NonceScope, SecurityFeatures};
pub use rest::{RestError, RestSecrets, RestUsername};
