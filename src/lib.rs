//! zuora-gateway: an authenticating reverse proxy in front of the Zuora REST API.
//!
//! The request path is a tower stack assembled in [`stack`]; configuration is
//! parsed and validated in [`config`] before any port is bound; every failure
//! is a [`error::GatewayError`] mapped to a Zuora-shaped response at one edge.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authn;
pub mod body;
pub mod cli;
pub mod compression;
pub mod config;
pub mod context;
pub mod error;
pub mod health;
pub mod layers;
pub mod memory;
pub mod metrics;
pub mod oauth;
pub mod policy;
pub mod ratelimit;
pub mod reload;
pub mod run;
pub mod secret;
pub mod server;
pub mod sim;
pub mod stack;
pub mod telemetry;
pub mod upstream;
