//! The upstream side: the pooled rustls client, hop-by-hop header handling
//! and the innermost service that forwards a request to Zuora.

pub mod breaker;
pub mod client;
pub mod forward;
pub mod headers;

pub use client::{Clients, HttpClient, build_client, build_clients, set_runtime_index};
pub use forward::{Forward, Upstream, Upstreams};
