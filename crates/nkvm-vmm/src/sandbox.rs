//! The sandbox of a virtio device process: no descriptors beyond its own,
//! `no_new_privs`, and a seccomp filter (rust-vmm's `seccompiler`) that
//! allows only the system calls the process makes once it serves guest
//! data. Everything else traps: a `SIGSYS` handler writes one line naming
//! the call on stderr — [`FORBIDDEN_LINE`] and the number — and the process
//! then dies of `SIGSYS`. The VMM reads that line from the pipe it gave the
//! child as stderr and reports the call by number and name
//! ([`syscall_name`]).
//!
//! The filter is installed on the process's only thread before it creates
//! any other, so every thread inherits it; the threads are created (and the
//! guest's RAM mapped) only afterwards.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// What the `SIGSYS` handler writes before the number of the call.
pub const FORBIDDEN_LINE: &str = "nkvm-sandbox: forbidden system call ";

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The filter could not be built (a bug in the rule list).
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::Error),
    /// The kernel refused the filter or `no_new_privs`.
    #[error("cannot install the seccomp filter (does this kernel have CONFIG_SECCOMP_FILTER?)")]
    Install(#[source] seccompiler::Error),
    /// The `SIGSYS` handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    /// The descriptors could not be closed.
    #[error("cannot close the inherited descriptors")]
    CloseFds(#[source] std::io::Error),
}

/// The system calls every virtio device process (a vhost-user backend)
/// makes once it serves the VMM's connection, each with why: the
/// virtio-console filter.
pub const VHOST_USER_CALLS: &[(i64, &str)] = &[
    // The vhost-user socket: messages with descriptors, accept of the
    // one connection, shutdown when the VMM goes away.
    (libc::SYS_accept4, "accepts the VMM's connection"),
    (libc::SYS_accept, "accepts the VMM's connection (older libc)"),
    (libc::SYS_recvmsg, "vhost-user messages and the descriptors they carry"),
    (libc::SYS_sendmsg, "vhost-user replies"),
    (libc::SYS_sendto, "vhost-user replies without descriptors"),
    (libc::SYS_recvfrom, "vhost-user payloads"),
    (libc::SYS_shutdown, "the connection ends"),
    // Eventfds (kick, call, exit) and the worker's epoll.
    (libc::SYS_read, "kick eventfds"),
    (libc::SYS_write, "call eventfds (irqfds), stderr, the console's output"),
    (libc::SYS_epoll_create1, "the queue worker's epoll"),
    (libc::SYS_epoll_ctl, "kick eventfds in and out of the epoll"),
    (libc::SYS_epoll_wait, "the queue worker waits"),
    (libc::SYS_epoll_pwait, "the queue worker waits"),
    (libc::SYS_eventfd2, "the worker's exit eventfd"),
    (libc::SYS_close, "descriptors the VMM replaces"),
    (libc::SYS_fcntl, "descriptor flags of received fds"),
    (libc::SYS_fstat, "the size of guest RAM's memfd"),
    (libc::SYS_newfstatat, "the size of guest RAM's memfd"),
    (libc::SYS_statx, "the size of guest RAM's memfd"),
    // Guest RAM: the memfd mapped, unmapped when the table changes; the
    // VMM's dirty log (SET_LOG_BASE) likewise.
    (libc::SYS_mmap, "maps guest RAM and the dirty log from their memfds; the allocator"),
    (libc::SYS_munmap, "unmaps an old memory table or dirty log; the allocator"),
    (libc::SYS_mprotect, "thread stacks' guard pages"),
    (libc::SYS_madvise, "the allocator"),
    (libc::SYS_mremap, "the allocator"),
    (libc::SYS_brk, "the allocator"),
    // Threads: the request thread and the queue worker.
    // Threads only (CLONE_THREAD): a process the guest took over cannot
    // fork a child that outlives it. clone3's flags are behind a pointer
    // the filter cannot read: allowed here (a trap would win over any
    // other filter's answer), it fails with ENOSYS under `enter`'s second
    // filter, and glibc falls back to clone.
    (libc::SYS_clone, "starts the request and queue threads"),
    (libc::SYS_clone3, "refused with ENOSYS (see above)"),
    (libc::SYS_set_robust_list, "new threads"),
    (libc::SYS_rseq, "new threads"),
    (libc::SYS_sigaltstack, "new threads' signal stacks"),
    (libc::SYS_rt_sigprocmask, "new threads"),
    (libc::SYS_rt_sigreturn, "the SIGSYS handler returns"),
    (libc::SYS_futex, "locks and joins"),
    (libc::SYS_sched_yield, "locks"),
    (libc::SYS_sched_getaffinity, "std's thread count"),
    (libc::SYS_prctl, "thread names"),
    (libc::SYS_getrandom, "hash maps' seeds"),
    (libc::SYS_nanosleep, "back-off"),
    (libc::SYS_clock_nanosleep, "back-off"),
    (libc::SYS_clock_gettime, "time (when the vDSO cannot)"),
    (libc::SYS_gettid, "the SIGSYS handler's raise"),
    (libc::SYS_getpid, "the SIGSYS handler's raise"),
    (libc::SYS_tgkill, "the SIGSYS handler's raise"),
    (libc::SYS_rt_sigaction, "the SIGSYS handler resets itself"),
    (libc::SYS_exit, "threads end"),
    (libc::SYS_exit_group, "the process ends"),
];

/// What virtio-blk adds to [`VHOST_USER_CALLS`]: the image.
pub const IMAGE_CALLS: &[(i64, &str)] = &[
    (libc::SYS_pread64, "reads of the image"),
    (libc::SYS_pwrite64, "writes of the image"),
    (libc::SYS_preadv, "vectored reads of the image"),
    (libc::SYS_pwritev, "vectored writes of the image"),
    (libc::SYS_lseek, "the image's size"),
    (libc::SYS_fsync, "VIRTIO_BLK_T_FLUSH"),
    (libc::SYS_fdatasync, "VIRTIO_BLK_T_FLUSH"),
];

/// Closes every descriptor above stderr: the process keeps only what it
/// opens itself from here on.
pub fn close_inherited_fds() -> Result<(), SandboxError> {
    // SAFETY: close_range takes no pointers; it closes descriptors 3 and up,
    // none of which this process has opened yet (it is called first thing,
    // before anything in this process holds a descriptor of its own).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        return Err(SandboxError::CloseFds(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Builds the filter allowing the calls of `lists` (`clone` only to start
/// a thread); any other call traps (`SIGSYS`).
pub fn build_filter(lists: &[&[(i64, &str)]]) -> Result<BpfProgram, SandboxError> {
    let build = |e: seccompiler::Error| SandboxError::Build(e);
    let threads_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(|e| build(e.into()))?;
    let threads_only = SeccompRule::new(vec![threads_only]).map_err(|e| build(e.into()))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = lists
        .iter()
        .flat_map(|calls| calls.iter())
        .map(|(nr, _)| (*nr, if *nr == libc::SYS_clone { vec![threads_only.clone()] } else { vec![] }))
        .collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.into()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| build(e.into()))
}

/// The second filter: `clone3` fails with `ENOSYS` (so that glibc starts
/// threads with `clone`, whose flags the first filter checks).
fn no_clone3() -> Result<BpfProgram, SandboxError> {
    let build = |e: seccompiler::Error| SandboxError::Build(e);
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let errno = SeccompAction::Errno(libc::ENOSYS as u32);
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, errno, TargetArch::x86_64).map_err(|e| build(e.into()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| build(e.into()))
}

/// Enters the sandbox on this thread (and every thread it starts later):
/// installs the `SIGSYS` reporter, then `no_new_privs` and the filters
/// (`seccompiler::apply_filter` sets `no_new_privs` first). Of two stacked
/// filters the kernel takes the stricter answer: `clone3`, allowed by the
/// first, fails.
pub fn enter(lists: &[&[(i64, &str)]]) -> Result<(), SandboxError> {
    let program = build_filter(lists)?;
    let second = no_clone3()?;
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys).map_err(SandboxError::Handler)?;
    seccompiler::apply_filter(&second).map_err(SandboxError::Install)?;
    seccompiler::apply_filter(&program).map_err(SandboxError::Install)
}

/// Offset of `si_syscall` in a `SIGSYS` `siginfo_t` on x86-64: after
/// `si_signo`, `si_errno`, `si_code`, padding and `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

/// The `SIGSYS` handler: one line with the call's number on stderr, then
/// the process dies of `SIGSYS` (the default action, once this returns).
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler;
    // for a seccomp SIGSYS its _sigsys member holds the call's number as an
    // int at SI_SYSCALL_OFFSET, inside the 128-byte structure.
    let nr = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<libc::c_int>().read_unaligned() };
    // Formatted by hand: nothing in a signal handler may allocate.
    let mut line = [0u8; 64];
    let prefix = FORBIDDEN_LINE.as_bytes();
    line[..prefix.len()].copy_from_slice(prefix);
    let mut at = prefix.len();
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in (0..d).rev() {
        line[at] = digits[i];
        at += 1;
    }
    line[at] = b'\n';
    at += 1;
    // With SIGSYS back to its default action and raised (blocked while
    // this handler runs), the process dies of it as soon as the handler
    // returns.
    // SAFETY: write, signal and raise are async-signal-safe; `line` is a live buffer of at least `at` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), at);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// The x86-64 name of system call `nr`, for the ones a device process
/// might plausibly make; `None` for the others (reported by number).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALLS.iter().find(|(_, number)| *number == nr).map(|(name, _)| *name)
}

/// x86-64 system call numbers and names (from libc's constants).
const SYSCALLS: &[(&str, i64)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("open", libc::SYS_open),
    ("close", libc::SYS_close),
    ("stat", libc::SYS_stat),
    ("fstat", libc::SYS_fstat),
    ("lseek", libc::SYS_lseek),
    ("mmap", libc::SYS_mmap),
    ("mprotect", libc::SYS_mprotect),
    ("munmap", libc::SYS_munmap),
    ("brk", libc::SYS_brk),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("ioctl", libc::SYS_ioctl),
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("access", libc::SYS_access),
    ("pipe", libc::SYS_pipe),
    ("mremap", libc::SYS_mremap),
    ("madvise", libc::SYS_madvise),
    ("dup", libc::SYS_dup),
    ("dup2", libc::SYS_dup2),
    ("nanosleep", libc::SYS_nanosleep),
    ("getpid", libc::SYS_getpid),
    ("socket", libc::SYS_socket),
    ("connect", libc::SYS_connect),
    ("accept", libc::SYS_accept),
    ("sendto", libc::SYS_sendto),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendmsg", libc::SYS_sendmsg),
    ("recvmsg", libc::SYS_recvmsg),
    ("shutdown", libc::SYS_shutdown),
    ("bind", libc::SYS_bind),
    ("listen", libc::SYS_listen),
    ("clone", libc::SYS_clone),
    ("fork", libc::SYS_fork),
    ("vfork", libc::SYS_vfork),
    ("execve", libc::SYS_execve),
    ("exit", libc::SYS_exit),
    ("wait4", libc::SYS_wait4),
    ("kill", libc::SYS_kill),
    ("uname", libc::SYS_uname),
    ("fcntl", libc::SYS_fcntl),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("truncate", libc::SYS_truncate),
    ("ftruncate", libc::SYS_ftruncate),
    ("getcwd", libc::SYS_getcwd),
    ("chdir", libc::SYS_chdir),
    ("rename", libc::SYS_rename),
    ("mkdir", libc::SYS_mkdir),
    ("rmdir", libc::SYS_rmdir),
    ("unlink", libc::SYS_unlink),
    ("readlink", libc::SYS_readlink),
    ("chmod", libc::SYS_chmod),
    ("chown", libc::SYS_chown),
    ("getuid", libc::SYS_getuid),
    ("ptrace", libc::SYS_ptrace),
    ("setuid", libc::SYS_setuid),
    ("prctl", libc::SYS_prctl),
    ("mount", libc::SYS_mount),
    ("gettid", libc::SYS_gettid),
    ("futex", libc::SYS_futex),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("tgkill", libc::SYS_tgkill),
    ("openat", libc::SYS_openat),
    ("newfstatat", libc::SYS_newfstatat),
    ("unlinkat", libc::SYS_unlinkat),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("accept4", libc::SYS_accept4),
    ("eventfd2", libc::SYS_eventfd2),
    ("pipe2", libc::SYS_pipe2),
    ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev),
    ("getrandom", libc::SYS_getrandom),
    ("memfd_create", libc::SYS_memfd_create),
    ("statx", libc::SYS_statx),
    ("rseq", libc::SYS_rseq),
    ("clone3", libc::SYS_clone3),
    ("close_range", libc::SYS_close_range),
    ("openat2", libc::SYS_openat2),
    ("pidfd_open", libc::SYS_pidfd_open),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("sched_yield", libc::SYS_sched_yield),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("exit_group", libc::SYS_exit_group),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_and_names_its_calls() {
        assert!(!build_filter(&[VHOST_USER_CALLS, IMAGE_CALLS]).unwrap().is_empty());
        for (nr, why) in VHOST_USER_CALLS.iter().chain(IMAGE_CALLS) {
            assert!(syscall_name(*nr).is_some(), "{nr} ({why}) has a name");
        }
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
        assert_eq!(syscall_name(100_000), None);
    }

    /// Set in the child's environment.
    const CHILD: &str = "NKVM_TEST_SANDBOX_CHILD";

    /// In a child process (the filter stays for a process's life): inside
    /// the sandbox a thread starts (clone3 refused, clone with
    /// CLONE_THREAD), and a fork is a forbidden call, reported as `clone`.
    #[test]
    fn inside_the_sandbox_threads_start_and_a_fork_is_forbidden() {
        if std::env::var_os(CHILD).is_some() {
            enter(&[VHOST_USER_CALLS, &[(libc::SYS_write, "the test's output")]]).unwrap();
            std::thread::spawn(|| ()).join().unwrap();
            println!("a thread ran");
            // SAFETY: fork(2); the child, if the filter let one be made,
            // only exits.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: _exit ends the (forked) child at once.
                unsafe { libc::_exit(0) };
            }
            println!("forked");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let name = "sandbox::tests::inside_the_sandbox_threads_start_and_a_fork_is_forbidden";
        let out = std::process::Command::new(exe)
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{stdout}\n{stderr}");
        assert!(stdout.contains("a thread ran") && !stdout.contains("forked"), "{stdout}\n{stderr}");
        let line = format!("{FORBIDDEN_LINE}{}", libc::SYS_clone);
        assert!(stderr.contains(&line), "{stderr}");
    }
}
