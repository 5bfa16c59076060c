#!/usr/bin/env python3
"""Boot the same kernel and initramfs with nkvm and with QEMU (-accel kvm,
-M microvm and -M pc) in one run, and print for each: whether the guest's
init ran, the time to the init marker (median of the runs that got there),
and the VMM's peak RSS excluding guest memory.

Guest memory is a memfd for every VMM here (nkvm always; QEMU through
memory-backend-memfd), so "RSS excluding guest memory" is RssAnon + RssFile
from /proc/PID/status, sampled every 50 ms; the guest's pages are RssShmem.

Usage: scripts/bench-boot.py [--runs N] [--timeout S] [--cpus N]
Needs target/guest (scripts/fetch-guest.sh), target/release/nkvm
(cargo build --release) and qemu-system-x86_64 (apt-get install
qemu-system-x86; --install does it).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "target", "guest")
MARKER = "NKVM-GUEST: init started"
# The kernel's last line before it executes /init.
RUN_INIT = "Run /init as init process"
# nkvm's default command line (crates/nkvm-vmm/src/cli.rs), for every VMM: the same work.
CMDLINE = ("console=ttyS0 reboot=k panic=-1 noxsave cryptomgr.notests "
           "clearcpuid=ssse3,sse4_1,sse4_2,avx,avx2,aes,pclmulqdq,sha_ni,avx512f")
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1bc")
# What a VMM prints when the guest cannot go on.
FATAL = ("KVM internal error", "emulation failure", "guest stopped", "Kernel panic", "triple fault")


def rss_excluding_guest(pid):
    """RssAnon + RssFile of `pid`, in KiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssFile"))
    except (OSError, KeyError, ValueError):
        return None


def boot_once(argv, timeout):
    """Runs one boot; returns (init_ran, secs_to_marker, secs_to_run_init, peak_kib, why)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    found = threading.Event()
    state = {"marker_at": None, "run_init_at": None, "why": None, "tail": []}

    def reader():
        for line in proc.stdout:
            line = ANSI.sub("", line)
            state["tail"] = (state["tail"] + [line.rstrip()])[-40:]
            if RUN_INIT in line and state["run_init_at"] is None:
                state["run_init_at"] = time.monotonic() - start
            if MARKER in line and state["marker_at"] is None:
                state["marker_at"] = time.monotonic() - start
                found.set()
            if state["why"] is None and any(f in line for f in FATAL):
                state["why"] = line.strip()[:100]
                found.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    peak = 0
    while not found.is_set() and proc.poll() is None and time.monotonic() - start < timeout:
        rss = rss_excluding_guest(proc.pid)
        if rss:
            peak = max(peak, rss)
        time.sleep(0.05)
    # Let a failing VMM print its reason, then stop it either way.
    time.sleep(0.5)
    rss = rss_excluding_guest(proc.pid)
    if rss:
        peak = max(peak, rss)
    proc.kill()
    proc.wait()
    t.join(timeout=2)
    why = state["why"]
    # QEMU follows "KVM internal error" with a register dump: name the RIP.
    rip = [t.split()[0] for t in state["tail"] if t.startswith("RIP=")]
    if why and rip:
        why += f" at {rip[-1]}"
        code = [t for t in state["tail"] if t.startswith("Code=") and "<" in t]
        if code:
            after = code[-1].split("<", 1)[1].replace(">", "").split()[:6]
            why += f" (bytes {' '.join(after)})"
    if state["marker_at"] is None and why is None:
        why = "timeout" if time.monotonic() - start >= timeout else f"exited: {' / '.join(state['tail'][-2:])[:100]}"
    return state["marker_at"] is not None, state["marker_at"], state["run_init_at"], peak, why


def vmms(args):
    nkvm = os.path.join(ROOT, "target", "release", "nkvm")
    initrd = os.path.join(GUEST, "initramfs.cpio")
    mem = f"{args.memory}M"
    out = []
    for kernel in ("vmlinux", "bzImage") if args.both_images else ("vmlinux",):
        path = os.path.join(GUEST, kernel)
        if os.path.exists(path):
            out.append((f"nkvm ({kernel})", [nkvm, "run", "--kernel", path, "--initrd", initrd,
                                             "--memory", mem, "--cpus", str(args.cpus), "--cmdline", CMDLINE]))
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        common = ["-accel", "kvm", "-cpu", "host", "-m", mem, "-smp", str(args.cpus), "-nographic", "-no-reboot",
                  "-object", f"memory-backend-memfd,id=ram,size={mem}", "-kernel",
                  os.path.join(GUEST, "bzImage"), "-initrd", initrd, "-append", CMDLINE]
        out.append(("qemu -M microvm", [qemu, "-M", "microvm,memory-backend=ram"] + common))
        out.append(("qemu -M pc", [qemu, "-M", "pc,memory-backend=ram"] + common))
    else:
        print("bench-boot: qemu-system-x86_64 not found (apt-get install qemu-system-x86, or --install)",
              file=sys.stderr)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="boots per VMM that reaches init (default 3)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a boot counts as hung")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB")
    p.add_argument("--install", action="store_true", help="apt-get install qemu-system-x86 if missing")
    p.add_argument("--both-images", action="store_true", help="boot nkvm from the bzImage too (slower start)")
    p.add_argument("--only", default="", help="run only the VMMs whose name contains this (e.g. qemu)")
    args = p.parse_args()
    if args.install and not shutil.which("qemu-system-x86_64"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=True,
                       stdout=subprocess.DEVNULL)
    rows = []
    for name, argv in [v for v in vmms(args) if args.only in v[0]]:
        times, kernel_times, peaks, reached, why = [], [], [], False, ""
        for i in range(args.runs):
            ok, secs, run_init, peak, reason = boot_once(argv, args.timeout)
            peaks.append(peak)
            if run_init is not None:
                kernel_times.append(run_init)
            print(f"bench-boot: {name} run {i + 1}: "
                  + (f"kernel ran /init after {run_init:.1f} s; " if run_init is not None else "")
                  + (f"init marker after {secs:.1f} s" if ok else f"no init marker ({reason})")
                  + f", peak RSS {peak / 1024:.1f} MiB", file=sys.stderr, flush=True)
            if ok:
                reached = True
                times.append(secs)
            else:
                why = reason
            if run_init is None:
                break  # a VMM whose kernel cannot get to init will not on a rerun
        med = lambda v: f"{statistics.median(v):.1f} s" if v else "-"
        rows.append((name, bool(kernel_times), med(kernel_times), reached, med(times), max(peaks), why))
    print("\n| VMM | kernel ran /init | time to `Run /init` (median) | init marker | time to marker | "
          "peak VMM RSS excl. guest memory | how it ended |")
    print("|---|---|---|---|---|---|---|")
    for name, ran_init, t_init, reached, t_marker, peak, why in rows:
        print(f"| {name} | {'yes' if ran_init else 'no'} | {t_init} | {'yes' if reached else 'no'} | {t_marker} "
              f"| {peak / 1024:.1f} MiB | {why} |")


if __name__ == "__main__":
    main()
