"""The machine record that result files carry (processor, torch's CPU kernel set)."""

from __future__ import annotations

import platform
from pathlib import Path

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


def _cpuinfo_flags_and_count() -> tuple[set[str], int] | None:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return None
    lines = info.read_text(errors="replace").splitlines()
    flags = next((ln.partition(":")[2].split() for ln in lines if ln.partition(":")[0].strip() == "flags"), [])
    return set(flags), sum(ln.partition(":")[0].strip() == "processor" for ln in lines)


def test_machine_record_and_description():
    r = machine.machine_record()
    assert set(r) == {"processor", "cpu_capability", "cores", "torch"}
    assert r["torch"] == torch.__version__
    # checked against the kernel's own listing, not against the calls the record makes
    listed = _cpuinfo_flags_and_count()
    if listed is not None and platform.machine() in ("x86_64", "AMD64"):
        flags, count = listed
        assert r["cores"] == str(count)
        if "avx512f" not in flags:  # torch cannot dispatch AVX-512 kernels without the instructions
            assert r["cpu_capability"] != "AVX512"
        if "avx2" in flags:
            assert r["cpu_capability"] in {"AVX2", "AVX512"}
    else:
        assert int(r["cores"]) >= 1 and r["cpu_capability"]
    fake = {"processor": "P", "cpu_capability": "AVX2", "cores": "2", "torch": "9.9"}
    assert machine.describe_machine(fake) == "P (torch CPU kernels: AVX2), 2 cores, torch 9.9"
    assert machine.describe_machine().startswith(r["processor"] + " (torch CPU kernels: " + r["cpu_capability"])
