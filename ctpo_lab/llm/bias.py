"""Bias and variance of policy-gradient estimators on real LLM trajectories, against an on-policy reference.

An estimator is a :class:`ctpo_lab.losses.LossConfig` (or the name of a preset of :data:`ctpo_lab.losses.PRESETS`)
and its label is the config's ``name``. Every estimator is a per-sequence weighted sum of score vectors,
``X_i = Σ_t c_{i,t} ∇log π(y_{i,t}|s_{i,t})`` for ``y_i ~ μ``, where ``c_{i,t}`` is minus the derivative of the
estimator's loss with respect to ``log π(y_{i,t}|s_{i,t})`` (the losses of :mod:`ctpo_lab.losses`, summed over a
sequence's tokens). With ``ℓ_t = log π(y_t|s_t) − log μ(y_t|s_t)``, ``r_t = e^{ℓ_t}``, ``L_t = Σ_{k≤t} ℓ_k``,
the default :data:`ESTIMATORS` are

==========================  ========================================================  =========================
estimator (preset)          c_{i,t}                                                   clip
==========================  ========================================================  =========================
unclipped_token             r_t A_i                                                   none
unclipped_cumulative        ρ_{1:t} A_i,  ρ_{1:t} = e^{L_t}                           none
unclipped_sequence          ρ_{1:T} A_i  (full-sequence IS)                           none
unclipped_sequence_geomean  s_i A_i,  s_i = e^{L_T / |y_i|}                           none
grpo                        r_t A_i · 1[not clipped]                                  r_t ∈ [0.8, 1.2], dual 3
gspo                        s_i A_i · 1[not clipped]                                  s_i ∈ [1 − 3e-4, 1 + 4e-4]
ctpo                        ρ_{1:t} A_i · 1[not clipped]                              L_t ∈ [−0.025√t, 0.05√t],
                                                                                      dual e^{0.05√t}
ctpo_fixed                  ρ_{1:t} A_i · 1[not clipped]                              L_t ∈ [−0.025, 0.05], dual
==========================  ========================================================  =========================

(the clipped presets keep their caps ``|log weight| ≤ 10``). :func:`estimator_config` replaces every preset's
aggregation by the per-sequence token sum ``seq-mean-token-sum``, so that every estimator targets
``∇J = E_π[A Σ_t ∇log π_t]`` on the same scale (the presets' own length normalisations rescale estimators and
reference alike only when all lengths are equal).

The on-policy reference is ``X^ref_i = A_i Σ_t ∇log π(y_{i,t}|s_{i,t})`` with ``y_i ~ π`` itself (every ratio
is 1, every estimator coincides with it). Projected on K random directions (:mod:`ctpo_lab.llm.directions`)
and averaged within prompt groups, each estimator gives a matrix ``U[p, k]`` (prompt group p, direction k);
:func:`compare_to_reference` turns those into bias, covariance trace, MSE and cosine with bootstrap CIs.
Advantages come from :mod:`ctpo_lab.advantages`.

Three policies (the sampler μ = π_roll, the trainer's recompute π_old, the current π): with
``rollout_log_prob`` = log μ and a ``rollout_correction`` of :data:`ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS`,
``c_{i,t}`` is minus the derivative of ``compute_policy_loss(log π, log π_old, ..., rollout_log_prob=log μ,
rollout_correction=...)``; the correction ``none`` (:data:`NO_CORRECTION`) is the two-policy loss against π_old
(the mismatch ignored). :data:`CORRECTIONS` are the defaults of the bias study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ctpo_lab import losses, stats

__all__ = [
    "ESTIMATORS",
    "CORRECTIONS",
    "NO_CORRECTION",
    "Estimator",
    "correction_name",
    "estimator_config",
    "estimator_name",
    "estimator_token_weights",
    "sequence_projections",
    "group_means",
    "ReferenceComparison",
    "compare_to_reference",
    "ratio_position_profile",
]

#: An estimator: the name of a preset of :data:`ctpo_lab.losses.PRESETS` or a :class:`ctpo_lab.losses.LossConfig`.
Estimator = str | losses.LossConfig

#: Default estimators: the bare importance weights (no clip, no cap) first, then the clipped loss presets.
ESTIMATORS: tuple[str, ...] = (
    "unclipped_token",
    "unclipped_cumulative",
    "unclipped_sequence",
    "unclipped_sequence_geomean",
    "grpo",
    "gspo",
    "ctpo",
    "ctpo_fixed",
)


#: The name of "no rollout correction" (the loss against π_old, the sampler ignored).
NO_CORRECTION = "none"

#: Default rollout corrections of the three-policy measurement: none, verl's token / sequence TIS and token
#: IcePop presets, and the cumulative ρ_{1:t}(π_old/μ) in CTPO's √t window.
CORRECTIONS: tuple[str, ...] = (NO_CORRECTION, "decoupled_token_is", "decoupled_seq_is", "decoupled_token_icepop",
                                "cumulative_sqrt_t")


def correction_name(correction: object) -> str:
    """The label of a rollout correction: ``none`` for None / ``"none"``, a name of
    :data:`ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS`, or the ``name`` of a correction object
    (``ValueError`` naming ``rollout_correction`` for an unknown name)."""
    from ctpo_lab.rollout_correction import resolve_rollout_correction

    if correction is None or correction == NO_CORRECTION:
        return NO_CORRECTION
    return resolve_rollout_correction(correction).name


def estimator_config(estimator: Estimator, **overrides: object) -> losses.LossConfig:
    """The validated :class:`ctpo_lab.losses.LossConfig` an estimator is measured with.

    ``estimator`` is a preset name or a LossConfig; ``overrides`` are LossConfig fields applied to it (e.g.
    ``eps_high=0.28``). The aggregation is always the per-sequence token sum ``seq-mean-token-sum`` (loss =
    mean over sequences of ``Σ_t`` per-token losses), which puts every estimator on the scale of ∇J.
    """
    agg = overrides.pop("aggregation", "seq-mean-token-sum")
    if agg != "seq-mean-token-sum":
        raise ValueError(f"aggregation: the bias study measures every estimator with 'seq-mean-token-sum', got {agg!r}")
    try:
        return losses.resolve_config(estimator, **overrides, aggregation="seq-mean-token-sum")
    except ValueError as e:
        raise ValueError(f"estimator: {e}") from None


def estimator_name(estimator: Estimator) -> str:
    """The label of an estimator: its config's ``name`` (the preset name for a preset)."""
    return estimator_config(estimator).name


def estimator_token_weights(
    estimator: Estimator, logp_target: Tensor, logp_behaviour: Tensor, adv: Tensor | np.ndarray, mask: Tensor,
    *, rollout_log_prob: Tensor | None = None, rollout_correction: object = None,
) -> tuple[Tensor, Tensor]:
    """Per-token weights ``c_{i,t}`` of an estimator and the mask of tokens whose gradient its clip dropped.

    ``c = −∂ loss_i / ∂ log π(y_{i,t})`` for the estimator's loss of each sequence (token sum), computed by
    autograd through :func:`ctpo_lab.losses.compute_policy_loss` in float64.

    ``estimator``: a preset name or a LossConfig (see :func:`estimator_config`).
    ``logp_behaviour`` is the loss's ``old_log_prob`` (μ's log-probs in the two-policy setting, π_old's with
    three policies). ``rollout_log_prob`` [N, T] (the sampler's log μ) and ``rollout_correction`` (a name of
    :data:`ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS`, a correction object, or None / ``"none"``: no
    correction) make it the three-policy loss ``compute_policy_loss(..., rollout_log_prob=,
    rollout_correction=)``; its weights multiply the loss and its rejection removes tokens (counted in
    ``dropped``). The coefficients are scaled by the number of rows with a valid token of ``mask`` (the
    per-sequence contribution to the batch loss, rejected rows included in the count).
    Shapes: logp_target, logp_behaviour, mask [N, T]; adv [N] → (c float64 [N, T], dropped bool [N, T]).
    """
    cfg = estimator_config(estimator)
    name = cfg.name
    mask = mask.bool()
    lp = logp_target.detach().double().requires_grad_(True)
    adv_t = torch.as_tensor(np.asarray(adv), dtype=torch.float64)
    kw: dict[str, object] = {}
    if rollout_correction is not None and not (isinstance(rollout_correction, str)
                                               and rollout_correction == NO_CORRECTION):
        if rollout_log_prob is None:
            raise ValueError("rollout_log_prob: a rollout_correction needs the sampler's log-probs [N, T]")
        from ctpo_lab.rollout_correction import resolve_rollout_correction

        kw = {"rollout_log_prob": rollout_log_prob.detach().double(),
              "rollout_correction": resolve_rollout_correction(rollout_correction)}
        name = f"{name} with {kw['rollout_correction'].name}"
    out = losses.compute_policy_loss(lp, logp_behaviour.double(), adv_t, mask, cfg, **kw)
    if int(out.num_nonfinite) > 0:
        raise ValueError(f"{name}: NaN or inf log-probs or advantages on {int(out.num_nonfinite)} valid tokens")
    (grad,) = torch.autograd.grad(out.loss, lp)
    rows = int((mask.sum(-1) > 0).sum())
    c = torch.where(mask, -grad * max(rows, 1), 0.0).detach()
    dropped = mask & (c == 0) & (adv_t[:, None] != 0)
    if not torch.isfinite(c).all():
        raise ValueError(f"{name}: non-finite token weights (ratios overflow float64)")
    return c, dropped


def sequence_projections(weights: Tensor, derivatives: Tensor) -> np.ndarray:
    """``X[i, k] = Σ_t c_{i,t} d_{k,i,t}``.  Shapes: weights [N, T], derivatives [K, N, T] → float64 [N, K]."""
    if derivatives.ndim != 3 or derivatives.shape[1:] != weights.shape:
        raise ValueError(f"derivatives: expected [K, {', '.join(map(str, weights.shape))}], "
                         f"got {tuple(derivatives.shape)}")
    return torch.einsum("nt,knt->nk", weights.double(), derivatives.double()).numpy()


def group_means(x: np.ndarray, group_id: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of ``x`` [N, K] within each group → (groups [P], means [P, K]) (groups sorted)."""
    g = np.asarray(group_id)
    groups, inv = np.unique(g, return_inverse=True)
    sums = np.zeros((len(groups), x.shape[1]))
    np.add.at(sums, inv, x)
    return groups, sums / np.bincount(inv)[:, None]


@dataclass
class ReferenceComparison:
    """Point estimates and bootstrap CIs of one estimator against the on-policy reference.

    ``values`` maps a statistic to its point estimate, ``ci`` to (low, high); ``per_direction`` holds the
    bias along each direction with its CI (prompt bootstrap only, the direction being fixed).
    """

    values: dict[str, float]
    ci: dict[str, tuple[float, float]]
    per_direction: pd.DataFrame

    def row(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.values.items():
            out[k] = v
            if k in self.ci:
                out[f"{k}_lo"], out[f"{k}_hi"] = self.ci[k]
        return out


def _stats(e: np.ndarray, r: np.ndarray, pair: np.ndarray | None, batch_size: int,
           noise: float = 1.0) -> dict[str, np.ndarray]:
    """Vectorised statistics over leading replicate axes: e, r [..., P, K] (pair: [..., P, K] or None).

    Squared norms are noise-corrected per direction, ``m̂_a m̂_b − noise · Ĉov(a, b) / P`` (E[m̂_a m̂_b] =
    m_a m_b + Cov(a, b)/P over P prompt groups; a and r share prompts, so their covariance counts), then
    averaged over directions (E_v⟨a, v⟩⟨b, v⟩ = ⟨a, b⟩ for v ~ N(0, I)). Bootstrap replicates use ``noise = 2``:
    a resample adds the same noise once more, so the replicates are centred on the corrected point estimate.
    """
    P = e.shape[-2]

    def ip(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ma, mb = a.mean(-2), b.mean(-2)
        cov = ((a - ma[..., None, :]) * (b - mb[..., None, :])).sum(-2) / (P - 1)
        return (ma * mb - noise * cov / P).mean(-1)

    dd = e - r
    bias_sq, ref_sq, est_sq, cross = ip(dd, dd), ip(r, r), ip(e, e), ip(e, r)
    tr_e, tr_r = e.var(-2, ddof=1).mean(-1), r.var(-2, ddof=1).mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_norm = np.sqrt(np.where(ref_sq > 0, ref_sq, np.nan))
        bias_norm = np.sqrt(np.clip(bias_sq, 0, None))
        mse = np.clip(bias_sq, 0, None) + tr_e / batch_size
        out = {
            "bias_norm": bias_norm,
            "bias_sq": bias_sq,
            "rel_bias": bias_norm / ref_norm,
            "ref_norm": ref_norm,
            "trace_cov": tr_e,
            "trace_cov_ref": tr_r,
            "var_ratio": tr_e / tr_r,
            "cosine": cross / np.sqrt(np.where((est_sq > 0) & (ref_sq > 0), est_sq * ref_sq, np.nan)),
            "scale": cross / np.where(ref_sq > 0, ref_sq, np.nan),
            "mse": mse,
            "rel_mse": mse / np.where(ref_sq > 0, ref_sq, np.nan),
            # scale-free and measurable even when the gradient itself is not resolved: the squared bias in units
            # of one prompt group's reference variance (bias² = noise² at a batch of 1/bias_to_noise groups),
            # and the gradient noise scale B = tr Cov_ref / ‖g‖² (‖g‖ is resolved only when P ≫ B)
            "bias_to_noise": bias_sq / tr_r,
            "noise_scale": tr_r / np.where(ref_sq > 0, ref_sq, np.nan),
        }
        if pair is not None:
            dp = e - pair
            dsq = ip(dp, dp)
            out["rel_bias_vs_seq"] = np.sqrt(np.clip(dsq, 0, None)) / ref_norm
            out["bias_vs_seq_to_noise"] = dsq / tr_r
    return out


def compare_to_reference(
    estimate: np.ndarray,
    reference: np.ndarray,
    *,
    paired: np.ndarray | None = None,
    batch_size: int = 64,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ReferenceComparison:
    """Bias, covariance trace, MSE and cosine of an estimator against the on-policy reference.

    Parameters
    ----------
    estimate : [P, K] group means of the estimator's projections (trajectories of μ)
    reference : [P, K] group means of the on-policy reference (trajectories of π), the same P prompts in the
        same order (the bootstrap resamples prompts jointly, which removes between-prompt variance from the bias)
    paired : [P, K] optional, another estimator on the *same* μ trajectories (the sequence estimator, whose
        expectation is the on-policy gradient when the signal is a per-sequence one): ``rel_bias_vs_seq`` is
        ‖E[X − X_seq]‖ / ‖g‖, a lower-variance bias estimate through the IS identity
    batch_size : N of ``mse = ‖bias‖² + tr Cov / N`` (N prompt groups)
    n_boot : bootstrap replicates; each resamples the P prompts and the K directions (so that the CI also
        carries the sketch error of estimating norms from K random projections)

    Returns
    -------
    :class:`ReferenceComparison` with, per statistic, the point estimate and a percentile CI:
    bias_norm (‖E X − g‖, noise-corrected: (m̂_X − m̂_g)² − Var(X − g)/P per direction), rel_bias (÷ ‖g‖),
    trace_cov (tr Cov of one prompt group's mean X), var_ratio (÷ the reference's), cosine(E X, g), scale
    (⟨E X, g⟩/‖g‖²), mse and rel_mse at ``batch_size``, ref_norm (‖g‖), bias_to_noise (‖bias‖² / tr Cov_ref,
    noise-corrected, may be < 0 within noise), noise_scale (B = tr Cov_ref / ‖g‖², the batch of prompt groups
    at which the reference's noise equals its signal: relative quantities are resolved only when P ≫ B),
    rel_bias_vs_seq and bias_vs_seq_to_noise (with ``paired``: ‖E[X − X_seq]‖ over ‖g‖, and its square over
    tr Cov_ref).
    """
    e = np.asarray(estimate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if e.ndim != 2 or r.shape != e.shape:
        raise ValueError(f"estimate/reference: expected equal [P, K] shapes, got {e.shape} and {r.shape}")
    if paired is not None and np.shape(paired) != e.shape:
        raise ValueError(f"paired: expected shape {e.shape}, got {np.shape(paired)}")
    P, K = e.shape
    if P < 2:
        raise ValueError(f"estimate: need at least 2 prompt groups, got {P}")
    for name, x in (("estimate", e), ("reference", r), ("paired", paired)):
        if x is not None and not np.isfinite(x).all():
            raise ValueError(f"{name}: NaN or inf values")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1), got {level!r}")
    pr = None if paired is None else np.asarray(paired, dtype=np.float64)
    point = {k: float(v) for k, v in _stats(e, r, pr, batch_size).items()}
    rng = np.random.default_rng(seed)
    ci: dict[str, tuple[float, float]] = {}
    if n_boot > 0:
        chunks = []
        for start in range(0, n_boot, 200):
            b = min(200, n_boot - start)
            ip = rng.integers(0, P, size=(b, P))
            ik = rng.integers(0, K, size=(b, K))
            sel = (ip[:, :, None], ik[:, None, :])
            chunks.append(_stats(e[sel], r[sel], None if pr is None else pr[sel], batch_size, noise=2.0))
        boot = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        for k, v in boot.items():
            fin = v[np.isfinite(v)]
            ci[k] = (tuple(float(x) for x in stats.percentile_interval(fin, level)) if fin.size > 0.5 * n_boot
                     else (math.nan, math.nan))
    # per-direction bias: prompts resampled, direction fixed
    b_dir = e.mean(0) - r.mean(0)
    lo = hi = np.full(K, np.nan)
    if n_boot > 0:
        ip = rng.integers(0, P, size=(n_boot, P))
        bd = e[ip].mean(1) - r[ip].mean(1)
        lo, hi = stats.percentile_interval(bd, level, axis=0)
    se = np.sqrt((e - r).var(0, ddof=1) / P)
    per_dir = pd.DataFrame({"direction": np.arange(K), "bias": b_dir, "bias_lo": lo, "bias_hi": hi, "se": se,
                            "estimate_mean": e.mean(0), "reference_mean": r.mean(0)})
    return ReferenceComparison(point, ci, per_dir)


def _stopped(values: Tensor, mask: Tensor) -> Tensor:
    """Carry each row's last valid value forward over its padding ([N, T])."""
    lengths = mask.sum(-1)
    idx = torch.arange(values.shape[1])[None, :].expand_as(values)
    last = (lengths - 1).clamp(min=0)[:, None]
    return torch.where(idx < lengths[:, None], values, values.gather(1, last))


def ratio_position_profile(
    log_ratio: Tensor,
    mask: Tensor,
    group_id: np.ndarray | Tensor,
    *,
    positions: list[int] | np.ndarray | None = None,
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per-position moments of the importance weights under μ, by weight family.

    With ``ℓ_k = log π(y_k|s_k) − log μ(y_k|s_k)`` and ``L_t = Σ_{k≤t} ℓ_k``, the weights are

    * ``cumulative``: ρ_{1:t} = exp(L_t), stopped at the end of the response (ρ_{1:t} = ρ_{1:|y|} for
      t > |y|). It is a μ-martingale: E_μ[ρ_{1:t}] = Σ_{y_{1:t}} μ(y_{1:t}) π(y_{1:t}) / μ(y_{1:t}) = 1 exactly
      for every t, a check of the sampling and scoring pipeline;
    * ``token``: r_t = exp(ℓ_t) over the responses still running at t (E_μ[r_t | s_t] = Σ_y π(y|s_t) = 1);
    * ``sequence_geomean``: exp(L_t / min(t, |y|)), the running geometric mean of the token ratios (GSPO's
      weight at t = |y|; stopped; no reason to have mean 1).

    Returns a DataFrame with columns weight, position, n, mean, mean_lo, mean_hi (prompt-cluster bootstrap),
    var, ess (normalised effective sample size (Σw)² / (n Σw²)), max.
    """
    mask = mask.bool()
    lr = torch.where(mask, log_ratio.double(), 0.0)
    if not torch.isfinite(lr).all():
        raise ValueError("log_ratio: NaN or inf on valid tokens")
    N, T = lr.shape
    g = np.asarray(group_id)
    groups, inv = np.unique(g, return_inverse=True)
    if positions is None:
        positions = np.unique(np.clip(np.round(np.geomspace(1, max(T, 1), 24)).astype(int), 1, T))
    pos = np.asarray(positions, dtype=int)
    if pos.size == 0 or pos.min() < 1 or pos.max() > T:
        raise ValueError(f"positions: expected values in [1, {T}]")
    L = lr.cumsum(-1)
    t_idx = torch.arange(1, T + 1, dtype=torch.float64)[None, :]
    lengths = mask.sum(-1, keepdim=True).double()
    weights = {
        "cumulative": _stopped(L, mask).exp().numpy(),
        "token": lr.exp().numpy(),
        "sequence_geomean": _stopped(L / torch.minimum(t_idx, lengths.clamp(min=1)), mask).exp().numpy(),
    }
    valid_tok = mask.numpy()
    rng = np.random.default_rng(seed)
    boot_groups = rng.integers(0, len(groups), size=(n_boot, len(groups))) if n_boot > 0 else None
    rows = []
    for wname, w in weights.items():
        for t in pos:
            col = w[:, t - 1]
            keep = valid_tok[:, t - 1] if wname == "token" else mask.sum(-1).numpy() > 0
            if keep.sum() < 2:
                continue
            x = col[keep]
            gi = inv[keep]
            lo = hi = math.nan
            if boot_groups is not None:
                s = np.bincount(gi, weights=x, minlength=len(groups))
                c = np.bincount(gi, minlength=len(groups)).astype(float)
                bs, bc = s[boot_groups].sum(1), c[boot_groups].sum(1)
                ok = bc > 0
                lo, hi = stats.percentile_interval(bs[ok] / bc[ok], level)
            rows.append({"weight": wname, "position": int(t), "n": int(keep.sum()), "mean": float(x.mean()),
                         "mean_lo": float(lo), "mean_hi": float(hi), "var": float(x.var(ddof=1)),
                         "ess": float(x.sum() ** 2 / (len(x) * (x**2).sum())), "max": float(x.max())})
    return pd.DataFrame(rows)
