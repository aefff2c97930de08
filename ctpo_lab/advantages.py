"""Group advantages of outcome rewards: the one definition used by the trainer, the LLM study and the bias study.

Responses come in prompt groups (G responses sampled for the same prompt). For a response i of group g with
reward R_i, the schemes are

* ``grpo``:   A_i = (R_i − mean_g R) / (std_g R + ε), the unbiased std (÷ (n_g − 1)); GRPO, verl's
  ``compute_grpo_outcome_advantage``;
* ``rloo``:   A_i = R_i − (Σ_{j∈g} R_j − R_i) / (n_g − 1), the leave-one-out mean as baseline (with it the
  full-sequence IS estimator is exactly unbiased for ∇J);
* ``reward``: A_i = R_i, no baseline;

with ``mean_g R = Σ_{j∈g} R_j / n_g`` and ``std_g R = sqrt(Σ_{j∈g} (R_j − mean_g R)² / (n_g − 1))``; ε = 1e-6.
A group of a single response gets ``A = 0`` under ``grpo`` and ``rloo`` (it has no baseline).

Groups are given either as **group ids** ``[N]`` (any integers; the rows of a group need not be contiguous) or
as a **fixed group size** G (the N = P·G rows are P consecutive groups of G, the trainer's layout).

Inputs may be NumPy arrays, sequences or torch tensors:

* a torch tensor of floats is computed in its own dtype on its own device, and a tensor of that dtype and
  device is returned (the trainer's float32 rewards on the accelerator); integer/bool tensors in float64;
* anything else is computed in float64 and a float64 ``numpy.ndarray`` is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["SCHEMES", "GRPO_EPS", "Scheme", "group_advantages", "grpo_advantages", "rloo_advantages"]

Scheme = Literal["grpo", "rloo", "reward"]
#: Advantage schemes, see the module docstring.
SCHEMES: tuple[str, ...] = ("grpo", "rloo", "reward")
#: ε of the GRPO denominator ``std_g R + ε``.
GRPO_EPS: float = 1e-6

ArrayLike = Tensor | np.ndarray | Sequence[float]
Groups = int | Tensor | np.ndarray | Sequence[int]


def _within(x: Tensor, scheme: str, eps: float) -> Tensor:
    """The scheme applied along the last axis of ``x`` [..., n] (one group per row of n responses)."""
    n = x.shape[-1]
    if scheme == "reward":
        return x.clone()
    if n < 2:
        return torch.zeros_like(x)
    if scheme == "grpo":
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps)
    return x - (x.sum(-1, keepdim=True) - x) / (n - 1)


def group_advantages(rewards: ArrayLike, groups: Groups, scheme: Scheme | str = "grpo", *,
                     eps: float = GRPO_EPS) -> Tensor | np.ndarray:
    """Per-response advantages of a scheme of :data:`SCHEMES` within prompt groups.

    Parameters
    ----------
    rewards : [N] float (tensor, array or sequence); NaN/inf raise ``ValueError``.
    groups : int G, or [N] integer group ids
        A fixed group size (``N`` must be a multiple of G; rows ``[pG, (p+1)G)`` form group p), or one id per
        response (rows with equal ids form a group).
    scheme : ``"grpo"``, ``"rloo"`` or ``"reward"`` (formulas in the module docstring).
    eps : ε of ``grpo``'s denominator ``std_g R + ε`` (> 0).

    Returns
    -------
    [N] advantages: a tensor in the rewards' float dtype and device for a float tensor input, else float64
    numpy.

    Raises
    ------
    ValueError : unknown scheme, bad shapes, a group size that does not divide N, NaN/inf rewards.
    TypeError : ``groups`` neither an int nor an array of ids.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"advantage: expected one of {SCHEMES}, got {scheme!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    as_numpy = not isinstance(rewards, Tensor)
    if as_numpy:
        r = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
    else:
        r = rewards if rewards.is_floating_point() else rewards.to(torch.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards: expected shape [N], got {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards: NaN or inf value(s)")
    if isinstance(groups, bool):
        raise TypeError("groups: expected a group size (int) or group ids [N], got a bool")
    if isinstance(groups, (int, np.integer)):
        size = int(groups)
        if size < 1 or r.numel() % size:
            raise ValueError(f"rewards: expected [N] with N a multiple of group_size={size}, got {tuple(r.shape)}")
        out = _within(r.view(-1, size), scheme, eps).view(-1)
    else:
        g = groups.detach().cpu() if isinstance(groups, Tensor) else torch.as_tensor(np.asarray(groups))
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
            raise TypeError(f"groups: expected integer group ids, got dtype {g.dtype}")
        if tuple(g.shape) != tuple(r.shape):
            raise ValueError(f"rewards/group_id: expected equal 1-D shapes, got {tuple(r.shape)} and "
                             f"{tuple(g.shape)}")
        g = g.to(r.device)
        out = torch.zeros_like(r) if scheme != "reward" else r.clone()
        if scheme != "reward":
            for gid in torch.unique(g):
                sel = g == gid
                out[sel] = _within(r[sel], scheme, eps)
    return out.cpu().numpy() if as_numpy else out


def grpo_advantages(rewards: ArrayLike, groups: Groups, eps: float = GRPO_EPS) -> Tensor | np.ndarray:
    """GRPO advantages ``(R_i − mean_g R) / (std_g R + eps)`` (unbiased std; 0 for a group of one).

    ``groups``: a fixed group size G (consecutive groups, as the trainer lays out its batch) or [N] group ids.
    Shapes [N] → [N]; dtype/kind as :func:`group_advantages`.
    """
    return group_advantages(rewards, groups, "grpo", eps=eps)


def rloo_advantages(rewards: ArrayLike, groups: Groups) -> Tensor | np.ndarray:
    """RLOO advantages ``R_i − mean_{j∈g, j≠i} R_j`` (0 for a group of one).  Shapes [N] → [N]; see
    :func:`group_advantages`."""
    return group_advantages(rewards, groups, "rloo")
