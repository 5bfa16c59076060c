//! The Linux command line: the default, and the work-arounds for hosts
//! whose KVM cannot run some guest-kernel instructions (nested `kvm_pvm`),
//! which nkvm adds to whatever command line it is given.
//!
//! | option | why |
//! |---|---|
//! | `noxsave` | the kernel's `xsaves`/`xrstors` context switches come back as emulation failures |
//! | `clearcpuid=ssse3,...` | kernel SIMD (crypto, the RNG's blake2s) past SSE2 is not emulated |
//! | `cryptomgr.notests` | minutes of crypto self-tests in a kernel that runs in KVM's emulator |
//! | `initcall_blacklist=ftrace_check_for_weak_functions,...` | boot work that only tracing and BPF use, minutes each in an emulated kernel, with init waiting for it: `ftrace_check_for_weak_functions` looks up every ftrace call site in kallsyms (~40k lookups); `trace_eval_init` and `tracer_init_tracefs` rewrite every trace event's format and build tracefs (~4 min of a boot on the Intel host); `cubictcp_register`, `bpf_prog_test_run_init`, `bpf_key_sig_kfuncs_init`, `kfunc_init`, `bpf_rstat_kfunc_init` and `bpf_tcp_ca_kfunc_init` register BPF kfuncs, and the first of them to run parses and checks the kernel's whole BTF (3-4 min; blacklisting only some moves the parse to the next). The guest then has no tracefs events, BPF kfuncs or TCP CUBIC (Reno is the default) |
//! | `nowatchdog` | the soft-lockup detector reports from its timer interrupt; in an emulated kernel one report over the 16550 console takes ~25 s, longer than the detector's threshold, so once a CPU is held up 20 s (a long initcall does that here) the reports follow one another and the interrupted task never runs again: a boot that never ends |
//! | `rcupdate.rcu_cpu_stall_suppress=1` | RCU's CPU-stall warnings print from the scheduler tick, the same interrupt-context loop as the soft-lockup reports |
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
    "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs,\
     cubictcp_register,bpf_prog_test_run_init,bpf_key_sig_kfuncs_init,kfunc_init,bpf_rstat_kfunc_init,\
     bpf_tcp_ca_kfunc_init",
    "nowatchdog",
    "rcupdate.rcu_cpu_stall_suppress=1",
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
        let rest: Vec<&str> =
            HOST_WORKAROUNDS.iter().copied().filter(|w| !w.starts_with("clearcpuid=") && *w != "noxsave").collect();
        assert_eq!(added, rest);
        assert!(added.contains(&"nowatchdog"), "{added:?}");
        assert_eq!(full, format!("console=ttyS0 clearcpuid=avx noxsave {}", rest.join(" ")));
    }

    #[test]
    fn an_empty_command_line_gets_just_the_workarounds() {
        let (full, _) = with_host_workarounds("");
        assert!(full.starts_with("noxsave "), "{full}");
    }
}
