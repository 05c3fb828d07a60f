//! zuora-gateway
