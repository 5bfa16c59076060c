//! The XSAVE family (`xsave`, `xsaveopt`, `xsavec`, `xrstor`, `xgetbv`,
//! `xsetbv`), completed through the vCPU's XSAVE image (`KVM_GET_XSAVE`,
//! `KVM_SET_XSAVE`), which is in the standard format: the legacy area
//! (x87 in bytes 0..160 but for MXCSR at 24..32, XMM at 160..416), the
//! header at 512 (XSTATE_BV, XCOMP_BV) and component `i >= 2` at the offset
//! CPUID leaf 0xd subleaf `i` gives.

use iced_x86::{Instruction, Mnemonic};

use super::guest::{Fault, GuestMemory};
use super::{EmulateError, Outcome};
use crate::{Regs, Sregs};

/// Where the header starts, and where the extended components may start.
const HEADER: usize = 512;
const EXTENDED: usize = 576;
const COMPACTED: u64 = 1 << 63;
/// MXCSR bits a guest may set.
const MXCSR_MASK: u32 = 0xffff;

/// Bytes of one state component in the standard format: `(offset, size)`
/// pieces (x87 is split around MXCSR), and whether a compacted image aligns
/// it to 64 bytes.
struct Component {
    pieces: Vec<(usize, usize)>,
    align64: bool,
}

/// The layout of the state components the guest's CPUID describes.
struct Layout(Vec<Option<Component>>);

impl Layout {
    fn of(cpuid: &crate::Cpuid) -> Layout {
        let mut components: Vec<Option<Component>> = vec![
            Some(Component { pieces: vec![(0, 24), (32, 128)], align64: false }),
            Some(Component { pieces: vec![(160, 256)], align64: false }),
        ];
        components.resize_with(63, || None);
        for e in cpuid.as_slice() {
            let i = e.index as usize;
            if e.function == 0xd && (2..63).contains(&i) && e.eax != 0 {
                components[i] =
                    Some(Component { pieces: vec![(e.ebx as usize, e.eax as usize)], align64: e.ecx & 2 != 0 });
            }
        }
        Layout(components)
    }

    /// Where component `i` lives in guest memory, and how big it is: at
    /// its standard offset, or packed after the header in the order of
    /// `xcomp_bv` for a compacted image. `None` if CPUID does not describe it.
    fn placed(&self, i: usize, xcomp_bv: u64) -> Option<Vec<(usize, usize, usize)>> {
        let c = self.0.get(i)?.as_ref()?;
        if i < 2 || xcomp_bv & COMPACTED == 0 {
            return Some(c.pieces.iter().map(|&(o, n)| (o, o, n)).collect());
        }
        let mut at = EXTENDED;
        for j in 2..=i {
            if xcomp_bv & (1 << j) == 0 {
                continue;
            }
            let cj = self.0.get(j)?.as_ref()?;
            if cj.align64 {
                at = at.next_multiple_of(64);
            }
            if j == i {
                return Some(vec![(c.pieces[0].0, at, c.pieces[0].1)]);
            }
            at += cj.pieces[0].1;
        }
        None
    }
}

/// PKRU (state component 9) from the vCPU's XSAVE image: 0, its initial
/// value, when XSTATE_BV says it is in its initial state or CPUID does not
/// place it.
pub(super) fn pkru(vcpu: &crate::Vcpu) -> Result<u32, EmulateError> {
    const PKRU: usize = 9;
    let image = vcpu.xsave()?;
    let layout = Layout::of(&vcpu.cpuid()?);
    if image.len() < EXTENDED || u64_at(&image, HEADER) & (1 << PKRU) == 0 {
        return Ok(0);
    }
    let Some(&(at, _, 4..)) = layout.placed(PKRU, 0).as_deref().and_then(|p| p.first()) else { return Ok(0) };
    Ok(image.get(at..at + 4).map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes"))))
}

/// The state components whose bits are set in `mask`.
fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..63).filter(move |i| mask & (1 << i) != 0)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// A fault taken while reading an area the instruction writes is reported
/// as a write fault.
fn as_write(fault: Fault) -> Fault {
    match fault {
        Fault::Page { addr, error_code } => Fault::Page { addr, error_code: error_code | 2 },
        other => other,
    }
}

/// One instruction of the family.
pub(super) fn complete(
    insn: &Instruction,
    regs: &mut Regs,
    sregs: &Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    const OSXSAVE: u64 = 1 << 18;
    if sregs.cr4 & OSXSAVE == 0 || insn.has_lock_prefix() {
        return Ok(Outcome::Vector(6));
    }
    let vcpu = mem.vcpu;
    let xcr0 = vcpu.xcr0()?;
    match insn.mnemonic() {
        Mnemonic::Xgetbv => {
            let value = match regs.rcx as u32 {
                0 => xcr0,
                // XINUSE, where CPUID.(0xd, 1).EAX[2] offers it.
                1 if xgetbv1(&vcpu.cpuid()?) => xcr0 & inuse(&vcpu.xsave()?),
                _ => return Ok(Outcome::Fault(Fault::General(0))),
            };
            regs.rax = value & 0xffff_ffff;
            regs.rdx = value >> 32;
            return Ok(Outcome::Done);
        }
        Mnemonic::Xsetbv => {
            let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            // x87 always on, AVX only with SSE; the rest KVM checks.
            let valid = mem.cpl == 0 && regs.rcx as u32 == 0 && value & 1 != 0 && (value & 4 == 0 || value & 2 != 0);
            if !valid || vcpu.set_xcr0(value).is_err() {
                return Ok(Outcome::Fault(Fault::General(0)));
            }
            return Ok(Outcome::Done);
        }
        _ => {}
    }
    // The xsave family (not xgetbv/xsetbv) raises #NM under CR0.TS.
    const CR0_TS: u64 = 1 << 3;
    if sregs.cr0 & CR0_TS != 0 {
        return Ok(Outcome::Vector(7));
    }
    let Some(addr) = GuestMemory::operand_address(insn, 0, regs, sregs) else { return Ok(Outcome::Unsupported) };
    if addr % 64 != 0 {
        return Ok(Outcome::Fault(Fault::General(0)));
    }
    let rfbm = xcr0 & ((regs.rdx << 32) | (regs.rax & 0xffff_ffff));
    let layout = Layout::of(&vcpu.cpuid()?);
    match insn.mnemonic() {
        Mnemonic::Xsave | Mnemonic::Xsave64 | Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => {
            save(addr, rfbm, 0, &layout, mem)
        }
        Mnemonic::Xsavec | Mnemonic::Xsavec64 => save(addr, rfbm, rfbm | COMPACTED, &layout, mem),
        Mnemonic::Xrstor | Mnemonic::Xrstor64 => restore(addr, rfbm, xcr0, &layout, mem),
        _ => Ok(Outcome::Unsupported),
    }
}

fn xgetbv1(cpuid: &crate::Cpuid) -> bool {
    cpuid.as_slice().iter().any(|e| e.function == 0xd && e.index == 1 && e.eax & 4 != 0)
}

/// XINUSE as the XSAVE image's XSTATE_BV records it.
fn inuse(image: &[u8]) -> u64 {
    u64_at(image, HEADER)
}

/// `xsave`/`xsaveopt` (`xcomp_bv` 0: standard format, every requested
/// component written, XSTATE_BV's other bits kept) and `xsavec` (`xcomp_bv`
/// = RFBM | bit 63: compacted, only components in use written).
fn save(addr: u64, rfbm: u64, xcomp_bv: u64, layout: &Layout, mem: &GuestMemory<'_>) -> Result<Outcome, EmulateError> {
    let image = mem.vcpu.xsave()?;
    let inuse = inuse(&image) & rfbm;
    let mut places = Vec::new();
    for i in bits(rfbm) {
        if xcomp_bv != 0 && inuse & (1 << i) == 0 {
            continue;
        }
        let Some(p) = layout.placed(i, xcomp_bv) else { return Ok(Outcome::Unsupported) };
        places.extend(p);
    }
    let end = places.iter().map(|&(_, at, n)| at + n).max().unwrap_or(0).max(EXTENDED);
    let mut area = vec![0u8; end];
    if let Err(fault) = mem.read(addr, &mut area)? {
        return Ok(Outcome::Fault(as_write(fault)));
    }
    for (from, to, n) in places {
        area[to..to + n].copy_from_slice(&image[from..from + n]);
    }
    if rfbm & 0b110 != 0 {
        area[24..32].copy_from_slice(&image[24..32]);
    }
    let bv = if xcomp_bv != 0 { inuse } else { (u64_at(&area, HEADER) & !rfbm) | inuse };
    area[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
    if xcomp_bv != 0 {
        area[HEADER + 8..HEADER + 16].copy_from_slice(&xcomp_bv.to_le_bytes());
    }
    Ok(match mem.write(addr, &area)? {
        Ok(()) => Outcome::Done,
        Err(fault) => Outcome::Fault(fault),
    })
}

/// `xrstor`, from a standard or compacted image: components in RFBM whose
/// XSTATE_BV bit is set are loaded, the others go to their initial state
/// (their bit cleared in the vCPU's image, so the kernel's own restore
/// initialises them). #GP(0) for a malformed header or reserved MXCSR bits.
fn restore(addr: u64, rfbm: u64, xcr0: u64, layout: &Layout, mem: &GuestMemory<'_>) -> Result<Outcome, EmulateError> {
    let mut header = [0u8; 64];
    if let Err(fault) = mem.read(addr.wrapping_add(HEADER as u64), &mut header)? {
        return Ok(Outcome::Fault(fault));
    }
    let (xstate_bv, xcomp_bv) = (u64_at(&header, 0), u64_at(&header, 8));
    let compacted = xcomp_bv & COMPACTED != 0;
    let malformed = if compacted {
        xcomp_bv & !COMPACTED & !xcr0 != 0 || xstate_bv & !xcomp_bv != 0 || header[16..].iter().any(|&b| b != 0)
    } else {
        xstate_bv & !xcr0 != 0 || header[8..24].iter().any(|&b| b != 0)
    };
    if malformed {
        return Ok(Outcome::Fault(Fault::General(0)));
    }
    let load = rfbm & xstate_bv;
    let mut places = Vec::new();
    for i in bits(load) {
        let Some(p) = layout.placed(i, xcomp_bv) else { return Ok(Outcome::Unsupported) };
        places.extend(p);
    }
    let end = places.iter().map(|&(_, at, n)| at + n).max().unwrap_or(0).max(32);
    let mut area = vec![0u8; end];
    if let Err(fault) = mem.read(addr, &mut area)? {
        return Ok(Outcome::Fault(fault));
    }
    // MXCSR comes with SSE or AVX: always in the standard form, only with
    // their XSTATE_BV bits in the compacted one.
    let mxcsr_loaded = if compacted { load & 0b110 != 0 } else { rfbm & 0b110 != 0 };
    let mxcsr = u32::from_le_bytes([area[24], area[25], area[26], area[27]]);
    if mxcsr_loaded && mxcsr & !MXCSR_MASK != 0 {
        return Ok(Outcome::Fault(Fault::General(0)));
    }
    let mut image = mem.vcpu.xsave()?;
    for (to, from, n) in places {
        image[to..to + n].copy_from_slice(&area[from..from + n]);
    }
    if mxcsr_loaded {
        image[24..28].copy_from_slice(&mxcsr.to_le_bytes());
    }
    let mut bv = (inuse(&image) & !rfbm) | load;
    if mxcsr_loaded && load & 0b110 == 0 {
        // The kernel takes MXCSR only along with SSE state: pass the XMM
        // registers' initial state (zeros) with it.
        image[160..416].fill(0);
        bv |= 0b10;
    }
    image[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
    mem.vcpu.set_xsave(&image)?;
    Ok(Outcome::Done)
}
