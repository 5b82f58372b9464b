//! Datadog Remote Configuration, client side: targets for product
//! `SCA_DETECTION` from the agent's `/v0.7/config` endpoint.

pub mod client;
pub mod poller;
pub mod protocol;
