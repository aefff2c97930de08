"""Limits and checks shared by the statistics commands (``python -m ctpo_lab.llm run|analyze|fit|bias`` and
``python -m ctpo_lab.diagnose``): the bootstrap and chain budgets a command line takes, the bin width a set of
responses can carry, and the JSON-readiness of a result (no NaN written silently).

* bootstrap replicates (``--n-boot``): an int in [:data:`MIN_BOOT`, :data:`MAX_BOOT`] — fewer than 10 replicates
  give no meaningful 95% percentile interval, more than 100,000 add nothing but time and memory (one float per
  replicate and statistic, held at once);
* random chains of the exact prediction (``--chain-seeds``): at most :data:`MAX_CHAIN_SEEDS`;
* a bin width (``--bin-width``) at most the longest response (:func:`check_bin_width`): a wider bin holds every
  position in one bin whose centre lies beyond the data, and the binned fits are undefined.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MIN_BOOT", "MAX_BOOT", "MAX_CHAIN_SEEDS", "check_boot", "check_bin_width", "longest_response",
           "finite_json"]

#: The fewest bootstrap replicates a command takes (a 95% percentile interval from fewer is noise).
MIN_BOOT = 10
#: The most bootstrap replicates a command takes (beyond it, a typo: 10⁵ already pins a 95% bound to ±0.1%).
MAX_BOOT = 100_000
#: The most random chains of the exact bias/variance prediction (each one is a full exact computation).
MAX_CHAIN_SEEDS = 1_000


def check_boot(n_boot: Any, name: str = "n_boot") -> int:
    """``n_boot`` when it is an int in [:data:`MIN_BOOT`, :data:`MAX_BOOT`]; else ``ValueError`` naming ``name``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or not MIN_BOOT <= n_boot <= MAX_BOOT:
        raise ValueError(f"{name}: expected an int in [{MIN_BOOT}, {MAX_BOOT}] (bootstrap replicates), "
                         f"got {n_boot!r}")
    return n_boot


def longest_response(mask: Any) -> int:
    """The number of valid tokens of the longest row of a [N, T] mask (0 for an empty one)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or m.size == 0:
        return 0
    return int(m.sum(axis=1).max())


def check_bin_width(bin_width: int, longest: int, name: str = "bin_width") -> None:
    """``ValueError`` naming ``name`` when ``bin_width`` exceeds ``longest``, the longest response in tokens."""
    if bin_width > longest:
        raise ValueError(f"{name}: expected at most the longest response ({longest} tokens), got {bin_width}: "
                         "a wider bin leaves the binned fits undefined")


def finite_json(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, ±inf; numpy scalars included) replaced by ``None``, and the
    dotted paths of the replaced values (``"targets.stale_k1.sigma_hat"``, ``"exponent_ci[0]"``)."""
    undefined: list[str] = []

    def walk(o: Any, where: str) -> Any:
        if isinstance(o, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(o)]
        if isinstance(o, bool) or o is None or isinstance(o, (str, int)):
            return o
        if isinstance(o, np.ndarray):
            return walk(o.tolist(), where)
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, (float, np.floating)):
            v = float(o)
            if not math.isfinite(v):
                undefined.append(where)
                return None
            return v
        return o

    return walk(obj, path), undefined
