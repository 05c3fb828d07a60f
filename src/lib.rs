//! zuora-gateway

pub mod sim;
