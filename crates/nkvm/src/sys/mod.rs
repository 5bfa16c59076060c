//! The one `unsafe` perimeter of nkvm.
//!
//! Everything that hands a raw pointer to the kernel, maps memory or reads a
//! union the kernel filled in lives below this module, each wrapped once in a
//! safe function with a `SAFETY:` note. The rest of the crate is safe Rust on
//! top of `kvm-ioctls` and these wrappers.

pub(crate) mod anon;
pub(crate) mod dirty;
pub(crate) mod hyperv;
pub(crate) mod irq;
pub(crate) mod kick;
pub(crate) mod memfd;
pub(crate) mod ram_view;
pub(crate) mod ring;
pub(crate) mod run;
pub(crate) mod slot;
pub(crate) mod xsave;
