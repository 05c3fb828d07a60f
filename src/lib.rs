//! zuora-gateway: an authenticating reverse proxy in front of the Zuora REST API.
//!
//! The request path is a tower stack assembled in [`stack`]; configuration is
//! parsed and validated in [`config`] before any port is bound; every failure
//! is a [`error::GatewayError`] mapped to a Zuora-shaped response at one edge.
#![forbid(unsafe_code)]

pub mod body;
pub mod compression;
pub mod config;
pub mod error;
pub mod health;
pub mod metrics;
pub mod secret;
pub mod upstream;
pub mod context;
pub mod layers;
pub mod policy;
pub mod ratelimit;
