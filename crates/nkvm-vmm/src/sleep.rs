//! ACPI S3, suspend to RAM, on the kvm-unit-tests machine.
//!
//! The guest writes `SLP_EN` with `SLP_TYP` = [`acpi::SLP_TYP_S3`] to PM1a
//! control ([`acpi::PlatformRequest::Sleep`]); the vCPU that wrote asks
//! every vCPU to stop ([`Sleep::request`]) and each parks in
//! [`Sleep::park`], its thread blocked (no guest runs, nothing spins). RAM
//! and the devices keep their state, as they do in S3.
//!
//! The wake event is the RTC alarm ([`nkvm_devices::cmos::Cmos::alarm_in`],
//! status B `AIE` set): vCPU 0's thread sleeps until it goes off. Without
//! one the machine sleeps until nkvm is stopped, as a PC with no wake
//! source does. Then, as a reset does, every vCPU gets back the state it
//! had when created (KVM's reset state, saved by [`Sleep::remember`]):
//! the application processors wait for INIT/SIPI again, and the boot
//! processor starts in real mode at the FACS's waking vector — the 64-bit
//! `X_Firmware_Waking_Vector` if not 0, else the 32-bit one — with
//! `CS = vector >> 4` and `IP = vector & 0xf` (ACPI 6.5, 5.2.10).
//!
//! A machine in S3 cannot be saved: from the guest's request to the wake,
//! [`WakeSource::guard`], registered with the machine's saved devices as
//! `"acpi-s3"`, refuses to save (its vCPU threads are parked here, not in
//! a state a snapshot can take). Awake, it saves a small blob saying so,
//! and a restore takes only that.
//!
//! Not modelled: PM1 status bits (`WAK_STS`, `RTC_STS`) after the wake,
//! `RTC_EN` gating the alarm as a wake event, the FACS's waking-vector
//! flags (64-bit or protected-mode wake), S1, S2 and S4.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nkvm::{GuestAddress, RunState, Vcpu, VcpuState, Vm};
use nkvm_devices::snapshot::{StateReader, StateWriter};
use nkvm_devices::{Snapshot, SnapshotError};

use crate::acpi;
use crate::saved::{LoadError, SavedDevice};

/// How often a parked thread looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Errors of a sleep or a wake.
#[derive(Debug, thiserror::Error)]
pub enum SleepError {
    /// Saving a vCPU's reset state failed.
    #[error("cannot save vCPU {id}'s reset state for S3 resume")]
    Save {
        /// The vCPU.
        id: u32,
        /// Why.
        #[source]
        source: nkvm::StateError,
    },
    /// No reset state was saved for this vCPU.
    #[error("vCPU {0} has no saved reset state; S3 resume cannot reset it")]
    NoResetState(u32),
    /// Putting a vCPU back in its reset state failed.
    #[error("cannot reset vCPU {id} on S3 resume")]
    Restore {
        /// The vCPU.
        id: u32,
        /// Why.
        #[source]
        source: nkvm::StateError,
    },
    /// Placing the boot vCPU at the waking vector failed.
    #[error("cannot start vCPU 0 at the waking vector {vector:#x}")]
    Vector {
        /// The vector.
        vector: u64,
        /// Why.
        #[source]
        source: nkvm::VcpuError,
    },
    /// The FACS could not be read.
    #[error("cannot read the FACS waking vector at {0}")]
    Facs(GuestAddress, #[source] nkvm::MemoryError),
    /// A waking vector real mode cannot reach.
    #[error("the waking vector {0:#x} is above 1 MiB; a real-mode wake cannot reach it")]
    VectorTooHigh(u64),
}

/// How a parked vCPU came back.
#[derive(Debug, PartialEq, Eq)]
pub enum Parked {
    /// The machine woke; the vCPU is reset and may run.
    Woken,
    /// nkvm is stopping the VM: end the vCPU's thread.
    Stopped,
}

/// What tells the boot vCPU how long until the wake event, if any; and
/// the machine's "asleep" flag, which its [`guard`](Self::guard) reads.
pub struct WakeSource {
    alarm: Box<dyn Fn() -> Option<Duration> + Send + Sync>,
    asleep: Arc<AtomicBool>,
}

impl std::fmt::Debug for WakeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeSource").field("asleep", &self.asleep).finish_non_exhaustive()
    }
}

impl WakeSource {
    /// A wake event `alarm` says the time to (`None`: none set).
    pub fn new(alarm: Box<dyn Fn() -> Option<Duration> + Send + Sync>) -> Self {
        Self { alarm, asleep: Arc::default() }
    }

    /// No wake event: a sleeping machine sleeps until nkvm is stopped.
    pub fn never() -> Self {
        Self::new(Box::new(|| None))
    }

    /// The saved-device entry that refuses to save the machine while it
    /// is asleep (see the [module documentation](self)).
    pub fn guard(&self) -> S3Guard {
        S3Guard(self.asleep.clone())
    }
}

/// Refuses to save a machine parked in S3; see [`WakeSource::guard`].
#[derive(Debug)]
pub struct S3Guard(Arc<AtomicBool>);

/// What an awake machine's `"acpi-s3"` blob holds: that it was awake.
struct Awake(bool);

impl Snapshot for Awake {
    fn snapshot_name(&self) -> &'static str {
        "acpi-s3"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.bool(!self.0);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        if input.bool("asleep")? {
            return Err(input.invalid("asleep", 1, at, "0: a machine asleep in S3 is never saved"));
        }
        self.0 = true;
        Ok(())
    }
}

impl SavedDevice for S3Guard {
    fn save(&self) -> Result<Vec<u8>, String> {
        if self.0.load(SeqCst) {
            return Err("the guest is asleep in ACPI S3; a sleeping machine cannot be saved (save it awake, \
                        e.g. after its RTC alarm wakes it)"
                .into());
        }
        Ok(Awake(true).snapshot())
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        Awake(false).restore(blob).map_err(|source| LoadError::Device { name: name.to_string(), source })
    }

    fn unpausable(&self) -> Option<String> {
        self.0.load(SeqCst).then(|| {
            "the guest is asleep in ACPI S3: its vCPUs wait for the wake-up, there is nothing to pause or save \
             (try again once its RTC alarm wakes it)"
                .to_string()
        })
    }
}

#[derive(Debug, Default)]
struct Rendezvous {
    /// Wakes so far: a parked application processor waits for the next.
    wakes: u64,
    /// Application processors parked in this sleep.
    parked: u32,
    /// Of those, the ones that have reset themselves after the wake.
    resumed: u32,
}

/// The S3 state of a machine; see the [module documentation](self).
pub struct Sleep {
    /// Shared with the [`WakeSource`]'s guard.
    asleep: Arc<AtomicBool>,
    rendezvous: Mutex<Rendezvous>,
    changed: Condvar,
    reset_states: Mutex<HashMap<u32, VcpuState>>,
    facs: GuestAddress,
    wake: Box<dyn Fn() -> Option<Duration> + Send + Sync>,
}

impl std::fmt::Debug for Sleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sleep").field("asleep", &self.asleep).field("facs", &self.facs).finish_non_exhaustive()
    }
}

impl Sleep {
    /// S3 for a machine whose FACS is at `facs`, woken when `wake` says.
    pub fn new(facs: GuestAddress, wake: WakeSource) -> Self {
        Self {
            asleep: wake.asleep,
            rendezvous: Mutex::default(),
            changed: Condvar::new(),
            reset_states: Mutex::default(),
            facs,
            wake: wake.alarm,
        }
    }

    fn rendezvous(&self) -> MutexGuard<'_, Rendezvous> {
        self.rendezvous.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves `vcpu`'s state as its reset state: call it once the vCPU is
    /// created and has its CPUID, before it is placed at an entry point.
    pub fn remember(&self, vcpu: &mut Vcpu) -> Result<(), SleepError> {
        let id = vcpu.id();
        let state = vcpu.save_state(&mut RunState::new()).map_err(|source| SleepError::Save { id, source })?;
        self.reset_states.lock().unwrap_or_else(|p| p.into_inner()).insert(id, state);
        Ok(())
    }

    /// The guest asked for S3: every vCPU is to park (`kick_all` makes them
    /// leave the guest and look at [`requested`](Self::requested)).
    pub fn request(&self, kick_all: impl FnOnce()) {
        self.asleep.store(true, SeqCst);
        kick_all();
    }

    /// Whether the vCPUs must park.
    pub fn requested(&self) -> bool {
        self.asleep.load(SeqCst)
    }

    /// Parks the calling vCPU until the machine wakes, then resets it (vCPU
    /// 0 to the waking vector). Returns early with [`Parked::Stopped`]
    /// when `stop` is set.
    pub fn park(&self, vcpu: &mut Vcpu, vm: &Vm, stop: &AtomicBool) -> Result<Parked, SleepError> {
        if vcpu.id() == 0 {
            self.park_boot_vcpu(vcpu, vm, stop)
        } else {
            self.park_application_processor(vcpu, stop)
        }
    }

    fn park_application_processor(&self, vcpu: &mut Vcpu, stop: &AtomicBool) -> Result<Parked, SleepError> {
        let mut r = self.rendezvous();
        if !self.requested() {
            return Ok(Parked::Woken); // came too late: the machine is awake
        }
        r.parked += 1;
        let sleeping_through = r.wakes;
        while r.wakes == sleeping_through {
            if stop.load(SeqCst) {
                return Ok(Parked::Stopped);
            }
            r = self.changed.wait_timeout(r, STOP_POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(r);
        let reset = self.reset(vcpu);
        self.rendezvous().resumed += 1;
        self.changed.notify_all();
        reset.map(|()| Parked::Woken)
    }

    fn park_boot_vcpu(&self, vcpu: &mut Vcpu, vm: &Vm, stop: &AtomicBool) -> Result<Parked, SleepError> {
        log::debug!("S3: asleep");
        let mut r = self.rendezvous();
        loop {
            if stop.load(SeqCst) {
                return Ok(Parked::Stopped);
            }
            let wait = match (self.wake)() {
                Some(d) if d.is_zero() => break,
                Some(d) => d.min(STOP_POLL),
                None => STOP_POLL,
            };
            r = self.changed.wait_timeout(r, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
        log::debug!("S3: the RTC alarm wakes the machine");
        // Wake: release the parked application processors and let them
        // reset before vCPU 0 runs (it may send them INIT/SIPI at once).
        r.wakes += 1;
        self.asleep.store(false, SeqCst);
        self.changed.notify_all();
        while r.resumed < r.parked {
            if stop.load(SeqCst) {
                return Ok(Parked::Stopped);
            }
            r = self.changed.wait_timeout(r, STOP_POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
        r.parked = 0;
        r.resumed = 0;
        drop(r);
        let vector = self.waking_vector(vm)?;
        if vector >= 0x10_0000 {
            return Err(SleepError::VectorTooHigh(vector));
        }
        self.reset(vcpu)?;
        vcpu.set_real_mode((vector >> 4) as u16, (vector & 0xf) as u16)
            .map_err(|source| SleepError::Vector { vector, source })?;
        log::debug!("S3: vCPU 0 resumes at {:04x}:{:x}", vector >> 4, vector & 0xf);
        Ok(Parked::Woken)
    }

    /// Puts `vcpu` back to its reset state, keeping the LINT0/LINT1
    /// requests it has not taken: an 8259 that acknowledged a vector while
    /// the machine slept (the PIT ticks on) has it in service, and only the
    /// guest's EOI, after it takes the vector, ends that.
    fn reset(&self, vcpu: &mut Vcpu) -> Result<(), SleepError> {
        let id = vcpu.id();
        let mut state = {
            let states = self.reset_states.lock().unwrap_or_else(|p| p.into_inner());
            states.get(&id).ok_or(SleepError::NoResetState(id))?.clone()
        };
        state.pending_lint = vcpu.pending_lint();
        vcpu.restore_state(&state).map_err(|source| SleepError::Restore { id, source })
    }

    /// The FACS's waking vector: the 64-bit one if set, else the 32-bit one.
    fn waking_vector(&self, vm: &Vm) -> Result<u64, SleepError> {
        let read = |offset: u64, buf: &mut [u8]| {
            let at = GuestAddress(self.facs.0 + offset);
            vm.read_memory(at, buf).map_err(|e| SleepError::Facs(at, e))
        };
        let mut x = [0u8; 8];
        read(acpi::FACS_X_WAKING_VECTOR, &mut x)?;
        let mut v = [0u8; 4];
        read(acpi::FACS_WAKING_VECTOR, &mut v)?;
        Ok(waking_vector(u64::from_le_bytes(x), u32::from_le_bytes(v)))
    }
}

/// The vector ACPI says to wake at: `x` if not 0, else `legacy`.
pub fn waking_vector(x: u64, legacy: u32) -> u64 {
    if x != 0 {
        x
    } else {
        u64::from(legacy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_64_bit_vector_wins_when_set() {
        assert_eq!(waking_vector(0, 0x1000), 0x1000);
        assert_eq!(waking_vector(0x9_f000, 0x1000), 0x9_f000);
    }

    #[test]
    fn a_request_is_seen_until_the_wake() {
        let sleep = Sleep::new(GuestAddress(0xe_0040), WakeSource::never());
        assert!(!sleep.requested());
        let mut kicked = false;
        sleep.request(|| kicked = true);
        assert!(kicked && sleep.requested());
    }

    #[test]
    fn a_sleeping_machine_refuses_to_save_and_an_awake_one_round_trips() {
        let wake = WakeSource::never();
        let guard = wake.guard();
        let blob = guard.save().unwrap();
        guard.restore("acpi-s3", &blob).unwrap();
        let sleep = Sleep::new(GuestAddress(0xe_0040), wake);
        sleep.request(|| {});
        let err = guard.save().unwrap_err();
        assert!(err.contains("asleep in ACPI S3"), "{err}");
        // A blob claiming sleep (built by hand: nkvm never writes one).
        let mut forged = blob.clone();
        let crc_at = forged.len() - 4;
        forged[crc_at - 1] = 1;
        let crc = nkvm_devices::snapshot::crc32(&forged[..crc_at]);
        forged[crc_at..].copy_from_slice(&crc.to_le_bytes());
        let err = guard.restore("acpi-s3", &forged).unwrap_err();
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("asleep = 0x1"), "{cause}");
        assert!(guard.restore("acpi-s3", &blob[..blob.len() - 1]).is_err());
    }

    /// A vector an 8259 acknowledged while the machine slept (queued on
    /// LINT0) is still queued after the wake's reset of the vCPU.
    #[test]
    fn the_wake_keeps_a_vector_queued_on_lint0() {
        let hv = nkvm::Hypervisor::open().expect("this test needs /dev/kvm");
        let vm = nkvm::Vm::new(&hv, &nkvm::VmConfig { vcpus: 1, memory: 1 << 20, ..Default::default() }).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let sleep = Sleep::new(GuestAddress(0xe_0040), WakeSource::never());
        sleep.remember(&mut vcpu).unwrap();
        vcpu.lint().raise_lint0(0x08);
        sleep.reset(&mut vcpu).unwrap();
        assert_eq!(vcpu.pending_lint().extint, [0x08], "the timer's vector, in service at the 8259, is kept");
    }
}
