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
(rule ``detached_clip``, CISPO: ``clip(e^X, 1−ε_low, 1+ε_high)``; rule ``reinforce``, GPG: 1) and ``keep``
the loss's gradient factor (a 0/1 mask, except for the sign-dependent token weights below):

* the cap: ``X_t > max_log_weight`` → 0 (clip-window rules only; the surrogate rules have no cap);
* ``ppo`` / ``log_window``: ``S > 0`` and ``X_t > upper_t``, or ``S < 0`` and ``X_t < lower_t`` → 0
  (bounds from :func:`ctpo_lab.clipping.clip_window`);
* dual clip (``ppo``, ``log_window``, ``none``): ``S < 0`` and ``X_t > log d_t`` → 0
  (:func:`ctpo_lab.clipping.dual_clip_bound`);
* sign-dependent token weights (token-level ratios only; ``W = 1`` and ``keep`` is the whole weight):
  ``gppo`` ``min(e^X, 1+ε_high)`` for ``S > 0``, ``max(e^X, 1−ε_low)`` for ``S < 0``; ``sapo``
  ``4 r σ_τ(1 − σ_τ)`` with ``r = e^X``, ``σ_τ = σ(τ(r − 1))``, ``τ = τ_pos`` for ``S > 0`` else ``τ_neg`` (0 where
  the log-ratio clamp binds);
* the mask rule ``ratio_band`` (IcePop): ``e^{ℓ_t} ∉ [mask_low, mask_high]`` → 0, a per-transition factor of
  the token's own table ``β`` (whatever the level).

Three levels, by what ``X_t`` depends on: ``token`` (ℓ_t only: masks are per-transition tables),
``prefix`` (the running sum Σ_{k≤t} of a per-token increment: the masks need the augmented ``(z, L)`` state),
``sequence`` (L_T: the mask is read out at the end of the trajectory, on the augmented state).

How each configuration is measured (:meth:`ChainEstimator.method`, :data:`LAB_METHODS`): ``"dp"`` — the exact
DP (:func:`ctpo_lab.markov.exact_moments`); ``"per_trajectory"`` — the loss of one trajectory is well defined
but the DP cannot represent it (row rules ``gmpo``/``topr``/``vespo``, ``dppo_*``, which read μ_t itself, the
masks ``opsm``/``trust_region``/``cppo``): exact by enumeration (:func:`ctpo_lab.markov.enumerate_moments`) on
small chains, Monte Carlo otherwise; ``"batch"`` — the loss reads a batch statistic
(:data:`ctpo_lab.surrogates.BATCH_RULES`, :data:`ctpo_lab.masks.BATCH_MASKS`): Monte Carlo on batches of
``batch_size`` trajectories (:func:`ctpo_lab.markov.monte_carlo_moments`), whose moments are those of one
trajectory's contribution within such a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit

from ctpo_lab import losses, masks, surrogates
from ctpo_lab.clipping import clip_window, dual_clip_bound

__all__ = ["ChainEstimator", "chain_estimator", "loss_token_coefficients", "lab_method", "L_FLOOR", "LAB_METHODS",
           "DP_RULES", "DP_MASKS"]

#: how the exact lab measures a configuration (:meth:`ChainEstimator.method`): the exact DP, the per-trajectory
#: loss (enumeration on small chains, Monte Carlo otherwise) or Monte Carlo on batches
LAB_METHODS: tuple[str, ...] = ("dp", "per_trajectory", "batch")
#: the clip/surrogate rules the exact DP represents (``gppo``/``sapo`` on token-level ratios only)
DP_RULES: tuple[str, ...] = ("ppo", "log_window", "detached_clip", "none", "gppo", "sapo", "reinforce")
#: the mask rules the exact DP represents
DP_MASKS: tuple[str, ...] = ("none", "ratio_band")
#: rules whose per-token weight depends on the sign of the signal (token-level in the DP)
_SIGN_WEIGHTED = ("gppo", "sapo")
#: rules and masks whose loss reads log π_t and log μ_t themselves, not only ℓ_t
_PROBABILITY_RULES = ("dppo_tv", "dppo_kl", "clip_cov", "kl_cov")
_PROBABILITY_MASKS = ("cppo",)

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
        """The gradient mask reads the sign of the signal (a clip window, a dual clip, a sign-dependent weight)."""
        c = self.config
        return (c.clip in ("ppo", "log_window") + _SIGN_WEIGHTED
                or (c.clip == "none" and c.dual_clip is not None))

    @property
    def sign_weighted(self) -> bool:
        """The token weight itself depends on the sign of the signal (``gppo``, ``sapo``): ``keep`` carries it."""
        return self.config.clip in _SIGN_WEIGHTED

    @property
    def capped(self) -> bool:
        """The log-weight cap ``max_log_weight`` applies (clip-window rules; the surrogate rules ignore it)."""
        c = self.config
        return c.max_log_weight is not None and c.clip not in surrogates.SURROGATE_RULES

    @property
    def has_mask(self) -> bool:
        """``keep`` is not identically 1."""
        return self.sign_dependent or self.capped

    @property
    def batch_level(self) -> bool:
        """The loss of a trajectory reads the whole batch (:data:`ctpo_lab.surrogates.BATCH_RULES`,
        :data:`ctpo_lab.masks.BATCH_MASKS`): measured by Monte Carlo on batches of ``batch_size``."""
        c = self.config
        return c.clip in surrogates.BATCH_RULES or c.mask_rule in masks.BATCH_MASKS

    @property
    def reads_probabilities(self) -> bool:
        """The loss reads log π_t and log μ_t themselves (DPPO's probability trust region, the covariance rules,
        CPPO's Binary-TV), not only ℓ_t: :func:`loss_token_coefficients` needs ``log_prob``/``old_log_prob``."""
        c = self.config
        return c.clip in _PROBABILITY_RULES or c.mask_rule in _PROBABILITY_MASKS

    def dp_unsupported_reason(self, signal: str = "reward") -> str | None:
        """Why the exact DP cannot represent this configuration with ``signal`` (None: it can)."""
        c = self.config
        mc = ("use markov.monte_carlo_moments (or enumerate_moments on small chains), which accept every "
              "per-trajectory LossConfig")
        if self.batch_level:
            what = f"rule {c.clip!r}" if c.clip in surrogates.BATCH_RULES else f"mask rule {c.mask_rule!r}"
            return (f"estimator: {self.name!r} is batch-level ({what} reads a statistic of the whole batch); the "
                    "exact DP and enumeration measure one trajectory at a time — use "
                    "markov.monte_carlo_moments(..., batch_size=...), which evaluates the loss on batches")
        if c.clip not in DP_RULES:
            why = ("its per-token gradient reads a row statistic" if c.clip in surrogates.ROW_RULES
                   else "its weight and trust region read π_t and μ_t themselves, not only ℓ_t")
            return f"estimator: {self.name!r} uses rule {c.clip!r}, which the exact DP does not represent ({why}); {mc}"
        if c.mask_rule not in DP_MASKS:
            return (f"estimator: {self.name!r} uses mask rule {c.mask_rule!r}, which the exact DP does not "
                    f"represent (only {DP_MASKS}); {mc}")
        if self.sign_weighted and self.level != "token":
            return (f"estimator: {self.name!r} applies the sign-dependent weight of rule {c.clip!r} to a "
                    f"{self.level}-level ratio ({c.ratio}); the exact DP supports it on token-level ratios only; "
                    f"{mc}")
        if self.level == "sequence" and self.has_mask:
            if self.position_dependent_window:
                return (f"estimator: {self.name!r} applies a position-dependent log window (clip_exponent="
                        f"{c.clip_exponent}) to a sequence-level ratio ({c.ratio}); the exact DP reads "
                        "sequence-level masks only at the end of the trajectory, where they cannot depend on t — "
                        f"{mc}")
            if signal != "reward" and self.sign_dependent:
                return (f"estimator: {self.name!r} masks a sequence-level ratio by the sign of a per-token signal "
                        f"({signal!r}); the exact DP supports sequence-level sign masks for the outcome signal "
                        f"'reward' only — {mc}")
        return None

    def method(self, signal: str = "reward") -> str:
        """How the exact lab measures this configuration with ``signal``: one of :data:`LAB_METHODS`
        (``"dp"``: exact DP; ``"per_trajectory"``: enumeration on small chains, Monte Carlo otherwise;
        ``"batch"``: Monte Carlo on batches of ``batch_size`` trajectories)."""
        if self.batch_level:
            return "batch"
        return "dp" if self.dp_unsupported_reason(signal) is None else "per_trajectory"

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
        if self.capped:
            dropped |= x > c.max_log_weight
        if c.clip == "gppo":  # the bounded weight: min(w, 1+ε_high) for S > 0, max(w, 1−ε_low) for S < 0
            lo, hi, _ = self.window(t)
            w = np.exp(np.minimum(x, c.max_log_weight) if self.capped else x)
            v = np.where(sg > 0, np.minimum(w, np.exp(hi)), np.where(sg < 0, np.maximum(w, np.exp(lo)), w))
            return np.where(dropped, 0.0, np.broadcast_to(v, shape))
        if c.clip == "sapo":  # d/dlog π of σ(τ(r−1))·4/τ: 4 r σ (1 − σ); 0 where the clamp binds
            r = np.exp(x)
            tau = np.where(sg > 0, c.tau_pos, c.tau_neg)
            s = expit(tau * (r - 1.0))
            v = 4.0 * r * s * (1.0 - s)
            if c.log_ratio_clamp is not None:
                v = np.where(np.abs(x) >= c.log_ratio_clamp, 0.0, v)
            return np.broadcast_to(v, shape).astype(np.float64)
        if c.clip in ("ppo", "log_window", "none"):
            lo, hi, log_dual = self.window(t)
            if c.clip != "none":
                dropped |= ((sg > 0) & (x > hi)) | ((sg < 0) & (x < lo))
            if log_dual is not None:
                dropped |= (sg < 0) & (x > log_dual)
        return (~dropped).astype(np.float64)

    def weight(self, x: np.ndarray) -> np.ndarray:
        """W(X): the weight multiplying the signal and the score (``e^X``; CISPO: the clipped weight; GPG and the
        sign-weighted rules: 1, their weight is in :meth:`keep`)."""
        c = self.config
        if c.clip == "reinforce" or self.sign_weighted:
            return np.ones_like(np.asarray(x, dtype=np.float64))
        w = np.exp(np.minimum(np.asarray(x, dtype=np.float64), c.max_log_weight if c.max_log_weight is not None
                              else np.inf))
        if c.clip == "detached_clip":
            w = np.clip(w, 1.0 - c.eps_low, 1.0 + c.eps_high)
        return w

    def tables(self, ell: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(α, β, γ)`` ``[|Z|, V]`` of the compact weight form w_t = (Π_{k<t} α_k) β_t (Π_{k>t} γ_k), before
        masks and signals (atom-weighted estimators: all ones, the weight comes from the augmented state), with
        the sign-independent per-token mask ``ratio_band`` in ``β``."""
        alpha, beta, gamma = self._weight_tables(ell, horizon)
        c = self.config
        if c.mask_rule == "ratio_band":
            r = np.exp(self.clamp_log_ratio(ell))
            beta = beta * ((r >= c.mask_low) & (r <= c.mask_high))
        return alpha, beta, gamma

    def _weight_tables(self, ell: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def lab_method(estimator: str | losses.LossConfig | ChainEstimator, signal: str = "reward",
               **overrides: object) -> str:
    """How the exact lab measures ``estimator`` (preset name, LossConfig or ChainEstimator) with ``signal``:
    ``"dp"`` (exact DP), ``"per_trajectory"`` (enumeration on small chains, Monte Carlo otherwise) or ``"batch"``
    (Monte Carlo on batches of ``batch_size`` trajectories). See :meth:`ChainEstimator.method`."""
    return chain_estimator(estimator, **overrides).method(signal)


def _rows_gradient(cfg: losses.LossConfig, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
                   rollout: torch.Tensor | None = None, correction: object = None) -> torch.Tensor:
    """−∂(rows · loss)/∂ log π on one batch of rows (every token valid; ``rollout``: the sampler's log μ with
    ``correction`` a rollout correction)."""
    lp = lp.detach().requires_grad_()
    out = losses.compute_policy_loss(lp, old, adv, torch.ones(lp.shape, dtype=torch.bool), cfg,
                                     rollout_log_prob=rollout, rollout_correction=correction)
    (grad,) = torch.autograd.grad(out.loss * lp.shape[0], lp)
    return -grad


def loss_token_coefficients(log_ratio: np.ndarray, signal: np.ndarray, estimator: ChainEstimator, *,
                            log_prob: np.ndarray | None = None, old_log_prob: np.ndarray | None = None,
                            batch_size: int | None = None, rollout_log_prob: np.ndarray | None = None,
                            rollout_correction: object = None) -> np.ndarray:
    """Per-token coefficients ``c_{i,t} = −∂ loss(y_i) / ∂ log π_{i,t}`` of the loss itself on each trajectory.

    ``log_ratio`` and ``signal`` are ``[N, T]`` (ℓ_t = log π − log μ, −inf allowed where π = 0; the signal is the
    per-token advantage). ``log_prob``/``old_log_prob`` ``[N, T]`` are log π_t and log μ_t of each token (log π
    = −inf allowed; ``log_ratio`` is then not read): the loss sees the real probabilities, which the rules of
    :attr:`ChainEstimator.reads_probabilities` need (DPPO, the covariance rules, CPPO). Without them the loss
    is given log π = ℓ and log μ = 0, which is exact for every rule that reads ℓ only (and raises for the others).
    Where π = 0 the loss sees log π = log μ + :data:`L_FLOOR`.

    Computed by autograd through :func:`ctpo_lab.losses.compute_policy_loss` in float64 with every token valid,
    the global-batch scaling off and ``aggregation="all-seq-mean-token-sum"`` (the loss of row i is its token
    sum, the sum over rows is divided by N whatever a mask removes, and multiplied back by N): each row is its own
    trajectory, the rows do not interact (with every token valid this is ``seq-mean-token-sum``, the same numbers,
    except under masks that remove whole rows from the denominator, ``trust_region``, which would couple them).
    Batch-level rules (:attr:`ChainEstimator.batch_level`) need ``batch_size``: the rows are cut into
    consecutive batches of ``batch_size`` (N must be a multiple), the loss is evaluated on each batch and
    multiplied back by ``batch_size``, so that ``c_{i,t}`` is row
    i's contribution to −∇(batch_size · loss) within its batch (a batch's gradient is the mean of its rows'
    estimators).

    Three policies (:mod:`ctpo_lab.markov.three_policy`): ``rollout_log_prob`` ``[N, T]`` is the sampler's
    log π_roll and ``rollout_correction`` a correction of :mod:`ctpo_lab.rollout_correction` (a name of
    ``ROLLOUT_CORRECTIONS`` or a ``RolloutCorrection``); ``log_prob``/``old_log_prob`` (log π, log π_old) are then
    required, and the loss is ``policy_loss(..., rollout_log_prob=, rollout_correction=)``. A batch-normalised
    correction is batch-level (``batch_size`` as for the batch-level rules). Returns ``[N, T]`` float64.
    """
    from ctpo_lab.rollout_correction import resolve_rollout_correction

    ell = np.asarray(log_ratio, dtype=np.float64)
    n = ell.shape[0]
    if n == 0:
        return np.zeros_like(ell)
    corr = resolve_rollout_correction(rollout_correction)
    if corr is not None and (rollout_log_prob is None or log_prob is None):
        raise ValueError("rollout_log_prob: a rollout_correction needs rollout_log_prob, log_prob and old_log_prob")
    batch_level = estimator.batch_level or (corr is not None and corr.rollout_is_batch_normalize)
    if batch_level:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: {estimator.name!r} is batch-level; pass batch_size=B (a positive int), "
                             f"got {batch_size!r}")
        if n % int(batch_size):
            raise ValueError(f"batch_size: {n} rows are not a whole number of batches of {batch_size}")
    if (log_prob is None) != (old_log_prob is None):
        raise ValueError("log_prob/old_log_prob: pass both or neither")
    cfg = losses.resolve_config(estimator.config, aggregation="all-seq-mean-token-sum", dp_size=1,
                                batch_num_tokens=None, global_batch_size=None)
    adv = torch.as_tensor(np.asarray(signal, dtype=np.float64))
    if log_prob is None:
        if estimator.reads_probabilities:
            raise ValueError(f"log_prob: {estimator.name!r} reads log π and log μ themselves; pass log_prob and "
                             "old_log_prob")
        lp = torch.tensor(np.maximum(np.where(np.isnan(ell), L_FLOOR, ell), L_FLOOR), dtype=torch.float64)
        old = torch.zeros_like(lp)
    else:
        old_np = np.asarray(old_log_prob, dtype=np.float64)
        lp_np = np.asarray(log_prob, dtype=np.float64)
        lp = torch.tensor(np.maximum(np.where(np.isnan(lp_np), -np.inf, lp_np), old_np + L_FLOOR))
        old = torch.tensor(old_np)
    roll = None if rollout_log_prob is None else torch.tensor(np.asarray(rollout_log_prob, dtype=np.float64))
    if not batch_level:
        return _rows_gradient(cfg, lp, old, adv, roll, corr).numpy()
    b = int(batch_size)
    out = np.empty_like(ell)
    for a in range(0, n, b):
        sl = slice(a, a + b)
        out[sl] = _rows_gradient(cfg, lp[sl], old[sl], adv[sl], None if roll is None else roll[sl], corr).numpy()
    return out
