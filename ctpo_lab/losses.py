"""Policy losses = ratio family ∘ clip rule ∘ aggregation, with named presets.

>>> from ctpo_lab.losses import policy_loss, PRESETS
>>> loss, metrics = policy_loss(log_prob, old_log_prob, advantages, response_mask, preset="ctpo")

Reference semantics: verl's ``vanilla`` PPO/GRPO loss, GSPO, and the CTPO authors'
``cum-token-cumprod-la`` loss.  For token t of row i, with X_t the family's log-weight value
(:mod:`ctpo_lab.ratios`), s_t = max(t, 1)^p and A the advantage::

    log w_t = min(sg(X_t) + log π_t − sg(log π_t), max_log_weight)
    loss_t  = max(−A·w_t, −A·clip(w_t))           (clip: PPO ratio window or log window [−ε_low s_t, ε_high s_t])
    loss_t  = min(−A·d_t, loss_t)   if A < 0       (dual clip; d_t = c or exp(ε_c s_t))
    loss    = aggregate(loss_t, mask)

Every preset field can be overridden by keyword: ``policy_loss(..., preset="ctpo", clip_exponent=0.0)``.

``diagnostics="basic"`` computes only verl's metric set (``actor/pg_loss``, ``actor/pg_clipfrac``,
``actor/pg_clipfrac_lower``, ``actor/ppo_kl``, verl's definitions); ``"full"`` (default) every metric of
:mod:`ctpo_lab.diagnostics`.  ``path="lean"`` (default) computes the values without autograd and forms the
per-token gradient −A·w·keep·(aggregation weight) in one pass (a custom autograd function, the same operations
in the same order as autograd's, so float32 results are bit-identical in practice); ``path="reference"`` is
autograd through the max/min/where of :func:`ctpo_lab.clipping.clipped_surrogate` (tests compare the two).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ctpo_lab import masks, ratios, surrogates
from ctpo_lab import rollout_correction as _rollout
from ctpo_lab.clipping import CLIP_RULES, ClipOutput, clip_window, clipped_surrogate
from ctpo_lab.diagnostics import basic_diagnostics, loss_diagnostics

__all__ = [
    "AGGREGATIONS",
    "LossConfig",
    "PRESETS",
    "PRESET_SOURCES",
    "ZOO_PRESETS",
    "ALL_RULES",
    "TRAINING_PRESETS",
    "FIGURE1_WINDOWS",
    "PolicyLossOutput",
    "DIAGNOSTICS",
    "PATHS",
    "resolve_config",
    "lean_path_applies",
    "aggregate",
    "compute_policy_loss",
    "policy_loss",
]

AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-sum-token-sum-norm",
    "all-seq-mean-token-mean",
    "all-seq-mean-token-sum",
)
#: ``diagnostics=`` of :func:`compute_policy_loss`: ``"basic"`` = the metrics verl computes (``actor/pg_loss``,
#: ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``, ``actor/ppo_kl``); ``"full"`` = :mod:`ctpo_lab.diagnostics`.
DIAGNOSTICS: tuple[str, ...] = ("basic", "full")
#: ``path=`` of :func:`compute_policy_loss`: the fused one-pass gradient or autograd through the clip rule.
PATHS: tuple[str, ...] = ("lean", "reference")


@dataclass(frozen=True)
class LossConfig:
    """A complete policy-loss specification (one preset).

    Attributes
    ----------
    name : preset name (informational).
    ratio : ratio family, one of :data:`ctpo_lab.ratios.RATIO_FAMILIES`.
    clip : clip rule, one of :data:`ctpo_lab.clipping.CLIP_RULES`.
    eps_low, eps_high : window half-widths (> 0); ratio space for ``ppo``/``detached_clip``, log space for
        ``log_window`` (multiplied by s_t = max(t,1)^clip_exponent).
    clip_exponent : p of the log window (0.5: CTPO-LA; 0: a fixed log window; −0.5: geometric mean).
    dual_clip : ``ppo``: ratio-space c > 1; ``log_window``: ε_c > 0 (bound exp(ε_c s_t)); None: off.
    aggregation : one of :data:`AGGREGATIONS`.
    norm_horizon : the constant of ``seq-mean-token-sum-norm`` (None: the padded length T of the batch).
    log_ratio_clamp : per-token clamp of ℓ_t (verl and CTPO use 20).
    max_log_weight : safety cap on log w_t before exponentiation (CTPO and GSPO code use 10; None: off).
    truncation : C (token_tis) or c̄ (truncated_cumulative), ratio space; the cap C of the detached weight
        min(r, C) of ``dppo_tv``/``dppo_kl``.
    tau_pos, tau_neg : SAPO's gate temperatures for A > 0 and A ≤ 0.
    cov_fraction, cov_low, cov_high, kl_coef : ``clip_cov``/``kl_cov``: the fraction of valid tokens selected, the
        covariance window of ``clip_cov``, the coefficient β of ``kl_cov``'s |ℓ| penalty.
    kernel_power_pos, kernel_rate_pos, kernel_power_neg, kernel_rate_neg : VESPO's (k, λ) for A ≥ 0 and A < 0.
    mask_rule : one of :data:`ctpo_lab.masks.MASK_RULES`, applied after the surrogate.
    mask_low, mask_high : ``ratio_band``: the kept ratio band [mask_low, mask_high].
    mask_threshold : δ of ``opsm``/``trust_region``/``cppo``, τ of ``m2po``.
    mask_statistic : ``trust_region``'s per-token statistic, ``"k2"`` or ``"k3"``.
    position_weight_min, prefix_budget : CPPO's w_min and δ_b.
    dp_size, batch_num_tokens, global_batch_size : verl's global-batch scaling of the aggregation (data-parallel
        size; valid tokens and sequences of the global mini-batch); the defaults are the local batch.
    """

    name: str = "custom"
    ratio: str = "token"
    clip: str = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_exponent: float = 0.0
    dual_clip: float | None = 3.0
    aggregation: str = "token-mean"
    norm_horizon: int | None = None
    log_ratio_clamp: float | None = ratios.DEFAULT_LOG_RATIO_CLAMP
    max_log_weight: float | None = None
    truncation: float | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    cov_fraction: float = 2e-4
    cov_low: float = 1.0
    cov_high: float = 5.0
    kl_coef: float = 0.1
    kernel_power_pos: float = 2.0
    kernel_rate_pos: float = 3.0
    kernel_power_neg: float = 3.0
    kernel_rate_neg: float = 2.0
    mask_rule: str = "none"
    mask_low: float | None = None
    mask_high: float | None = None
    mask_threshold: float | None = None
    mask_statistic: str = "k3"
    position_weight_min: float = 0.8
    prefix_budget: float = 0.02
    dp_size: int = 1
    batch_num_tokens: int | None = None
    global_batch_size: int | None = None

    def __post_init__(self) -> None:
        # the numeric fields' types first, before any check below compares or converts a value: a float field
        # takes an int or a float (not a bool) that a float can hold (an int of 400 digits cannot), an int field
        # an int (not a bool) ≤ 2**63 - 1 (it reaches torch as a signed 64-bit scalar)
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), str(f.type)
            optional = kind.endswith("| None")
            if v is None and optional:
                continue
            if kind.startswith("float"):
                expected = f"a finite number{' or None' if optional else ''}"
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise ValueError(f"{f.name}: expected {expected}, got {v!r}")
                if isinstance(v, numbers.Integral):
                    try:
                        float(v)
                    except OverflowError:
                        raise ValueError(f"{f.name}: expected {expected}, got an int too large for a float "
                                         f"(≈ 10^{int(math.log10(abs(v)))})") from None
            elif kind.startswith("int"):
                integral = isinstance(v, numbers.Integral)
                if isinstance(v, bool) or not integral or abs(v) > 2**63 - 1:
                    shown = f"≈ 10^{int(math.log10(abs(v)))}" if integral and abs(v) > 2**63 - 1 else repr(v)
                    raise ValueError(f"{f.name}: expected an int of magnitude ≤ 2**63 - 1"
                                     f"{' or None' if optional else ''}, got {shown}")
        if self.ratio not in ratios.RATIO_FAMILIES:
            raise ValueError(f"ratio: unknown ratio family {self.ratio!r}; expected one of {ratios.RATIO_FAMILIES}")
        if self.clip not in ALL_RULES:
            raise ValueError(f"clip: unknown clip rule {self.clip!r}; expected one of {ALL_RULES}")
        if self.mask_rule not in masks.MASK_RULES:
            raise ValueError(f"mask_rule: unknown mask rule {self.mask_rule!r}; expected one of {masks.MASK_RULES}")
        if self.mask_statistic not in masks.MASK_STATISTICS:
            raise ValueError(f"mask_statistic: expected one of {masks.MASK_STATISTICS}, got {self.mask_statistic!r}")
        needs = {"ratio_band": ("mask_low", "mask_high"), "opsm": ("mask_threshold",),
                 "trust_region": ("mask_threshold",), "m2po": ("mask_threshold",), "cppo": ("mask_threshold",)}
        for field in needs.get(self.mask_rule, ()):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{field}: mask rule {self.mask_rule!r} needs a finite number >= 0, got {v!r}")
        if self.mask_rule == "ratio_band" and not self.mask_low <= self.mask_high:
            raise ValueError(f"mask_high: expected mask_low <= mask_high, got [{self.mask_low}, {self.mask_high}]")
        for field in ("tau_pos", "tau_neg", "cov_fraction", "kernel_rate_pos", "kernel_rate_neg"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{field}: expected a finite number > 0, got {v!r}")
        for field in ("cov_low", "cov_high", "kl_coef", "kernel_power_pos", "kernel_power_neg", "prefix_budget"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{field}: expected a finite number, got {v!r}")
        if not 0 < self.position_weight_min <= 1:
            raise ValueError(f"position_weight_min: expected 0 < w_min <= 1, got {self.position_weight_min!r}")
        if not (isinstance(self.dp_size, int) and not isinstance(self.dp_size, bool) and self.dp_size >= 1):
            raise ValueError(f"dp_size: expected an int >= 1, got {self.dp_size!r}")
        for field in ("batch_num_tokens", "global_batch_size"):
            v = getattr(self, field)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{field}: expected a positive int or None, got {v!r}")
        if self.dp_size > 1 and self.aggregation == "token-mean" and self.batch_num_tokens is None:
            raise ValueError("batch_num_tokens: token-mean with dp_size > 1 needs the global number of valid tokens")
        if (self.dp_size > 1 and self.aggregation.startswith("seq-mean") and self.global_batch_size is None):
            raise ValueError("global_batch_size: a seq-mean aggregation with dp_size > 1 needs the global batch size")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: unknown aggregation {self.aggregation!r}; expected one of {AGGREGATIONS}")
        for field in ("eps_low", "eps_high"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{field}: expected a finite number > 0, got {v!r}")
        if self.clip in ("ppo", "gppo", "clip_cov") and self.eps_low >= 1:
            raise ValueError(f"eps_low: the PPO ratio window needs 0 < eps_low < 1, got {self.eps_low!r}")
        if not math.isfinite(self.clip_exponent):
            raise ValueError(f"clip_exponent: expected a finite number, got {self.clip_exponent!r}")
        if self.dual_clip is not None:
            if self.clip == "ppo" and not self.dual_clip > 1:
                raise ValueError(f"dual_clip: the PPO dual clip needs c > 1, got {self.dual_clip!r}")
            if self.clip == "log_window" and not self.dual_clip > 0:
                raise ValueError(f"dual_clip: the log-window dual clip needs ε_c > 0, got {self.dual_clip!r}")
        if self.clip in surrogates.SURROGATE_RULES and self.ratio != "token":
            raise ValueError(f"ratio: rule {self.clip!r} forms its own weight from the token log-ratios; "
                             f"use ratio='token', got {self.ratio!r}")
        if self.ratio in ("token_tis", "truncated_cumulative") and not (self.truncation or 0) > 0:
            raise ValueError(f"truncation: ratio {self.ratio!r} needs a truncation cap > 0, got {self.truncation!r}")
        for field in ("log_ratio_clamp", "max_log_weight", "truncation", "dual_clip"):
            v = getattr(self, field)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{field}: expected a finite number or None, got {v!r}")
            if field == "log_ratio_clamp" and v <= 0:
                raise ValueError(f"log_ratio_clamp: expected a clamp > 0 or None, got {v!r}")
        if self.norm_horizon is not None and not (isinstance(self.norm_horizon, int) and self.norm_horizon > 0):
            raise ValueError(f"norm_horizon: expected a positive int or None, got {self.norm_horizon!r}")


#: every value of ``LossConfig.clip``: the clip-window rules and the other surrogate rules
ALL_RULES: tuple[str, ...] = CLIP_RULES + surrogates.SURROGATE_RULES

_UNCLIPPED = dict(clip="none", dual_clip=None, aggregation="seq-mean-token-sum", max_log_weight=None)

#: Named presets: every estimator ctpo_lab trains, measures exactly or measures on a real model is one of these
#: (or a :class:`LossConfig` derived from one with overrides).
#:
#: * loss presets with the semantics of their reference implementations: ``grpo`` (verl ``vanilla``: token
#:   ratio, PPO clip 0.2/0.2, dual clip 3), ``dapo`` (ε_high = 0.28), ``gspo`` (geometric mean of the sequence
#:   ratio, clip 3e-4/4e-4, seq-mean-token-mean), ``ctpo`` (the CTPO authors' ``cum-token-cumprod-la``:
#:   cumulative ratio, log window [−0.025√t, 0.05√t], dual bound e^{0.05√t}, log-weight cap 10),
#:   ``ctpo_fixed`` (the same window without the √t), ``ctpo_geomean`` (L_t/t with the t^{−1/2} window),
#:   ``seq_is`` (full-sequence ratio with the PPO clip), ``cispo`` (weight clipped to [0, 5], gradient kept);
#: * the bare importance weights, no clip and no cap (the estimators Σ_t w_t A ∇log π_t of the theory):
#:   ``unclipped_token`` (r_t), ``unclipped_cumulative`` (ρ_{1:t}), ``unclipped_sequence`` (ρ_{1:T}),
#:   ``unclipped_sequence_geomean`` (ρ_{1:T}^{1/|y|}), ``unclipped_cumulative_geomean`` (ρ_{1:t}^{1/t}),
#:   ``tis`` (truncated token IS min(r_t, 2)), ``cumulative_tis`` (Π_{k≤t} min(r_k, 1));
#: * the two windows of the paper's Figure 1 on L_t (``ctpo`` without the dual clip): ``fixed_window``
#:   (w ∈ [0.5, 5]) and ``sqrt_t_window`` ([−0.025√t, 0.05√t]).
PRESETS: dict[str, LossConfig] = {
    "grpo": LossConfig(name="grpo", ratio="token", clip="ppo", eps_low=0.2, eps_high=0.2, dual_clip=3.0),
    "dapo": LossConfig(name="dapo", ratio="token", clip="ppo", eps_low=0.2, eps_high=0.28, dual_clip=3.0),
    "gspo": LossConfig(
        name="gspo", ratio="sequence_geomean", clip="ppo", eps_low=3e-4, eps_high=4e-4, dual_clip=None,
        aggregation="seq-mean-token-mean", max_log_weight=10.0, log_ratio_clamp=None,
    ),
    "ctpo": LossConfig(
        name="ctpo", ratio="cumulative", clip="log_window", eps_low=0.025, eps_high=0.05, clip_exponent=0.5,
        dual_clip=0.05, max_log_weight=10.0,
    ),
    "ctpo_fixed": LossConfig(
        name="ctpo_fixed", ratio="cumulative", clip="log_window", eps_low=0.025, eps_high=0.05,
        clip_exponent=0.0, dual_clip=0.05, max_log_weight=10.0,
    ),
    "ctpo_geomean": LossConfig(
        name="ctpo_geomean", ratio="cumulative_geomean", clip="log_window", eps_low=0.025, eps_high=0.05,
        clip_exponent=-0.5, dual_clip=0.05, max_log_weight=10.0,
    ),
    "seq_is": LossConfig(
        name="seq_is", ratio="sequence", clip="ppo", eps_low=0.2, eps_high=0.2, dual_clip=3.0, max_log_weight=10.0
    ),
    "cispo": LossConfig(name="cispo", ratio="token", clip="detached_clip", eps_low=0.2, eps_high=0.2, dual_clip=None),
    "unclipped_token": LossConfig(name="unclipped_token", ratio="token", **_UNCLIPPED),
    "unclipped_cumulative": LossConfig(name="unclipped_cumulative", ratio="cumulative", **_UNCLIPPED),
    "unclipped_sequence": LossConfig(name="unclipped_sequence", ratio="sequence", **_UNCLIPPED),
    "unclipped_sequence_geomean": LossConfig(
        name="unclipped_sequence_geomean", ratio="sequence_geomean", **_UNCLIPPED
    ),
    "unclipped_cumulative_geomean": LossConfig(
        name="unclipped_cumulative_geomean", ratio="cumulative_geomean", **_UNCLIPPED
    ),
    "tis": LossConfig(name="tis", ratio="token_tis", truncation=2.0, **_UNCLIPPED),
    "cumulative_tis": LossConfig(name="cumulative_tis", ratio="truncated_cumulative", truncation=1.0, **_UNCLIPPED),
    "fixed_window": LossConfig(
        name="fixed_window", ratio="cumulative", clip="log_window", eps_low=math.log(2.0), eps_high=math.log(5.0),
        clip_exponent=0.0, dual_clip=None, max_log_weight=10.0,
    ),
    "sqrt_t_window": LossConfig(
        name="sqrt_t_window", ratio="cumulative", clip="log_window", eps_low=0.025, eps_high=0.05,
        clip_exponent=0.5, dual_clip=None, max_log_weight=10.0,
    ),
    # ------------------------------------------------------------------ the field's estimator zoo
    "dr_grpo": LossConfig(name="dr_grpo", ratio="token", clip="ppo", dual_clip=None, log_ratio_clamp=None,
                          aggregation="seq-mean-token-sum-norm"),
    "bnpo": LossConfig(name="bnpo", ratio="token", clip="ppo", dual_clip=None, log_ratio_clamp=None,
                       aggregation="token-mean"),
    "gmpo": LossConfig(name="gmpo", ratio="token", clip="gmpo", eps_low=0.4, eps_high=0.4, dual_clip=None,
                       log_ratio_clamp=None, aggregation="all-seq-mean-token-sum"),
    "sapo": LossConfig(name="sapo", ratio="token", clip="sapo", dual_clip=None, aggregation="seq-mean-token-mean"),
    "gppo": LossConfig(name="gppo", ratio="token", clip="gppo", eps_low=0.2, eps_high=0.28, dual_clip=None),
    "topr": LossConfig(name="topr", ratio="token", clip="topr", dual_clip=None),
    "dppo_tv": LossConfig(name="dppo_tv", ratio="token", clip="dppo_tv", dual_clip=None, truncation=3.0),
    "dppo_kl": LossConfig(name="dppo_kl", ratio="token", clip="dppo_kl", dual_clip=None, truncation=3.0),
    "clip_cov": LossConfig(name="clip_cov", ratio="token", clip="clip_cov", dual_clip=None, log_ratio_clamp=None),
    "kl_cov": LossConfig(name="kl_cov", ratio="token", clip="kl_cov", dual_clip=None, log_ratio_clamp=None),
    "gpg": LossConfig(name="gpg", ratio="token", clip="reinforce", dual_clip=None),
    "luspo": LossConfig(
        name="luspo", ratio="sequence_geomean", clip="ppo", eps_low=3e-4, eps_high=4e-4, dual_clip=None,
        log_ratio_clamp=None, aggregation="all-seq-mean-token-sum",
    ),
    "vespo": LossConfig(name="vespo", ratio="token", clip="vespo", dual_clip=None),
    "opsm": LossConfig(name="opsm", ratio="token", clip="ppo", dual_clip=None, log_ratio_clamp=None,
                       mask_rule="opsm", mask_threshold=0.5),
    "trm": LossConfig(name="trm", ratio="token", clip="ppo", dual_clip=3.0, mask_rule="trust_region",
                      mask_statistic="k3", mask_threshold=0.05),
    "m2po": LossConfig(name="m2po", ratio="token", clip="none", dual_clip=None, mask_rule="m2po",
                       mask_threshold=0.04),
    "icepop": LossConfig(name="icepop", ratio="token", clip="none", dual_clip=None, mask_rule="ratio_band",
                         mask_low=0.5, mask_high=5.0),
    "cppo": LossConfig(name="cppo", ratio="token", clip="none", dual_clip=None, mask_rule="cppo",
                       mask_threshold=0.2, position_weight_min=0.8, prefix_budget=0.02),
}

#: One line per preset: the formula it implements and its source (paper; reference implementation).  Where the
#: source gives no default for a hyperparameter, the line says which value ctpo_lab chose.
PRESET_SOURCES: dict[str, str] = {
    "grpo": "token r_t, PPO clip [0.8, 1.2], dual clip 3, token-mean — verl vanilla (core_algos.py) with its defaults",
    "dapo": "grpo with ε_high = 0.28 (clip-higher) — arXiv 2503.14476 (DAPO); verl vanilla with clip_ratio_high=0.28",
    "gspo": "s_i = exp(mean_t ℓ_t) per row, PPO clip [1−3e-4, 1+4e-4], log s capped at 10, no per-token clamp, "
            "seq-mean-token-mean — arXiv 2507.18071; verl gspo",
    "ctpo": "ρ_{1:t} with log window [−0.025√t, 0.05√t], dual bound e^{0.05√t}, log-weight cap 10 — arXiv 2605.07331; "
            "the CTPO authors' cum-token-cumprod-la",
    "ctpo_fixed": "ctpo with the fixed log window [−0.025, 0.05] — arXiv 2605.07331 (ablation)",
    "ctpo_geomean": "ρ_{1:t}^{1/t} with the t^{−1/2} log window — arXiv 2605.07331; cum-token-geomean-la",
    "seq_is": "ρ_{1:T} with the PPO clip and dual clip 3 — the sequence-level IS baseline of arXiv 2605.07331",
    "cispo": "−A·sg(clip(r, 0.8, 1.2))·log π (gradient never dropped) — MiniMax-M1 (arXiv 2506.13585); verl cispo",
    "unclipped_token": "Σ_t r_t A ∇log π_t, no clip — the token IS estimator of the theory",
    "unclipped_cumulative": "Σ_t ρ_{1:t} A ∇log π_t — the unbiased prefix IS estimator",
    "unclipped_sequence": "Σ_t ρ_{1:T} A ∇log π_t — the full-sequence IS estimator",
    "unclipped_sequence_geomean": "Σ_t ρ_{1:T}^{1/|y|} A ∇log π_t — GSPO's weight without its clip",
    "unclipped_cumulative_geomean": "Σ_t ρ_{1:t}^{1/t} A ∇log π_t — the geometric-mean prefix weight",
    "tis": "Σ_t min(r_t, 2) A ∇log π_t — truncated IS (arXiv 2510.18855's TIS with C = 2)",
    "cumulative_tis": "Σ_t Π_{k≤t} min(r_k, 1) A ∇log π_t — truncated cumulative IS (c̄ = 1)",
    "fixed_window": "ρ_{1:t} with the fixed ratio window [0.5, 5] — Figure 1 of arXiv 2605.07331",
    "sqrt_t_window": "ρ_{1:t} with the √t log window, no dual clip — Figure 1 of arXiv 2605.07331",
    "dr_grpo": "token PPO clip [0.8, 1.2], no dual clip, Σ loss / (B·H) with H the padded length (TRL: "
               "max_completion_length; pass norm_horizon) — arXiv 2503.20783; TRL loss_type='dr_grpo'",
    "bnpo": "token PPO clip [0.8, 1.2], no dual clip, Σ loss / Σ mask over the local batch — TRL loss_type='bnpo'",
    "gmpo": "row: −Ā·exp(mean_t sign-pessimistic clip(ℓ_t, −0.4, 0.4)), mean over rows — arXiv 2507.20673; "
            "verl geo_mean with clip_ratio=0.4 (the GMPO paper's range)",
    "sapo": "−A·σ(τ(r−1))·4/τ, τ = 1.0 (A > 0) / 1.05, seq-mean-token-mean — arXiv 2511.20347; verl sapo",
    "gppo": "PPO clip [0.8, 1.28] forward; −A·sg(clip)·∇log π kept in the clipped region — arXiv 2508.07629 "
            "(Klear-Reasoner, ε values as its recipe; β₁ = β₂ = 1)",
    "topr": "A ≥ 0: −A·log π; A < 0: −A·sg(min(ρ_{1:T}, 1))·log π; token-mean (ctpo_lab's choice of "
            "normaliser) — arXiv 2503.14286",
    "dppo_tv": "−A·sg(min(r, 3))·log π on tokens with π−μ ≤ 0.2 (A > 0) / ≥ −0.2 (A ≤ 0) — arXiv 2602.04879; "
               "verl dppo_tv (clip_ratio_c = 3 from verl's ActorConfig)",
    "dppo_kl": "dppo_tv with the binary KL(μ‖π) ≤ 0.2 on the side that moves π away from μ — arXiv 2602.04879; "
               "verl dppo_kl",
    "clip_cov": "PPO clip, and max(⌊2e-4·N⌋, 1) random tokens with cov(A, log π) ∈ (1, 5) zeroed — "
                "arXiv 2505.22617; verl clip_cov (torch.randperm: seed the global generator)",
    "kl_cov": "−A·r, plus 0.1·|ℓ| on the max(⌊2e-4·N⌋, 1) tokens of largest cov(A, log π) — arXiv 2505.22617; "
              "verl kl_cov",
    "gpg": "−A·log π (no importance weight) — arXiv 2504.02546; verl gpg",
    "luspo": "GSPO's clipped sequence weight summed over the row's tokens (×|y|), mean over rows — "
             "arXiv 2602.05261; TRL loss_type='luspo' with GSPO's ε (TRL's default ε is 0.2)",
    "vespo": "−A·sg(W^k e^{λ(1−W)})·log π, W = ρ_{1:T} in [1e-8, e^20], (k, λ) = (2, 3) for A ≥ 0, (3, 2) "
             "otherwise, token-mean — arXiv 2602.10693; TRL loss_type='vespo'",
    "opsm": "token PPO clip [0.8, 1.2], rows with A < 0 and mean(log μ − log π) > 0.5 dropped — DeepSeek-V3.2 "
            "(arXiv 2512.02556); TRL off_policy_mask_threshold (0.5, the value TRL's documentation suggests)",
    "trm": "grpo, rows with max_t k3(ℓ_t) > 0.05 removed (trust-region masking; δ = 0.05 is ctpo_lab's "
           "choice) — arXiv 2512.23075; verl rollout_rs='seq_max_k3'",
    "m2po": "−A·r on the tokens left after removing the largest ℓ² until the batch mean ℓ² ≤ 0.04 (removed "
            "tokens leave the denominator) — arXiv 2510.01161; AReaL",
    "icepop": "−A·r·1[0.5 ≤ r ≤ 5] (masked tokens stay in the denominator) — IcePop (Ring-1T); verl "
              "decoupled_token_icepop's band",
    "cppo": "−A·r on tokens that pass CPPO's position-weighted, prefix-budgeted Binary-TV test (δ = 0.2, "
            "w_min = 0.8, δ_b = 0.02) — arXiv 2606.10968; the authors' implementations for verl and UniRL",
}

#: The two clip windows on L_t of the paper's Figure 1 (presets above).
FIGURE1_WINDOWS: tuple[str, ...] = ("fixed_window", "sqrt_t_window")

#: The presets that are losses one trains with (the rest are measurement estimators and windows).
#: The estimators of the field's zoo (beyond ctpo_lab's own and the bare weights), in the order of the tables.
ZOO_PRESETS: tuple[str, ...] = (
    "grpo", "dapo", "dr_grpo", "bnpo", "gspo", "gmpo", "sapo", "cispo", "gppo", "topr", "dppo_tv", "dppo_kl",
    "clip_cov", "kl_cov", "gpg", "luspo", "vespo", "opsm", "trm", "m2po", "icepop", "cppo",
)

TRAINING_PRESETS: tuple[str, ...] = ("grpo", "dapo", "gspo", "ctpo", "ctpo_fixed", "ctpo_geomean", "seq_is", "cispo")


def resolve_config(preset: str | LossConfig = "grpo", **overrides: object) -> LossConfig:
    """The preset's :class:`LossConfig` with keyword overrides applied (validated)."""
    if isinstance(preset, LossConfig):
        base = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        base = PRESETS[preset]
    else:
        raise TypeError(f"preset: expected a preset name or a LossConfig, got {type(preset).__name__}")
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides: unknown loss option(s) {unknown}; valid options are {sorted(fields)}")
    return dataclasses.replace(base, **overrides) if overrides else base


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, norm_horizon: int | None = None, *,
              dp_size: int = 1, batch_num_tokens: int | None = None, global_batch_size: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar (verl's ``agg_loss``, plus TRL's all-row means).

    With S_i = Σ_t loss_it·m_it, n_i = Σ_t m_it, R = #rows with n_i > 0 (or ``global_batch_size``),
    N = Σ n_i (or ``batch_num_tokens``), D = ``dp_size`` and H = ``norm_horizon`` (default: the padded T):

    ==========================  ==========================================================================
    token-mean                  Σ_i S_i / N · D
    token-sum                   Σ_i S_i · D
    seq-mean-token-mean         Σ_{n_i>0} (S_i / n_i) / R · D
    seq-mean-token-sum          Σ_i S_i / R · D
    seq-mean-token-sum-norm     Σ_i S_i / R · D / H        (verl ≥ 0.9; Dr. GRPO with H = max length)
    seq-sum-token-sum-norm      Σ_i S_i / H                (the earlier verl form, without / R)
    all-seq-mean-token-mean     Σ_i (S_i / max(n_i, 1)) / B    (TRL ``grpo``: empty rows count in B)
    all-seq-mean-token-sum      Σ_i S_i / B                (TRL ``luspo``; verl ``geo_mean``'s row mean)
    ==========================  ==========================================================================

    An empty mask gives 0 (with a zero gradient).
    """
    return _aggregate(per_token_loss, mask, mode, norm_horizon, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                      global_batch_size=global_batch_size)


def _row_counts(mask: Tensor) -> Tensor:
    """[B, T] bool → [B] int64 number of True per row, without an int64 [B, T] temporary (a bool ``sum`` or
    ``count_nonzero(dim)`` converts the whole mask to int64 first: a fresh 8-byte-per-token buffer)."""
    return mask.view(torch.uint8).sum(-1, dtype=torch.int32).to(torch.int64)


def _aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, norm_horizon: int | None,
               row_count: Tensor | None = None, n: Tensor | None = None, masked: bool = False, *,
               dp_size: int = 1, batch_num_tokens: int | None = None,
               global_batch_size: int | None = None) -> Tensor:
    """:func:`aggregate` with optional precomputed valid-token counts (``count_nonzero``: a bool ``sum``
    first converts the whole mask to int64); ``masked``: the loss is already 0 on masked-out tokens."""
    masked = per_token_loss if masked else torch.where(mask, per_token_loss, 0.0)
    scale = float(dp_size)
    if mode == "token-mean":
        if batch_num_tokens is not None:
            return masked.sum() / float(batch_num_tokens) * scale
        out = masked.sum() / (mask.count_nonzero() if n is None else n).clamp(min=1)
        return out * scale if dp_size != 1 else out
    if mode == "token-sum":
        return masked.sum() * scale if dp_size != 1 else masked.sum()
    row_sum = masked.sum(dim=-1)
    horizon = float(norm_horizon or mask.shape[-1])
    if mode == "seq-sum-token-sum-norm":
        return row_sum.sum() / horizon
    if mode.startswith("all-seq-mean"):
        rows_all = max(mask.shape[0], 1)
        if mode == "all-seq-mean-token-sum":
            return row_sum.sum() / rows_all
        row_count = _row_counts(mask) if row_count is None else row_count
        return (row_sum / row_count.clamp(min=1)).sum() / rows_all
    row_count = _row_counts(mask) if row_count is None else row_count
    rows = (row_count > 0).sum().clamp(min=1) if global_batch_size is None else float(global_batch_size)
    if mode == "seq-mean-token-mean":
        out = (row_sum / row_count.clamp(min=1)).sum() / rows
    elif mode == "seq-mean-token-sum":
        out = row_sum.sum() / rows
    elif mode == "seq-mean-token-sum-norm":
        out = row_sum.sum() / rows / horizon
    else:
        raise ValueError(f"aggregation: unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    return out * scale if dp_size != 1 else out


class PolicyLossOutput(NamedTuple):
    """Everything one loss evaluation computes, on the input's device (no host synchronisation)."""

    loss: Tensor  #: scalar
    log_ratio: Tensor  #: [B, T] ℓ_t (clamped; 0 on masked-out tokens)
    log_weight_value: Tensor  #: [B, T] X_t, the family's log-weight before the cap and the clip
    position: Tensor  #: [B, T] int64 t
    clip: ClipOutput  #: per-token loss, window bounds and clip masks
    mask: Tensor  #: [B, T] bool
    metrics: dict[str, Tensor]  #: 0-d tensors (see :mod:`ctpo_lab.diagnostics`)
    num_nonfinite: Tensor  #: 0-d count of NaN/inf inputs on valid tokens
    config: LossConfig


def _check_inputs(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor) -> None:
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages),
                    ("response_mask", response_mask)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if log_prob.ndim != 2:
        raise ValueError(f"log_prob: expected shape [B, T], got {tuple(log_prob.shape)}")
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"old_log_prob: shape {tuple(old_log_prob.shape)} does not match log_prob {tuple(log_prob.shape)}"
        )
    if response_mask.shape != log_prob.shape:
        raise ValueError(
            f"response_mask: shape {tuple(response_mask.shape)} does not match log_prob {tuple(log_prob.shape)}"
        )
    if response_mask.is_complex():
        raise TypeError(f"response_mask: expected bool or 0/1 integers/floats, got dtype {response_mask.dtype}")
    if response_mask.dtype != torch.bool and response_mask.numel():  # one host check, only for non-bool masks
        if not bool(((response_mask == 0) | (response_mask == 1)).all()):
            bad = response_mask[(response_mask != 0) & (response_mask != 1)].flatten()[:3].tolist()
            raise ValueError(f"response_mask: expected bool or exactly 0/1 values, got {bad}")
    if advantages.shape not in (log_prob.shape[:1], log_prob.shape):
        raise ValueError(
            f"advantages: expected shape [B] = {tuple(log_prob.shape[:1])} or [B, T] = {tuple(log_prob.shape)}, "
            f"got {tuple(advantages.shape)}"
        )


def compute_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    preset: str | LossConfig = "grpo",
    *,
    diagnostics: str = "full",
    path: str = "lean",
    rollout_log_prob: Tensor | None = None,
    rollout_correction: str | _rollout.RolloutCorrection | None = None,
    **overrides: object,
) -> PolicyLossOutput:
    """Device-side policy loss with all intermediate quantities (see :func:`policy_loss` for the arguments).

    Does not check for NaN/inf (that needs a host sync): read ``num_nonfinite`` together with the metrics.
    ``path="lean"`` (default) forms the per-token gradient in one pass (:class:`_FusedLoss`) for the clip-window
    rules without a mask rule and with the local aggregation; every other configuration, and ``"reference"``,
    is autograd through the rule (:func:`ctpo_lab.clipping.clipped_surrogate` or :mod:`ctpo_lab.surrogates`,
    then :mod:`ctpo_lab.masks`) — the same values and gradients; the tests compare the two.
    With ``diagnostics="basic"`` the lean path leaves
    ``position`` and the clip masks of ``clip`` as ``None`` (they are not computed).
    """
    cfg = resolve_config(preset, **overrides)
    if diagnostics not in DIAGNOSTICS:
        raise ValueError(f"diagnostics: expected one of {DIAGNOSTICS}, got {diagnostics!r}")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    _check_inputs(log_prob, old_log_prob, advantages, response_mask)
    if rollout_correction is not None:
        return _corrected_policy_loss(cfg, log_prob, old_log_prob, advantages, response_mask, diagnostics,
                                      rollout_log_prob, rollout_correction)
    if rollout_log_prob is not None:
        _check_rollout_log_prob(rollout_log_prob, log_prob)
    if path == "lean" and lean_path_applies(cfg):
        return _lean_policy_loss(cfg, log_prob, old_log_prob, advantages, response_mask, diagnostics)
    return _reference_policy_loss(cfg, log_prob, old_log_prob, advantages, response_mask, diagnostics)


def lean_path_applies(cfg: LossConfig) -> bool:
    """Whether ``path="lean"`` takes the fused one-pass gradient: it covers the clip-window rules without a
    mask rule, on the local batch (no global-batch scaling)."""
    return (cfg.clip in ("ppo", "log_window", "detached_clip", "none") and cfg.mask_rule == "none"
            and cfg.dp_size == 1 and cfg.batch_num_tokens is None and cfg.global_batch_size is None)


#: mask rules that remove the dropped tokens from the aggregation's denominators (they edit the response mask,
#: as verl's rejection sampling and AReaL's M2PO do); the others zero the dropped tokens' loss only
_DENOMINATOR_MASKS = ("trust_region", "m2po")


def _reference_policy_loss(cfg: LossConfig, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                           response_mask: Tensor, diagnostics: str, token_weight: Tensor | None = None
                           ) -> PolicyLossOutput:
    """Autograd through the rule: the clip window of :func:`ctpo_lab.clipping.clipped_surrogate` or a rule of
    :mod:`ctpo_lab.surrogates`, then the mask rule of :mod:`ctpo_lab.masks`, then :func:`aggregate`."""
    dtype = ratios.compute_dtype(log_prob.dtype)
    mask = response_mask.bool()
    lp = log_prob.to(dtype)
    old = old_log_prob.to(dtype).detach()
    adv = advantages.to(dtype).detach()
    if adv.ndim == 1:
        adv = adv.unsqueeze(-1).expand_as(lp)
    # lp − μ is non-finite iff either input is (inf − inf = NaN): one check covers both log-prob tensors
    num_nonfinite = (~torch.isfinite(lp.detach() - old) & mask).sum() + (~torch.isfinite(adv) & mask).sum()
    adv = torch.where(mask, adv, 0.0)
    lp_valid = torch.where(mask, lp, 0.0)  # NaN at masked-out positions never reaches a value or a gradient
    old_valid = torch.where(mask, old, 0.0)

    position = ratios.positions(mask)
    log_ratio = ratios.token_log_ratio(lp, old, mask, cfg.log_ratio_clamp)
    reference_metrics: dict[str, Tensor] = {}
    if cfg.clip in surrogates.SURROGATE_RULES:
        rule = surrogates.surrogate(
            surrogates.SurrogateInputs(lp_valid, old_valid, lp_valid - old_valid, adv, mask), cfg)
        x = rule.log_weight_value
        none = torch.zeros_like(mask)
        inf = torch.tensor(math.inf, dtype=dtype, device=lp.device)
        clip = ClipOutput(rule.per_token_loss, -inf, inf, rule.dropped_high, rule.dropped_low, none,
                          rule.dropped_high | rule.dropped_low)
        reference_metrics = rule.reference_metrics
    else:
        x = ratios.family_log_weight(cfg.ratio, log_ratio.detach(), mask, truncation=cfg.truncation,
                                     position=position)
        log_w = ratios.stop_gradient_log_weight(x, lp, mask, cfg.max_log_weight)
        clip = clipped_surrogate(
            cfg.clip, log_w, adv, position, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
            exponent=cfg.clip_exponent, dual_clip=cfg.dual_clip, log_prob=lp_valid,
        )
    per_token_loss = clip.per_token_loss
    agg_mask = mask
    keep = masks.token_keep(cfg, lp_valid, old_valid, log_ratio, adv, mask)
    if keep is not None:
        per_token_loss = torch.where(keep, per_token_loss, 0.0)
        if cfg.mask_rule in _DENOMINATOR_MASKS:
            agg_mask = keep
        clip = clip._replace(per_token_loss=per_token_loss)
    if token_weight is not None:  # a rollout correction's detached weights (zero on masked-out tokens)
        per_token_loss = per_token_loss * token_weight.to(per_token_loss.dtype)
        clip = clip._replace(per_token_loss=per_token_loss)
    loss = aggregate(per_token_loss, agg_mask, cfg.aggregation, cfg.norm_horizon, dp_size=cfg.dp_size,
                     batch_num_tokens=cfg.batch_num_tokens, global_batch_size=cfg.global_batch_size)
    with torch.no_grad():
        if diagnostics == "full":
            metrics = loss_diagnostics(
                log_ratio=log_ratio, log_weight_value=x, mask=mask, clipped_high=clip.clipped_high,
                clipped_low=clip.clipped_low, clipped_dual=clip.clipped_dual,
                clipped_term_active=clip.clipped_term_active, max_log_weight=cfg.max_log_weight,
            )
            if keep is not None:
                metrics["pg_update/mask/rate"] = (mask & ~keep).count_nonzero() / mask.count_nonzero().clamp(min=1)
            metrics.update(reference_metrics)
        elif cfg.clip in surrogates.SURROGATE_RULES:
            metrics = dict(reference_metrics)
        else:
            metrics = basic_diagnostics(
                log_ratio_sum=torch.where(mask, log_ratio.detach(), 0.0).sum(), num_tokens=mask.count_nonzero(),
                num_term_active=(clip.clipped_term_active & mask).count_nonzero(),
                num_dual=(clip.clipped_dual & mask).count_nonzero(),
            )
        metrics["actor/pg_loss"] = loss.detach()
    return PolicyLossOutput(loss, log_ratio, x, position, clip, mask, metrics, num_nonfinite, cfg)


def _check_rollout_log_prob(rollout_log_prob: object, log_prob: Tensor) -> None:
    if not isinstance(rollout_log_prob, Tensor):
        raise TypeError(f"rollout_log_prob: expected a torch.Tensor, got {type(rollout_log_prob).__name__}")
    if not rollout_log_prob.is_floating_point():
        raise TypeError(f"rollout_log_prob: expected a floating-point tensor, got dtype {rollout_log_prob.dtype}")
    if rollout_log_prob.shape != log_prob.shape:
        raise ValueError(f"rollout_log_prob: shape {tuple(rollout_log_prob.shape)} does not match log_prob "
                         f"{tuple(log_prob.shape)}")


def _corrected_policy_loss(cfg: LossConfig, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                           response_mask: Tensor, diagnostics: str, rollout_log_prob: Tensor | None,
                           rollout_correction: object) -> PolicyLossOutput:
    """The reference path with a rollout correction (:mod:`ctpo_lab.rollout_correction`): its weights multiply
    the per-token loss, its rejection edits the response mask (and so the aggregation's denominators), bypass
    mode anchors the loss at μ (``loss_type="reinforce"``: −A·w·log π with the preset's aggregation)."""
    if rollout_log_prob is None:
        raise ValueError("rollout_log_prob: a rollout_correction needs the sampler's log-probs [B, T]")
    _check_rollout_log_prob(rollout_log_prob, log_prob)
    corr = _rollout.compute_rollout_correction(log_prob, old_log_prob, rollout_log_prob, response_mask,
                                               rollout_correction)
    if corr.correction.bypass_mode and corr.correction.loss_type == "reinforce":
        cfg = dataclasses.replace(cfg, name=f"{cfg.name}+reinforce", ratio="token", clip="reinforce",
                                  dual_clip=None)
    out = _reference_policy_loss(cfg, log_prob, corr.anchor_log_prob, advantages, corr.response_mask, diagnostics,
                                 token_weight=corr.weights)
    out.metrics.update(corr.metrics)
    return out


def metrics_to_host(metrics: dict[str, Tensor], num_nonfinite: Tensor | None = None) -> dict[str, float]:
    """Move a dict of 0-d metric tensors to the host in one transfer; raise if inputs were non-finite."""
    names = list(metrics)
    values = torch.stack([metrics[k].to(torch.float64) for k in names]
                         + ([num_nonfinite.to(torch.float64)] if num_nonfinite is not None else []))
    host = values.cpu().tolist()
    if num_nonfinite is not None and host[-1] > 0:
        raise ValueError(
            f"log_prob/old_log_prob/advantages: {int(host[-1])} NaN or inf value(s) on valid tokens"
        )
    return dict(zip(names, host))


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    preset: str | LossConfig = "grpo",
    *,
    diagnostics: str = "full",
    path: str = "lean",
    rollout_log_prob: Tensor | None = None,
    rollout_correction: str | _rollout.RolloutCorrection | None = None,
    **overrides: object,
) -> tuple[Tensor, dict[str, float]]:
    """Importance-weighted clipped policy-gradient loss of a named preset.

    Parameters
    ----------
    log_prob : Tensor [B, T] float
        log π_θ(y_t|s_t) of the policy being optimised (may require grad). bf16/fp16 are computed in float32,
        float64 stays float64.
    old_log_prob : Tensor [B, T] float
        log μ(y_t|s_t) of the behaviour policy that sampled the tokens (treated as a constant).
    advantages : Tensor [B] or [B, T] float
        Advantage per response (broadcast over tokens) or per token.
    response_mask : Tensor [B, T] bool or 0/1
        Valid tokens. Values at masked-out positions are ignored (NaN allowed) and get a zero gradient.
    preset : str or LossConfig
        A key of :data:`PRESETS` (``grpo``, ``dapo``, ``gspo``, ``ctpo``, ``ctpo_fixed``, ``ctpo_geomean``,
        ``seq_is``, ``cispo``, the ``unclipped_*`` weights, ``tis``, ``cumulative_tis``, the Figure-1 windows)
        or a :class:`LossConfig`.
    diagnostics : {"full", "basic"}
        ``"full"``: every metric of :mod:`ctpo_lab.diagnostics`; ``"basic"``: only the metrics verl computes
        (``actor/pg_loss``, ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``, ``actor/ppo_kl``).
    path : {"lean", "reference"}
        ``"lean"``: values and the per-token gradient −A·w·keep formed in one pass by a custom autograd
        function; ``"reference"``: autograd through max/min/where (same values and gradients).
    rollout_log_prob : Tensor [B, T] float, optional
        log μ of the sampler (vLLM/SGLang) when it differs from the trainer's recompute ``old_log_prob`` = π_old.
        Without ``rollout_correction`` it is only checked.
    rollout_correction : str or RolloutCorrection, optional
        A key of :data:`ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS` (verl's ``decoupled_*`` / ``bypass_*``
        presets, ``trl_*``, ``areal_decoupled``, ``cumulative_*``), a
        :class:`~ctpo_lab.rollout_correction.RolloutCorrection` or verl's ``RolloutCorrectionConfig``.  Its
        detached weights (π_old/μ, truncated or masked) multiply the per-token loss before aggregation, its
        rejection removes tokens from the response mask (and the denominators), and bypass mode anchors the loss
        at μ; the ``rollout_corr/*`` (verl) and ``sampling/*`` (TRL) metrics are added.  Always the reference
        path.  None (default): nothing changes.
    **overrides
        Any :class:`LossConfig` field, e.g. ``eps_high=0.28`` or ``aggregation="seq-mean-token-mean"``.

    Returns
    -------
    loss : Tensor, scalar
        0 (with a zero gradient) when no token is valid, including B = 0 or T = 0; every metric is then 0.
    metrics : dict[str, float]
        The diagnostics of :mod:`ctpo_lab.diagnostics` plus ``actor/pg_loss``.

    Raises
    ------
    ValueError / TypeError
        Bad shapes or dtypes, a mask with values other than 0/1, unknown preset/option, invalid (NaN, inf,
        non-positive) clip parameters, NaN/inf on valid tokens, or finite inputs whose weights overflow the
        dtype to an infinite loss (set ``max_log_weight``).
    """
    out = compute_policy_loss(log_prob, old_log_prob, advantages, response_mask, preset, diagnostics=diagnostics,
                              path=path, rollout_log_prob=rollout_log_prob, rollout_correction=rollout_correction,
                              **overrides)
    host = metrics_to_host(out.metrics, out.num_nonfinite)
    if not math.isfinite(host["actor/pg_loss"]):  # finite inputs whose weights overflow the dtype
        raise ValueError(f"max_log_weight: the {out.config.ratio} weights overflow {out.loss.dtype} on these inputs "
                         f"(loss {host['actor/pg_loss']}); set max_log_weight (e.g. 10) or log_ratio_clamp")
    return out.loss, host


# ------------------------------------------------------------------------------------------ the lean path
class _FusedLoss(torch.autograd.Function):
    """The loss value computed outside autograd; the backward is ``backward_fn(grad)``: the per-token gradient
    formed in one pass (no graph through max/min/where)."""

    @staticmethod
    def forward(ctx, log_prob: Tensor, value: Tensor, backward_fn) -> Tensor:  # noqa: ANN001
        ctx.backward_fn = backward_fn
        return value.clone()

    @staticmethod
    @once_differentiable  # the gradient is formed without a graph: double backward raises instead of lying
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        return ctx.backward_fn(grad), None, None


_ROW_FAMILIES = ("sequence", "sequence_geomean")


def _aggregate_grad(grad: Tensor, mode: str, n: Tensor, row_count: Tensor, norm_horizon: int | None,
                    T: int) -> Tensor:
    """d loss / d loss_t of :func:`aggregate` on valid tokens, in autograd's order of operations (0-d or [B, 1]);
    the local batch only (the global-batch scaling takes the autograd path)."""
    if mode == "token-mean":
        return grad / n.clamp(min=1)
    if mode == "token-sum":
        return grad
    if mode == "seq-sum-token-sum-norm":
        return grad / float(norm_horizon or T)
    B = row_count.shape[0]
    if mode == "all-seq-mean-token-sum":
        return grad / max(B, 1)
    if mode == "all-seq-mean-token-mean":
        return ((grad / max(B, 1)) / row_count.clamp(min=1)).unsqueeze(-1)
    rows = (row_count > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        return (grad / float(norm_horizon or T)) / rows
    if mode == "seq-mean-token-mean":
        return ((grad / rows) / row_count.clamp(min=1)).unsqueeze(-1)
    return grad / rows


def _is_prefix(mask: Tensor, fmask: Tensor | None = None, row_count: Tensor | None = None,
               positions: Tensor | None = None) -> bool:
    """Every row's valid tokens are its first columns (no invalid → valid step), so t = column + 1 on them.

    With the mask as 0/1 floats ``fmask`` [B, T], its row counts r_b and ``positions`` = (1, …, T) in fmask's
    dtype: r distinct positions sum to at least 1 + … + r, with equality only for the first r, so a row is a
    prefix iff Σ_t fmask_bt·t = r_b(r_b + 1)/2 (one matrix-vector product; exact while every partial sum is an
    integer below 2^24 in float32)."""
    T = mask.shape[-1]
    if T < 2:
        return True
    if (fmask is not None and row_count is not None and positions is not None
            and (fmask.dtype == torch.float64 or T * (T + 1) < 2**25)):
        return bool(torch.equal((fmask @ positions).to(torch.int64), row_count * (row_count + 1) // 2))
    # an int8 first difference of 1 is an invalid → valid step; 3–4× faster than comparing bool slices
    return int(torch.diff(mask.view(torch.int8), dim=-1).max()) <= 0


def _keep_and_above(clamped: Tensor, unclamped: Tensor, as_float: bool, want_above: bool
                    ) -> tuple[Tensor, Tensor | None]:
    """``keep`` = (clamped == unclamped): the clamp did not bind; ``above`` = (clamped < unclamped): its upper bound
    did.  As 0/1 floats of ``unclamped``'s shape and dtype when ``as_float`` (on the CPU a comparison into a float
    tensor takes about a third of one into bool), else ``keep`` as bool and ``above`` None."""
    if not as_float:
        return clamped == unclamped, None
    keep = torch.eq(clamped, unclamped, out=torch.empty_like(unclamped))
    above = torch.lt(clamped, unclamped, out=torch.empty_like(unclamped)) if want_above else None
    return keep, above


def _lean_policy_loss(cfg: LossConfig, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                      response_mask: Tensor, diagnostics: str) -> PolicyLossOutput:
    """The values of the reference path; the gradient −A·w·keep·(aggregation weight) formed in one pass.

    For token t with value v_t of the clipped weight (loss_t = −A·v_t), the clip rules reduce to one clamp:
    PPO: v = clamp(w, lo_A, hi_A) with (lo_A, hi_A) = (−∞, 1+ε_high) for A > 0 and (1−ε_low, c) for A < 0
    (c = ∞ without the dual clip); log window: v = exp(clamp(log w, lo_A, hi_A)) with (−∞, ε_high·s_t) for
    A > 0 and (−ε_low·s_t, ε_c·s_t) for A < 0.  The gradient of loss_t in log π_t is −A·w where the clamp does
    not bind (and the log-weight cap does not), 0 elsewhere.  (At exact ties on a window boundary autograd
    splits the gradient in halves; the lean path takes the one-sided value.)  The sequence families are
    computed per row.
    """
    dtype = ratios.compute_dtype(log_prob.dtype)
    mask = response_mask.bool()
    lp = log_prob.to(dtype)
    full = diagnostics == "full"
    B, T = lp.shape
    inf = math.inf
    with torch.no_grad():
        old = old_log_prob.to(dtype)
        adv = advantages.to(dtype)
        row_adv = adv.ndim == 1
        dm = lp.detach() - old
        # "basic" on the CPU: one sum tells whether every input is finite.  Then masked-out entries are zeroed by
        # a float 0/1 multiply (exact: x·1 = x, x·0 = ±0), cheaper there than a bool masked_fill (≈ 9% of the
        # whole loss at [64, 4096]; no gain measured with "full"); any NaN/inf (even on masked-out tokens, where
        # x·0 would be NaN) takes the masked_fill path and the exact count.
        fmask = None
        if not full and dm.device.type == "cpu" and bool(torch.isfinite(dm.sum() + adv.sum())):
            fmask = mask.view(torch.uint8).to(dtype)  # via uint8: a bool → float cast is ≈ 6× slower here
            row_count = fmask.sum(-1).to(torch.int64)  # exact: T < 2^24
        else:
            row_count = _row_counts(mask)
        mask_float = fmask  # kept when fmask is dropped below (an overflowing cumulative sum)
        outside = ~mask if fmask is None else None  # for masked_fill; formed below if fmask is dropped
        n = row_count.sum()
        if row_adv:
            adv_bad = ((~torch.isfinite(adv)).to(torch.int64) * row_count).sum()
        else:
            adv_bad = (~torch.isfinite(adv) & mask).sum()
        if fmask is not None:
            dm = dm.mul_(fmask)
            num_nonfinite = adv_bad
        else:
            dm = dm.masked_fill_(outside, 0.0)  # in place on a fresh tensor: cheaper than where
            if dm.device.type == "cpu" and bool(torch.isfinite(dm.sum())):
                num_nonfinite = adv_bad
            else:
                num_nonfinite = (~torch.isfinite(dm) & mask).sum() + adv_bad
        if cfg.log_ratio_clamp is not None:
            dm.clamp_(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        log_ratio = dm
        # X_t (per row [B, 1] for the sequence families)
        if cfg.ratio == "token":
            x = dm
        elif cfg.ratio == "cumulative":
            x = dm.cumsum(-1)
            # a partial sum that overflowed stays non-finite up to the row's last column; none can overflow when
            # the log-ratios are clamped to ±c and T·c is finite
            bounded = cfg.log_ratio_clamp is not None and cfg.log_ratio_clamp * T < torch.finfo(dtype).max / 2
            if fmask is not None and T > 0 and (bounded or bool(torch.isfinite(x[:, -1].sum()))):
                x = x.mul_(fmask)
            else:
                fmask, outside = None, ~mask
                x = x.masked_fill_(outside, 0.0)
        elif cfg.ratio in _ROW_FAMILIES:
            x = dm.sum(-1)
            if cfg.ratio == "sequence_geomean":
                x = x / row_count.clamp(min=1).to(dtype)
            x = x.unsqueeze(-1)
        else:
            x = ratios.family_log_weight(cfg.ratio, dm, mask, truncation=cfg.truncation)
        cap_keep = cfg.max_log_weight is not None  # the cap's gradient mask x <= cap is needed
        inert_cap = False  # set below when the log window lies strictly under the cap
        if cfg.clip == "log_window" and cap_keep and cfg.dual_clip is not None:
            s_max = float(T) ** cfg.clip_exponent if cfg.clip_exponent > 0 else 1.0  # s_t <= T^p: no sync
            inert_cap = max(cfg.eps_high, cfg.dual_clip or 0.0) * s_max < cfg.max_log_weight * (1 - 1e-6)
        if inert_cap:  # the cap never binds where the window does not: no cap, no cap mask
            lw, cap_keep = x, False
        else:
            lw = x if cfg.max_log_weight is None else x.clamp(max=cfg.max_log_weight)
        # advantages: sign masks and −A ([B, 1] for per-row advantages)
        if row_adv:
            neg, pos, neg_adv = (adv < 0)[:, None], (adv > 0)[:, None], (-adv)[:, None]
        else:
            neg_adv = -torch.where(mask, adv, 0.0)
            neg, pos = neg_adv > 0, neg_adv < 0
        position = ratios.positions(mask) if full else None
        one = torch.ones((), dtype=dtype, device=lp.device)
        ninf, pinf = -inf * one, inf * one
        keep = keep_float = None
        dual = term = high = low = None
        # "basic" on the CPU, per-row advantages, a [B, T] log weight: the clip counts from per-row counts (their
        # row selection would synchronise a GPU; there the broadcasts are cheap)
        row_counts = not full and row_adv and lw.shape == (B, T) and lp.device.type == "cpu"
        # ... and with the mask as floats: the keep and dual masks as 0/1 floats too (see _keep_and_above)
        float_counts = row_counts and mask_float is not None and cfg.clip != "detached_clip"
        keep_all_float = None
        if cfg.clip == "detached_clip":
            lower, upper = clip_window("detached_clip", one, cfg.eps_low, cfg.eps_high, 0.0, dtype)
            w = lw.exp()
            cv = w.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
            grad_value = neg_adv * cv  # d loss_t / d log π_t = −A·clip(w) (the clipped weight multiplies the score)
            ptl = grad_value * lp.detach()  # verl's value −A·sg(clip(w))·log π (masked-out entries zeroed below)
            high, low = pos & (lw > upper), neg & (lw < lower)
            term = w != cv  # verl's clip fraction: outside the window on either side, whatever the sign of A
            dual = torch.zeros_like(term)
            num_term, num_dual = (term & mask).count_nonzero(), torch.zeros((), dtype=torch.int64)
        else:
            if cfg.clip == "log_window":
                prefix_positions = None  # t = 1..T on every row: s_t is one [T] row
                if cfg.clip_exponent != 0.0 and position is None and mask.device.type == "cpu":
                    prefix_positions = torch.arange(1, T + 1, device=lp.device).to(dtype)
                    if not _is_prefix(mask, mask_float, row_count, prefix_positions):
                        prefix_positions = None
                if cfg.clip_exponent == 0.0:
                    s = one
                elif prefix_positions is not None:
                    s = prefix_positions.pow_(cfg.clip_exponent)
                else:
                    position = ratios.positions(mask) if position is None else position
                    s = position.clamp(min=1).to(dtype).pow(cfg.clip_exponent)
                lower, upper = -cfg.eps_low * s, cfg.eps_high * s
                if cfg.dual_clip is None:
                    top = pinf
                else:
                    top = upper if cfg.dual_clip == cfg.eps_high else cfg.dual_clip * s
                # per-sign bounds as bound + offset (0 or ±inf per row): one broadcast add, no [B, T] where
                zero = torch.zeros((), dtype=dtype, device=lp.device)
                lo_a = lower + torch.where(neg, zero, ninf)
                if cfg.dual_clip is None:
                    hi_a = upper + torch.where(pos, zero, pinf)
                else:
                    base = upper if cfg.dual_clip == cfg.eps_high else torch.where(neg, top, upper)
                    # A = 0 rows: no bound (never counted as clipped), unless the cap was dropped (inert_cap):
                    # then they keep the upper bound, which keeps their (zero) loss finite, and are not counted
                    hi_a = base if inert_cap else base + torch.where(neg | pos, zero, pinf)
                # lo_a is a fresh [B, T] tensor: the clamp writes into it (a fresh output costs page faults here)
                z = torch.clamp(lw, lo_a, hi_a, out=lo_a) if lo_a.shape == lw.shape else lw.clamp(lo_a, hi_a)
                keep, above_float = _keep_and_above(z, lw, float_counts, cfg.dual_clip is not None)
                # on A < 0 rows, z < lw where the dual bound binds
                above = z < lw if row_counts and not float_counts and cfg.dual_clip is not None else None
                v = z.exp_()  # z is not needed any more
                pre = lw
            else:  # ppo / none: the clamp in ratio space
                if cfg.clip == "ppo":
                    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
                    lower, upper = clip_window("ppo", one, cfg.eps_low, cfg.eps_high, 0.0, dtype)
                else:
                    lo, hi = -inf, inf
                    lower, upper = ninf, pinf
                top = pinf if cfg.dual_clip is None else cfg.dual_clip * one
                lo_a = torch.where(neg, lo * one, ninf)
                hi_a = torch.where(neg, top, torch.where(pos, hi * one, pinf))
                w = lw.exp()
                if lp.device.type == "cpu":  # a clamp with [B, 1] bounds is ≈ 4× a maximum and a minimum here
                    v = torch.maximum(w, lo_a)
                    v = torch.minimum(v, hi_a, out=v)
                else:
                    v = w.clamp(lo_a, hi_a)
                keep, above_float = _keep_and_above(v, w, float_counts, cfg.dual_clip is not None)
                above = v < w if row_counts and not float_counts and cfg.dual_clip is not None else None
                pre = w
            grad_value = v  # where the clamp does not bind, v = w
            # counts: the clamp binds on pg2 > pg1 (A > 0 above the window, A < 0 below) or on the dual clip
            keep_m = None if float_counts else keep & mask
            # Basic counts on per-row advantages come from the [B] sign masks by row selection and per-row sums
            # of 0/1 floats (exact: T < 2^24): on the CPU a [B, T] & [B, 1] broadcast costs several same-shape
            # ops, and a per-row count_nonzero casts to a [B, T] int64.  On A < 0 rows the clamp's output is below
            # its input exactly where the input exceeds the dual bound (the lower bound never exceeds it).
            dual_tok = None
            if cfg.dual_clip is None:
                num_dual = torch.zeros((), dtype=torch.int64, device=lp.device)
            elif float_counts:
                num_dual = above_float.mul_(mask_float).sum(-1)[neg[:, 0]].to(torch.int64).sum()
            elif row_counts:
                num_dual = (above & mask)[neg[:, 0]].count_nonzero()
            else:
                dual_tok = neg & (pre > top)
                num_dual = (dual_tok & mask).count_nonzero()
            if row_counts:
                # also the backward's 0/1 gradient mask
                keep_float = keep.mul_(mask_float) if float_counts else keep_m.view(torch.uint8).to(dtype)
                kept_per_row = keep_float.sum(-1).to(torch.int64)
                if inert_cap:  # only rows with A != 0 count (A = 0 rows were bounded too)
                    signed = (neg | pos)[:, 0]
                    num_term = (row_count[signed] - kept_per_row[signed]).sum() - num_dual
                else:
                    num_term = n - kept_per_row.sum() - num_dual
            elif inert_cap:
                if row_adv:
                    signed = neg | pos  # [B, 1]
                    num_term = (row_count * signed[:, 0]).sum() - (keep_m & signed).count_nonzero() - num_dual
                else:
                    num_term = (mask & ~keep & (neg | pos)).count_nonzero() - num_dual
            else:
                num_term = n - keep_m.count_nonzero() - num_dual
            if full:
                changed = (~keep & (neg | pos)) if inert_cap else ~keep
                high, low = pos & (lw > upper), neg & (lw < lower)
                dual = torch.zeros((B, T), dtype=torch.bool, device=lp.device) if dual_tok is None else dual_tok
                term = changed if dual_tok is None else changed & ~dual_tok
            # the dual mask's buffer is dead once counted: the per-token loss is written into it
            ptl = torch.mul(neg_adv, v, out=above_float) if above_float is not None else neg_adv * v
        full_ptl = ptl.shape == (B, T)
        # finite inputs, token or cumulative X (0 off the mask): ptl is finite off the mask, a multiply zeroes it
        float_zero = fmask is not None and cfg.ratio in ("token", "cumulative")
        if full_ptl:  # a fresh [B, T] tensor: zero it in place (= the reference's values, where A is 0)
            ptl = ptl.mul_(fmask) if float_zero else ptl.masked_fill_(~mask if outside is None else outside, 0.0)
        else:  # one value per row (sequence families, per-row advantages)
            ptl = ptl.expand(B, T)
        loss_value = _aggregate(ptl, mask, cfg.aggregation, cfg.norm_horizon, row_count, n, masked=full_ptl)
        if float_counts:
            keep_all = None
            keep_all_float = keep_float
            if cap_keep:
                below_cap = torch.le(x, cfg.max_log_weight, out=torch.empty_like(keep_float))
                keep_all_float = below_cap.mul_(keep_float)
        else:
            keep_all = mask if keep is None else keep_m
            if cap_keep:
                keep_all = keep_all & (x <= cfg.max_log_weight)
        aggregation, norm_horizon = cfg.aggregation, cfg.norm_horizon
        if cfg.clip == "detached_clip":
            def backward_fn(grad: Tensor) -> Tensor:
                g = _aggregate_grad(grad, aggregation, n, row_count, norm_horizon, T)
                return (g * grad_value).expand(B, T).masked_fill(~keep_all, 0.0)
        else:
            # the float mask is dead after the forward: the first backward writes the gradient into it (handed
            # over, so autograd can take it as the leaf's .grad; a fresh [B, T] output is cold in the cache)
            spare = [mask_float] if float_counts else []

            def backward_fn(grad: Tensor) -> Tensor:
                g = _aggregate_grad(grad, aggregation, n, row_count, norm_horizon, T)
                g_adv = g * neg_adv
                out = spare.pop() if spare and torch.result_type(g_adv, grad_value) == grad_value.dtype else None
                c = g_adv * grad_value if out is None else torch.mul(g_adv, grad_value, out=out)
                if c.shape != (B, T):
                    return torch.where(keep_all, c, 0.0)
                finite = float_zero and bool(torch.isfinite(g).all())  # c is finite wherever keep_all is False
                if keep_all_float is not None:  # keep_all as 0/1 floats
                    return c.mul_(keep_all_float) if finite else c.masked_fill_(keep_all_float == 0, 0.0)
                if finite:
                    if keep_float is not None and not cap_keep:  # keep_float is keep_all as 0/1
                        return c.mul_(keep_float)
                    return c.mul_(keep_all.view(torch.uint8).to(c.dtype))
                return c.masked_fill_(~keep_all, 0.0)
        if x.shape != (B, T):
            x = torch.where(mask, x.expand(B, T), 0.0)
        if full:
            metrics = loss_diagnostics(
                log_ratio=log_ratio, log_weight_value=x, mask=mask, clipped_high=high.expand(B, T),
                clipped_low=low.expand(B, T), clipped_dual=dual.expand(B, T),
                clipped_term_active=term.expand(B, T), max_log_weight=cfg.max_log_weight,
            )
            clip = ClipOutput(ptl, lower, upper, high.expand(B, T), low.expand(B, T), dual.expand(B, T),
                              term.expand(B, T))
        else:
            metrics = basic_diagnostics(log_ratio_sum=dm.sum(), num_tokens=n, num_term_active=num_term,
                                        num_dual=num_dual)
            clip = ClipOutput(ptl, lower, upper, None, None, None, None)
        metrics["actor/pg_loss"] = loss_value
    loss = _FusedLoss.apply(lp, loss_value, backward_fn)
    return PolicyLossOutput(loss, log_ratio, x, position, clip, mask, metrics, num_nonfinite, cfg)
