//! The bytes on nkvm's sockets.
#![forbid(unsafe_code)]

pub mod apic;
