#!/usr/bin/env python3
"""Runs the kvm-unit-tests x86 suite under nkvm (and QEMU, with --qemu) and
prints one row per test of x86/unittests.cfg, side by side.

    scripts/kvm-unit-tests.py                  # build the suite and nkvm, run every test
    scripts/kvm-unit-tests.py --qemu           # ... and QEMU on the same binaries
    scripts/kvm-unit-tests.py ioapic vmexit_cpuid   # only these tests
    scripts/kvm-unit-tests.py --check          # run the tests of the pass list; exit 1 if one does not pass

The suite comes from ../shared/kvm-unit-tests/*.tar.gz beside the repository
by default, or --source (a tarball or an upstream checkout). It is built in
target/kvm-unit-tests (gcc, make). Each test runs with its `smp`,
`test_args`, `timeout` and the `qemu_params` nkvm can honour: `-m`, `-smp`,
`-initrd`, `-enable-kvm` (nkvm always is KVM), and of `-cpu`: `-FEATURE`
(`--cpu-features`), `vendor=` (`--cpu-vendor`), `hv_passthrough`
(`--hyperv`) and `host-phys-bits` (what nkvm gives anyway); a `-cpu` model or
feature nkvm cannot give, a special machine or device, an i386-only or
manual-only test is "n/a" with the reason.

Results follow the suite's own rules (scripts/arch-run.bash): a test ends by
writing its status to port 0xf4 and the VMM exits with (status << 1) | 1, so
1 is PASS, 3 FAIL, 77 SKIP; a run past its timeout is TIMEOUT; anything else
(nkvm stopping the guest, QEMU dying) is FAIL with the VMM's last word.
"""

import argparse
import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "kvm-unit-tests"
BUILD = REPO / "target" / "kvm-unit-tests"
PASS_LIST = REPO / "scripts" / "kvm-unit-tests.pass"
DEFAULT_MEMORY_MIB = 128
DEFAULT_TIMEOUT = 90

# -cpu models nkvm can stand in for: it gives the guest what this host's KVM
# supports, which is a superset of qemu64's features.
CPU_MODELS = {"qemu64", "max", "host", "kvm64"}
# Features this machine has no way to give a guest (nested virtualisation, PMU
# passthrough, reduced MAXPHYADDR): the test is not applicable.
MISSING = {"svm", "vmx", "npt", "vmx-mbec"}
# -cpu ...,vendor= strings and `nkvm run --cpu-vendor`'s names for them.
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
# Features `nkvm run --cpu-features=-NAME` can hide (crates/nkvm-vmm/src/cpu_features.rs).
HIDEABLE = {"pcid", "x2apic", "tsc-deadline", "xsave", "rdrand", "invpcid", "smep", "smap", "umip", "pku",
            "la57", "rdpid"}


@dataclass
class Test:
    name: str
    file: str
    smp: int = 1
    args: str = ""
    params: str = ""
    arch: str = ""
    groups: list = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT
    check: str = ""


@dataclass
class Plan:
    """How to run a test under nkvm, or why it does not apply."""

    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    initrd: str = ""
    not_applicable: str = ""
    cpu_features: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    vendor: str = ""
    hyperv: bool = False


@dataclass
class Result:
    verdict: str  # PASS FAIL SKIP TIMEOUT n/a
    seconds: float = 0.0
    failed_checks: int = 0
    first_failure: str = ""
    cycles: dict = field(default_factory=dict)
    log: str = ""

    def cell(self):
        if self.verdict == "FAIL" and self.failed_checks:
            return f"FAIL ({self.failed_checks})"
        return self.verdict


def parse_timeout(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        return DEFAULT_TIMEOUT
    scale = {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    return float(m.group(1)) * scale


def parse_cfg(path):
    tests, cur = [], None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(.+)\]", line)
        if m:
            cur = Test(name=m.group(1), file="")
            tests.append(cur)
            continue
        if cur is None or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key == "file":
            cur.file = value
        elif key == "smp":
            cur.smp = int(value)
        elif key in ("test_args", "extra_params_args"):
            cur.args = value
        elif key in ("qemu_params", "extra_params"):
            cur.params = value
        elif key == "arch":
            cur.arch = value
        elif key == "groups":
            cur.groups = value.split()
        elif key == "timeout":
            cur.timeout = parse_timeout(value)
        elif key == "check":
            cur.check = value
    return tests


def expand(text):
    """Expands backticks the way the suite's scripts do (through the shell)."""
    if "`" not in text and "$" not in text:
        return text
    return subprocess.run(["bash", "-c", f"echo {text}"], capture_output=True, text=True).stdout.strip()


def plan(test):
    p = Plan(cpus=test.smp)
    if test.arch and test.arch != "x86_64":
        p.not_applicable = f"{test.arch} only"
        return p
    if "nodefault" in test.groups:
        p.not_applicable = "manual run only (group nodefault)"
        return p
    for check in test.check.split():
        path, _, want = check.partition("=")
        try:
            have = Path(path).read_text().strip()
        except OSError:
            have = None
        if have != want:
            p.not_applicable = f"host: {path} is not {want}"
            return p
    words = shlex.split(expand(test.params))
    i = 0
    while i < len(words):
        opt = words[i]
        if opt == "-enable-kvm":
            # nkvm always runs on KVM: a flag with no value.
            i += 1
            continue
        val = words[i + 1] if i + 1 < len(words) else ""
        i += 2
        if opt == "-m":
            m = re.fullmatch(r"(\d+)([MmGg]?)", val)
            if not m:
                p.not_applicable = f"memory size {val}"
                return p
            p.memory_mib = int(m.group(1)) * (1024 if m.group(2) in "Gg" and m.group(2) else 1)
        elif opt == "-smp":
            p.cpus = int(val.split(",")[0])
        elif opt == "-initrd":
            p.initrd = val
        elif opt == "-cpu":
            parts = val.split(",")
            if parts[0] not in CPU_MODELS:
                p.not_applicable = f"-cpu {parts[0]} (a fixed CPU model)"
                return p
            for feat in parts[1:]:
                name = feat.lstrip("+-").split("=")[0]
                if feat.startswith("vendor="):
                    vendor = VENDORS.get(feat.split("=", 1)[1])
                    if vendor is None:
                        p.not_applicable = f"-cpu {feat}"
                        return p
                    p.vendor = vendor
                    continue
                if feat == "hv_passthrough":
                    p.hyperv = True
                    continue
                if feat == "host-phys-bits":
                    # nkvm always gives the guest the host's MAXPHYADDR.
                    continue
                if name in MISSING or "phys-bits" in name:
                    p.not_applicable = f"-cpu {feat} (not available on this host)"
                    return p
                if feat.startswith("-"):
                    if name not in HIDEABLE:
                        p.not_applicable = f"-cpu {feat} (nkvm cannot hide this feature)"
                        return p
                    p.hidden.append(name)
                elif feat.startswith("+"):
                    p.cpu_features.append(name)
                elif name not in ("migratable",):
                    p.not_applicable = f"-cpu {feat}"
                    return p
        elif opt == "-machine":
            if val not in ("pit=off",) and not val.startswith("accel"):
                p.not_applicable = f"-machine {val}"
                return p
        elif opt == "-device":
            p.not_applicable = f"-device {val}"
            return p
        elif opt in ("-overcommit", "-global"):
            pass
        else:
            p.not_applicable = f"QEMU option {opt}"
            return p
    return p


def host_cpu_flags():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def host_vendor():
    """The host CPU's vendor string (GenuineIntel, AuthenticAMD), from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


def parse_pass_list(text, vendor):
    """The tests a pass list expects to pass on a host of `vendor`, and those it excuses there.

    One test per line, `#` starts a comment; `NAME not-on=VENDOR` is a test a host of that
    vendor cannot pass (for a cause of the host's, named in the comment)."""
    expected, excused = [], []
    for line in text.splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        name, conditions = words[0], words[1:]
        unknown = [c for c in conditions if not c.startswith("not-on=")]
        if unknown:
            raise ValueError(f"{PASS_LIST.name}: {name}: unknown condition {' '.join(unknown)} (use not-on=VENDOR)")
        (excused if f"not-on={vendor}" in conditions else expected).append(name)
    return expected, excused


CPUINFO_NAMES = {"tsc-deadline": "tsc_deadline_timer"}


def interpret(status, out, timed_out, seconds):
    fails = [line for line in out.splitlines() if line.startswith("FAIL:") or line.startswith("FAIL ")]
    cycles = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\w+) (\d+)", line.strip())
        if m:
            cycles[m.group(1)] = int(m.group(2))
    r = Result("FAIL", seconds, len(fails), fails[0] if fails else "", cycles, out)
    # The VMM's own last word when it, not the test, ended the run: nkvm
    # stopping the guest, QEMU refusing its options (QEMU exits 1 then too,
    # which would read as a pass).
    vmm_errors = [
        line
        for line in out.splitlines()
        if line.startswith(("nkvm: guest stopped", "qemu-system")) and ": warning:" not in line
    ]
    if timed_out:
        r.verdict = "TIMEOUT"
    elif vmm_errors and status != 3:
        r.first_failure = vmm_errors[0]
    elif status == 1:
        r.verdict = "PASS"
    elif status == 77:
        r.verdict = "SKIP"
    elif status == 3:
        r.verdict = "FAIL"
    else:
        last = [line for line in out.splitlines() if line.strip()]
        r.first_failure = r.first_failure or (last[-1] if last else f"exit status {status}")
    return r


def run(cmd, timeout, cwd):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        timed_out = True
    text = out.decode(errors="replace")
    return interpret(proc.returncode, text, timed_out, time.monotonic() - start)


def run_nkvm(nkvm, test, p, suite):
    cmd = [str(nkvm), "run", "--kernel", f"x86/{test.file}", "--cpus", str(p.cpus),
           "--memory", f"{p.memory_mib}M", "--cmdline", expand(test.args)]
    if p.initrd:
        cmd += ["--initrd", p.initrd]
    if p.hidden:
        cmd += ["--cpu-features=" + ",".join("-" + h for h in p.hidden)]
    if p.vendor:
        cmd += ["--cpu-vendor", p.vendor]
    if p.hyperv:
        cmd.append("--hyperv")
    return run(cmd, test.timeout, suite)


def run_qemu(qemu, test, p, suite):
    cmd = [qemu, "--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
           "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
           "-display", "none", "-serial", "stdio", "-machine", "accel=kvm",
           "-kernel", f"x86/{test.file}", "-smp", str(test.smp)]
    params = shlex.split(expand(test.params))
    if "-m" not in params:
        cmd += ["-m", str(DEFAULT_MEMORY_MIB)]
    cmd += params
    if test.args:
        cmd += ["-append", expand(test.args)]
    return run(cmd, test.timeout, suite)


def prepare_suite(source, build):
    """Unpacks (if a tarball) and builds the suite; returns its directory."""
    if source.is_dir() and (source / "x86" / "unittests.cfg").exists():
        suite = source
    else:
        tarball = source if source.is_file() else next(iter(sorted(source.glob("kvm-unit-tests-*.tar.gz"))), None)
        if tarball is None:
            sys.exit(f"kvm-unit-tests: no suite at {source} (give --source a tarball or a checkout)")
        suite = build / "kvm-unit-tests"
        stamp = build / ".unpacked"
        if not stamp.exists() or stamp.read_text() != str(tarball):
            shutil.rmtree(build, ignore_errors=True)
            build.mkdir(parents=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(build, filter="tar")
            stamp.write_text(str(tarball))
    if not (suite / "x86" / "vmexit.flat").exists():
        for tool in ("gcc", "make", "objcopy"):
            if shutil.which(tool) is None:
                sys.exit(f"kvm-unit-tests: building the suite needs {tool} (apt-get install build-essential)")
        print(f"kvm-unit-tests: building {suite}", file=sys.stderr)
        subprocess.run(["./configure", "--arch=x86_64"], cwd=suite, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["make", "-j2"], cwd=suite, check=True, stdout=subprocess.DEVNULL)
    return suite


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests", nargs="*", help="only these tests (default: all)")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="suite tarball, its folder, or a checkout")
    ap.add_argument("--nkvm", type=Path, help="the nkvm binary (default: cargo build --release)")
    ap.add_argument("--qemu", action="store_true", help="also run QEMU on the same binaries")
    ap.add_argument("--qemu-binary", default="qemu-system-x86_64", help="the QEMU to run (default qemu-system-x86_64)")
    ap.add_argument("--jobs", type=int, default=2, help="tests run at once (default 2)")
    ap.add_argument("--check", action="store_true",
                    help=f"run the tests listed in {PASS_LIST.name} (unless tests are named) and exit 1 if one does not pass")
    ap.add_argument("--logs", type=Path, default=REPO / "target" / "kvm-unit-tests-logs", help="one log per run")
    args = ap.parse_args()

    suite = prepare_suite(args.source.resolve(), BUILD)
    nkvm = args.nkvm
    if nkvm is None:
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "nkvm-vmm"], cwd=REPO, check=True)
        nkvm = REPO / "target" / "release" / "nkvm"
    nkvm = nkvm.resolve()
    if args.qemu and shutil.which(args.qemu_binary) is None:
        sys.exit(f"kvm-unit-tests: --qemu: {args.qemu_binary} is not installed (apt-get install qemu-system-x86)")

    tests = parse_cfg(suite / "x86" / "unittests.cfg")
    vendor = host_vendor()
    try:
        expected, excused = parse_pass_list(PASS_LIST.read_text(), vendor)
    except ValueError as e:
        sys.exit(f"kvm-unit-tests: {e}")
    unknown = set(expected + excused) - {t.name for t in tests}
    if unknown:
        sys.exit(f"kvm-unit-tests: {PASS_LIST.name} names tests unittests.cfg lacks: {', '.join(sorted(unknown))}")
    if args.check and not args.tests:
        # The excused ones run too, so the table shows them.
        args.tests = expected + excused
    if args.tests:
        unknown = set(args.tests) - {t.name for t in tests}
        if unknown:
            sys.exit(f"kvm-unit-tests: no such test: {', '.join(sorted(unknown))}")
        tests = [t for t in tests if t.name in args.tests]
    flags = host_cpu_flags()
    plans = {}
    for t in tests:
        p = plan(t)
        for feat in p.cpu_features:
            if not p.not_applicable and CPUINFO_NAMES.get(feat, feat.replace("-", "_")) not in flags:
                p.not_applicable = f"-cpu +{feat}: this host's CPU lacks it"
        plans[t.name] = p
    args.logs.mkdir(parents=True, exist_ok=True)

    def job(t, vmm):
        p = plans[t.name]
        if not (suite / "x86" / t.file).exists():
            return Result("n/a", first_failure=f"x86/{t.file} is not built for x86_64")
        if p.not_applicable and vmm == "nkvm":
            return Result("n/a", first_failure=p.not_applicable)
        if vmm == "nkvm":
            r = run_nkvm(nkvm, t, p, suite)
        else:
            r = run_qemu(args.qemu_binary, t, p, suite)
        (args.logs / f"{t.name}.{vmm}.log").write_text(r.log)
        return r

    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {}
        for t in tests:
            futures[pool.submit(job, t, "nkvm")] = (t.name, "nkvm")
            if args.qemu:
                futures[pool.submit(job, t, "qemu")] = (t.name, "qemu")
        for f in concurrent.futures.as_completed(futures):
            name, vmm = futures[f]
            results[(name, vmm)] = f.result()
            r = results[(name, vmm)]
            print(f"  {vmm:4} {name:32} {r.cell():12} {r.seconds:6.1f}s", file=sys.stderr, flush=True)

    print_table(tests, results, bool(args.qemu))
    if args.check:
        expected = [e for e in expected if e in {t.name for t in tests}]
        broken = [e for e in expected if results[(e, "nkvm")].verdict != "PASS"]
        print(f"kvm-unit-tests expected: {len(expected) - len(broken)} passed, {len(broken)} failed")
        for e in excused:
            if (e, "nkvm") in results:
                print(f"kvm-unit-tests: {e} is not expected to pass on a {vendor} host ({PASS_LIST.name}); "
                      f"here: {results[(e, 'nkvm')].cell()}")
        if broken:
            for e in broken:
                r = results[(e, "nkvm")]
                print(f"kvm-unit-tests: {e} is expected to pass but is {r.cell()}: {r.first_failure}", file=sys.stderr)
            sys.exit(1)
        print(f"kvm-unit-tests: all {len(expected)} tests of {PASS_LIST.name} passed")


def print_table(tests, results, qemu):
    header = "| test | nkvm | time | " + ("QEMU | time | " if qemu else "") + "first failure (nkvm) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    counts = {}
    for t in tests:
        r = results[(t.name, "nkvm")]
        counts.setdefault("nkvm", {}).setdefault(r.verdict, 0)
        counts["nkvm"][r.verdict] += 1
        row = f"| {t.name} | {r.cell()} | {r.seconds:.1f}s | "
        if qemu:
            q = results[(t.name, "qemu")]
            counts.setdefault("qemu", {}).setdefault(q.verdict, 0)
            counts["qemu"][q.verdict] += 1
            row += f"{q.cell()} | {q.seconds:.1f}s | "
        why = r.first_failure.replace("|", "\\|")[:100]
        print(row + why + " |")
    for vmm, c in counts.items():
        print(f"{vmm}: " + ", ".join(f"{c[k]} {k}" for k in sorted(c)) + f" of {len(tests)}")
    vm_rows = [t for t in tests if t.name.startswith("vmexit_")]
    if vm_rows:
        print()
        print("| vmexit test | nkvm cycles | " + ("QEMU cycles | nkvm / QEMU |" if qemu else ""))
        print("|---|---|" + ("---|---|" if qemu else ""))
        for t in vm_rows:
            key = t.args.split()[0] if t.args else ""
            n = results[(t.name, "nkvm")].cycles.get(key)
            row = f"| {key} | {n if n is not None else '-'} | "
            if qemu:
                q = results[(t.name, "qemu")].cycles.get(key)
                ratio = f"{n / q:.2f}" if n and q else "-"
                row += f"{q if q is not None else '-'} | {ratio} |"
            print(row)


if __name__ == "__main__":
    main()
