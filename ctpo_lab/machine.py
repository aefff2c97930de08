"""What machine a result came from: the facts that decide which float kernels ran.

CPU results of the same seed differ between processors because torch picks its vectorised kernels (and MKL its
code paths) by the instruction set it finds: an AVX-512 machine and an AVX2 one sum in different orders.  Result
files record these facts so that two runs' numbers can be told apart as "same machine kind" or not.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def processor_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The processor's model name (``/proc/cpuinfo``'s ``model name`` on Linux, ``platform.processor()``
    elsewhere), or ``"unknown"``."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_record() -> dict[str, str]:
    """``processor`` (model name), ``cpu_capability`` (the instruction set torch's CPU kernels were dispatched
    for: ``"AVX512"``, ``"AVX2"``, ...), ``cores`` (logical CPUs) and ``torch`` (its version)."""
    import torch

    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch builds without the query
        capability = "unknown"
    return {"processor": processor_name(), "cpu_capability": capability, "cores": str(os.cpu_count() or 0),
            "torch": torch.__version__}


def describe_machine(record: dict[str, str] | None = None) -> str:
    """One line for a report, e.g. ``"AMD EPYC (torch CPU kernels: AVX2), 2 cores, torch 2.13.0+cpu"``."""
    r = machine_record() if record is None else record
    return f"{r['processor']} (torch CPU kernels: {r['cpu_capability']}), {r['cores']} cores, torch {r['torch']}"
