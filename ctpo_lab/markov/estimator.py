"""An estimator of the exact laboratory is a :class:`ctpo_lab.losses.LossConfig`: this module compiles one to the
per-transition tables and gradient masks the dynamic programmes need, and gives the loss's own per-token
coefficients on explicit trajectories.

The contract (tested by enumerating every trajectory of small chains and differentiating
:func:`ctpo_lab.losses.policy_loss` with autograd): for one trajectory ``y ~ μ`` with per-token signal ``S_t``
(the advantages), the exact lab's estimator is

    X(y) = −∇_θ policy_loss(log π_θ(y), log μ(y), S, mask = 1, aggregation = "seq-mean-token-sum")
         = Σ_t c_t ψ_t,    c_t = S_t · W(X_t) · keep(X_t, t, sign S_t),

with ``θ`` the tabular target logits, ``ψ_t = ∇_θ log π_θ(y_t|s_t)``, ``X_t`` the ratio family's log-weight
value (:mod:`ctpo_lab.ratios`, on the per-token log-ratio clamped at ``log_ratio_clamp``), ``W(X) = e^X``
(rule ``detached_clip``, CISPO: ``clip(e^X, 1−ε_low, 1+ε_high)``) and ``keep`` the loss's gradient mask:

* the cap: ``X_t > max_log_weight`` → 0;
* ``ppo`` / ``log_window``: ``S > 0`` and ``X_t > upper_t``, or ``S < 0`` and ``X_t < lower_t`` → 0
  (bounds from :func:`ctpo_lab.clipping.clip_window`);
* dual clip (``ppo``, ``log_window``, ``none``): ``S < 0`` and ``X_t > log d_t`` → 0
  (:func:`ctpo_lab.clipping.dual_clip_bound`).

Three levels, by what ``X_t`` depends on: ``token`` (ℓ_t only: masks are per-transition tables),
``prefix`` (the running sum Σ_{k≤t} of a per-token increment: the masks need the augmented ``(z, L)`` state),
``sequence`` (L_T: the mask is read out at the end of the trajectory, on the augmented state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ctpo_lab import losses
from ctpo_lab.clipping import clip_window, dual_clip_bound

__all__ = ["ChainEstimator", "chain_estimator", "loss_token_coefficients", "L_FLOOR"]

#: stands in for ℓ = −inf (π = 0 < μ) when the loss has no log-ratio clamp; far below every window
L_FLOOR = -1e3

_LEVEL = {
    "token": "token",
    "token_tis": "token",
    "cumulative": "prefix",
    "truncated_cumulative": "prefix",
    "cumulative_geomean": "prefix",
    "sequence": "sequence",
    "sequence_geomean": "sequence",
}


def _numpy_bound(x: torch.Tensor | None) -> np.ndarray | None:
    return None if x is None else x.detach().cpu().numpy().astype(np.float64)


@dataclass(frozen=True)
class ChainEstimator:
    """A validated :class:`~ctpo_lab.losses.LossConfig` with the exact lab's derived quantities.

    Attributes
    ----------
    config : the loss configuration (the estimator's one definition).
    level : ``"token"``, ``"prefix"`` or ``"sequence"`` (see the module docstring).
    """

    config: losses.LossConfig

    # ---------------------------------------------------------------- classification
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def level(self) -> str:
        return _LEVEL[self.config.ratio]

    @property
    def sign_dependent(self) -> bool:
        """The gradient mask reads the sign of the signal (a clip window or a dual clip)."""
        c = self.config
        return c.clip in ("ppo", "log_window") or (c.clip == "none" and c.dual_clip is not None)

    @property
    def has_mask(self) -> bool:
        """``keep`` is not identically 1."""
        return self.sign_dependent or self.config.max_log_weight is not None

    @property
    def atom_weighted(self) -> bool:
        """``W(X_t)`` is read from the augmented state's running sum (it does not factor over transitions)."""
        detached = self.config.clip == "detached_clip" and self.level != "token"
        return detached or self.config.ratio == "cumulative_geomean"

    @property
    def needs_augmented(self) -> bool:
        """The dynamic programme needs the ``(z, L)`` state."""
        if self.level == "token":
            return False
        return self.has_mask or self.atom_weighted

    @property
    def position_dependent_window(self) -> bool:
        c = self.config
        return c.clip == "log_window" and c.clip_exponent != 0.0

    # ---------------------------------------------------------------- NumPy quantities
    def clamp_log_ratio(self, ell: np.ndarray) -> np.ndarray:
        """ℓ clamped at ``±log_ratio_clamp`` (−inf → the clamp, or :data:`L_FLOOR` without a clamp)."""
        c = self.config.log_ratio_clamp
        x = np.asarray(ell, dtype=np.float64)
        if c is None:
            return np.maximum(np.where(np.isnan(x), L_FLOOR, x), L_FLOOR)
        return np.clip(x, -c, c)

    def increment(self, ell: np.ndarray) -> np.ndarray:
        """Per-token log-weight increment of the family: ℓ (``token``, ``cumulative``, ``sequence``, the
        geometric means) or ``min(ℓ, log truncation)`` (``token_tis``, ``truncated_cumulative``)."""
        x = self.clamp_log_ratio(ell)
        if self.config.ratio in ("token_tis", "truncated_cumulative"):
            x = np.minimum(x, math.log(self.config.truncation))
        return x

    def value(self, running_sum: np.ndarray, t: int | np.ndarray, horizon: int) -> np.ndarray:
        """X_t from the running sum of increments (token level: the increment itself; sequence level: L_T)."""
        s = np.asarray(running_sum, dtype=np.float64)
        if self.config.ratio == "cumulative_geomean":
            return s / np.maximum(np.asarray(t, dtype=np.float64), 1.0)
        if self.config.ratio == "sequence_geomean":
            return s / float(horizon)
        return s

    def window(self, t: int | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Log-space (lower_t, upper_t, log d_t) of the clip rule at 1-based positions ``t`` (d_t: the dual
        bound, None without a dual clip), from :mod:`ctpo_lab.clipping` evaluated in float64."""
        c = self.config
        pos = torch.as_tensor(np.asarray(t, dtype=np.int64))
        lo, hi = clip_window(c.clip, pos, c.eps_low, c.eps_high, c.clip_exponent, torch.float64)
        dual = dual_clip_bound(c.clip, pos, c.dual_clip, c.clip_exponent, torch.float64)
        log_dual = None if dual is None else np.log(_numpy_bound(dual))
        return _numpy_bound(lo), _numpy_bound(hi), log_dual

    def keep(self, x: np.ndarray, t: int | np.ndarray, sign: np.ndarray | float) -> np.ndarray:
        """Gradient mask (1.0 = the token keeps its gradient) for log-weight values ``x`` at positions ``t``
        with signal sign ``sign`` (broadcast together)."""
        c = self.config
        x = np.asarray(x, dtype=np.float64)
        sg = np.asarray(sign, dtype=np.float64)
        shape = np.broadcast_shapes(x.shape, sg.shape, np.shape(t))
        dropped = np.zeros(shape, dtype=bool)
        if c.max_log_weight is not None:
            dropped |= x > c.max_log_weight
        if c.clip in ("ppo", "log_window", "none"):
            lo, hi, log_dual = self.window(t)
            if c.clip != "none":
                dropped |= ((sg > 0) & (x > hi)) | ((sg < 0) & (x < lo))
            if log_dual is not None:
                dropped |= (sg < 0) & (x > log_dual)
        return (~dropped).astype(np.float64)

    def weight(self, x: np.ndarray) -> np.ndarray:
        """W(X): the weight multiplying the signal and the score (``e^X``; CISPO: the clipped weight)."""
        c = self.config
        w = np.exp(np.minimum(np.asarray(x, dtype=np.float64), c.max_log_weight if c.max_log_weight is not None
                              else np.inf))
        if c.clip == "detached_clip":
            w = np.clip(w, 1.0 - c.eps_low, 1.0 + c.eps_high)
        return w

    def tables(self, ell: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(α, β, γ)`` ``[|Z|, V]`` of the compact weight form w_t = (Π_{k<t} α_k) β_t (Π_{k>t} γ_k), before
        masks and signals (atom-weighted estimators: all ones, the weight comes from the augmented state)."""
        inc = self.increment(ell)
        one = np.ones_like(inc)
        if self.atom_weighted:
            return one, one, one
        if self.level == "token":
            return one, self.weight(inc), one
        r = np.exp(inc)
        if self.level == "prefix":
            return r, r, one
        s = r ** (1.0 / horizon) if self.config.ratio == "sequence_geomean" else r
        return s, s, s


def chain_estimator(estimator: str | losses.LossConfig | ChainEstimator, **overrides: object) -> ChainEstimator:
    """The :class:`ChainEstimator` of a preset name or a :class:`~ctpo_lab.losses.LossConfig` (with overrides)."""
    if isinstance(estimator, ChainEstimator):
        estimator = estimator.config
    if not isinstance(estimator, (str, losses.LossConfig)):
        raise TypeError(f"estimator: expected a preset name or a LossConfig, got {type(estimator).__name__}")
    if isinstance(estimator, str) and estimator not in losses.PRESETS:
        raise ValueError(f"estimator: unknown preset {estimator!r}; expected a LossConfig or one of "
                         f"{sorted(losses.PRESETS)}")
    return ChainEstimator(losses.resolve_config(estimator, **overrides))


def loss_token_coefficients(log_ratio: np.ndarray, signal: np.ndarray, estimator: ChainEstimator) -> np.ndarray:
    """Per-token coefficients ``c_{i,t} = −∂ loss(y_i) / ∂ log π_{i,t}`` of the loss itself on each trajectory.

    ``log_ratio`` and ``signal`` are ``[N, T]`` (ℓ_t = log π − log μ, −inf allowed where π = 0; the signal is the
    per-token advantage). Computed by autograd through :func:`ctpo_lab.losses.compute_policy_loss` in float64
    with every token valid and ``aggregation="seq-mean-token-sum"`` (the loss of row i is its token sum, and
    the mean over rows is multiplied back by N). Returns ``[N, T]`` float64.
    """
    ell = np.asarray(log_ratio, dtype=np.float64)
    n = ell.shape[0]
    if n == 0:
        return np.zeros_like(ell)
    cfg = losses.resolve_config(estimator.config, aggregation="seq-mean-token-sum")
    lp = torch.tensor(np.maximum(np.where(np.isnan(ell), L_FLOOR, ell), L_FLOOR), dtype=torch.float64,
                      requires_grad=True)
    adv = torch.as_tensor(np.asarray(signal, dtype=np.float64))
    out = losses.compute_policy_loss(lp, torch.zeros_like(lp), adv, torch.ones(ell.shape, dtype=torch.bool), cfg)
    (grad,) = torch.autograd.grad(out.loss * n, lp)
    return -grad.numpy()
