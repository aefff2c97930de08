"""Rollout–training mismatch correction: the sampler μ = π_roll as a third policy in every loss.

The sampler (vLLM/SGLang, often bf16, possibly stale) gives log μ_t (``rollout_log_prob``); the trainer's
recompute gives log π_old,t (``old_log_prob``); the loss is computed on log π_θ,t.  With ℓ_t = log π_old,t −
log μ_t on valid tokens (0 elsewhere), a :class:`RolloutCorrection` defines

* detached **importance weights** w [B, T] that multiply the per-token policy loss before aggregation (verl's
  ``rollout_is_weights``; zero on masked-out tokens):

  ==============  ===================================================================================
  ``token``       r_t = exp(clamp(ℓ_t, ±safety_bound))
  ``sequence``    ρ_{1:T} = exp(clamp(Σ_t ℓ_t, ±safety_bound)), broadcast to the row's tokens
  ``cumulative``  ρ_{1:t} = exp(L_t), L_t = Σ_{k≤t} ℓ_k, with the log window [−ε_low s_t, ε_high s_t],
                  s_t = max(t, 1)^p (p = ``cumulative_exponent``; p = 0 is a fixed window) — new, no
                  framework has it
  ==============  ===================================================================================

  then ``truncate`` (TIS: min(w, U), and max(w, lower) when a lower bound is given; the cumulative level
  clamps L_t to its window) or ``mask`` (MIS / IcePop: w·1[lower ≤ w ≤ U], the zeroed tokens stay in the
  aggregation's denominator; the cumulative level zeroes the tokens whose L_t leaves the window).  verl's
  ``rollout_is_threshold`` picks the mode: a number U is TIS, a ``"lo_hi"`` string is IcePop;
  ``rollout_is_mode`` and ``rollout_is_threshold_lower`` express TRL's and AReaL's variants.
  ``rollout_is_batch_normalize`` divides by the batch mean (over tokens; over rows for ``sequence``).
* a **rejection mask** (verl's ``rollout_rs``, comma-chained options, all must pass): per token k1 = −ℓ,
  k2 = ℓ²/2, k3 = e^ℓ − 1 − ℓ (ℓ clamped to ±20); ``token_k*`` tests each token, ``seq_sum_k*`` /
  ``seq_mean_k*`` / ``seq_max_k{2,3}`` the row's masked sum / mean / max and reject the whole row.  k1 options
  keep log(lo) ≤ stat ≤ log(hi) (ratio-space ``"lo_hi"``; a single U means lo = 1/U), k2/k3 keep stat ≤ U.
  Rejected tokens leave the response mask, hence the aggregation's denominators (verl's modified
  ``response_mask``).
* ``bypass_mode`` (verl): π_old is not recomputed; the loss is anchored at μ (the PPO ratio is π_θ/μ) and the
  weights / rejection are computed on sg(log π_θ) − log μ.  ``loss_type="ppo_clip"`` applies the rejection
  only (the ratio already corrects); ``"reinforce"`` is −A·w·log π_θ with the preset's aggregation.

Metrics reproduce verl's ``compute_rollout_correction_and_rejection_mask`` (names ``rollout_corr/…``, verl's
definitions, including where verl averages over all rows or over the rows with a valid token) and TRL's
``sampling/…`` names.  Facts from verl 0.9 ``rollout_corr_helper.py`` / ``config/algorithm.py``, TRL 1.16
``grpo_trainer.py`` and AReaL's ``ppo_actor_loss_fn``; code written from those facts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ctpo_lab import ratios

__all__ = [
    "SAFETY_BOUND",
    "ROLLOUT_IS_LEVELS",
    "ROLLOUT_IS_MODES",
    "ROLLOUT_RS_OPTIONS",
    "LOSS_TYPES",
    "VERL_FIELDS",
    "RolloutCorrection",
    "RolloutCorrectionOutput",
    "RejectionOption",
    "ROLLOUT_CORRECTIONS",
    "ROLLOUT_CORRECTION_SOURCES",
    "resolve_rollout_correction",
    "parse_is_threshold",
    "parse_rejection",
    "rollout_is_weights",
    "rollout_rejection_mask",
    "offpolicy_metrics",
    "sampling_metrics",
    "compute_rollout_correction",
]

#: verl's bound on log-ratios before exponentiation (``SAFETY_BOUND``)
SAFETY_BOUND = 20.0
ROLLOUT_IS_LEVELS: tuple[str, ...] = ("token", "sequence", "cumulative")
ROLLOUT_IS_MODES: tuple[str, ...] = ("truncate", "mask")
#: verl's ``SUPPORTED_ROLLOUT_RS_OPTIONS`` (there is no ``seq_max_k1``)
ROLLOUT_RS_OPTIONS: tuple[str, ...] = (
    "token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3",
)
LOSS_TYPES: tuple[str, ...] = ("ppo_clip", "reinforce")
#: the fields of verl's ``RolloutCorrectionConfig``
VERL_FIELDS: tuple[str, ...] = (
    "rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize", "rollout_rs", "rollout_rs_threshold",
    "bypass_mode", "loss_type",
)
_ESS_EPS = 1e-8  # verl's ESS normalises by (mean + 1e-8)
_BATCH_NORM_MIN = 1e-8  # verl skips the batch normalisation when the mean is not above 1e-8


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_is_threshold(spec: object) -> tuple[float, float | None]:
    """verl's ``rollout_is_threshold``: a number (or numeric string) U → (U, None) (TIS); ``"lo_hi"`` →
    (hi, lo) (IcePop).  Bounds must be > 0 and lo ≤ hi; ``math.inf`` is allowed as U (TRL's clip_max=None)."""
    if isinstance(spec, bool) or not (_is_number(spec) or isinstance(spec, str)):
        raise ValueError(f"rollout_is_threshold: expected a number or a 'lower_upper' string, got {spec!r}")
    lower = None
    try:
        if isinstance(spec, str):
            text = spec.strip()
            if "_" in text:
                lo, hi = text.split("_", 1)
                lower, upper = float(lo), float(hi)
            else:
                upper = float(text)
        else:
            upper = float(spec)
    except ValueError:
        raise ValueError(f"rollout_is_threshold: cannot parse {spec!r} as a number or 'lower_upper'") from None
    if math.isnan(upper) or not upper > 0:
        raise ValueError(f"rollout_is_threshold: the upper bound must be > 0, got {spec!r}")
    if lower is not None and (not math.isfinite(lower) or not 0 < lower <= upper):
        raise ValueError(f"rollout_is_threshold: expected 0 < lower <= upper, got {spec!r}")
    return upper, lower


class RejectionOption(NamedTuple):
    """One parsed ``rollout_rs`` option: statistic ``k1``/``k2``/``k3``, level ``token``/``sum``/``mean``/``max``,
    bounds in the statistic's space (k1: log of the ratio-space bounds; k2/k3: lower is None)."""

    name: str
    statistic: str
    level: str
    lower: float | None
    upper: float


def parse_rejection(rollout_rs: object, threshold: object) -> tuple[RejectionOption, ...]:
    """verl's ``rollout_rs`` (comma-separated, duplicates dropped) with ``rollout_rs_threshold`` (one value shared
    by every option or one per option, comma-separated; k1: ``"lo_hi"`` ratio bounds or U meaning lo = 1/U)."""
    if rollout_rs is None:
        return ()
    if not isinstance(rollout_rs, str):
        raise ValueError(f"rollout_rs: expected None or a comma-separated string, got {rollout_rs!r}")
    names: list[str] = []
    for part in rollout_rs.split(","):
        opt = part.strip()
        if not opt:
            continue
        if opt not in ROLLOUT_RS_OPTIONS:
            raise ValueError(f"rollout_rs: unknown option {opt!r}; expected options from {ROLLOUT_RS_OPTIONS}")
        if opt not in names:
            names.append(opt)
    if not names:
        raise ValueError(f"rollout_rs: no option in {rollout_rs!r}")
    if threshold is None:
        raise ValueError("rollout_rs_threshold: required when rollout_rs is set")
    if isinstance(threshold, bool) or not (_is_number(threshold) or isinstance(threshold, str)):
        raise ValueError(f"rollout_rs_threshold: expected a number or a string, got {threshold!r}")
    specs = [str(threshold)] if _is_number(threshold) else [p.strip() for p in threshold.split(",") if p.strip()]
    if len(specs) not in (1, len(names)):
        raise ValueError(f"rollout_rs_threshold: expected one value or {len(names)} (one per option), got "
                         f"{threshold!r}")
    specs = specs * len(names) if len(specs) == 1 else specs
    out = []
    for name, spec in zip(names, specs):
        stat = name[-2:]
        level = "token" if name.startswith("token") else name.split("_")[1]
        try:
            if stat == "k1":
                lo, hi = (float(x) for x in spec.split("_", 1)) if "_" in spec else (None, float(spec))
                lo = 1.0 / hi if lo is None else lo
                if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                    raise ValueError
                out.append(RejectionOption(name, stat, level, math.log(lo), math.log(hi)))
            else:
                if "_" in spec:
                    raise ValueError
                hi = float(spec)
                if not (math.isfinite(hi) and hi > 0):
                    raise ValueError
                out.append(RejectionOption(name, stat, level, None, hi))
        except ValueError:
            need = "'lower_upper' ratio bounds 0 < lower <= upper or one upper bound > 0" if stat == "k1" else \
                "a single finite upper bound > 0"
            raise ValueError(f"rollout_rs_threshold: option {name!r} needs {need}, got {spec!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class RolloutCorrection:
    """A rollout correction: verl's ``RolloutCorrectionConfig`` fields (same names and defaults) plus the
    variants of TRL, AReaL and the cumulative level.

    Attributes
    ----------
    name : informational.
    rollout_is : None (no weights: rejection and metrics only), ``"token"``, ``"sequence"`` or ``"cumulative"``.
    rollout_is_threshold : U (TIS) or ``"lo_hi"`` (IcePop); unused by ``cumulative``.
    rollout_is_batch_normalize : divide the weights by their batch mean (tokens; rows for ``sequence``).
    rollout_rs, rollout_rs_threshold : verl's rejection options and thresholds (see :func:`parse_rejection`).
    bypass_mode : anchor the loss at μ (no π_old); weights and rejection on sg(log π_θ) − log μ.
    loss_type : bypass mode's loss, ``"ppo_clip"`` (the preset on π_θ/μ, weights not applied) or ``"reinforce"``
        (−A·w·log π_θ).
    rollout_is_mode : None (verl: from the threshold's form), ``"truncate"`` or ``"mask"``.
    rollout_is_threshold_lower : a lower bound for ``truncate`` (TRL's clip_min: max(w, lower)) or ``mask``
        (keep w ≥ lower); not together with a ``"lo_hi"`` threshold.
    safety_bound : clamp of log w before exponentiation (verl: 20; TRL and AReaL: None).
    cumulative_eps_low, cumulative_eps_high, cumulative_exponent : the cumulative level's log window
        [−ε_low s_t, ε_high s_t], s_t = max(t, 1)^p.
    """

    name: str = "custom"
    rollout_is: str | None = "sequence"
    rollout_is_threshold: str | float = 2.0
    rollout_is_batch_normalize: bool = False
    rollout_rs: str | None = None
    rollout_rs_threshold: str | float | None = None
    bypass_mode: bool = False
    loss_type: str = "ppo_clip"
    rollout_is_mode: str | None = None
    rollout_is_threshold_lower: float | None = None
    safety_bound: float | None = SAFETY_BOUND
    cumulative_eps_low: float = 0.025
    cumulative_eps_high: float = 0.05
    cumulative_exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.rollout_is is not None and self.rollout_is not in ROLLOUT_IS_LEVELS:
            raise ValueError(f"rollout_is: expected None or one of {ROLLOUT_IS_LEVELS}, got {self.rollout_is!r}")
        _, lo = parse_is_threshold(self.rollout_is_threshold)
        for field in ("rollout_is_batch_normalize", "bypass_mode"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}: expected a bool, got {getattr(self, field)!r}")
        parse_rejection(self.rollout_rs, self.rollout_rs_threshold)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.loss_type == "reinforce" and not self.bypass_mode:
            raise ValueError("loss_type: 'reinforce' is bypass mode's loss; set bypass_mode=True")
        if self.rollout_is_mode is not None and self.rollout_is_mode not in ROLLOUT_IS_MODES:
            raise ValueError(f"rollout_is_mode: expected None or one of {ROLLOUT_IS_MODES}, "
                             f"got {self.rollout_is_mode!r}")
        low = self.rollout_is_threshold_lower
        if low is not None:
            if not _is_number(low) or not math.isfinite(low) or low < 0:
                raise ValueError(f"rollout_is_threshold_lower: expected a finite number >= 0 or None, got {low!r}")
            if lo is not None:
                raise ValueError("rollout_is_threshold_lower: the 'lo_hi' threshold already sets the lower bound")
            if low > parse_is_threshold(self.rollout_is_threshold)[0]:
                raise ValueError(f"rollout_is_threshold_lower: {low} exceeds the upper bound")
        sb = self.safety_bound
        if sb is not None and (not _is_number(sb) or not math.isfinite(sb) or sb <= 0):
            raise ValueError(f"safety_bound: expected a finite number > 0 or None, got {sb!r}")
        for field in ("cumulative_eps_low", "cumulative_eps_high"):
            v = getattr(self, field)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{field}: expected a finite number > 0, got {v!r}")
        if not _is_number(self.cumulative_exponent) or not math.isfinite(self.cumulative_exponent):
            raise ValueError(f"cumulative_exponent: expected a finite number, got {self.cumulative_exponent!r}")

    @property
    def is_bounds(self) -> tuple[str, float | None, float]:
        """(mode, lower, upper) of the weight rule (``cumulative``: the mode only is used)."""
        upper, lower = parse_is_threshold(self.rollout_is_threshold)
        mode = self.rollout_is_mode or ("mask" if lower is not None else "truncate")
        return mode, (lower if lower is not None else self.rollout_is_threshold_lower), upper

    @property
    def rejection(self) -> tuple[RejectionOption, ...]:
        return parse_rejection(self.rollout_rs, self.rollout_rs_threshold)

    @classmethod
    def from_verl(cls, config: object, name: str = "custom") -> RolloutCorrection:
        """From verl's ``RolloutCorrectionConfig`` (or anything with its attributes) or a mapping of its fields;
        missing fields take verl's defaults, unknown mapping keys are an error."""
        if isinstance(config, Mapping):  # Hydra's private keys (``_target_``) are not fields
            fields = {k: v for k, v in config.items() if not str(k).startswith("_")}
            unknown = sorted(set(fields) - set(VERL_FIELDS) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"rollout_correction: unknown field(s) {unknown}; expected {VERL_FIELDS}")
            return cls(**{"name": name, **fields})
        return cls(name=name, **{f: getattr(config, f) for f in VERL_FIELDS if hasattr(config, f)})


def _verl(name: str, **kw: object) -> RolloutCorrection:
    return RolloutCorrection(name=name, **kw)


_GEO = dict(rollout_rs="seq_mean_k1", rollout_rs_threshold="0.999_1.001")
_K3 = dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01)
_BYPASS_PG = dict(bypass_mode=True, loss_type="reinforce")
_BYPASS_CLIP = dict(bypass_mode=True, loss_type="ppo_clip")

#: Named corrections: verl's ``RolloutCorrectionConfig`` presets with their default thresholds, TRL's four
#: ``vllm_importance_sampling_mode`` values (clip_max 3.0, no clip_min), AReaL's decoupled PPO behaviour weight
#: (π_prox/π_behav, tokens above the cap 5 zeroed; AReaL's default loss has no dual clip: ``dual_clip=None``),
#: and the cumulative level.
ROLLOUT_CORRECTIONS: dict[str, RolloutCorrection] = {
    "disabled": _verl("disabled", rollout_is=None),
    "decoupled_token_is": _verl("decoupled_token_is", rollout_is="token", rollout_is_threshold=2.0),
    "decoupled_seq_is": _verl("decoupled_seq_is", rollout_is="sequence", rollout_is_threshold=2.0),
    "decoupled_token_icepop": _verl("decoupled_token_icepop", rollout_is="token", rollout_is_threshold="0.5_5.0"),
    "decoupled_seq_is_rs": _verl("decoupled_seq_is_rs", rollout_is="sequence", rollout_is_threshold=2.0,
                                 rollout_rs="seq_sum_k1", rollout_rs_threshold="0.5_2.0"),
    "decoupled_geo_rs": _verl("decoupled_geo_rs", rollout_is=None, **_GEO),
    "decoupled_geo_rs_seq_tis": _verl("decoupled_geo_rs_seq_tis", rollout_is="sequence", **_GEO),
    "decoupled_geo_rs_token_tis": _verl("decoupled_geo_rs_token_tis", rollout_is="token", **_GEO),
    "decoupled_k3_rs": _verl("decoupled_k3_rs", rollout_is=None, **_K3),
    "decoupled_k3_rs_seq_tis": _verl("decoupled_k3_rs_seq_tis", rollout_is="sequence", **_K3),
    "decoupled_k3_rs_token_tis": _verl("decoupled_k3_rs_token_tis", rollout_is="token", **_K3),
    "bypass_ppo_clip": _verl("bypass_ppo_clip", rollout_is=None, **_BYPASS_CLIP),
    "bypass_ppo_clip_geo_rs": _verl("bypass_ppo_clip_geo_rs", rollout_is=None, **_GEO, **_BYPASS_CLIP),
    "bypass_ppo_clip_k3_rs": _verl("bypass_ppo_clip_k3_rs", rollout_is=None, **_K3, **_BYPASS_CLIP),
    "bypass_pg_is": _verl("bypass_pg_is", rollout_is="sequence", rollout_is_threshold=2.0, **_BYPASS_PG),
    "bypass_pg_token_icepop": _verl("bypass_pg_token_icepop", rollout_is="token", rollout_is_threshold="0.5_5.0",
                                    **_BYPASS_PG),
    "bypass_pg_geo_rs": _verl("bypass_pg_geo_rs", rollout_is=None, **_GEO, **_BYPASS_PG),
    "bypass_pg_geo_rs_seq_tis": _verl("bypass_pg_geo_rs_seq_tis", rollout_is="sequence", **_GEO, **_BYPASS_PG),
    "bypass_pg_geo_rs_token_tis": _verl("bypass_pg_geo_rs_token_tis", rollout_is="token", **_GEO, **_BYPASS_PG),
    # TRL vllm_importance_sampling_mode (no log-ratio clamp; ratios outside the bounds zeroed by the *_mask modes)
    "trl_token_truncate": _verl("trl_token_truncate", rollout_is="token", rollout_is_threshold=3.0,
                                rollout_is_mode="truncate", safety_bound=None),
    "trl_token_mask": _verl("trl_token_mask", rollout_is="token", rollout_is_threshold=3.0, rollout_is_mode="mask",
                            safety_bound=None),
    "trl_sequence_truncate": _verl("trl_sequence_truncate", rollout_is="sequence", rollout_is_threshold=3.0,
                                   rollout_is_mode="truncate", safety_bound=None),
    "trl_sequence_mask": _verl("trl_sequence_mask", rollout_is="sequence", rollout_is_threshold=3.0,
                               rollout_is_mode="mask", safety_bound=None),
    # AReaL decoupled PPO: w = π_prox/π_behav, zeroed above behav_imp_weight_cap (kept in the denominator)
    "areal_decoupled": _verl("areal_decoupled", rollout_is="token", rollout_is_threshold=5.0, rollout_is_mode="mask",
                             safety_bound=None),
    # the cumulative level: ρ_{1:t}(π_old/μ) in a log window
    "cumulative_sqrt_t": _verl("cumulative_sqrt_t", rollout_is="cumulative", rollout_is_mode="truncate",
                               cumulative_eps_low=0.025, cumulative_eps_high=0.05, cumulative_exponent=0.5),
    "cumulative_sqrt_t_mask": _verl("cumulative_sqrt_t_mask", rollout_is="cumulative", rollout_is_mode="mask",
                                    cumulative_eps_low=0.025, cumulative_eps_high=0.05, cumulative_exponent=0.5),
    "cumulative_fixed": _verl("cumulative_fixed", rollout_is="cumulative", rollout_is_mode="truncate",
                              cumulative_eps_low=math.log(2.0), cumulative_eps_high=math.log(2.0),
                              cumulative_exponent=0.0),
}

ROLLOUT_CORRECTION_SOURCES: dict[str, str] = {
    **{k: f"verl RolloutCorrectionConfig.{k}() with its default thresholds (verl/trainer/config/algorithm.py)"
       for k in ROLLOUT_CORRECTIONS if k.startswith(("decoupled_", "bypass_", "disabled"))},
    **{f"trl_{m}": f"TRL GRPOConfig vllm_importance_sampling_mode='{m}', clip_max 3.0, clip_min None"
       for m in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
    "areal_decoupled": "AReaL decoupled PPO: w = exp(log π_prox − log π_behav), zeroed where w > "
                       "behav_imp_weight_cap = 5 (the value of AReaL's example configs; its default is None)",
    "cumulative_sqrt_t": "ρ_{1:t}(π_old/μ) clamped to the log window [−0.025√t, 0.05√t] (CTPO's window) — ctpo_lab",
    "cumulative_sqrt_t_mask": "ρ_{1:t}(π_old/μ), tokens whose L_t leaves [−0.025√t, 0.05√t] zeroed — ctpo_lab",
    "cumulative_fixed": "ρ_{1:t}(π_old/μ) clamped to [1/2, 2] (a fixed window, TIS's C = 2 on the prefix) — ctpo_lab",
}


def resolve_rollout_correction(spec: object) -> RolloutCorrection | None:
    """A name of :data:`ROLLOUT_CORRECTIONS`, a :class:`RolloutCorrection`, a verl ``RolloutCorrectionConfig``
    (or any object with its fields) or a mapping of its fields; None stays None."""
    if spec is None or isinstance(spec, RolloutCorrection):
        return spec
    if isinstance(spec, str):
        if spec not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"rollout_correction: unknown correction {spec!r}; expected one of "
                             f"{sorted(ROLLOUT_CORRECTIONS)}")
        return ROLLOUT_CORRECTIONS[spec]
    if isinstance(spec, Mapping) or all(hasattr(spec, f) for f in ("rollout_is", "rollout_rs", "bypass_mode")):
        return RolloutCorrection.from_verl(spec)
    raise TypeError(f"rollout_correction: expected a name, a RolloutCorrection or verl's RolloutCorrectionConfig, "
                    f"got {type(spec).__name__}")


# ------------------------------------------------------------------------------------------------ helpers
_MEAN_EPS = 1e-8  # verl's masked mean divides by (count + 1e-8): kept, so that E[x²] − E[x]² agrees too


def _mmean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """verl's masked mean Σ x·m / (Σ m + 1e-8) (over all entries, or along ``dim``; 0 where nothing is valid)."""
    total = torch.where(mask, x, 0.0)
    if dim is None:
        return total.sum() / (mask.count_nonzero().to(x.dtype) + _MEAN_EPS)
    return total.sum(dim) / (mask.sum(dim).to(x.dtype) + _MEAN_EPS)


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, -math.inf).max()


def _masked_min(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, math.inf).min()


def _std(x: Tensor) -> Tensor:
    """Unbiased standard deviation of a 1-d tensor; 0 for one element."""
    return x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)


def _scalar(v: float, like: Tensor) -> Tensor:
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


# ------------------------------------------------------------------------------------------------ weights
def rollout_is_weights(log_ratio: Tensor, mask: Tensor, correction: RolloutCorrection
                       ) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The detached weights [B, T] (zero on masked-out tokens, batch-normalised if asked) and verl's IS metrics
    (unprefixed: ``rollout_is_mean``, …), from ℓ = log π_old − log μ [B, T] (0 on masked-out tokens) and a bool
    mask; (None, {}) when ``rollout_is`` is None."""
    c = correction
    if c.rollout_is is None:
        return None, {}
    mode, lower, upper = c.is_bounds
    ell = torch.where(mask, log_ratio.detach(), 0.0)
    sb = c.safety_bound
    metrics: dict[str, Tensor] = {}
    if c.rollout_is == "cumulative":
        L = ell.cumsum(-1)
        s = ratios.positions(mask).clamp(min=1).to(ell.dtype).pow(c.cumulative_exponent)
        lo_w, hi_w = -c.cumulative_eps_low * s, c.cumulative_eps_high * s
        raw = torch.where(mask, _clamp(L, sb).exp(), 0.0)
        inside = (L >= lo_w) & (L <= hi_w)
        if mode == "truncate":
            w = torch.where(mask, torch.maximum(torch.minimum(L, hi_w), lo_w).exp(), 0.0)
        else:
            w = torch.where(mask & inside, raw, 0.0)
        metrics["rollout_is_mean"] = _mmean(w, mask)
        metrics["rollout_is_max"] = _masked_max(w, mask)
        metrics["rollout_is_min"] = _masked_min(w, mask)
        metrics["rollout_is_ratio_fraction_high"] = _mmean((L > hi_w).to(ell.dtype), mask)
        metrics["rollout_is_ratio_fraction_low"] = _mmean((L < lo_w).to(ell.dtype), mask)
        if mode == "mask":
            metrics["rollout_is_oob_ratio"] = _mmean((~inside).to(ell.dtype), mask)
        _spread_metrics(metrics, w, raw, mask, math.inf, 0.0)
    else:
        if c.rollout_is == "token":
            log_w = ell
            raw = torch.where(mask, _clamp(ell, sb).exp(), 0.0)
        else:
            log_w = ell.sum(-1, keepdim=True)
            raw = torch.where(mask, _clamp(log_w, sb).exp(), 0.0)
        w = _apply_bounds(raw, mode, lower, upper)
        w = torch.where(mask, w, 0.0)
        lower_m = 1.0 / upper if lower is None else lower  # verl: the reciprocal of U when no lower bound is set
        if c.rollout_is == "sequence":  # over every row, empty rows included (their log-ratio sum is 0)
            metrics["rollout_is_max"] = log_w.max().clamp(max=SAFETY_BOUND).exp()
            metrics["rollout_is_min"] = log_w.min().exp()
            metrics["rollout_is_mean"] = _mmean(w, mask)
            metrics["rollout_is_ratio_fraction_high"] = (log_w > math.log(upper)).to(ell.dtype).mean()
            low_log = math.log(lower_m) if lower_m > 0 else -math.inf
            metrics["rollout_is_ratio_fraction_low"] = (log_w < low_log).to(ell.dtype).mean()
        else:
            metrics["rollout_is_mean"] = _mmean(w, mask)
            metrics["rollout_is_ratio_fraction_high"] = _mmean((raw > upper).to(ell.dtype), mask)
            metrics["rollout_is_ratio_fraction_low"] = _mmean((raw < lower_m).to(ell.dtype), mask)
            metrics["rollout_is_max"] = _masked_max(w, mask)
            metrics["rollout_is_min"] = _masked_min(w, mask)
        _spread_metrics(metrics, w, raw, mask, upper, lower_m)
        if mode == "mask":
            oob = raw > upper if lower is None else (raw < lower) | (raw > upper)
            metrics["rollout_is_oob_ratio"] = _mmean(oob.to(ell.dtype), mask)
    w = w.detach()
    if c.rollout_is_batch_normalize:
        if c.rollout_is == "sequence":
            valid_rows = mask.any(-1)
            mean = torch.where(valid_rows, _mmean(w, mask, -1), 0.0).sum() / valid_rows.sum().clamp(min=1).to(w.dtype)
        else:
            mean = _mmean(w, mask)
        if float(mean) > _BATCH_NORM_MIN:
            w = w / mean
            metrics["rollout_is_batch_norm_factor"] = mean
        else:
            metrics["rollout_is_batch_norm_factor"] = _scalar(1.0, w)
    return w, metrics


def _apply_bounds(raw: Tensor, mode: str, lower: float | None, upper: float) -> Tensor:
    if mode == "truncate":
        return raw.clamp(min=lower, max=upper) if lower is not None else raw.clamp(max=upper)
    keep = raw <= upper if lower is None else (raw >= lower) & (raw <= upper)
    return torch.where(keep, raw, 0.0)


def _spread_metrics(metrics: dict[str, Tensor], w: Tensor, raw: Tensor, mask: Tensor, upper: float,
                    lower_m: float) -> None:
    """verl's std / ESS (weights clamped to [0, U], over valid tokens) and per-row ``rollout_is_seq_*`` (every
    row, empty rows as 0)."""
    n = mask.count_nonzero()
    wc = w.clamp(min=0.0, max=upper)
    mean_c = _mmean(wc, mask)
    if int(n) > 1:
        metrics["rollout_is_std"] = (_mmean(wc.square(), mask) - mean_c.square()).clamp(min=0.0).sqrt()
    else:
        metrics["rollout_is_std"] = _scalar(0.0, w)
    metrics["rollout_is_eff_sample_size"] = 1.0 / _mmean((wc / (mean_c + _ESS_EPS)).square(), mask)
    row = _mmean(w, mask, -1)
    metrics["rollout_is_seq_mean"] = row.mean()
    metrics["rollout_is_seq_std"] = _std(row)
    metrics["rollout_is_seq_max"] = row.max()
    metrics["rollout_is_seq_min"] = row.min()
    metrics["rollout_is_seq_max_deviation"] = (row - 1.0).abs().max()
    raw_row = _mmean(raw, mask, -1)
    metrics["rollout_is_seq_fraction_high"] = (raw_row > upper).to(w.dtype).mean()
    metrics["rollout_is_seq_fraction_low"] = (raw_row < lower_m).to(w.dtype).mean()


# ------------------------------------------------------------------------------------------------ rejection
def rollout_rejection_mask(log_ratio: Tensor, mask: Tensor, correction: RolloutCorrection
                           ) -> tuple[Tensor, dict[str, Tensor]]:
    """The keep mask [B, T] bool (= mask where every ``rollout_rs`` option passes; the mask itself without
    options) and verl's rejection metrics (unprefixed: ``rollout_rs_masked_fraction``, per option
    ``rollout_rs_<option>_*``)."""
    options = correction.rejection
    if not options:
        return mask, {}
    ell = torch.where(mask, log_ratio.detach(), 0.0).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    dtype = ell.dtype
    token_stats = {"k1": -ell, "k2": 0.5 * ell.square(), "k3": ell.exp() - 1.0 - ell}
    valid_rows = mask.any(-1)
    combined = torch.ones_like(mask)
    metrics: dict[str, Tensor] = {}
    for opt in options:
        tok = token_stats[opt.statistic]
        if opt.level == "token":
            stat, seq = tok, None
        else:
            if opt.level == "sum":
                seq = torch.where(mask, tok, 0.0).sum(-1)
            elif opt.level == "mean":
                seq = _mmean(tok, mask, -1)
            else:
                seq = torch.where(mask, tok, -math.inf).max(-1).values
                seq = torch.where(valid_rows, seq, 0.0)
            stat = seq.unsqueeze(-1).expand_as(ell)
        keep = stat <= opt.upper if opt.lower is None else (stat >= opt.lower) & (stat <= opt.upper)
        combined = combined & keep
        _option_metrics(metrics, opt, stat, seq, mask, valid_rows)
        p = f"rollout_rs_{opt.name}"
        rejected = ~keep & mask
        metrics[f"{p}_masked_fraction"] = _mmean(rejected.to(dtype), mask)
        metrics[f"{p}_seq_masked_fraction"] = (rejected.any(-1) & valid_rows).sum().to(dtype) / \
            valid_rows.sum().clamp(min=1)
    rejected = ~combined & mask
    metrics["rollout_rs_masked_fraction"] = _mmean(rejected.to(dtype), mask)
    metrics["rollout_rs_seq_masked_fraction"] = rejected.any(-1).to(dtype).mean()  # over every row
    return mask & combined, metrics


def _option_metrics(metrics: dict[str, Tensor], opt: RejectionOption, stat: Tensor, seq: Tensor | None,
                    mask: Tensor, valid_rows: Tensor) -> None:
    """verl's per-option statistics: token-weighted mean; max/min and threshold fractions over valid rows
    (sequence options) or valid tokens (token options); std of the statistic clamped to its bounds; the
    ``seq_*`` summary over the valid rows (token options: the rows' token means)."""
    p = f"rollout_rs_{opt.name}"
    dtype = stat.dtype
    k1 = opt.statistic == "k1"
    low = opt.lower if k1 else 0.0
    seq_values = (seq if seq is not None else _mmean(stat, mask, -1))[valid_rows]
    metrics[f"{p}_mean"] = _mmean(stat, mask)
    zero = _scalar(0.0, stat)
    if seq is not None:
        metrics[f"{p}_max"] = seq_values.max()
        metrics[f"{p}_min"] = seq_values.min()
        metrics[f"{p}_fraction_high"] = (seq_values > opt.upper).to(dtype).mean()
        metrics[f"{p}_fraction_low"] = (seq_values < low).to(dtype).mean() if k1 else zero
    else:
        metrics[f"{p}_max"] = _masked_max(stat, mask)
        metrics[f"{p}_min"] = _masked_min(stat, mask)
        metrics[f"{p}_fraction_high"] = _mmean((stat > opt.upper).to(dtype), mask)
        metrics[f"{p}_fraction_low"] = _mmean((stat < low).to(dtype), mask) if k1 else zero
    if int(mask.count_nonzero()) > 1:
        sc = stat.clamp(min=low, max=opt.upper)
        metrics[f"{p}_std"] = (_mmean(sc.square(), mask) - _mmean(sc, mask).square()).clamp(min=0.0).sqrt()
    else:
        metrics[f"{p}_std"] = zero
    metrics[f"{p}_seq_mean"] = seq_values.mean()
    metrics[f"{p}_seq_std"] = _std(seq_values)
    metrics[f"{p}_seq_max"] = seq_values.max()
    metrics[f"{p}_seq_min"] = seq_values.min()
    metrics[f"{p}_seq_max_deviation"] = seq_values.abs().max()
    metrics[f"{p}_seq_fraction_high"] = (seq_values > opt.upper).to(dtype).mean()
    if k1:
        metrics[f"{p}_seq_fraction_low"] = (seq_values < low).to(dtype).mean()


# ------------------------------------------------------------------------------------------------ metrics
def offpolicy_metrics(train_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """verl's off-policy diagnostics (unprefixed): ``training_ppl``, ``training_log_ppl``, ``kl``, ``k3_kl``,
    ``rollout_ppl``, ``rollout_log_ppl``, ``log_ppl_diff``, ``log_ppl_abs_diff``, ``log_ppl_diff_max``,
    ``log_ppl_diff_min``, ``ppl_ratio``, ``chi2_token``, ``chi2_seq``; per-row quantities are averaged over every
    row (an empty row counts with mean log-prob 0)."""
    lp = torch.where(mask, train_log_prob.detach(), 0.0)
    mu = torch.where(mask, rollout_log_prob.detach(), 0.0)
    ell = lp - mu
    m_train, m_roll = _mmean(lp, mask, -1), _mmean(mu, mask, -1)
    d = m_roll - m_train
    ellc = ell.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return {
        "training_ppl": (-m_train).exp().mean(),
        "training_log_ppl": (-m_train).mean(),
        "kl": _mmean(mu - lp, mask),
        "k3_kl": _mmean(ell.exp() - ell - 1.0, mask),
        "rollout_ppl": (-m_roll).exp().mean(),
        "rollout_log_ppl": (-m_roll).mean(),
        "log_ppl_diff": d.mean(),
        "log_ppl_abs_diff": d.abs().mean(),
        "log_ppl_diff_max": d.max(),
        "log_ppl_diff_min": d.min(),
        "ppl_ratio": d.exp().mean(),
        "chi2_token": _mmean(ellc.exp().square(), mask) - 1.0,
        "chi2_seq": (2.0 * ell.sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)).exp().mean() - 1.0,
    }


def sampling_metrics(log_ratio: Tensor, mask: Tensor, correction: RolloutCorrection) -> dict[str, Tensor]:
    """TRL's names: ``sampling/sampling_logp_difference/{mean,max}`` (|log π_old − log μ| over valid tokens) and,
    with weights, ``sampling/importance_sampling_ratio/{min,mean,max}`` of the bounded ratios (before batch
    normalisation) over valid tokens, or over every row (one ratio per row) for the ``sequence`` level."""
    ell = torch.where(mask, log_ratio.detach(), 0.0)
    delta = ell.abs()
    out = {"sampling/sampling_logp_difference/mean": _mmean(delta, mask),
           "sampling/sampling_logp_difference/max": torch.where(mask, delta, 0.0).max()}
    if correction.rollout_is is None:
        return out
    if correction.rollout_is == "sequence":
        mode, lower, upper = correction.is_bounds
        flat = _apply_bounds(_clamp(ell.sum(-1), correction.safety_bound).exp(), mode, lower, upper)
    else:
        w, _ = rollout_is_weights(log_ratio, mask, dataclasses.replace(correction, rollout_is_batch_normalize=False))
        flat = w[mask]
    out["sampling/importance_sampling_ratio/min"] = flat.min()
    out["sampling/importance_sampling_ratio/mean"] = flat.mean()
    out["sampling/importance_sampling_ratio/max"] = flat.max()
    return out


# ------------------------------------------------------------------------------------------------ entry point
class RolloutCorrectionOutput(NamedTuple):
    """What a loss needs from a correction."""

    weights: Tensor | None  #: [B, T] detached factor on the per-token loss (None: not applied)
    is_weights: Tensor | None  #: [B, T] the computed weights (bypass ppo_clip computes them for metrics only)
    response_mask: Tensor  #: [B, T] bool: the response mask with rejected tokens removed
    anchor_log_prob: Tensor  #: the loss's old log-prob: π_old (decoupled) or μ (bypass)
    metrics: dict[str, Tensor]  #: ``rollout_corr/*`` and ``sampling/*``, 0-d tensors
    correction: RolloutCorrection


def _check_log_prob(name: str, x: object, shape: torch.Size) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match log_prob {tuple(shape)}")


def compute_rollout_correction(log_prob: Tensor, old_log_prob: Tensor, rollout_log_prob: Tensor,
                               response_mask: Tensor, correction: object) -> RolloutCorrectionOutput:
    """Weights, rejection mask and metrics of ``correction`` (see the module docstring).

    ``log_prob`` π_θ, ``old_log_prob`` π_old (ignored in bypass mode), ``rollout_log_prob`` μ, all [B, T];
    ``response_mask`` [B, T] bool or 0/1.  The ratio is π_old/μ (decoupled) or sg(π_θ)/μ (bypass).  Raises
    ValueError on NaN/inf on valid tokens or a mask without a valid token (verl's requirement).
    """
    corr = resolve_rollout_correction(correction)
    if corr is None:
        raise ValueError("rollout_correction: expected a correction, got None")
    shape = log_prob.shape
    _check_log_prob("rollout_log_prob", rollout_log_prob, shape)
    _check_log_prob("old_log_prob", old_log_prob, shape)
    if response_mask.shape != shape:
        raise ValueError(f"response_mask: shape {tuple(response_mask.shape)} does not match log_prob {tuple(shape)}")
    mask = response_mask.bool()
    if not bool(mask.any()):
        raise ValueError("response_mask: a rollout correction needs at least one valid token")
    dtype = ratios.compute_dtype(log_prob.dtype)
    mu = rollout_log_prob.detach().to(dtype)
    train = (log_prob if corr.bypass_mode else old_log_prob).detach().to(dtype)
    for name, x in (("rollout_log_prob", mu), ("log_prob" if corr.bypass_mode else "old_log_prob", train)):
        bad = int((~torch.isfinite(x) & mask).sum())
        if bad:
            raise ValueError(f"{name}: {bad} NaN or inf value(s) on valid tokens")
    with torch.no_grad():
        log_ratio = torch.where(mask, train - mu, 0.0)
        w, is_metrics = rollout_is_weights(log_ratio, mask, corr)
        keep, rs_metrics = rollout_rejection_mask(log_ratio, mask, corr)
        metrics = {f"rollout_corr/{k}": v for k, v in {**is_metrics, **rs_metrics,
                                                       **offpolicy_metrics(train, mu, mask)}.items()}
        metrics.update(sampling_metrics(log_ratio, mask, corr))
    applied = None if (corr.bypass_mode and corr.loss_type == "ppo_clip") else w
    anchor = rollout_log_prob if corr.bypass_mode else old_log_prob
    return RolloutCorrectionOutput(applied, w, keep, anchor, metrics, corr)
