"""The machine record that result files carry (processor, torch's CPU kernel set)."""

from __future__ import annotations

import os

import torch

from ctpo_lab import machine


def test_processor_name_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu avx2\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
    assert machine.processor_name(info) == "AMD EPYC 9B14"


def test_processor_name_without_cpuinfo_falls_back(tmp_path):
    name = machine.processor_name(tmp_path / "missing")
    assert isinstance(name, str) and name  # platform.processor() or "unknown"
    empty = tmp_path / "empty"
    empty.write_text("processor\t: 0\nmodel name\t:   \n")
    assert machine.processor_name(empty) == machine.processor_name(tmp_path / "missing")


def test_machine_record_and_description():
    r = machine.machine_record()
    assert set(r) == {"processor", "cpu_capability", "cores", "torch"}
    assert r["cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())
    assert r["cores"] == str(os.cpu_count()) and r["torch"] == torch.__version__
    fake = {"processor": "P", "cpu_capability": "AVX2", "cores": "2", "torch": "9.9"}
    assert machine.describe_machine(fake) == "P (torch CPU kernels: AVX2), 2 cores, torch 9.9"
    assert machine.describe_machine().startswith(r["processor"] + " (torch CPU kernels: " + r["cpu_capability"])
