//! The `kvm_run` area: entering the guest and decoding why it left.
//!
//! nkvm maps the vCPU's `kvm_run` page itself (a second mapping of the same
//! page `kvm-ioctls` maps), so that the kicker of another thread can hold a
//! reference to the `immediate_exit` byte that outlives nothing it points to.
//! The RFC's `enter_guest(&mut RunState)` is built on top: the inputs are
//! copied in before `KVM_RUN` and the exit copied out after.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{
    kvm_run, kvm_run__bindgen_ty_1, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_IO,
    KVM_EXIT_IOAPIC_EOI, KVM_EXIT_IO_IN, KVM_EXIT_IRQ_WINDOW_OPEN, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::exit::{Exit, InternalError, SystemEvent};
use crate::GuestAddress;

ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);

/// Our own shared mapping of a vCPU's `kvm_run` page(s).
#[derive(Debug)]
pub(crate) struct RunArea {
    ptr: NonNull<kvm_run>,
    len: usize,
}

// The area is shared memory between this process and the kernel.
// SAFETY: only `immediate_exit` is touched from other threads, always through an `AtomicU8`; every other
// field is read and written only by code holding `&mut Vcpu` (through `KickShared::run_area`), never
// concurrently.
unsafe impl Send for RunArea {}
// SAFETY: see `Send`: shared access is limited to the atomic `immediate_exit`.
unsafe impl Sync for RunArea {}

/// What the caller wants written into `kvm_run` before entering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Nothing to complete.
    None,
    /// Data for a single `in` (`size` bytes of `value`).
    IoIn { size: u8, value: u64 },
    /// Data for an MMIO read (`size` bytes of `value`).
    MmioRead { size: u8, value: u64 },
}

/// The state copied out of `kvm_run` with every exit.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RunFlags {
    pub(crate) ready_for_interrupt_injection: bool,
    pub(crate) if_flag: bool,
    pub(crate) cr8: u64,
    pub(crate) apic_base: u64,
}

impl RunArea {
    /// Maps `len` bytes (from `KVM_GET_VCPU_MMAP_SIZE`) of the vCPU fd.
    pub(crate) fn map(vcpu_fd: RawFd, len: usize) -> io::Result<Self> {
        if len < std::mem::size_of::<kvm_run>() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh shared mapping of the vCPU fd at offset 0, the layout
        // KVM documents for KVM_RUN; the result is checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, vcpu_fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<kvm_run>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: `immediate_exit` is a u8 inside the live mapping; AtomicU8 has
        // the same layout as u8, and every access to this byte is atomic.
        unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*self.ptr.as_ptr()).immediate_exit)) }
    }

    /// Asks the kernel to leave (or not enter) the guest as soon as possible.
    pub(crate) fn request_immediate_exit(&self) {
        self.immediate_exit().store(1, Ordering::SeqCst);
    }

    /// Whether an immediate exit is requested (the next `KVM_RUN` returns
    /// without entering the guest).
    pub(crate) fn immediate_exit_requested(&self) -> bool {
        self.immediate_exit().load(Ordering::SeqCst) != 0
    }

    /// Withdraws a pending immediate-exit request; returns whether one was set.
    pub(crate) fn take_immediate_exit(&self) -> bool {
        self.immediate_exit().swap(0, Ordering::SeqCst) != 0
    }

    /// Writes the completion of the previous read exit and the interrupt
    /// window request, then runs `KVM_RUN` on `fd`.
    ///
    /// Returns `Ok(true)` when the guest exited, `Ok(false)` when the run was
    /// interrupted (EINTR: a kick) before or during guest execution.
    #[inline(always)]
    pub(crate) fn run(
        &self,
        fd: &impl AsRawFd,
        completion: Completion,
        string_in: Option<&[u8]>,
        request_interrupt_window: bool,
    ) -> io::Result<bool> {
        let run = self.ptr.as_ptr();
        // The completion comes from the caller's `RunState`, which need not
        // belong to this vCPU: the offset KVM left is checked again here.
        // SAFETY: `run` is the live kvm_run, touched only by the thread holding `&mut Vcpu`; every write
        // lands inside the `len`-byte mapping (the offsets are checked first).
        unsafe {
            (*run).request_interrupt_window = u8::from(request_interrupt_window);
            match completion {
                Completion::None => {}
                Completion::IoIn { size, value } => {
                    let off = (*run).__bindgen_anon_1.io.data_offset as usize;
                    let n = usize::from(size).min(8);
                    if off.checked_add(n).is_some_and(|end| end <= self.len) {
                        write_le(run.cast::<u8>().add(off), value, n);
                    }
                }
                Completion::MmioRead { size, value } => {
                    let data = std::ptr::addr_of_mut!((*run).__bindgen_anon_1.mmio.data);
                    write_le(data.cast::<u8>(), value, usize::from(size));
                }
            }
            if let Some(data) = string_in {
                let off = (*run).__bindgen_anon_1.io.data_offset as usize;
                if off < self.len {
                    let n = data.len().min(self.len - off);
                    std::ptr::copy_nonoverlapping(data.as_ptr(), run.cast::<u8>().add(off), n);
                }
            }
        }
        #[cfg(feature = "exit-timing")]
        crate::exit_timing::entering();
        // SAFETY: KVM_RUN takes no argument; `fd` is a vCPU fd whose kvm_run
        // page is mapped (by us and by kvm-ioctls) for the call's duration.
        let ret = unsafe { ioctl(fd, KVM_RUN()) };
        #[cfg(feature = "exit-timing")]
        crate::exit_timing::left();
        if ret == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(false),
            _ => Err(err),
        }
    }

    /// The interrupt-related flags of the last exit.
    pub(crate) fn flags(&self) -> RunFlags {
        let run = self.ptr.as_ptr();
        // SAFETY: plain integer fields of the live kvm_run, read by the owning thread.
        unsafe {
            RunFlags {
                ready_for_interrupt_injection: (*run).ready_for_interrupt_injection != 0,
                if_flag: (*run).if_flag != 0,
                cr8: (*run).cr8,
                apic_base: (*run).apic_base,
            }
        }
    }

    /// Decodes the exit the kernel left in `kvm_run`. String I/O data
    /// (`rep outs`) is copied into `string_out`.
    #[inline(always)]
    pub(crate) fn decode(&self, string_out: &mut Vec<u8>) -> Exit {
        let run = self.ptr.as_ptr();
        // I/O and MMIO first, with compares: a `match` over every reason is
        // a jump table, more instructions on the path every exit takes.
        // SAFETY: the kernel wrote `exit_reason` and the union member that
        // reason selects; each arm reads only that member. For I/O, the data
        // range is checked against the mapping before it is read.
        unsafe {
            let reason = (*run).exit_reason;
            if reason == KVM_EXIT_IO {
                let io = (*run).__bindgen_anon_1.io;
                let total = io.count as usize * usize::from(io.size);
                let off = io.data_offset as usize;
                if total == 0 || off.checked_add(total).is_none_or(|end| end > self.len) || io.size > 8 {
                    return Exit::Unknown { reason: KVM_EXIT_IO };
                }
                let src = run.cast::<u8>().add(off);
                let is_in = u32::from(io.direction) == KVM_EXIT_IO_IN;
                if io.count != 1 {
                    return string_io(
                        string_out,
                        is_in,
                        io.port,
                        io.size,
                        io.count,
                        std::slice::from_raw_parts(src, total),
                    );
                }
                if is_in {
                    Exit::IoIn { port: io.port, size: io.size }
                } else {
                    let data = read_le(src, total, off + 8 <= self.len);
                    Exit::IoOut { port: io.port, size: io.size, data }
                }
            } else if reason == KVM_EXIT_MMIO {
                let mmio = (*run).__bindgen_anon_1.mmio;
                let size = mmio.len.min(8) as u8;
                let addr = GuestAddress(mmio.phys_addr);
                if mmio.is_write != 0 {
                    Exit::MmioWrite { addr, size, data: read_le(mmio.data.as_ptr(), usize::from(size), true) }
                } else {
                    Exit::MmioRead { addr, size }
                }
            } else {
                decode_other(run)
            }
        }
    }
}

/// Decodes an exit other than I/O and MMIO.
///
/// # Safety
///
/// `run` is the live `kvm_run` of a vCPU that has just left `KVM_RUN`.
#[inline]
unsafe fn decode_other(run: *const kvm_run) -> Exit {
    // SAFETY: the caller's contract; each arm reads only the union member
    // its exit reason selects.
    unsafe {
        match (*run).exit_reason {
            KVM_EXIT_HLT => Exit::Hlt,
            KVM_EXIT_SHUTDOWN => Exit::Shutdown,
            KVM_EXIT_IRQ_WINDOW_OPEN => Exit::InterruptWindow,
            KVM_EXIT_IOAPIC_EOI => Exit::IoapicEoi { vector: (*run).__bindgen_anon_1.eoi.vector },
            KVM_EXIT_SYSTEM_EVENT => {
                let ev = (*run).__bindgen_anon_1.system_event;
                Exit::SystemEvent(SystemEvent::from_raw(ev.type_))
            }
            KVM_EXIT_FAIL_ENTRY => {
                let f = (*run).__bindgen_anon_1.fail_entry;
                Exit::FailEntry { hardware_reason: f.hardware_entry_failure_reason, cpu: f.cpu }
            }
            KVM_EXIT_INTERNAL_ERROR => internal_error(&(*run).__bindgen_anon_1),
            reason => Exit::Unknown { reason },
        }
    }
}

/// The mask of the low `n` bytes (all of them from 8 on), without a branch.
#[inline(always)]
fn low_bytes(n: usize) -> u64 {
    ((1u128 << (8 * n.min(8))) - 1) as u64
}

/// The low `n` bytes (1 to 8) at `src` as a little-endian value, read
/// without a call to `memcpy` (a variable-length copy is one, an indirect
/// call through the GOT) and, when `wide` says 8 bytes are readable, without
/// a branch on `n` either: a mask instead of a jump table on the exit path.
///
/// # Safety
///
/// `src..src + n.min(8)` must be readable, and `src..src + 8` if `wide`.
#[inline(always)]
unsafe fn read_le(src: *const u8, n: usize, wide: bool) -> u64 {
    // SAFETY: the caller's contract; each read stays within its bytes.
    unsafe {
        if wide {
            return u64::from_le(src.cast::<u64>().read_unaligned()) & low_bytes(n);
        }
        (0..n.min(8)).fold(0, |v, i| v | u64::from(src.add(i).read()) << (8 * i))
    }
}

/// Writes the low `n` bytes (at most 8) of `value` at `dst`, little-endian,
/// without a call to `memcpy` (see [`read_le`]).
///
/// # Safety
///
/// `dst..dst + n.min(8)` must be writable.
#[inline(always)]
unsafe fn write_le(dst: *mut u8, value: u64, n: usize) {
    // SAFETY: the caller's contract; each write stays within `n.min(8)` bytes.
    unsafe {
        match n {
            1 => dst.write(value as u8),
            2 => dst.cast::<u16>().write_unaligned((value as u16).to_le()),
            4 => dst.cast::<u32>().write_unaligned((value as u32).to_le()),
            8 => dst.cast::<u64>().write_unaligned(value.to_le()),
            _ => (0..n.min(8)).for_each(|i| dst.add(i).write((value >> (8 * i)) as u8)),
        }
    }
}

/// A `rep ins`/`rep outs` exit: `data` (the elements KVM wrote out, or the
/// room for those it will read in) goes to `string_out`.
#[cold]
fn string_io(string_out: &mut Vec<u8>, is_in: bool, port: u16, size: u8, count: u32, data: &[u8]) -> Exit {
    string_out.clear();
    if is_in {
        string_out.resize(data.len(), 0);
        Exit::IoInString { port, size, count }
    } else {
        string_out.extend_from_slice(data);
        Exit::IoOutString { port, size, count }
    }
}

/// Decodes a `KVM_EXIT_INTERNAL_ERROR` exit (rare: kept out of the exit path).
/// It takes the exit's union alone, not the whole `kvm_run`: a kicker may
/// write `immediate_exit` meanwhile.
///
/// # Safety
///
/// The exit reason must be `KVM_EXIT_INTERNAL_ERROR`, so that the
/// `internal` member (and for an emulation failure, `emulation_failure`)
/// of `exit` is the one KVM wrote.
#[cold]
unsafe fn internal_error(exit: &kvm_run__bindgen_ty_1) -> Exit {
    // SAFETY: the caller's contract (above).
    unsafe {
        let internal = exit.internal;
        let mut err = InternalError {
            suberror: internal.suberror,
            data: [0; 16],
            ndata: internal.ndata.min(16) as u8,
            insn_bytes: [0; 15],
            insn_len: 0,
        };
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
            let emu = exit.emulation_failure;
            if emu.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
                let insn = emu.__bindgen_anon_1.__bindgen_anon_1;
                let n = insn.insn_size.min(15);
                err.insn_bytes = insn.insn_bytes;
                err.insn_len = n;
            }
            // The flags word and the bytes overlay data[0..]; keep
            // only what is not instruction bytes.
            err.ndata = 0;
        } else {
            let n = usize::from(err.ndata);
            err.data[..n].copy_from_slice(&internal.data[..n]);
        }
        Exit::InternalError(Box::new(err))
    }
}

impl Drop for RunArea {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_and_written_little_endian_at_every_size() {
        let bytes = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99];
        let value = 0x8877_6655_4433_2211u64;
        for n in 0..=9 {
            let want = if n >= 8 { value } else { value & ((1u64 << (8 * n)) - 1) };
            // SAFETY: `bytes` has 9 readable bytes; at most 8 are read.
            assert_eq!(unsafe { read_le(bytes.as_ptr(), n, false) }, want, "read {n}");
            // SAFETY: as above; the wide read takes 8 bytes and masks them.
            assert_eq!(unsafe { read_le(bytes.as_ptr(), n, true) }, want, "wide read {n}");
            let mut out = [0xeeu8; 9];
            // SAFETY: `out` has 9 writable bytes; at most 8 are written.
            unsafe { write_le(out.as_mut_ptr(), value, n) };
            let k = n.min(8);
            assert_eq!(out[..k], bytes[..k], "write {n}");
            assert!(out[k..].iter().all(|&b| b == 0xee), "write {n} stayed in its {k} bytes");
        }
    }
}
