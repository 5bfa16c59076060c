#!/usr/bin/env python3
"""Unit tests of scripts/kvm-unit-tests.py's pure logic: how a unittests.cfg
entry's qemu_params become `nkvm run` options, or "n/a".

    python3 scripts/test_kvm_unit_tests.py
"""

import importlib.util
import unittest
from pathlib import Path

_spec = importlib.util.spec_from_file_location("kut", Path(__file__).with_name("kvm-unit-tests.py"))
kut = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kut)


def plan(params, **kw):
    return kut.plan(kut.Test(name="t", file="t.flat", params=params, **kw))


class PlanTest(unittest.TestCase):
    def test_host_phys_bits_is_what_nkvm_does_and_a_fixed_width_is_not(self):
        self.assertEqual(plan("-cpu max,host-phys-bits").not_applicable, "")
        self.assertIn("phys-bits=36", plan("-cpu max,phys-bits=36").not_applicable)

    def test_enable_kvm_is_a_flag_without_a_value(self):
        p = plan("-enable-kvm -m 2048 -cpu host")
        self.assertEqual((p.not_applicable, p.memory_mib), ("", 2048))

    def test_vendor_maps_to_cpu_vendor_and_unknown_vendors_are_na(self):
        self.assertEqual(plan("-cpu max,vendor=GenuineIntel").vendor, "intel")
        self.assertEqual(plan("-cpu qemu64,vendor=AuthenticAMD").vendor, "amd")
        self.assertIn("vendor=HygonGenuine", plan("-cpu max,vendor=HygonGenuine").not_applicable)

    def test_hv_passthrough_asks_nkvm_for_hyperv(self):
        p = plan("-cpu host,hv_passthrough")
        self.assertEqual((p.not_applicable, p.hyperv), ("", True))
        self.assertIn("-device hyperv-testdev", plan("-cpu host,hv_passthrough -device hyperv-testdev").not_applicable)

    def test_hidden_features_and_unhideable_ones(self):
        self.assertEqual(plan("-cpu max,-x2apic,-pcid").hidden, ["x2apic", "pcid"])
        self.assertIn("cannot hide", plan("-cpu max,-avx2").not_applicable)

    def test_nested_virtualisation_and_devices_stay_na(self):
        self.assertIn("+vmx", plan("-cpu max,+vmx").not_applicable)
        self.assertIn("-device", plan("-device intel-iommu").not_applicable)

    def test_a_pass_list_excuses_a_test_only_on_the_vendor_it_names(self):
        text = "# comment\nsmptest\nla57 not-on=GenuineIntel  # the host's cause\n\n"
        self.assertEqual(kut.parse_pass_list(text, "GenuineIntel"), (["smptest"], ["la57"]))
        self.assertEqual(kut.parse_pass_list(text, "AuthenticAMD"), (["smptest", "la57"], []))
        with self.assertRaises(ValueError):
            kut.parse_pass_list("la57 only-on=AuthenticAMD\n", "GenuineIntel")

    def test_the_committed_pass_list_parses(self):
        expected, excused = kut.parse_pass_list(kut.PASS_LIST.read_text(), "GenuineIntel")
        self.assertIn("la57", excused)
        self.assertGreater(len(expected), 20)


if __name__ == "__main__":
    unittest.main()
