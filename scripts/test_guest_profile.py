#!/usr/bin/env python3
"""Unit tests of scripts/guest-profile.py's pure logic: reading `perf script`
lines of the `kvm:kvm_emulate_insn` tracepoint and folding them into
functions per vCPU.

    python3 scripts/test_guest_profile.py
"""

import importlib.util
import unittest
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gp", Path(__file__).with_name("guest-profile.py"))
gp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gp)

# Lines as `perf script` printed them for a Debian 6.1 guest on the Intel host.
PERF = """\
           vcpu1  9254 [000] 13359.876881: kvm:kvm_emulate_insn: 0:ffffffff81073e00:0f ae e8 (prot64)
           vcpu1  9254 [000] 13359.876889: kvm:kvm_emulate_insn: 0:ffffffff81073e03:0f 31 (prot64)
           vcpu0  9253 [001] 13359.876890: kvm:kvm_emulate_insn: 0:ffffffff81a17a0a:f4 (prot64)
           vcpu0  9253 [001] 13359.876893: kvm:kvm_emulate_insn: 0:ffffffff81000000:90 (prot64)
           vcpu0  9253 [001] 13359.876897: kvm:kvm_emulate_insn: 0:ffffffff80000000:90 (prot64)
 nkvm 9250 [000] 13359.9: sched:sched_switch: something else
"""

KALLSYMS = """\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _stext
ffffffff81073df0 T pvclock_clocksource_read
ffffffff81073e90 t pvclock_read_wallclock
ffffffff81a17a00 t native_safe_halt
ffffffff82a00000 D init_task
"""


class ProfileTest(unittest.TestCase):
    def setUp(self):
        self.symbols = gp.Symbols.parse(KALLSYMS)

    def test_only_text_symbols_are_kept(self):
        self.assertEqual(self.symbols.names, ["_stext", "pvclock_clocksource_read", "pvclock_read_wallclock", "native_safe_halt"])

    def test_a_rip_maps_to_its_function_and_offset(self):
        self.assertEqual(self.symbols.lookup(0xFFFFFFFF81073E03), ("pvclock_clocksource_read", 0x13))
        self.assertEqual(self.symbols.lookup(0xFFFFFFFF81000000), ("_stext", 0))
        self.assertEqual(self.symbols.lookup(0xFFFFFFFF80000000), (None, 0))

    def test_samples_are_read_per_vcpu_and_other_lines_are_skipped(self):
        samples = list(gp.parse_samples(PERF.splitlines()))
        self.assertEqual(len(samples), 5)
        self.assertEqual(samples[0], ("vcpu1", 0xFFFFFFFF81073E00))

    def test_the_profile_counts_instructions_and_entries_per_function(self):
        total, per_fn, entries = gp.profile(gp.parse_samples(PERF.splitlines()), self.symbols)
        self.assertEqual(total, {"vcpu0": 3, "vcpu1": 2})
        self.assertEqual(per_fn["vcpu1"]["pvclock_clocksource_read"], 2)
        self.assertEqual(entries["vcpu1"]["pvclock_clocksource_read"], 0)
        self.assertEqual(entries["vcpu0"]["_stext"], 1)
        # Below the first symbol: the address itself stands for the function.
        self.assertEqual(per_fn["vcpu0"]["0xffffffff80000000"], 1)
        text = gp.report(total, per_fn, entries, 1.0, 5)
        self.assertIn("vcpu1: 2 emulated instructions in 1.0 s", text)
        self.assertIn("pvclock_clocksource_read", text)

    def test_an_empty_recording_says_why_it_may_be_empty(self):
        total, per_fn, entries = gp.profile([], self.symbols)
        self.assertIn("no emulated instructions", gp.report(total, per_fn, entries, 1.0, 5))


if __name__ == "__main__":
    unittest.main()
