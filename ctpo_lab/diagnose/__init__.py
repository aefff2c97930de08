"""Diagnose your own run: ``python -m ctpo_lab.diagnose PATH --out DIR``.

:mod:`~ctpo_lab.diagnose.readers` reads the input (format detected from the path) into per-token log-ratios;
:mod:`~ctpo_lab.diagnose.pipeline` computes the statistics and writes ``summary.json``, ``report.md``, PNG figures
and a self-contained ``report.html``.
"""

from __future__ import annotations

from ctpo_lab.diagnose.pipeline import diagnose, summarize
from ctpo_lab.diagnose.readers import DUMP_MODES, FORMATS, Trajectories, detect_format, read_trajectories

__all__ = ["diagnose", "summarize", "DUMP_MODES", "FORMATS", "Trajectories", "detect_format", "read_trajectories"]
