//! The guest both VMMs run: a loop on the TSC that writes one byte to COM1
//! every tick and stores to a fixed number of pages per tick.
//!
//! One code generator, two encodings of the same instructions: 32-bit for
//! the multiboot ELF (QEMU `-kernel`, `nkvm run --kernel`: protected mode,
//! paging off, only the BSP runs) and 64-bit for nkvm's built-in machine
//! (`nkvm run --image`: long mode, identity-mapped RAM, every vCPU enters
//! with its id in rdi and the APs park). Only 32-bit registers are used, so
//! the two differ in encoding, not in behaviour.
//!
//! Each tick the guest writes `'@' + (tick & 31)` (a rotating printable
//! byte, so a lost or repeated tick shows) and stores the tick number into
//! the first dword of the next `pages` pages of [`DIRTY_START`,
//! [`DIRTY_END`]), wrapping, [`UNROLL`] pages a loop turn. The tick deadline advances by `tick_cycles`;
//! a deadline more than one tick late or early (the TSC jumped across a
//! migration) is reset to now + one tick, so the guest never bursts to
//! catch up and never stalls on a clock that went back.

use iced_x86::code_asm::*;

/// First byte of the RAM the guest dirties (above the kernel and the
/// multiboot information).
pub const DIRTY_START: u32 = 16 << 20;
/// End of it (below the top of a 512 MiB guest).
pub const DIRTY_END: u32 = 496 << 20;
/// Where the multiboot image is linked.
pub const MULTIBOOT_LOAD: u32 = 0x40_0000;
/// Where `nkvm run --image` loads a raw image.
pub const IMAGE_LOAD: u64 = 0x10_0000;
const COM1: u16 = 0x3f8;
/// Pages stored to per turn of the dirtying loop; `pages` is rounded up
/// to a multiple of it.
pub const UNROLL: u32 = 4;

/// What a guest image does.
#[derive(Clone, Copy, Debug)]
pub struct Ticker {
    /// TSC cycles per tick.
    pub tick_cycles: u32,
    /// Pages stored to per tick (0: the guest only ticks), a multiple of
    /// [`UNROLL`].
    pub pages: u32,
}

impl Ticker {
    /// The multiboot (v1) ELF32 kernel, for QEMU and `nkvm run --kernel`.
    pub fn multiboot_elf(&self) -> Vec<u8> {
        super::common::elf32(&self.assemble(32), MULTIBOOT_LOAD)
    }

    /// The raw 64-bit image, for `nkvm run --image` (the built-in machine).
    pub fn builtin_image(&self) -> Vec<u8> {
        self.assemble(64)
    }

    fn assemble(&self, bitness: u32) -> Vec<u8> {
        self.code(bitness).expect("the ticker assembles")
    }

    fn code(&self, bitness: u32) -> Result<Vec<u8>, IcedError> {
        let tick = self.tick_cycles as i32;
        let mut a = CodeAssembler::new(bitness)?;
        let (mut wait, mut due, mut resync, mut emit) =
            (a.create_label(), a.create_label(), a.create_label(), a.create_label());
        let (mut dirty, mut no_wrap) = (a.create_label(), a.create_label());
        if bitness == 64 {
            // The built-in machine runs the image on every vCPU: the APs park.
            let (mut bsp, mut park) = (a.create_label(), a.create_label());
            a.test(edi, edi)?;
            a.jz(bsp)?;
            a.set_label(&mut park)?;
            a.pause()?;
            a.jmp(park)?;
            a.set_label(&mut bsp)?;
        }
        // ebp:ebx = the next deadline, esi = the tick number, edi = the next page.
        a.xor(esi, esi)?;
        a.mov(edi, DIRTY_START)?;
        a.jmp(resync)?;

        a.set_label(&mut wait)?;
        a.rdtsc()?;
        a.sub(eax, ebx)?;
        a.sbb(edx, ebp)?;
        a.jns(due)?;
        // Early: keep waiting unless the deadline is more than a tick away.
        a.inc(edx)?;
        a.jnz(resync)?;
        a.cmp(eax, -tick)?;
        a.jae(wait)?;
        a.jmp(resync)?;
        a.set_label(&mut due)?;
        a.test(edx, edx)?;
        a.jnz(resync)?;
        a.cmp(eax, tick)?;
        a.jae(resync)?;
        a.add(ebx, tick)?;
        a.adc(ebp, 0)?;
        a.jmp(emit)?;
        a.set_label(&mut resync)?;
        a.rdtsc()?;
        a.add(eax, tick)?;
        a.adc(edx, 0)?;
        a.mov(ebx, eax)?;
        a.mov(ebp, edx)?;

        a.set_label(&mut emit)?;
        a.inc(esi)?;
        a.mov(eax, esi)?;
        a.and(eax, 31)?;
        a.add(eax, i32::from(b'@'))?;
        a.mov(edx, u32::from(COM1))?;
        a.out(dx, al)?;
        if self.pages > 0 {
            // UNROLL pages a turn: the guest runs in KVM's instruction
            // emulator here, so instructions per page set the top rate.
            a.mov(ecx, self.pages.div_ceil(UNROLL))?;
            a.set_label(&mut dirty)?;
            for i in 0..UNROLL {
                a.mov(dword_ptr(edi + i * 4096), esi)?;
            }
            a.add(edi, UNROLL * 4096)?;
            a.cmp(edi, DIRTY_END)?;
            a.jb(no_wrap)?;
            a.mov(edi, DIRTY_START)?;
            a.set_label(&mut no_wrap)?;
            a.dec(ecx)?;
            a.jnz(dirty)?;
        }
        a.jmp(wait)?;
        let load = if bitness == 64 { IMAGE_LOAD } else { u64::from(MULTIBOOT_LOAD) };
        a.assemble(load)
    }
}

/// The tick byte after `b` (`'@'..='_'`, wrapping).
pub fn next_tick_byte(b: u8) -> u8 {
    b'@' + ((b - b'@' + 1) & 31)
}
