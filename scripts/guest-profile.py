#!/usr/bin/env python3
"""Where an emulated guest kernel spends its time: a profile of a running nkvm.

On a host whose KVM runs guest CPL 0 in its instruction emulator (nested
kvm_pvm: docs/architecture.md, "Host quirks") every guest-kernel instruction
passes through KVM's `kvm:kvm_emulate_insn` tracepoint with its RIP. This
records that tracepoint for a few seconds on one nkvm process, maps each RIP to
a kernel function and prints, per vCPU, the instructions per second and the
functions that took them (with how often each was entered):

    scripts/guest-profile.py $(pgrep -f 'nkvm run --kernel') --seconds 2
    scripts/guest-profile.py PID --vmlinux target/guest/vmlinux --top 40

Symbols come from the vmlinux's symbol table, or, for a stripped distribution
kernel such as Debian's, from the kallsyms table inside it (`kallsyms-finder`
of the `vmlinux-to-elf` Python package, installed with pip when missing; the
result is cached beside the vmlinux as `.kallsyms`). Needs root, `perf`
(Debian: `apt-get install linux-perf`) and debugfs (mounted if it is not).

This is how the boot's lost minutes were found (tracefs, the BTF check) and how
the lockup-report livelock was seen (docs/architecture.md, "Host quirks").
"""

import argparse
import bisect
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VMLINUX = os.path.join(ROOT, "target", "guest", "vmlinux")
TRACEPOINT = "kvm:kvm_emulate_insn"
# `perf script` for the tracepoint: "vcpu0  1234 [001] 13359.876881: kvm:kvm_emulate_insn: 0:ffffffff810db008:4d 2b (prot64)"
LINE = re.compile(r"^\s*(\S+)\s+\d+\s+\[\d+\]\s+[\d.]+:\s+kvm:kvm_emulate_insn:\s+[0-9a-f]+:([0-9a-f]+):")


class Symbols:
    """Sorted (address, name) pairs of a kernel's text symbols."""

    def __init__(self, pairs):
        pairs = sorted(pairs)
        self.addrs = [a for a, _ in pairs]
        self.names = [n for _, n in pairs]

    @classmethod
    def parse(cls, text):
        """From `nm`/`/proc/kallsyms` lines: ADDRESS TYPE NAME (text symbols only)."""
        pairs = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in ("t", "T", "w", "W"):
                pairs.append((int(parts[0], 16), parts[2]))
        return cls(pairs)

    def lookup(self, addr):
        """(function, offset), or (None, 0) below the first symbol."""
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0:
            return None, 0
        return self.names[i], addr - self.addrs[i]


def parse_samples(lines):
    """(vcpu thread name, rip) of each emulated instruction in `perf script` output."""
    for line in lines:
        m = LINE.match(line)
        if m:
            yield m.group(1), int(m.group(2), 16)


def profile(samples, symbols):
    """Per vCPU: total instructions, Counter of instructions per function, Counter of entries."""
    total = collections.Counter()
    per_fn = collections.defaultdict(collections.Counter)
    entries = collections.defaultdict(collections.Counter)
    for vcpu, rip in samples:
        name, off = symbols.lookup(rip)
        name = name or hex(rip)
        total[vcpu] += 1
        per_fn[vcpu][name] += 1
        if off == 0:
            entries[vcpu][name] += 1
    return total, per_fn, entries


def load_symbols(vmlinux):
    """The text symbols of `vmlinux`: its symbol table, else its kallsyms (cached)."""
    nm = subprocess.run(["nm", vmlinux], capture_output=True, text=True)
    if nm.returncode == 0 and nm.stdout.strip():
        return Symbols.parse(nm.stdout)
    cache = vmlinux + ".kallsyms"
    if not os.path.exists(cache) or os.path.getmtime(cache) < os.path.getmtime(vmlinux):
        finder = shutil.which("kallsyms-finder")
        if finder is None:
            print("guest-profile: installing vmlinux-to-elf (pip) for kallsyms-finder", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "vmlinux-to-elf"], check=True)
            finder = shutil.which("kallsyms-finder")
        if finder is None:
            sys.exit("guest-profile: kallsyms-finder is not on PATH after `pip install vmlinux-to-elf`")
        out = subprocess.run([finder, vmlinux], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            sys.exit(f"guest-profile: no symbol table and no kallsyms found in {vmlinux}:\n{out.stderr}")
        with open(cache, "w") as f:
            f.write(out.stdout)
    with open(cache) as f:
        return Symbols.parse(f.read())


def ensure_tracefs():
    """The kvm tracepoints are under debugfs/tracefs: mount debugfs if needed."""
    if os.path.isdir("/sys/kernel/debug/tracing/events/kvm") or os.path.isdir("/sys/kernel/tracing/events/kvm"):
        return
    subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], capture_output=True)
    if not os.path.isdir("/sys/kernel/debug/tracing/events/kvm"):
        sys.exit("guest-profile: no kvm tracepoints (is debugfs mountable and kvm loaded? run as root)")


def record(pid, seconds):
    """`perf script` lines of `seconds` of the tracepoint on `pid`."""
    if shutil.which("perf") is None:
        sys.exit("guest-profile: perf is not installed (Debian: apt-get install linux-perf)")
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit(f"guest-profile: no process {pid}")
    ensure_tracefs()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        rec = subprocess.run(
            ["perf", "record", "-q", "-e", TRACEPOINT, "-p", str(pid), "-o", data, "--", "sleep", str(seconds)],
            capture_output=True,
            text=True,
        )
        if rec.returncode != 0 or not os.path.exists(data):
            sys.exit(f"guest-profile: perf record failed:\n{rec.stderr}")
        out = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True)
        return out.stdout.splitlines()


def report(total, per_fn, entries, seconds, top):
    """The table, one block per vCPU."""
    lines = []
    if not total:
        return "no emulated instructions: the guest ran none at CPL 0 in KVM's emulator (idle, or a host that runs it)"
    for vcpu in sorted(total):
        n = total[vcpu]
        lines.append(f"{vcpu}: {n} emulated instructions in {seconds} s ({n / seconds / 1000:.0f} k/s)")
        lines.append(f"  {'instr':>8} {'share':>6} {'entries':>8}  function")
        for name, count in per_fn[vcpu].most_common(top):
            lines.append(f"  {count:8d} {count / n:6.1%} {entries[vcpu][name]:8d}  {name}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pid", type=int, help="the nkvm process running the guest")
    ap.add_argument("--seconds", type=float, default=2.0, help="how long to record (default 2)")
    ap.add_argument("--vmlinux", default=DEFAULT_VMLINUX, help="the guest's kernel (default target/guest/vmlinux)")
    ap.add_argument("--top", type=int, default=25, help="functions per vCPU (default 25)")
    args = ap.parse_args()
    if not os.path.exists(args.vmlinux):
        sys.exit(f"guest-profile: {args.vmlinux} does not exist (scripts/fetch-guest.sh fetches Debian's)")
    symbols = load_symbols(args.vmlinux)
    lines = record(args.pid, args.seconds)
    print(report(*profile(parse_samples(lines), symbols), args.seconds, args.top))


if __name__ == "__main__":
    main()
