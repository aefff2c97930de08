"""Input checks shared by the modules of :mod:`ctpo_lab.stats` (internal to the package; public names).

Every check raises ``TypeError``/``ValueError`` naming the offending argument, and NaN/inf on valid tokens are
rejected rather than propagated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["ArrayLike", "to_numpy", "matrix_and_mask", "group_index", "check_positive_int", "check_confidence"]

ArrayLike = Tensor | np.ndarray | Sequence[Any]


def to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """A NumPy view of a tensor, array, list or tuple; anything else raises ``TypeError`` naming ``name``."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (np.ndarray, list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name}: expected a torch.Tensor, numpy array or sequence, got {type(x).__name__}")


def matrix_and_mask(values: ArrayLike, mask: ArrayLike, name: str = "cum_log_ratio") -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, T] values (0 on masked-out tokens) and bool [N, T] mask; NaN/inf on valid tokens raise."""
    x = to_numpy(values, name)
    m = to_numpy(mask, "mask")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected shape [N, T], got {x.shape}")
    if m.shape != x.shape:
        raise ValueError(f"mask: shape {m.shape} does not match {name} {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name}: expected a real-valued array, got dtype {x.dtype}")
    if m.dtype != bool:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise TypeError(f"mask: expected bool or 0/1 values, got dtype {m.dtype}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError("mask: expected only 0/1 values")
        m = m.astype(bool)
    x = x.astype(np.float64)
    bad = int((~np.isfinite(x) & m).sum())
    if bad:
        raise ValueError(f"{name}: {bad} NaN or inf value(s) on valid tokens")
    return np.where(m, x, 0.0), m


def group_index(groups: ArrayLike | None, n: int, name: str = "groups") -> np.ndarray | None:
    """Group labels (any hashable values, one per row) as int64 ids 0..G−1 [n]; None stays None."""
    if groups is None:
        return None
    g = to_numpy(groups, name).reshape(-1)
    if g.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries (one per row), got {g.shape[0]}")
    _, inv = np.unique(g, return_inverse=True)
    return inv.astype(np.int64)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int ≥ {minimum}, got {value!r}")
    return int(value)


def check_confidence(confidence: float) -> float:
    """A confidence level in the open interval (0, 1)."""
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    return float(confidence)
