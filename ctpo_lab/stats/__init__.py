"""Statistics over collections of trajectories and runs: the √t law, drift, clip and ESS profiles, bootstrap CIs.

Everything here consumes log-ratios produced elsewhere (the Markov lab, the LLM module, the trainer) and
returns NumPy results; per-batch quantities are computed by :mod:`ctpo_lab.diagnostics` (position bins, ESS)
and clip masks by :func:`ctpo_lab.clipping.clipped_surrogate` (through :func:`ctpo_lab.losses.compute_policy_loss`),
never re-derived here.

Notation: ℓ_t = log π(y_t|s_t) − log μ(y_t|s_t) the per-token log-ratio, L_t = Σ_{k≤t} ℓ_k over valid tokens,
t the 1-based valid-token position.  Under μ, L_t = M_t − K_t (a martingale plus a drift) with
E L_t = −Σ_{k≤t} E KL(μ‖π)(s_k); with i.i.d. martingale increments of variance σ², sd(L_t) = σ·√t.

Modules (everything public is re-exported here, so ``from ctpo_lab import stats; stats.sqrt_t_fit(...)``):

* :mod:`~ctpo_lab.stats.bootstrap` — :func:`bootstrap_ci`, :func:`curve_bands`, :func:`iqm`,
  :func:`percentile_interval` (mean with a percentile bootstrap; IQM with a stratified bootstrap, as rliable)
  and :func:`format_ci`, the one ``estimate [low, high]`` formatter.
* :mod:`~ctpo_lab.stats.permutation` — :func:`sign_flip_p_value`, the paired sign-flip permutation test (exact up
  to :data:`EXACT_SIGN_FLIP_MAX` = 40 differences, :func:`sign_flip_is_exact`; Monte Carlo beyond,
  :func:`monte_carlo_sign_flip_p_value`), and :func:`holm_adjust` (Holm's step-down correction for a family of
  such tests).
* :mod:`~ctpo_lab.stats.positions` — :func:`binned_profile`, :func:`profile_table` → :class:`PositionTable`,
  :func:`center_within_groups`, :func:`group_centering`.
* :mod:`~ctpo_lab.stats.sqrt_t` — :func:`sqrt_t_fit` (the paper's fixed-exponent σ̂: WLS through the origin,
  weights √count, bins of 50; and a free-exponent log-log slope with a cluster-bootstrap CI) → :class:`SqrtTFit`,
  and :func:`fixed_exponent_sigma`.
* :mod:`~ctpo_lab.stats.profiles` — :func:`drift_profile` (E L_t by position against −Σ KL) →
  :class:`DriftProfile`, :func:`clip_rate_profile` (advantage-aware clip rate by position for any loss preset
  or config, e.g. the Figure-1 presets ``fixed_window`` and ``sqrt_t_window``), :func:`ess_profile`.
* ``inputs`` — the input checks the modules share.
"""

from __future__ import annotations

from ctpo_lab.stats.bootstrap import (
    BootstrapCI,
    CurveBands,
    bootstrap_ci,
    curve_bands,
    format_ci,
    iqm,
    percentile_interval,
)
from ctpo_lab.stats.permutation import (
    EXACT_SIGN_FLIP_MAX,
    holm_adjust,
    monte_carlo_sign_flip_p_value,
    sign_flip_is_exact,
    sign_flip_p_value,
)
from ctpo_lab.stats.positions import (
    PositionTable,
    binned_profile,
    center_within_groups,
    group_centering,
    profile_table,
)
from ctpo_lab.stats.profiles import DriftProfile, clip_rate_profile, drift_profile, ess_profile
from ctpo_lab.stats.sqrt_t import SqrtTFit, fixed_exponent_sigma, sqrt_t_fit

__all__ = [
    "BootstrapCI",
    "CurveBands",
    "PositionTable",
    "SqrtTFit",
    "DriftProfile",
    "iqm",
    "percentile_interval",
    "bootstrap_ci",
    "curve_bands",
    "format_ci",
    "sign_flip_p_value",
    "sign_flip_is_exact",
    "monte_carlo_sign_flip_p_value",
    "EXACT_SIGN_FLIP_MAX",
    "holm_adjust",
    "center_within_groups",
    "group_centering",
    "binned_profile",
    "profile_table",
    "fixed_exponent_sigma",
    "sqrt_t_fit",
    "drift_profile",
    "clip_rate_profile",
    "ess_profile",
]
