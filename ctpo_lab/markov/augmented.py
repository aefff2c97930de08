"""The augmented ``(z, L)`` dynamic programme for estimators whose gradient mask or weight reads a running sum.

State ``(z_t, L_{t-1})`` with ``L_t = Σ_{k≤t} inc_k`` the running sum of the estimator's per-token log-weight
increment (ℓ, or min(ℓ, log c̄) for the truncated cumulative ratio; :mod:`ctpo_lab.markov.estimator`); the
transition ``(z, L) --y--> (f(z,y), L + inc(z,y))`` is deterministic, so the moment recursions of
:mod:`ctpo_lab.markov.exact` apply verbatim with the per-transition ``β`` multiplied by the loss's gradient mask
``keep(X_t, t, sign)`` (prefix-level ratios: CTPO's window, a PPO clip on ρ_{1:t}, the cap) or the readout
multiplied by ``keep(X_T, sign)`` (sequence-level ratios: GSPO's clip, the sequence PPO clip). Ratios still
enter through the tilted tables ``α, β, γ``, so ``L`` is used only for the masks — except for weights that do
not factor over transitions (``cumulative_geomean``: e^{L_t/t}; CISPO's clipped weight of a prefix or sequence
ratio), which are read from the atom's ``L`` (exact with exact atoms; binned, from the bin's mean ``L``).

Atoms with equal ``L`` are merged: exactly (key ``round(L / 1e-11)``; equal count vectors of
(context, token) pairs give equal ``L``, so merging is exact up to float rounding) or approximately on a grid of
width ``bin_width`` (each merged atom keeps the μ-mass-weighted mean ``L`` of its members; report convergence
by shrinking the width). Exact per-position clip rates ``P_μ(L_t > ε_h t^p)`` need only the ``(z, L)``
distribution (:func:`log_ratio_distribution_profile`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

from ctpo_lab import losses

from .dp import BlockFeature, moment_step, position_moments, state_policy_tables, transition_tables
from .estimator import L_FLOOR, ChainEstimator, chain_estimator
from .model import MarkovMDP

__all__ = ["run_augmented_dp", "log_ratio_distribution_profile", "FIGURE1_WINDOWS"]

FIGURE1_WINDOWS = losses.FIGURE1_WINDOWS  # the two windows of the paper's Figure 1 (presets)

_EXACT_KEY = 1e-11


def _merge(nz: np.ndarray, Lp: np.ndarray, valid: np.ndarray, width: float) -> tuple[np.ndarray, int]:
    """Destination atom ids ``[A, V]`` for keys ``(nz, round(Lp / width))`` over valid transitions."""
    key_L = np.floor(Lp / width + 0.5).astype(np.int64) if width == _EXACT_KEY else np.floor(Lp / width).astype(
        np.int64)
    kv, zv = key_L[valid], nz[valid]
    lo = kv.min()
    span = int(kv.max() - lo + 1)
    comb = zv.astype(np.int64) * span + (kv - lo)
    _, inv = np.unique(comb, return_inverse=True)
    dest = np.zeros(nz.shape, dtype=np.int64)
    dest[valid] = inv.ravel()
    return dest, int(inv.max()) + 1


def run_augmented_dp(
    mdp: MarkovMDP,
    estimator: ChainEstimator,
    alpha: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    feature: BlockFeature,
    signal_table: np.ndarray | None,
    reward_signal: np.ndarray,
    sign: float | None,
    positions: np.ndarray,
    *,
    second: bool = True,
    bin_width: float | None = None,
    max_atoms: int = 2_000_000,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Moments of an estimator whose mask or weight reads the running sum, on the ``(z, L)`` state.

    Parameters
    ----------
    alpha, beta, gamma : ``[|Z|, V]`` weight tables; ``feature``: block features; ``signal_table``:
    ``[T, |Z|, V]`` oracle signal or ``None`` (outcome signal, ``reward_signal[z] = R(z) − b`` read out at
    the end); ``sign``: the sign piece (±1) for the outcome signal; ``positions``: bool ``[T]``.

    Returns
    -------
    mean ``[d]``, diagonal second moment ``[d]`` (or None), info dict (``max_atoms``, ``bin_width``).
    """
    est = estimator
    width = _EXACT_KEY if bin_width is None else float(bin_width)
    if width <= 0:
        raise ValueError("bin_width must be positive")
    tab = transition_tables(mdp)
    T, V = mdp.horizon, mdp.vocab_size
    d, B = feature.d, feature.B
    mu = tab.mu
    ell = est.increment(tab.ell)
    az = np.array([mdp.start_state])
    aL = np.zeros(1)
    mass = np.ones(1)
    Q0, P0 = np.ones(1), np.ones(1)
    Q1, P1, P2 = np.zeros((1, d)), np.zeros((1, d)), np.zeros((1, d))
    biggest = 1
    for t in range(T):
        z = az
        A = z.size
        p = mu[z]
        valid = p > 0
        Lp = np.maximum(aL[:, None] + ell[z], L_FLOOR)
        a_, g_ = alpha[z], gamma[z]
        b_ = beta[z] * float(positions[t])
        if signal_table is not None:
            b_ = b_ * signal_table[t][z]
        if est.level == "prefix":
            x = est.value(Lp, t + 1, T)
            if est.atom_weighted:  # the weight does not factor over transitions: read it from the atom
                b_ = b_ * est.weight(x)
            if est.has_mask:
                sg = np.sign(signal_table[t][z]) if signal_table is not None else sign
                b_ = b_ * est.keep(x, t + 1, sg)
        nz = mdp.next_state[z]
        dest, A2 = _merge(nz, Lp, valid, width)
        if A2 > max_atoms:
            raise ValueError(f"max_atoms: the augmented (z, L) state of {est.name!r} has {A2} atoms > max_atoms="
                             f"{max_atoms} at t={t + 1} (horizon {T}); pass bin_width=... for the binned "
                             "approximation, or use markov.monte_carlo_moments, which accepts every LossConfig")
        biggest = max(biggest, A2)
        rows = dest.ravel()
        cols = np.repeat(np.arange(A), V)

        def prop(w: np.ndarray, rows: np.ndarray = rows, cols: np.ndarray = cols, A: int = A, A2: int = A2
                 ) -> sparse.csr_matrix:
            return sparse.csr_matrix((w.ravel(), (rows, cols)), shape=(A2, A))

        pm = p * mass[:, None]
        new_mass = np.bincount(rows, pm.ravel(), minlength=A2)
        sumL = np.bincount(rows, (pm * Lp).ravel(), minlength=A2)
        first_L = np.zeros(A2)
        first_L[rows[valid.ravel()]] = Lp.ravel()[valid.ravel()]
        with np.errstate(divide="ignore", invalid="ignore"):
            new_L = np.where(new_mass > 0, sumL / np.where(new_mass > 0, new_mass, 1.0), first_L)
        new_z = np.zeros(A2, dtype=np.int64)
        new_z[rows[valid.ravel()]] = nz.ravel()[valid.ravel()]
        blk, hv = feature.blk[z], feature.hv[z]
        pb = p * b_
        Q0, Q1, P0, P1, P2 = moment_step(prop, p, a_, b_, g_, pb, blk, hv, dest, A2, d, B, Q0, Q1, P0, P1, P2,
                                         second=second)
        az, aL, mass = new_z, new_L, new_mass
    u = np.ones(az.size) if signal_table is not None else reward_signal[az].astype(np.float64)
    if sign is not None:
        u = np.where(np.sign(u) == sign, u, 0.0)
    if est.level == "sequence":
        x = est.value(aL, T, T)
        if est.atom_weighted:
            u = u * est.weight(x)
        if est.has_mask:
            u = u * est.keep(x, T, sign if sign is not None else 1.0)
    mean = u @ Q1
    sec = (u**2) @ P2 if second else None
    return mean, sec, {"max_atoms": biggest, "bin_width": bin_width}


def _window_estimators(windows) -> dict[str, ChainEstimator]:
    """Name → :class:`ChainEstimator` for windows given as preset names, LossConfigs or a name → config dict;
    each must be a window on ``L_t`` (ratio family ``cumulative`` or ``cumulative_geomean``)."""
    if windows is None:
        windows = FIGURE1_WINDOWS
    if isinstance(windows, (str, losses.LossConfig)):
        windows = (windows,)
    items = windows.items() if isinstance(windows, dict) else ((None, w) for w in windows)
    out: dict[str, ChainEstimator] = {}
    for key, w in items:
        est = chain_estimator(w)
        if est.config.ratio not in ("cumulative", "cumulative_geomean") or est.config.clip not in ("ppo", "log_window"):
            raise ValueError(f"windows: {est.name!r} is not a clip window on L_t (needs ratio 'cumulative' or "
                             f"'cumulative_geomean' and clip 'ppo' or 'log_window', got {est.config.ratio!r}, "
                             f"{est.config.clip!r})")
        out[key if key is not None else est.name] = est
    return out


def _clip_probabilities(est: ChainEstimator, t: int, L: np.ndarray, mass: np.ndarray) -> tuple[float, float]:
    """(P(clipped | A > 0), P(clipped | A < 0)) at position t for atoms/grid points ``L`` with probabilities
    ``mass``: A > 0 above the upper bound; A < 0 below the lower bound or above the dual bound."""
    lo, hi, log_dual = est.window(t)
    x = est.value(L, t, t)
    high = float(mass[x > hi].sum())
    low_mask = x < lo
    if log_dual is not None:
        low_mask |= x > log_dual
    return high, float(mass[low_mask].sum())


def _empty_profile(T: int, windows, quantiles, extra: str) -> dict[str, np.ndarray]:
    """Zero arrays [T] for every per-position output of the (z, L) profiles, plus ``t`` and ``extra``."""
    out: dict[str, np.ndarray] = {"t": np.arange(1, T + 1, dtype=np.float64)}
    for name in windows:
        for s in ("high", "low", "rate"):
            out[f"{name}_{s}"] = np.zeros(T)
    for q in quantiles:
        out[f"q{q}"] = np.zeros(T)
    for key in ("mean_L", "var_L", extra):
        out[key] = np.zeros(T)
    return out


def log_ratio_distribution_profile(
    mdp: MarkovMDP,
    windows: Sequence[str | losses.LossConfig] | dict[str, str | losses.LossConfig] | None = None,
    *,
    bin_width: float | None = None,
    max_atoms: int = 2_000_000,
    quantiles: tuple[float, ...] = (0.5,),
) -> dict[str, np.ndarray]:
    """Exact (or binned) distribution of ``L_t`` under ``μ`` per position ``t = 1..T``.

    Exact: atoms ``(z, L)`` merged on equal ``L``. Binned (``bin_width``): a dense grid per state ``z``; each
    transition shifts mass by ``ℓ(z,y)`` and splits it linearly between the two nearest grid points (this
    preserves ``E L_t`` exactly and adds at most ``bin_width²/4`` of variance per step); the grid covers
    ``E L ± 12 sd`` of the exact ``L_T`` moments, and the mass pushed off the grid is reported as
    ``"lost_mass"``.

    ``windows``: preset names or LossConfigs of clip windows on ``L_t`` (default: the Figure-1 presets
    ``fixed_window`` and ``sqrt_t_window``); the bounds come from :func:`ctpo_lab.clipping.clip_window`.

    Returns arrays ``[T]``: ``P(X_t > upper_t)`` as ``"{name}_high"`` (clipped when A > 0),
    ``P(X_t < lower_t or X_t > log d_t)`` as ``"{name}_low"`` (clipped when A < 0; d_t the dual bound),
    ``"{name}_rate" = ½(high + low)`` (advantage-aware clip rate when the advantage sign is a fair coin
    independent of ``L_t``), with ``X_t`` the window's value of ``L_t``, quantiles ``"q{q}"`` of ``L_t``,
    ``mean_L`` and ``var_L`` (checks), and
    ``atoms``.
    """
    windows = _window_estimators(windows)
    if bin_width is not None:
        return _grid_profile(mdp, windows, float(bin_width), quantiles)
    width = _EXACT_KEY
    tab = transition_tables(mdp)
    mu = state_policy_tables(mdp, mdp.behaviour)
    ell = np.where(np.isfinite(tab.ell), tab.ell, L_FLOOR)
    T = mdp.horizon
    out = _empty_profile(T, windows, quantiles, "atoms")
    az, aL, mass = np.array([mdp.start_state]), np.zeros(1), np.ones(1)
    for t in range(T):
        p = mu[az]
        valid = p > 0
        Lp = np.maximum(aL[:, None] + ell[az], L_FLOOR)
        nz = mdp.next_state[az]
        dest, A2 = _merge(nz, Lp, valid, width)
        if A2 > max_atoms:
            raise ValueError(f"(z, L) distribution has {A2} atoms > max_atoms={max_atoms} at t={t + 1}; "
                             "pass bin_width=...")
        rows = dest.ravel()
        pm = (p * mass[:, None]).ravel()
        new_mass = np.bincount(rows, pm, minlength=A2)
        sumL = np.bincount(rows, pm * Lp.ravel(), minlength=A2)
        with np.errstate(divide="ignore", invalid="ignore"):
            aL = np.where(new_mass > 0, sumL / np.where(new_mass > 0, new_mass, 1.0), 0.0)
        new_z = np.zeros(A2, dtype=np.int64)
        new_z[rows[valid.ravel()]] = nz.ravel()[valid.ravel()]
        az, mass = new_z, new_mass
        for name, win in windows.items():
            h, lw = _clip_probabilities(win, t + 1, aL, mass)
            out[f"{name}_high"][t], out[f"{name}_low"][t], out[f"{name}_rate"][t] = h, lw, 0.5 * (h + lw)
        order = np.argsort(aL, kind="stable")
        cm = np.cumsum(mass[order])
        for q in quantiles:
            out[f"q{q}"][t] = aL[order][min(np.searchsorted(cm, q * cm[-1]), len(cm) - 1)]
        m1 = float(mass @ aL)
        out["mean_L"][t] = m1
        out["var_L"][t] = float(mass @ aL**2) - m1**2
        out["atoms"][t] = A2
    return out


def _grid_profile(mdp: MarkovMDP, windows: dict[str, ChainEstimator], width: float,
                  quantiles: tuple[float, ...]) -> dict[str, np.ndarray]:
    if width <= 0:
        raise ValueError("bin_width must be positive")
    tab = transition_tables(mdp)
    mu = tab.mu
    ell = np.where(np.isfinite(tab.ell), tab.ell, L_FLOOR)
    T, nZ = mdp.horizon, mdp.num_states
    prof = position_moments(mdp)
    sd = np.sqrt(np.maximum(prof["var_L"], 0.0))
    lo_edge = float(min(0.0, np.min(prof["mean_L"] - 12 * sd))) - 2 * width - float(np.abs(ell[mu > 0]).max())
    hi_edge = float(max(0.0, np.max(prof["mean_L"] + 12 * sd))) + 2 * width + float(np.abs(ell[mu > 0]).max())
    lo_edge = -width * np.ceil(-lo_edge / width)  # 0 is a grid point
    nb = int(np.ceil((hi_edge - lo_edge) / width)) + 1
    if nb * nZ > 50_000_000:
        raise ValueError(f"grid of {nb} bins x {nZ} states is too large; increase bin_width")
    grid = lo_edge + width * np.arange(nb)
    m = np.zeros((nZ, nb))
    m[mdp.start_state, int(round(-lo_edge / width))] = 1.0
    out = _empty_profile(T, windows, quantiles, "lost_mass")
    lost = 0.0
    zs, ys = np.nonzero(mu > 0)
    shift = ell[zs, ys] / width
    ish = np.floor(shift).astype(np.int64)
    frac = shift - ish
    for t in range(T):
        new = np.zeros_like(m)
        for z, y, i, f in zip(zs, ys, ish, frac):
            src = m[z] * mu[z, y]
            dst = new[mdp.next_state[z, y]]
            for off, w in ((i, 1.0 - f), (i + 1, f)):
                if w == 0.0:
                    continue
                if off >= 0:
                    dst[off:] += w * src[: nb - off]
                    lost += w * float(src[nb - off:].sum())
                else:
                    dst[: nb + off] += w * src[-off:]
                    lost += w * float(src[:-off].sum())
        m = new
        dist = m.sum(axis=0)
        for name, win in windows.items():
            h, lw = _clip_probabilities(win, t + 1, grid, dist)
            out[f"{name}_high"][t], out[f"{name}_low"][t], out[f"{name}_rate"][t] = h, lw, 0.5 * (h + lw)
        cm = np.cumsum(dist)
        for q in quantiles:
            out[f"q{q}"][t] = grid[min(np.searchsorted(cm, q * cm[-1]), nb - 1)]
        m1 = float(dist @ grid)
        out["mean_L"][t], out["var_L"][t], out["lost_mass"][t] = m1, float(dist @ grid**2) - m1**2, lost
    return out
