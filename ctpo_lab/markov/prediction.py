"""Exact chain predictions matched to a real-LLM measurement: bias and variance of each estimator at the LLM's KL.

The LLM bias/variance measurement (``python -m ctpo_lab.llm bias``) reports, per source of off-policyness, the
relative bias and the variance ratio of each estimator together with the mean per-token ``KL(μ‖π)`` of the
source. :func:`matched_chain_prediction` computes the same two numbers exactly (dynamic programming, no
sampling) on random Markov chains whose per-token KL equals the measured one, so that the two can be drawn
side by side; :func:`summarize_prediction` reduces the per-seed rows to a median and a range per estimator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ctpo_lab import losses

from .estimator import ChainEstimator, chain_estimator
from .exact import Moments, exact_moments, performance, true_gradient
from .model import MarkovMDP, random_instance
from .sample import monte_carlo_moments

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PREDICTION_ESTIMATORS", "matched_chain_prediction", "summarize_prediction"]

#: the estimators the real-LLM bias measurement reports by default (preset names)
PREDICTION_ESTIMATORS: tuple[str, ...] = (
    "unclipped_token", "unclipped_cumulative", "unclipped_sequence", "unclipped_sequence_geomean",
    "grpo", "gspo", "ctpo", "ctpo_fixed",
)

#: ‖∇J‖ below this makes the relative quantities meaningless (a warning is issued)
_TINY_GRADIENT = 1e-6

_SUMMARY_METRICS = ("relative_bias", "cosine", "var_ratio", "bias_to_noise")


def _check_pos_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_estimators(estimators: Iterable[str | losses.LossConfig] | str | losses.LossConfig
                      ) -> tuple[ChainEstimator, ...]:
    if isinstance(estimators, (str, losses.LossConfig)):
        estimators = (estimators,)
    items = tuple(estimators)
    if not items:
        raise ValueError(f"estimators: expected at least one preset name or LossConfig, e.g. {PREDICTION_ESTIMATORS}")
    out = tuple(chain_estimator(e) for e in items)
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"estimators: names must be distinct (give derived LossConfigs their own name=), got {names}")
    return out


def _check_seeds(seeds: Iterable[int]) -> tuple[int, ...]:
    out = tuple(seeds)
    if not out:
        raise ValueError("seeds must not be empty")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"seeds must be ints, got {s!r}")
    return tuple(int(s) for s in out)


def matched_chain_prediction(
    kl: float,
    horizon: int,
    *,
    estimators: Sequence[str | losses.LossConfig] = PREDICTION_ESTIMATORS,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    vocab_size: int = 4,
    order: int = 1,
    automaton: str = "frac",
    batch_size: int = 64,
    group_size: int = 1,
    clipped_max_horizon: int = 16,
    bin_width: float | None = 0.01,
    progress: bool = False,
    mc_samples: int = 4096,
    mc_max_horizon: int = 64,
) -> pd.DataFrame:
    """Exact bias and variance of the LLM estimators on random chains with the LLM's per-token KL.

    Estimators the dynamic programme does not represent (:func:`ctpo_lab.markov.lab_method` ≠ ``"dp"``: row
    rules, probability-space trust regions, sequence masks, batch-level rules) are measured by Monte Carlo with
    ``mc_samples`` trajectories at ``min(horizon, mc_max_horizon)`` (``method`` says ``mc`` or ``mc-batch(B)``).

    For each seed the chain ``random_instance(vocab_size, horizon, order, seed, kl=kl, automaton=automaton)``
    has per-token ``KL(μ‖π) = kl`` in every context; the same seed with ``kl = 0`` gives the same target
    ``π`` with ``μ = π`` (the target logits are drawn first), the on-policy reference. The signal is the
    outcome reward with the baseline ``b = J(μ)`` (GRPO's group-mean baseline in expectation), so an
    estimator ``X`` is ``Σ_t w_t ψ_t (R − J(μ))`` under ``y ~ μ``; the on-policy reference is
    ``X₀ = Σ_t ψ_t (R − J(π))`` under ``y ~ π`` (every estimator reduces to it on-policy). Reported per
    (estimator, seed)::

        relative_bias = ‖E X − ∇J‖ / ‖∇J‖
        cosine        = ⟨E X, ∇J⟩ / (‖E X‖ ‖∇J‖)
        trace_cov     = tr Cov X = Σ_j (E X_j² − (E X_j)²)
        var_ratio     = tr Cov X / tr Cov X₀
        rel_mse       = (‖E X − ∇J‖² + tr Cov X / N) / ‖∇J‖²     (N = batch_size)

    with ``∇J = ∇_θ J(π)`` for the tabular softmax target ``θ ∈ R^{C×V}``.

    Each estimator is the loss configuration itself (a preset name or a :class:`~ctpo_lab.losses.LossConfig`),
    so the prediction is about exactly the loss that is trained and measured. Estimators whose gradient mask
    reads a running sum of log-ratios (``ctpo``, ``ctpo_fixed``: the window on ``L_t``; ``gspo``: the clip on
    ``e^{L_T/T}``) need the augmented ``(z, L)`` state, whose size grows quickly with the horizon. When
    ``horizon > clipped_max_horizon`` they are computed on the chain with the same seed, KL and policies but
    horizon ``clipped_max_horizon`` (with its own on-policy reference), and the ``horizon`` column records the
    horizon actually used. Token-level estimators (``grpo``: the per-token mask reads ``ℓ_t`` only) and the
    unclipped ones are always computed at ``horizon``.

    Parameters
    ----------
    kl : float
        Per-token ``KL(μ‖π)`` (the LLM's measured mean per-token KL), finite and ``≥ 0``.
    horizon : int
        Chain horizon ``T`` (e.g. the LLM's mean response length).
    estimators : sequence of str or LossConfig
        Preset names of :data:`ctpo_lab.losses.PRESETS` or LossConfigs (distinct names).
    seeds : sequence of int
        Random instances.
    vocab_size, order : int
        ``V`` and the context order ``k`` of the chain.
    automaton : str
        Reward automaton spec (:func:`ctpo_lab.markov.make_automaton`). The default ``"frac"`` (fraction of
        token 0 over the horizon, reward in ``[0, 1]``) keeps ``‖∇J‖`` of order one at every horizon;
        parity-type rewards (``"count"``, ``"parity"``, ``"sum:M"``) have ``‖∇J‖`` decaying geometrically in
        ``T`` (about ``5e-8`` at ``T = 64`` for ``"count"``), which makes every relative quantity meaningless
        — a ``RuntimeWarning`` is issued when ``‖∇J‖ < 1e-6``.
    batch_size : int
        ``N`` of ``rel_mse``.
    group_size : int
        ``G`` of ``bias_to_noise = ‖E X − ∇J‖² / (tr Cov X₀ / G)``: the squared bias in units of the variance of
        the mean of G on-policy trajectories (the LLM measurement's unit is one prompt group of G responses).
    clipped_max_horizon : int
        Largest horizon for the ``(z, L)``-state estimators (see above).
    bin_width : float or None
        Bin width of ``L`` for the ``(z, L)``-state estimators (``method = "dp-binned(w)"``); ``None`` =
        exact atoms, feasible only up to ``clipped_max_horizon ≈ 12`` at ``V = 4``. The other estimators are
        always exact (``method = "dp"``).
    progress : bool
        Show a tqdm progress bar over (seed, estimator).

    Returns
    -------
    pandas.DataFrame
        One row per (estimator, seed): ``estimator`` (the config's name), ``seed``, ``kl``,
        ``horizon`` (the horizon used), ``vocab_size``, ``order``, ``relative_bias``, ``cosine``,
        ``trace_cov``, ``var_ratio``, ``rel_mse``, ``bias_to_noise``, ``method``, and ``grad_norm`` (``‖∇J‖``).

    Notes
    -----
    The default call (8 estimators, 5 seeds, ``V = 4``, ``k = 1``, ``kl = 0.002``, ``horizon = 64``) takes a
    few seconds on a 2-core machine; almost all of it is the binned ``(z, L)`` DP of ``ctpo``,
    ``ctpo_fixed`` and ``gspo_clip`` at ``clipped_max_horizon = 16``.
    """
    if isinstance(kl, bool) or not isinstance(kl, (int, float, np.integer, np.floating)):
        raise ValueError(f"kl must be a finite float >= 0, got {kl!r}")
    kl = float(kl)
    if not math.isfinite(kl) or kl < 0:
        raise ValueError(f"kl must be a finite float >= 0, got {kl!r}")
    horizon = _check_pos_int(horizon, "horizon")
    clipped_max_horizon = _check_pos_int(clipped_max_horizon, "clipped_max_horizon")
    batch_size = _check_pos_int(batch_size, "batch_size")
    group_size = _check_pos_int(group_size, "group_size")
    ests = _check_estimators(estimators)
    seed_list = _check_seeds(seeds)
    if bin_width is not None and not (math.isfinite(bin_width) and bin_width > 0):
        raise ValueError(f"bin_width must be a positive float or None, got {bin_width!r}")

    import pandas as pd  # lazily: importing ctpo_lab.markov stays light

    jobs = [(s, e) for s in seed_list for e in ests]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"chain prediction (KL={kl:g}, T={horizon})")
    rows: list[dict] = []
    warned = False
    try:
        for seed in seed_list:
            # per horizon used: (off-policy chain, J(μ), on-policy reference moments)
            cache: dict[int, tuple[MarkovMDP, float, Moments]] = {}
            for est in ests:
                exact = est.method("reward") == "dp"
                augmented = est.needs_augmented
                T = min(horizon, clipped_max_horizon) if augmented else horizon
                if not exact:
                    T = min(horizon, mc_max_horizon)
                if T not in cache:
                    mdp = random_instance(vocab_size, T, order, seed, kl=kl, automaton=automaton)
                    mdp0 = random_instance(vocab_size, T, order, seed, kl=0.0, automaton=automaton)
                    ref = exact_moments(mdp0, "unclipped_token", signal="reward",
                                        baseline=performance(mdp0, "target"), along_gradient=False)
                    cache[T] = (mdp, performance(mdp, "behaviour"), ref)
                mdp, b, ref = cache[T]
                if exact:
                    m = exact_moments(mdp, est, signal="reward", baseline=b, along_gradient=False,
                                      bin_width=bin_width if augmented else None)
                else:
                    mc = monte_carlo_moments(mdp, est, "reward", baseline=b, n=mc_samples, seed=seed)
                    m = Moments(estimator=est.name, signal="reward", baseline=b, mean=mc.mean,
                                second_moment_diag=mc.second_moment_diag, gradient=true_gradient(mdp),
                                method=mc.method, config=est.config)
                g2 = float(m.gradient @ m.gradient)
                gn = math.sqrt(g2)
                if gn < _TINY_GRADIENT and not warned:
                    warnings.warn(f"‖∇J‖ = {gn:.3g} on seed {seed}, horizon {T} (automaton {automaton!r}): relative "
                                  "bias and rel_mse are meaningless; use a reward whose gradient does not vanish "
                                  "with T, e.g. automaton='frac'", RuntimeWarning, stacklevel=2)
                    warned = True
                ref_tc = ref.trace_cov
                rows.append({
                    "estimator": est.name,
                    "seed": seed,
                    "kl": kl,
                    "horizon": T,
                    "vocab_size": vocab_size,
                    "order": order,
                    "relative_bias": m.relative_bias,
                    "cosine": m.cosine,
                    "trace_cov": m.trace_cov,
                    "var_ratio": m.trace_cov / ref_tc if ref_tc > 0 else float("nan"),
                    "rel_mse": m.mse(batch_size) / g2 if g2 > 0 else float("nan"),
                    "bias_to_noise": m.bias_norm**2 * group_size / ref_tc if ref_tc > 0 else float("nan"),
                    "method": m.method,
                    "grad_norm": gn,
                })
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return pd.DataFrame(rows)


def summarize_prediction(df: pd.DataFrame) -> pd.DataFrame:
    """Median, minimum and maximum over seeds of ``relative_bias``, ``cosine``, ``var_ratio`` and
    ``bias_to_noise`` (when present), per estimator.

    Parameters
    ----------
    df : pandas.DataFrame
        Output of :func:`matched_chain_prediction` (columns ``estimator`` and the three metrics; extra
        columns are ignored).

    Returns
    -------
    pandas.DataFrame
        One row per estimator (in order of first appearance): ``estimator``, ``horizon`` (the largest
        horizon used), ``n_seeds``, and ``{metric}_median``, ``{metric}_min``, ``{metric}_max`` for each
        metric.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in ("estimator", *_SUMMARY_METRICS[:3]) if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks columns {missing}")
    out = []
    for est, g in df.groupby("estimator", sort=False):
        row: dict = {"estimator": est}
        if "horizon" in g.columns:
            row["horizon"] = int(g["horizon"].max())
        row["n_seeds"] = int(len(g))
        for metric in _SUMMARY_METRICS:
            if metric not in g.columns:
                continue
            v = g[metric].astype(float)
            row[f"{metric}_median"] = float(v.median())
            row[f"{metric}_min"] = float(v.min())
            row[f"{metric}_max"] = float(v.max())
        out.append(row)
    return pd.DataFrame(out)
