//! Compression (placeholder).
