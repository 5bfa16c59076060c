//! The Linux command line: the default, and the work-arounds for hosts
//! whose KVM cannot run some guest-kernel instructions (nested `kvm_pvm`),
//! which nkvm adds to whatever command line it is given.
//!
//! | option | why |
//! |---|---|
//! | `noxsave` | the kernel's `xsaves`/`xrstors` context switches come back as emulation failures |
//! | `clearcpuid=ssse3,...` | kernel SIMD (crypto, the RNG's blake2s) past SSE2 is not emulated |
//! | `cryptomgr.notests` | minutes of crypto self-tests in a kernel that runs in KVM's emulator |
//! | `initcall_blacklist=ftrace_check_for_weak_functions` | a worker that looks up every ftrace call site in kallsyms (~40k lookups): minutes of soft lockups in an emulated kernel, and init waits for it; it only matters once function tracing is turned on |
//!
//! `nkvm run --no-host-workarounds` passes the command line as given.

/// The command line a Linux guest gets when `--cmdline` is not given
/// (the host work-arounds are added to it as to any other).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// The options nkvm adds for this kind of host.
pub const HOST_WORKAROUNDS: &[&str] = &[
    "noxsave",
    "cryptomgr.notests",
    "clearcpuid=ssse3,sse4_1,sse4_2,avx,avx2,aes,pclmulqdq,sha_ni,avx512f",
    "initcall_blacklist=ftrace_check_for_weak_functions",
];

/// `cmdline` with every host work-around it does not already set (by
/// option name, so a user's own `clearcpuid=...` wins), and the ones added.
pub fn with_host_workarounds(cmdline: &str) -> (String, Vec<&'static str>) {
    let names: Vec<&str> = cmdline.split_whitespace().map(|w| w.split('=').next().unwrap_or(w)).collect();
    let added: Vec<&'static str> =
        HOST_WORKAROUNDS.iter().copied().filter(|w| !names.contains(&w.split('=').next().unwrap_or(w))).collect();
    let mut full = cmdline.trim().to_string();
    for w in &added {
        if !full.is_empty() {
            full.push(' ');
        }
        full.push_str(w);
    }
    (full, added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workaround_is_added_to_a_plain_command_line() {
        let (full, added) = with_host_workarounds("console=ttyS0 panic=-1");
        assert_eq!(added, HOST_WORKAROUNDS);
        assert!(full.starts_with("console=ttyS0 panic=-1 noxsave cryptomgr.notests clearcpuid="), "{full}");
    }

    #[test]
    fn an_option_the_user_set_is_not_added_again() {
        let (full, added) = with_host_workarounds("console=ttyS0 clearcpuid=avx noxsave");
        assert_eq!(added, ["cryptomgr.notests", "initcall_blacklist=ftrace_check_for_weak_functions"]);
        assert_eq!(
            full,
            "console=ttyS0 clearcpuid=avx noxsave cryptomgr.notests initcall_blacklist=ftrace_check_for_weak_functions"
        );
    }

    #[test]
    fn an_empty_command_line_gets_just_the_workarounds() {
        let (full, _) = with_host_workarounds("");
        assert!(full.starts_with("noxsave "), "{full}");
    }
}
