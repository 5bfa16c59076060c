//! Device models for nkvm.
#![forbid(unsafe_code)]
