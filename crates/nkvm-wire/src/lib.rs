//! The bytes on nkvm's sockets: I/O-region transactions ([`ioregion`]) and
//! APIC-bus messages ([`apic`]).
//!
//! Both protocols share one shape: every frame is an 8-byte
//! [header](frame) (magic `"NK"`, protocol, frame type, payload length)
//! followed by a fixed-size, little-endian payload; the VM side opens with
//! a hello and the device side acknowledges it ([`handshake`]); anything
//! malformed is a [`WireError`] naming the offending value, after which the
//! receiver drops the connection. Decoding never panics and never reads
//! past a frame. The full specification, with byte offsets, is
//! `docs/wire-format.md`.
//!
//! This crate depends on nothing but `std` and has no `unsafe`, so a device
//! process needs nothing else to speak to nkvm.
//!
//! ```
//! use nkvm_wire::ioregion::{AccessSize, IoFrame, Request, Space, read_frame, write_frame};
//!
//! // The VM side posts a 4-byte write at offset 0x10 of an MMIO region...
//! let request = Request::Write {
//!     tag: 1,
//!     space: Space::Mmio,
//!     offset: 0x10,
//!     size: AccessSize::Dword,
//!     data: 0xcafe_f00d,
//!     posted: true,
//! };
//! let mut socket = Vec::new();
//! write_frame(&mut socket, &IoFrame::Request(request)).unwrap();
//! assert_eq!(socket.len(), Request::FRAME_LEN);
//!
//! // ...the device side reads it back, checked against the region.
//! let frame = read_frame(&mut &socket[..]).unwrap();
//! assert_eq!(frame, Some(IoFrame::Request(request)));
//! request.validate(0x100).unwrap();
//! assert!(request.validate(0x12).is_err());
//! ```
#![forbid(unsafe_code)]

pub mod apic;
mod error;
pub mod frame;
pub mod handshake;
pub mod ioregion;
pub mod spin;

pub use error::WireError;
