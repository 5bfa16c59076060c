"""Counts the user-space instructions between two KVM_RUNs, for the raw
loop and for nkvm's enter_guest, by single-stepping the exit_roundtrip
bench under gdb (this host has no hardware performance counters).

Run through scripts/exit-path-trace.sh; it passes PATH_KIND ("raw" or
"nkvm"), SKIP (KVM_RUN calls to let pass first) and OUT (where the
instruction trace goes).
"""
import os

import gdb

KVM_RUN = 0xAE80
kind, skip, out = os.environ["PATH_KIND"], int(os.environ["SKIP"]), os.environ["OUT"]

gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("set breakpoint pending on")
gdb.execute(f"break ioctl if $rsi == {KVM_RUN}")
gdb.execute("run --bench > /dev/null")
gdb.execute(f"ignore 1 {skip}")
gdb.execute("continue")
gdb.execute("delete")
arch = gdb.selected_frame().architecture()


def here():
    pc = int(gdb.parse_and_eval("$pc"))
    return pc, arch.disassemble(pc)[0]["asm"]


def step_to_syscall():
    while not here()[1].startswith("syscall"):
        gdb.execute("stepi", to_string=True)


step_to_syscall()
gdb.execute("stepi", to_string=True)  # this KVM_RUN
trace = []
while True:
    pc, asm = here()
    if asm.startswith("syscall"):
        break
    trace.append((pc, asm))
    gdb.execute("stepi", to_string=True)

# A branch is taken when the next instruction is not the one that follows.
taken = sum(1 for (p, a), (q, _) in zip(trace, trace[1:]) if not p < q <= p + 15)
indirect = sum(1 for _, a in trace if a.startswith(("jmp    *", "jmp *", "call   *", "call *")))
locked = sum(1 for _, a in trace if a.startswith("lock"))
calls = sum(1 for _, a in trace if a.startswith("call"))
lines = len({p // 64 for p, _ in trace})
with open(out, "w") as f:
    for p, a in trace:
        sym = gdb.execute(f"info symbol {p}", to_string=True).split(" in section")[0].strip()
        f.write(f"{p:x} {sym}: {a}\n")
print(
    f"RESULT {kind}: {len(trace)} instructions, {taken} taken branches, {calls} calls, "
    f"{indirect} indirect jumps or calls, {locked} locked, {lines} code lines"
)
gdb.execute("kill")
