"""Position-binned profiles of L_t and the within-group centring.

Notation: ℓ_t the per-token log-ratio log π − log μ, L_t = Σ_{k≤t} ℓ_k over valid tokens, t the 1-based
valid-token position.  A profile bins positions into [1, w], [w+1, 2w], … and holds per bin the token count,
Σ L and Σ L² (so profiles of several batches add up); the binning itself is
:func:`ctpo_lab.diagnostics.position_profile`, never re-derived here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ctpo_lab import diagnostics
from ctpo_lab.stats.inputs import ArrayLike, check_positive_int, group_index, matrix_and_mask, to_numpy

__all__ = [
    "PositionTable",
    "group_centering",
    "center_within_groups",
    "binned_profile",
    "profile_table",
]


def group_centering(x: np.ndarray, m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre within groups, with the group sizes: for x, m [N, T] (float64 values, bool mask) and g [N] int
    group ids 0..G−1, returns (x_it − mean of x over the members of i's group alive at t, the number n_gt of
    those members), both [N, T] and 0 on masked-out tokens; t counts valid tokens."""
    pos = np.cumsum(m, axis=1)
    rows, cols = np.nonzero(m)
    key_g, key_t = g[rows], pos[rows, cols] - 1
    n_g, t_max = int(g.max()) + 1, max(int(pos.max()) if pos.size else 0, 1)
    s = np.zeros((n_g, t_max))
    n = np.zeros((n_g, t_max))
    np.add.at(s, (key_g, key_t), x[rows, cols])
    np.add.at(n, (key_g, key_t), 1.0)
    out = np.zeros_like(x)
    count = np.zeros_like(x)
    out[rows, cols] = x[rows, cols] - s[key_g, key_t] / n[key_g, key_t]
    count[rows, cols] = n[key_g, key_t]
    return out, count


def center_within_groups(cum_log_ratio: ArrayLike, mask: ArrayLike, groups: ArrayLike) -> np.ndarray:
    """L_t minus the mean of L_t over the members of the same group alive at position t.

    Pooling heterogeneous prompts inflates Var(L_t) by the between-prompt spread of the drift: with prompt
    drifts d_g(t) = E[L_t | g], Var(L_t) = E_g Var(L_t | g) + Var_g d_g(t), and the second term grows like t²
    when prompts differ in their per-token KL; centring within prompt groups removes it.

    Shapes: cum_log_ratio, mask [N, T], groups [N] → [N, T] (0 on masked-out tokens; a group member alone at
    t gets 0).  The centred values have variance σ²·(n−1)/n for n members alive;
    :func:`ctpo_lab.stats.sqrt_t_fit` corrects for that.
    """
    x, m = matrix_and_mask(cum_log_ratio, mask)
    g = group_index(groups, x.shape[0])
    assert g is not None
    return group_centering(x, m, g)[0]


def binned_profile(
    cum_log_ratio: ArrayLike,
    mask: ArrayLike,
    *,
    bin_width: int = 50,
    clipped: ArrayLike | None = None,
    groups: ArrayLike | None = None,
    center: bool = False,
) -> diagnostics.PositionProfile:
    """:func:`ctpo_lab.diagnostics.position_profile` on arrays or tensors, optionally centred within groups.

    Returns a float64 :class:`~ctpo_lab.diagnostics.PositionProfile` (summable across batches with ``+``).
    """
    x, m = matrix_and_mask(cum_log_ratio, mask)
    if center:
        if groups is None:
            raise ValueError("groups: center=True needs groups (one prompt-group id per row)")
        x = center_within_groups(x, m, groups)
    clip_t = None
    if clipped is not None:
        c = to_numpy(clipped, "clipped")
        if c.shape != x.shape:
            raise ValueError(f"clipped: shape {c.shape} does not match {x.shape}")
        clip_t = torch.from_numpy(c.astype(bool))
    return diagnostics.position_profile(torch.from_numpy(x), torch.from_numpy(m), bin_width, clip_t)


@dataclass(frozen=True)
class PositionTable:
    """NumPy view of a :class:`~ctpo_lab.diagnostics.PositionProfile`; every array [num_bins].

    Bins with fewer than ``min_count`` tokens have NaN mean/std/clip_rate.
    """

    bin_start: np.ndarray
    bin_center: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    clip_rate: np.ndarray | None
    bin_width: int
    min_count: int

    def to_dict(self) -> dict[str, Any]:
        d = {k: (None if v is None else np.asarray(v).tolist()) for k, v in asdict(self).items()
             if isinstance(v, np.ndarray) or v is None}
        d["bin_width"], d["min_count"] = self.bin_width, self.min_count
        return d


def profile_table(profile: diagnostics.PositionProfile, min_count: int = 1) -> PositionTable:
    """Convert a position profile to NumPy, masking bins with fewer than ``min_count`` tokens."""
    if not isinstance(profile, diagnostics.PositionProfile):
        raise TypeError(f"profile: expected a PositionProfile, got {type(profile).__name__}")
    min_count = check_positive_int(min_count, "min_count")
    count = profile.count.detach().cpu().numpy().astype(np.float64)
    keep = count >= min_count

    def arr(t: Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        a = t.detach().cpu().numpy().astype(np.float64)
        return np.where(keep, a, np.nan)

    return PositionTable(
        bin_start=profile.bin_start.cpu().numpy(),
        bin_center=profile.bin_center.cpu().numpy().astype(np.float64),
        count=count,
        mean=arr(profile.mean),  # type: ignore[arg-type]
        std=arr(profile.std),  # type: ignore[arg-type]
        clip_rate=arr(profile.clip_rate),
        bin_width=profile.bin_width,
        min_count=min_count,
    )


