"""Surrogate rules beyond the clip window: soft gates, probability-space trust regions, covariance-selected
tokens, geometric means of clipped token ratios, sequence kernels and the plain score-function loss.

:mod:`ctpo_lab.clipping` holds the rules that clip one importance weight against a window (PPO, the CTPO log
window, CISPO's detached clip, GPPO's gradient-preserving clip).  The rules here form the per-token loss in
other ways; each reproduces one reference implementation (named in its function's docstring) and reports the
metrics that implementation reports, with its definitions.

Every rule is a function ``rule(inputs, cfg) -> SurrogateOutput`` on :class:`SurrogateInputs`.  Notation:
ℓ_t = log π_t − log μ_t on valid tokens (clamped where the reference clamps), r_t = e^{ℓ_t}, A_t the
advantage (0 on masked-out tokens), n_i the number of valid tokens of row i, sg(·) the stop-gradient.

=============  ==========================================================================================
rule           per-token loss (value; the gradient is autograd's through the expression)
=============  ==========================================================================================
``sapo``       −A·g_τ(r),  g_τ(r) = σ(τ(r−1))·4/τ,  τ = τ_pos if A > 0 else τ_neg        (verl ``sapo``)
``dppo_tv``    −A·sg(min(r, C))·log π · 1[π−μ ≤ δ_high if A > 0 else π−μ ≥ −δ_low]   (verl ``dppo_tv``)
``dppo_kl``    as dppo_tv with the binary KL of (μ, π) ≤ δ (only on the side that moves π away)  (``dppo_kl``)
``clip_cov``   PPO clip without dual clip, ×0 on ≤ ⌊fraction·N⌋ random tokens with cov ∈ (lb, ub)  (verl)
``kl_cov``     −A·r, and −A·r + β·|ℓ| on the ⌊fraction·N⌋ tokens of largest covariance          (verl)
``gmpo``       row i: −Ā_i·exp(Σ_t sgn(A)·min(sgn(A)ℓ_t, sgn(A)clip(ℓ_t, −ε_low, ε_high)) / n_i)  (verl ``geo_mean``)
``reinforce``  −A·log π                                                                    (verl ``gpg``)
``topr``       −A·log π if A ≥ 0; −A·sg(clip(ρ_{1:T}, 0, 1))·log π if A < 0                (TOPR)
``vespo``      −A·sg(W^k·e^{λ(1−W)})·log π,  W = ρ_{1:T}, (k, λ) by the sign of A        (TRL ``vespo``)
=============  ==========================================================================================

The covariance rules (``clip_cov``, ``kl_cov``) select tokens from the whole batch: they are batch-level
estimators (the exact laboratory measures them by Monte Carlo).  ``clip_cov`` draws its tokens with
``torch.randperm`` from the global generator, as verl does: seed it for reproducible results.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class RuleParameters(Protocol):
    """The fields of :class:`ctpo_lab.losses.LossConfig` the rules read (a LossConfig is one)."""

    clip: str
    eps_low: float
    eps_high: float
    log_ratio_clamp: float | None
    truncation: float | None
    tau_pos: float
    tau_neg: float
    cov_fraction: float
    cov_low: float
    cov_high: float
    kl_coef: float
    kernel_power_pos: float
    kernel_rate_pos: float
    kernel_power_neg: float
    kernel_rate_neg: float


__all__ = ["RuleParameters", "SURROGATE_RULES", "ROW_RULES", "BATCH_RULES", "SurrogateInputs", "SurrogateOutput",
           "surrogate"]

#: rules of this module (values of ``LossConfig.clip``)
SURROGATE_RULES: tuple[str, ...] = (
    "sapo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "gmpo", "reinforce", "topr", "vespo",
)
#: rules whose per-token gradient depends on the whole row (a sequence statistic)
ROW_RULES: tuple[str, ...] = ("gmpo", "topr", "vespo")
#: rules whose per-token loss depends on the whole batch
BATCH_RULES: tuple[str, ...] = ("clip_cov", "kl_cov")


class SurrogateInputs(NamedTuple):
    """The tensors every rule reads (all [B, T]; float tensors in the compute dtype)."""

    log_prob: Tensor  #: log π_t, differentiable; 0 on masked-out tokens
    old_log_prob: Tensor  #: log μ_t, constant; 0 on masked-out tokens
    raw_log_ratio: Tensor  #: log π_t − log μ_t, unclamped, differentiable; 0 on masked-out tokens
    advantages: Tensor  #: A_t, 0 on masked-out tokens
    mask: Tensor  #: bool, valid tokens


class SurrogateOutput(NamedTuple):
    """A rule's per-token loss and its masks (all [B, T]) and the reference implementation's metrics."""

    per_token_loss: Tensor  #: differentiable, 0 on masked-out tokens
    log_weight_value: Tensor  #: the rule's log-weight (for the weight diagnostics), no gradient
    dropped_high: Tensor  #: A > 0 and the rule removed the token's gradient
    dropped_low: Tensor  #: A < 0 and the rule removed the token's gradient
    reference_metrics: dict[str, Tensor]  #: 0-d tensors, the reference's names and definitions


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """verl's masked mean: Σ x·m / Σ m (NaN-free: 0 for an empty mask)."""
    return torch.where(mask, x, 0.0).sum() / mask.count_nonzero().clamp(min=1)


def _clamped(x: Tensor, clamp: float | None) -> Tensor:
    return x if clamp is None else x.clamp(-clamp, clamp)


def _none(mask: Tensor) -> Tensor:
    return torch.zeros_like(mask)


def _kl_metric(inputs: SurrogateInputs, log_ratio: Tensor) -> Tensor:
    return _masked_mean(-log_ratio.detach(), inputs.mask)


def _const(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor in ``like``'s dtype (a Python float in ``torch.where`` would be rounded to float32 first)."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _zero(inputs: SurrogateInputs) -> Tensor:
    return torch.zeros((), dtype=inputs.log_prob.dtype, device=inputs.log_prob.device)


def _sapo(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """verl ``compute_policy_loss_sapo`` (arXiv 2511.20347): the soft gate σ(τ(r−1))·4/τ, whose gradient in
    log π is A·4·r·σ(1−σ) (1 at r = 1, decaying smoothly instead of a hard cut); no token is dropped, so
    verl reports ``pg_clipfrac = pg_clipfrac_lower = 0``."""
    ell = _clamped(inputs.raw_log_ratio, cfg.log_ratio_clamp)
    ratio = ell.exp()
    adv = inputs.advantages
    tau = torch.where(adv > 0, _const(cfg.tau_pos, ratio), _const(cfg.tau_neg, ratio))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = torch.where(inputs.mask, -gate * adv, 0.0)
    none = _none(inputs.mask)
    zero = _zero(inputs)
    return SurrogateOutput(loss, ell.detach(), none, none, {
        "actor/pg_clipfrac": zero, "actor/pg_clipfrac_lower": zero, "actor/ppo_kl": _kl_metric(inputs, ell)})


def _dppo(inputs: SurrogateInputs, cfg: RuleParameters, divergence: str) -> SurrogateOutput:
    """verl ``compute_policy_loss_dppo_{tv,kl}`` (arXiv 2602.04879): a trust region in probability space.
    ``eps_low``/``eps_high`` are the divergence bounds δ_low/δ_high, ``truncation`` the cap C of the
    detached weight.  TV: keep A > 0 tokens with π − μ ≤ δ_high, A ≤ 0 tokens with π − μ ≥ −δ_low.  KL: with
    D = μ log(μ/π) + (1−μ) log((1−μ+10⁻⁸)/(1−π+10⁻⁸)), keep A > 0 tokens with D ≤ δ_high or π ≤ μ, A ≤ 0 tokens
    with D ≤ δ_low or π ≥ μ.  verl's metrics: ``pg_clipfrac`` = fraction of valid tokens dropped,
    ``pg_clipfrac_lower`` = fraction kept whose ratio exceeds C."""
    ell = _clamped(inputs.raw_log_ratio, cfg.log_ratio_clamp)
    ratio = ell.detach().exp()
    cap = cfg.truncation if cfg.truncation is not None else math.inf
    weight = ratio.clamp(max=cap)
    lp = inputs.log_prob
    prob, old_prob = lp.detach().exp(), inputs.old_log_prob.exp()
    if divergence == "tv":
        keep_pos = (prob - old_prob) <= cfg.eps_high
        keep_neg = (prob - old_prob) >= -cfg.eps_low
    else:
        binary_kl = old_prob * (inputs.old_log_prob - lp.detach()) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        keep_pos = (binary_kl <= cfg.eps_high) | (prob <= old_prob)
        keep_neg = (binary_kl <= cfg.eps_low) | (prob >= old_prob)
    adv = inputs.advantages
    keep = torch.where(adv > 0, keep_pos, keep_neg) & inputs.mask
    loss = torch.where(keep, -adv * weight * lp, 0.0)
    dropped = inputs.mask & ~keep
    metrics = {
        "actor/pg_clipfrac": dropped.count_nonzero() / inputs.mask.count_nonzero().clamp(min=1),
        "actor/pg_clipfrac_lower": (keep & (ratio > cap)).count_nonzero() / inputs.mask.count_nonzero().clamp(min=1),
        "actor/ppo_kl": _kl_metric(inputs, ell),
    }
    return SurrogateOutput(loss, weight.log(), dropped & (adv > 0), dropped & (adv < 0), metrics)


def _ppo_terms(ratio: Tensor, adv: Tensor, cfg: RuleParameters) -> tuple[Tensor, Tensor]:
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    return pg1, pg2


def _clip_cov(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """verl ``compute_policy_loss_clip_cov`` (Entropy-Mechanism, arXiv 2505.22617): the PPO clip (no dual
    clip, no log-ratio clamp) on every token; among the valid tokens the clip left active, those with
    covariance c_t = (A_t − mean A)(log π_t − mean log π) in (``cov_low``, ``cov_high``) are candidates, and
    max(⌊``cov_fraction``·N⌋, 1) of them, drawn uniformly by ``torch.randperm`` (global generator), have their
    loss set to 0.  verl's ``pg_clipfrac`` = fraction of valid tokens so zeroed (no ``pg_clipfrac_lower``)."""
    mask = inputs.mask
    ell = inputs.raw_log_ratio
    ratio = ell.exp()
    adv = inputs.advantages
    pg1, pg2 = _ppo_terms(ratio, adv, cfg)
    clipped_by_ppo = (pg2 > pg1) & mask
    with torch.no_grad():
        lp = inputs.log_prob.detach()
        cov = (adv - _masked_mean(adv, mask)) * (lp - _masked_mean(lp, mask))
        candidates = mask & ~clipped_by_ppo & (cov < cfg.cov_high) & (cov > cfg.cov_low)
        n_select = max(int(cfg.cov_fraction * int(mask.count_nonzero())), 1)
        idx = torch.nonzero(candidates)
        corr = torch.ones_like(ratio)
        if len(idx) > 0:
            idx = idx[torch.randperm(len(idx))[: min(n_select, len(idx))]]
            corr[idx[:, 0], idx[:, 1]] = 0.0
    selected = corr == 0
    loss = torch.where(mask, torch.maximum(pg1, pg2) * corr, 0.0)
    high = (adv > 0) & (clipped_by_ppo | selected)
    low = (adv < 0) & (clipped_by_ppo | selected)
    metrics = {"actor/pg_clipfrac": _masked_mean(selected.to(ratio.dtype), mask),
               "actor/ppo_kl": _kl_metric(inputs, ell)}
    return SurrogateOutput(loss, ell.detach(), high & mask, low & mask, metrics)


def _kl_cov(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """verl ``compute_policy_loss_kl_cov`` (arXiv 2505.22617): −A·r on every token (no clip, no clamp) and
    −A·r + β|ℓ| (β = ``kl_coef``) on the max(⌊``cov_fraction``·N⌋, 1) valid tokens of largest covariance
    (A_t − mean A)(log π_t − mean log π) (``torch.topk`` over the valid tokens in row-major order, on the
    CPU as verl).  verl reports only ``actor/ppo_kl`` = mean |ℓ| over valid tokens."""
    mask = inputs.mask
    ell = inputs.raw_log_ratio
    ratio = ell.exp()
    adv = inputs.advantages
    loss = -adv * ratio
    with torch.no_grad():
        flat_valid = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        a = adv[mask].reshape(-1).cpu()
        lp = inputs.log_prob.detach()[mask].reshape(-1).cpu()
        selected = torch.zeros_like(mask)
        if len(a) > 0:
            cov = (a - a.mean()) * (lp - lp.mean())
            k = max(1, int(len(cov) * cfg.cov_fraction))
            top = flat_valid[torch.topk(cov, k, largest=True).indices.to(flat_valid.device)]
            selected.view(-1)[top] = True
    loss = torch.where(selected, loss + cfg.kl_coef * ell.abs(), loss)
    loss = torch.where(mask, loss, 0.0)
    none = _none(mask)
    return SurrogateOutput(loss, ell.detach(), none, none, {"actor/ppo_kl": _masked_mean(ell.detach().abs(), mask)})


def _gmpo(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """verl ``compute_policy_loss_geo_mean`` (GMPO, arXiv 2507.20673): per row, the geometric mean of the
    token ratios each clipped in log space to [−ε_low, ε_high] on the side the advantage's sign makes
    pessimistic, times the row's mean advantage Ā_i = Σ_t A_t / (n_i + 10⁻⁸); the loss is the mean over all B
    rows of −Ā_i·ρ̄_i (verl ignores ``loss_agg_mode``: use the aggregation ``all-seq-mean-token-sum``).  The
    gradient reaches every token of the row whose log-ratio the clip did not replace.  verl's metrics count
    the tokens with ℓ_t outside [−ε_low, ε_high]: ``pg_clipfrac`` those with A > 0, ``pg_clipfrac_lower``
    those with A < 0."""
    mask = inputs.mask
    ell = inputs.raw_log_ratio
    adv = inputs.advantages
    sgn = torch.sign(adv)
    ell_clamped = ell.clamp(-cfg.eps_low, cfg.eps_high)
    pessimistic = sgn * torch.minimum(sgn * ell, sgn * ell_clamped)
    n = mask.sum(-1).to(ell.dtype)
    log_row = torch.where(mask, pessimistic, 0.0).sum(-1) / (n + 1e-8)
    row_adv = torch.where(mask, adv, 0.0).sum(-1) / (n + 1e-8)
    row_loss = -row_adv * log_row.exp()  # [B]
    # the row loss spread over the row's tokens: the aggregation's token sum gives it back
    loss = torch.where(mask, (row_loss / n.clamp(min=1)).unsqueeze(-1), 0.0)
    outside = (ell.detach() != ell_clamped.detach()) & mask
    replaced = mask & (pessimistic.detach() != ell.detach())
    nf = mask.count_nonzero().clamp(min=1)
    metrics = {"actor/pg_clipfrac": (outside & (adv > 0)).count_nonzero() / nf,
               "actor/pg_clipfrac_lower": (outside & (adv < 0)).count_nonzero() / nf,
               "actor/ppo_kl": _kl_metric(inputs, ell)}
    log_weight = torch.where(mask, log_row.detach().unsqueeze(-1), 0.0)
    return SurrogateOutput(loss, log_weight, replaced & (adv > 0), replaced & (adv < 0), metrics)


def _reinforce(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """verl ``compute_policy_loss_gpg`` (GPG, arXiv 2504.02546): the plain score-function loss −A·log π (no
    importance weight); verl reports no metric."""
    mask = inputs.mask
    loss = torch.where(mask, -inputs.advantages * inputs.log_prob, 0.0)
    none = _none(mask)
    return SurrogateOutput(loss, torch.zeros_like(inputs.log_prob).detach(), none, none, {})


def _row_log_ratio(inputs: SurrogateInputs, cfg: RuleParameters) -> Tensor:
    """log ρ_{1:T} per row, [B] (per-token clamp where the config has one), no gradient."""
    ell = _clamped(inputs.raw_log_ratio.detach(), cfg.log_ratio_clamp)
    return torch.where(inputs.mask, ell, 0.0).sum(-1)


def _topr(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """TOPR (arXiv 2503.14286): no importance weight on A ≥ 0 rows; the sequence ratio truncated to [0, 1]
    (detached) on A < 0 rows: −A·sg(min(ρ_{1:T}, 1))·log π.  No token is dropped; the metric
    ``actor/pg_clipfrac_lower`` is the fraction of valid A < 0 tokens whose sequence ratio exceeds 1."""
    mask = inputs.mask
    adv = inputs.advantages
    log_row = _row_log_ratio(inputs, cfg).unsqueeze(-1)
    weight = torch.where(adv < 0, log_row.clamp(max=0.0).exp(), 1.0)
    loss = torch.where(mask, -adv * weight * inputs.log_prob, 0.0)
    none = _none(mask)
    nf = mask.count_nonzero().clamp(min=1)
    truncated = mask & (adv < 0) & (log_row > 0)
    metrics = {"actor/pg_clipfrac": _zero(inputs), "actor/pg_clipfrac_lower": truncated.count_nonzero() / nf,
               "actor/ppo_kl": _kl_metric(inputs, _clamped(inputs.raw_log_ratio, cfg.log_ratio_clamp))}
    return SurrogateOutput(loss, torch.where(mask, weight.log(), 0.0), none, none, metrics)


def _vespo(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """TRL ``loss_type="vespo"`` (arXiv 2602.10693): the detached sequence kernel
    φ(W) = exp(λ + k·log W − λ·W) (= W^k e^{λ(1−W)}, normalised so that φ(1) = 1; maximal at W = k/λ) times
    −A·log π, with log W = clamp(Σ_t clamp(ℓ_t, ±20), log 10⁻⁸, 20) the row's summed log-ratio and
    (k, λ) = (``kernel_power_pos``, ``kernel_rate_pos``) where A ≥ 0, the ``_neg`` pair otherwise."""
    mask = inputs.mask
    ell = _clamped(inputs.raw_log_ratio.detach(), cfg.log_ratio_clamp)
    log_w = torch.where(mask, ell, 0.0).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
    adv = inputs.advantages
    nonneg = adv >= 0
    k = torch.where(nonneg, _const(cfg.kernel_power_pos, ell), _const(cfg.kernel_power_neg, ell))
    lam = torch.where(nonneg, _const(cfg.kernel_rate_pos, ell), _const(cfg.kernel_rate_neg, ell)).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * log_w.exp()
    phi = torch.nan_to_num(log_phi.exp(), nan=0.0, posinf=0.0, neginf=0.0)
    loss = torch.where(mask, -adv * phi * inputs.log_prob, 0.0)
    none = _none(mask)
    metrics = {"actor/ppo_kl": _kl_metric(inputs, _clamped(inputs.raw_log_ratio, cfg.log_ratio_clamp))}
    return SurrogateOutput(loss, torch.where(mask, log_phi, 0.0), none, none, metrics)


_RULES = {
    "sapo": _sapo,
    "dppo_tv": lambda i, c: _dppo(i, c, "tv"),
    "dppo_kl": lambda i, c: _dppo(i, c, "kl"),
    "clip_cov": _clip_cov,
    "kl_cov": _kl_cov,
    "gmpo": _gmpo,
    "reinforce": _reinforce,
    "topr": _topr,
    "vespo": _vespo,
}


def surrogate(inputs: SurrogateInputs, cfg: RuleParameters) -> SurrogateOutput:
    """The per-token loss of ``cfg.clip`` (one of :data:`SURROGATE_RULES`) on ``inputs``."""
    if cfg.clip not in _RULES:
        raise ValueError(f"clip: {cfg.clip!r} is not a surrogate rule; expected one of {SURROGATE_RULES}")
    return _RULES[cfg.clip](inputs, cfg)
