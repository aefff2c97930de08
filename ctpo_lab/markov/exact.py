"""Exact on-policy quantities and exact estimator moments by dynamic programming (docs/theory.md §2, §4).

On-policy (one policy ``π``; the same code with ``μ``), cost ``O(T·|Z|·V)``::

    V_{T+1}(z) = R(z);  Q_t(z,y) = V_{t+1}(f(z,y));  V_t(z) = Σ_y π(y|z) Q_t(z,y);  A = Q − V
    d_1 = δ_{z_1};  d_{t+1}(z') = Σ_{f(z,y)=z'} d_t(z) π(y|z)
    J = V_1(z_1);  ∇J = Σ_t Σ_z d_t(z) Σ_y π(y|z) ψ(z,y) A_t(z,y)

Estimator moments (one trajectory ``y ~ μ``; an estimator is a :class:`ctpo_lab.losses.LossConfig`, compiled by
:mod:`ctpo_lab.markov.estimator`): ``X = Σ_t w_t ψ_t S_t`` with the token-t weight written
``w_t = (Π_{k<t} α_k) β_t (Π_{k>t} γ_k)`` over per-transition tables; with ``p = μ(y|z)`` and ``h`` the score
coordinates, the forward recursions (summed over ``(z, y)`` with ``f(z,y) = z'``) are::

    Q0' += p α Q0;  Q1' += p γ Q1 + p β h Q0                       (first moment)
    P0' += p α² P0; P1' += p α γ P1 + p α β h P0;
    P2' += p γ² P2 + 2 p γ β h P1 + p β² h² P0                      (diagonal second moment)

``E X_j = Σ_z u(z) Q1_{T+1}(z, j)``, ``E X_j² = Σ_z u(z)² P2_{T+1}(z, j)`` with ``u = R − b`` for the
outcome signal (``u = 1`` and ``β ← β·S_t`` for per-token oracle signals). Estimators whose gradient mask (or
weight) depends on a running sum of log-ratios run the same recursions on the augmented state ``(z, L)``
(:mod:`ctpo_lab.markov.augmented`). Sign-dependent masks with the outcome signal are split on the sign of
``R − b``: the two pieces are disjoint, so first and second moments add.

Costs: the mean alone is a forward-backward pass, ``O(T·|Z|·V)``. The diagonal second moment is the forward
recursion above, ``O(T·|Z|·V·d)`` (any per-token signal or position mask), or, when the tables do not
depend on time (outcome signal, all positions), the unrolled form of :func:`run_second_moment_toeplitz`,
``O(T·|Z|²·V)`` (chosen automatically when cheaper).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from ctpo_lab import losses

from .augmented import run_augmented_dp
from .dp import (
    BlockFeature,
    PolicyValues,
    gather_block,
    policy_values,
    position_moments,
    positions_mask,
    projected_feature,
    scalar_feature,
    scatter_blocks,
    score_feature,
    signal_tables,
    state_policy_tables,
    transition_tables,
)
from .estimator import ChainEstimator, chain_estimator
from .model import MarkovMDP

__all__ = [
    "SIGNALS",
    "STUDY_ESTIMATORS",
    "Moments",
    "PolicyValues",
    "policy_values",
    "performance",
    "true_gradient",
    "expected_score",
    "bias_decomposition",
    "resolve_estimator",
    "check_dp_support",
    "exact_moments",
    "surrogate_value",
    "position_moments",
    "signal_tables",
    "run_moment_dp",
    "run_mean_fb",
    "run_second_moment_toeplitz",
]

SIGNALS = ("reward", "q_pi", "adv_pi", "q_mu", "adv_mu")
#: the estimators of the standard study and of the reproductions (preset names of :data:`ctpo_lab.losses.PRESETS`)
STUDY_ESTIMATORS = (
    "unclipped_token", "unclipped_cumulative", "unclipped_sequence", "unclipped_sequence_geomean", "cumulative_tis",
    "tis", "cispo", "unclipped_cumulative_geomean", "grpo", "ctpo", "ctpo_fixed", "gspo",
)


# ------------------------------------------------------------------------------------------ on-policy
def performance(mdp: MarkovMDP, policy: np.ndarray | str = "target") -> float:
    """``J(policy) = E[R]``."""
    return policy_values(mdp, policy).J


def expected_score(mdp: MarkovMDP, occupancy: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``Σ_t Σ_z d_t(z) Σ_y π(y|z) ψ(z,y) W_t(z,y)`` as a ``[C·V]`` vector.

    Coordinate ``(c, v)``: ``Σ_t Σ_{z∈c} d_t(z) π(v|c) (W_t(z,v) − Σ_y π(y|c) W_t(z,y))``.
    ``occupancy`` is ``[T(+1), |Z|]`` and ``weights`` ``[T, |Z|, V]``.
    """
    T = mdp.horizon
    pz = state_policy_tables(mdp, mdp.target)
    W = np.asarray(weights, dtype=np.float64)
    d = np.asarray(occupancy, dtype=np.float64)[:T]
    centred = W - (pz[None] * W).sum(axis=2, keepdims=True)
    per_z = (d[:, :, None] * pz[None] * centred).sum(axis=0)  # [nZ, V]
    out = np.zeros((mdp.num_contexts, mdp.vocab_size))
    np.add.at(out, mdp.state_context, per_z)
    return out.ravel()


def true_gradient(mdp: MarkovMDP) -> np.ndarray:
    """``∇J(π)`` with respect to the target logits table, flattened row-major, ``[C·V]``."""
    pv = policy_values(mdp, "target")
    return expected_score(mdp, pv.occupancy, pv.adv)


def bias_decomposition(mdp: MarkovMDP, baseline: float = 0.0) -> dict[str, np.ndarray]:
    """Outcome-signal bias parts (docs/theory.md §3.3), each ``[C·V]``.

    ``state = Σ_t Σ_z (d^μ_t − d^π_t)(z) Σ_y π ψ (Q^μ_t − b)``;
    ``continuation = Σ_t E_{d^π_t, π}[ψ (Q^μ_t − Q^π_t)]``; ``E g_tok − ∇J = state + continuation``;
    ``E g_cum − ∇J = continuation``.
    """
    vp, vm = policy_values(mdp, "target"), policy_values(mdp, "behaviour")
    state = expected_score(mdp, vm.occupancy, vm.q - baseline) - expected_score(mdp, vp.occupancy, vm.q - baseline)
    cont = expected_score(mdp, vp.occupancy, vm.q - vp.q)
    return {"state": state, "continuation": cont, "token_bias": state + cont, "cumulative_bias": cont}


# ------------------------------------------------------------------------------------------ moments
@dataclass(eq=False)
class Moments:
    """Exact (or enumerated / sampled) first and second moments of one estimator.

    Attributes
    ----------
    mean : np.ndarray ``[d]``  ``E X``.
    second_moment_diag : np.ndarray ``[d]``  ``E X_j²``.
    gradient : np.ndarray ``[d]``  ``∇J`` (the reference).
    var_along_grad : float  ``Var(uᵀX)`` with ``u = ∇J/‖∇J‖`` (nan when ``∇J = 0``).
    """

    estimator: str
    signal: str
    baseline: float
    mean: np.ndarray
    second_moment_diag: np.ndarray
    gradient: np.ndarray
    var_along_grad: float = float("nan")
    method: str = "dp"
    info: dict = field(default_factory=dict)
    config: losses.LossConfig | None = None

    @property
    def variance_diag(self) -> np.ndarray:
        """``Var X_j = E X_j² − (E X_j)²``."""
        return self.second_moment_diag - self.mean**2

    @property
    def trace_cov(self) -> float:
        """``tr Cov X = Σ_j (E X_j² − (E X_j)²)``."""
        return float(np.sum(self.second_moment_diag) - np.sum(self.mean**2))

    @property
    def bias(self) -> np.ndarray:
        """``E X − ∇J``."""
        return self.mean - self.gradient

    @property
    def bias_norm(self) -> float:
        return float(np.linalg.norm(self.bias))

    @property
    def relative_bias(self) -> float:
        """``‖E X − ∇J‖ / ‖∇J‖``."""
        g = float(np.linalg.norm(self.gradient))
        return self.bias_norm / g if g > 0 else float("nan")

    @property
    def cosine(self) -> float:
        """Cosine between ``E X`` and ``∇J``."""
        a, b = np.linalg.norm(self.mean), np.linalg.norm(self.gradient)
        return float(self.mean @ self.gradient / (a * b)) if a > 0 and b > 0 else float("nan")

    @property
    def scale(self) -> float:
        """``⟨E X, ∇J⟩ / ‖∇J‖²`` (1 = right scale along ∇J)."""
        g2 = float(self.gradient @ self.gradient)
        return float(self.mean @ self.gradient / g2) if g2 > 0 else float("nan")

    def mse(self, batch_size: int = 1) -> float:
        """``E‖X̄_N − ∇J‖² = ‖bias‖² + tr Cov / N`` for the mean of ``N`` i.i.d. trajectories."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        return self.bias_norm**2 + self.trace_cov / batch_size

    def summary(self, batch_size: int = 64) -> dict[str, float]:
        return {
            "estimator": self.estimator,
            "signal": self.signal,
            "bias_norm": self.bias_norm,
            "relative_bias": self.relative_bias,
            "cosine": self.cosine,
            "scale": self.scale,
            "trace_cov": self.trace_cov,
            "var_along_grad": self.var_along_grad,
            f"mse_N{batch_size}": self.mse(batch_size),
            "grad_norm": float(np.linalg.norm(self.gradient)),
        }


def resolve_estimator(estimator: str | losses.LossConfig | ChainEstimator, signal: str,
                      overrides: dict | None = None) -> ChainEstimator:
    """The :class:`ChainEstimator` of ``estimator`` (preset name or LossConfig, with overrides), signal checked."""
    if not isinstance(signal, str) or signal not in SIGNALS:
        raise ValueError(f"signal: unknown signal {signal!r}; expected one of {SIGNALS}")
    return chain_estimator(estimator, **(overrides or {}))


def check_dp_support(est: ChainEstimator, signal: str) -> None:
    """Raise ``ValueError`` for the configurations the dynamic programme cannot represent exactly.

    Supported (:attr:`ChainEstimator.method` ``== "dp"``): the clip rules of
    :data:`ctpo_lab.markov.estimator.DP_RULES` (``gppo``/``sapo`` on token-level ratios) with the mask rules of
    :data:`~ctpo_lab.markov.estimator.DP_MASKS`; sequence-level masks without a position-dependent window, and
    sign-dependent ones for the outcome signal only. Every other rule (row statistics, probability-space trust
    regions, sequence/prefix masks) points to :func:`ctpo_lab.markov.monte_carlo_moments` /
    :func:`ctpo_lab.markov.enumerate_moments`; batch-level rules to ``monte_carlo_moments(batch_size=...)``.
    """
    reason = est.dp_unsupported_reason(signal)
    if reason is not None:
        raise ValueError(reason)


def run_moment_dp(
    mdp: MarkovMDP,
    alpha: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    feature: BlockFeature,
    readout: np.ndarray,
    *,
    beta_t: np.ndarray | None = None,
    second: bool = True,
    max_block_floats: int = 20_000_000,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The forward moment DP on the state ``z`` (module docstring), run over groups of feature blocks so that
    each accumulator array holds at most ``max_block_floats`` numbers (coordinates never interact in the
    diagonal recursions, so the groups are independent).

    Parameters
    ----------
    alpha, beta, gamma : np.ndarray ``[|Z|, V]``
        Time-homogeneous weight tables (already multiplied by nothing: ``p = μ`` is applied here).
    feature : BlockFeature
        Block-sparse features ``h``.
    readout : np.ndarray ``[|Z|]``
        ``u(z_{T+1})``.
    beta_t : np.ndarray ``[T, |Z|, V]``, optional
        Time-dependent multiplier of ``β`` (oracle signals, position masks, sign masks).
    second : bool
        Also compute the diagonal second moment.

    Returns
    -------
    mean ``[d]``, second moment diagonal ``[d]`` (or None).
    """
    nZ = mdp.num_states
    nblocks = feature.d // feature.B
    per = max(1, int(max_block_floats // max(1, nZ * feature.B)))
    if nblocks > per:
        mean = np.zeros(feature.d)
        sec = np.zeros(feature.d) if second else None
        for b0 in range(0, nblocks, per):
            b1 = min(nblocks, b0 + per)
            inside = (feature.blk >= b0) & (feature.blk < b1)
            sub = BlockFeature(blk=np.where(inside, feature.blk - b0, 0),
                           hv=np.where(inside[:, None, None], feature.hv, 0.0), d=(b1 - b0) * feature.B)
            m, s2 = run_moment_dp(mdp, alpha, beta, gamma, sub, readout, beta_t=beta_t, second=second,
                                  max_block_floats=max_block_floats)
            mean[b0 * feature.B : b1 * feature.B] = m
            if second:
                sec[b0 * feature.B : b1 * feature.B] = s2
        return mean, sec
    T, V = mdp.horizon, mdp.vocab_size
    d, B = feature.d, feature.B
    p = state_policy_tables(mdp, mdp.behaviour)
    dest = mdp.next_state
    rows = dest.ravel()
    cols = np.repeat(np.arange(nZ), V)
    blk, hv = feature.blk, feature.hv

    def prop(w: np.ndarray) -> sparse.csr_matrix:
        return sparse.csr_matrix((w.ravel(), (rows, cols)), shape=(nZ, nZ))

    K_a, K_g = prop(p * alpha), prop(p * gamma)
    K_a2, K_ag, K_g2 = prop(p * alpha**2), prop(p * alpha * gamma), prop(p * gamma**2)
    Q0 = np.zeros(nZ)
    Q0[mdp.start_state] = 1.0
    Q1 = np.zeros((nZ, d))
    P0, P1, P2 = Q0.copy(), np.zeros((nZ, d)), np.zeros((nZ, d))
    for t in range(T):
        b = beta if beta_t is None else beta * beta_t[t]
        pb = p * b
        Q1 = K_g @ Q1 + scatter_blocks(dest, blk, (pb * Q0[:, None])[:, :, None] * hv, nZ, d)
        if second:
            h_p1 = gather_block(P1, blk, B)  # [nZ, B]
            P2 = (K_g2 @ P2
                  + scatter_blocks(dest, blk, (2.0 * pb * gamma)[:, :, None] * hv * h_p1[:, None, :], nZ, d)
                  + scatter_blocks(dest, blk, (pb * b * P0[:, None])[:, :, None] * hv**2, nZ, d))
            P1 = K_ag @ P1 + scatter_blocks(dest, blk, (pb * alpha * P0[:, None])[:, :, None] * hv, nZ, d)
            P0 = K_a2 @ P0
        Q0 = K_a @ Q0
    mean = readout @ Q1
    sec = (readout**2) @ P2 if second else None
    if not np.all(np.isfinite(mean)) or (sec is not None and not np.all(np.isfinite(sec))):
        raise FloatingPointError("moment DP overflowed: reduce the horizon or the mismatch")
    return mean, sec


def run_mean_fb(mdp: MarkovMDP, alpha: np.ndarray, beta: np.ndarray, gamma: np.ndarray, feature: BlockFeature,
                readout: np.ndarray, *, beta_t: np.ndarray | None = None) -> np.ndarray:
    """First moment only, by forward (``α``-tilted occupancy) / backward (``γ``-tilted readout) passes:
    ``E X = Σ_t Σ_{z,y} F_t(z) μ(y|z) β_t(z,y) h(z,y) B_{t+1}(f(z,y))``. Cost ``O(T·|Z|·V)``."""
    T, nZ = mdp.horizon, mdp.num_states
    p = state_policy_tables(mdp, mdp.behaviour)
    nxt = mdp.next_state
    F = np.zeros((T + 1, nZ))
    F[0, mdp.start_state] = 1.0
    for t in range(T):
        F[t + 1] = np.bincount(nxt.ravel(), (F[t][:, None] * p * alpha).ravel(), minlength=nZ)
    Bk = readout.astype(np.float64).copy()
    coef = np.zeros((nZ, mdp.vocab_size))
    for t in range(T - 1, -1, -1):
        b = beta if beta_t is None else beta * beta_t[t]
        nb = Bk[nxt]
        coef += F[t][:, None] * p * b * nb
        Bk = (p * gamma * nb).sum(axis=1)
    out = np.zeros(feature.d)
    vals = (coef[:, :, None] * feature.hv).sum(axis=1)  # [nZ, B]
    colidx = feature.blk[:, None] * feature.B + np.arange(feature.B)[None, :]
    np.add.at(out, colidx.ravel(), vals.ravel())
    return out


def _estimate(mdp: MarkovMDP, est: ChainEstimator, signal: str, baseline: float, feature: BlockFeature,
              pos: np.ndarray, second: bool, augment_bin: float | None,
              max_atoms: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
    check_dp_support(est, signal)
    tab = transition_tables(mdp)
    T = mdp.horizon
    alpha, beta, gamma = est.tables(tab.ell, T)
    S = signal_tables(mdp, signal, baseline)
    G = mdp.state_reward - baseline
    signs = [1.0, -1.0] if (signal == "reward" and est.sign_dependent) else [None]
    info: dict = {}
    mean = np.zeros(feature.d)
    sec = np.zeros(feature.d) if second else None
    if est.needs_augmented:
        for sg in signs:
            m, s, inf = run_augmented_dp(mdp, est, alpha, beta, gamma, feature, S, G, sg, pos,
                                         second=second, bin_width=augment_bin, max_atoms=max_atoms)
            mean += m
            if second:
                sec += s
            info.update(inf)
        return mean, sec, info
    x_token = est.increment(tab.ell) if est.level == "token" else None
    for sg in signs:
        bt = np.broadcast_to(pos[:, None, None].astype(np.float64), (T,) + alpha.shape).copy()
        if S is not None:
            bt = bt * S
        if est.has_mask:  # token level: the mask is a per-(t, z, y) table
            keep = np.stack([est.keep(x_token, t + 1, np.sign(S[t]) if S is not None else sg) for t in range(T)])
            bt = bt * keep
        u = np.ones(mdp.num_states) if S is not None else G.copy()
        if sg is not None:
            u = np.where(np.sign(u) == sg, u, 0.0)
        if second and _use_toeplitz(mdp, feature):
            m = run_mean_fb(mdp, alpha, beta, gamma, feature, u, beta_t=bt)
            if np.all(bt == bt[:1]):
                sec += run_second_moment_toeplitz(mdp, alpha, beta * bt[0], gamma, u)
            else:  # per-token signals, position masks, time-dependent masks
                sec += run_second_moment_toeplitz(mdp, alpha, beta, gamma, u, beta_t=bt)
            info["second_moment_path"] = "toeplitz"
        elif second:
            m, s = run_moment_dp(mdp, alpha, beta, gamma, feature, u, beta_t=bt, second=True)
            sec += s
            info["second_moment_path"] = "forward"
        else:
            m = run_mean_fb(mdp, alpha, beta, gamma, feature, u, beta_t=bt)
        mean += m
    return mean, sec, info


def exact_moments(
    mdp: MarkovMDP,
    estimator: str | losses.LossConfig | ChainEstimator = "unclipped_cumulative",
    signal: str = "reward",
    baseline: float = 0.0,
    *,
    positions: Iterable[int] | np.ndarray | None = None,
    second_moment: bool = True,
    along_gradient: bool = True,
    bin_width: float | None = None,
    max_atoms: int = 2_000_000,
    **overrides: object,
) -> Moments:
    """Exact moments of the estimator ``X = Σ_t c_t ψ_t`` of a loss under ``y ~ μ`` by dynamic programming.

    ``X(y)`` is the negative gradient, with respect to the tabular target logits, of
    :func:`ctpo_lab.losses.policy_loss` on the single trajectory ``y`` with ``aggregation="seq-mean-token-sum"``
    and the signal as advantages (:mod:`ctpo_lab.markov.estimator`); never enumeration.

    Parameters
    ----------
    mdp : MarkovMDP
    estimator : str or LossConfig
        A preset name of :data:`ctpo_lab.losses.PRESETS` or any :class:`~ctpo_lab.losses.LossConfig`; its ratio
        family, clip rule, window, dual clip, cap, truncation and log-ratio clamp all apply. Its aggregation
        is ignored (the estimator is per trajectory).
    signal : str
        ``"reward"`` (``S_t = R − baseline``), ``"q_pi"``, ``"adv_pi"``, ``"q_mu"``, ``"adv_mu"``.
    baseline : float
        Subtracted from the reward (and from the ``q_*`` oracle values).
    positions : iterable of int (1-based) or bool mask ``[T]``, optional
        Keep only these token positions in the sum (per-position profiles, Prop. 2(i) per term).
    second_moment : bool
        Compute ``second_moment_diag`` (cost ``O(T·|Z|·V·d)``); otherwise only the mean (``O(T·|Z|·V)``)
        and ``second_moment_diag`` is NaN.
    along_gradient : bool
        Also compute ``Var(uᵀX)``, ``u = ∇J/‖∇J‖`` (one extra scalar DP).
    bin_width : float, optional
        Augmented-state estimators only: bin width of ``L`` (``None`` = exact atoms).
    max_atoms : int
        Augmented-state guard: beyond it a ``ValueError`` names the limit.
    **overrides
        :class:`~ctpo_lab.losses.LossConfig` fields applied to ``estimator`` (e.g. ``clip_exponent=0.0``).

    Returns
    -------
    Moments

    Raises
    ------
    ValueError
        Unknown estimator/signal, or a configuration the DP cannot represent (a sequence-level ratio with a
        position-dependent window, or masked by the sign of a per-token signal; an augmented state beyond
        ``max_atoms``): :func:`ctpo_lab.markov.monte_carlo_moments` accepts every LossConfig.
    """
    if not isinstance(mdp, MarkovMDP):
        raise TypeError(f"mdp: expected a MarkovMDP, got {type(mdp).__name__}")
    est = resolve_estimator(estimator, signal, overrides)
    if not np.isfinite(baseline):
        raise ValueError(f"baseline: expected a finite number, got {baseline!r}")
    pos = positions_mask(positions, mdp.horizon)
    grad = true_gradient(mdp)
    feat = score_feature(mdp)
    mean, sec, info = _estimate(mdp, est, signal, float(baseline), feat, pos, second_moment, bin_width, max_atoms)
    vag = float("nan")
    gn = np.linalg.norm(grad)
    if along_gradient and gn > 0 and second_moment:
        pf = projected_feature(mdp, grad / gn)
        pm, ps, _ = _estimate(mdp, est, signal, float(baseline), pf, pos, True, bin_width, max_atoms)
        vag = float(ps[0] - pm[0] ** 2)
    if sec is None:
        sec = np.full_like(mean, np.nan)
    return Moments(est.name, signal, float(baseline), mean, sec, grad, vag,
                   method="dp" if bin_width is None or not est.needs_augmented else f"dp-binned({bin_width})",
                   info=info, config=est.config)


def surrogate_value(mdp: MarkovMDP, estimator: str | losses.LossConfig | ChainEstimator = "unclipped_cumulative",
                    signal: str = "adv_mu", baseline: float = 0.0, **overrides: object) -> float:
    """``E_μ[Σ_t c_t]`` with the score replaced by 1: the value of the importance-weighted surrogate.

    Performance-difference lemma: ``E_μ[Σ_t ρ_{1:t} A^μ_t] = J(π) − J(μ)`` exactly (``unclipped_cumulative``).
    """
    est = resolve_estimator(estimator, signal, overrides)
    pos = np.ones(mdp.horizon, dtype=bool)
    mean, _, _ = _estimate(mdp, est, signal, baseline, scalar_feature(mdp), pos, False, None, 2_000_000)
    return float(mean[0])


# ------------------------------------------------------------------------------------------ homogeneous fast path
def _use_toeplitz(mdp: MarkovMDP, feature: BlockFeature, max_floats: float = 1e8) -> bool:
    """Use :func:`run_second_moment_toeplitz` when it applies (score feature, T > 1; ``β`` may depend on time)
    and is cheaper than the forward DP (``|Z| < 3d``) within memory (``2·T·|Z|·Q·V`` floats)."""
    if not feature.is_score or mdp.horizon < 2:
        return False
    nZ, C = mdp.num_states, mdp.num_contexts
    Q = nZ // C
    return nZ < 3 * feature.d and 2.0 * mdp.horizon * nZ * Q * mdp.vocab_size <= max_floats


def run_second_moment_toeplitz(mdp: MarkovMDP, alpha: np.ndarray, beta: np.ndarray, gamma: np.ndarray,
                               readout: np.ndarray, *, beta_t: np.ndarray | None = None,
                               chunk: int = 64) -> np.ndarray:
    """Diagonal second moment of the score estimator for time-homogeneous tables, ``[C·V]``.

    Unrolling the ``P`` recursions: with ``F_s = E[Π_{k<s} α_k²; z_s]`` (forward, kernel ``pα²``),
    ``B_t`` the backward ``pγ²`` expectation of ``u²`` after token ``t`` and ``K = pαγ`` (the middle kernel),
    coordinate ``j = (c, v)`` has ``E X_j² = Σ_t D_t + 2 Σ_{s<t} C_{s,t}`` with

        D_t     = Σ_{z∈c} F_t(z) Σ_y p β² h_j² B_t(f(z,y))
        C_{s,t} = Σ_{z,z''∈c} Σ_{y,y''} F_s(z) [pαβ h_j](z,y) K^{t−s−1}(f(z,y), z'') [pγβ h_j](z'',y'') B_t(f(z'',y'')).

    Because ``K`` does not depend on time, the double sum is ``Σ_n K^n(f(z,y), z'') corr_n(z, f(z'',y''))`` with
    ``corr_n(z, w) = Σ_s F_s(z) B_{s+n+1}(w)`` (FFT correlation). The cost is ``O(T·|Z|²·V)`` for the powers of
    ``K`` instead of ``O(T·|Z|·V·d)``: a factor ``≈ 3V/Q`` less for k-gram contexts. Requires the score
    feature, states numbered ``z = c·Q + q`` (true for :class:`MarkovMDP`).

    Time-dependent ``β_t = β·beta_t[t]`` (per-token oracle signals, position and sign masks; ``α``, ``γ`` and so
    ``K`` stay time-homogeneous): the multipliers move into the two end points of each pair,
    ``X_s(z,y) = F_s(z) beta_t[s](z,y)`` and ``Y_t(z'',y'') = beta_t[t](z'',y'') B_t(f(z'',y''))``, and the double
    sum becomes ``Σ_t U_t(z,y,z'') Y_t(z'',y'')`` with the causal convolution
    ``U_t = Σ_{s<t} X_s K^{t−s−1}(f(z,y), z'')`` (FFT over time): the same ``O(T·|Z|²·V)`` as the constant case.
    """
    T, nZ, V = mdp.horizon, mdp.num_states, mdp.vocab_size
    C = mdp.num_contexts
    Q = nZ // C
    p = state_policy_tables(mdp, mdp.behaviour)
    pi = state_policy_tables(mdp, mdp.target)
    nxt = mdp.next_state
    rows = np.repeat(np.arange(nZ), V)
    cols = nxt.ravel()
    # forward F [T, nZ] (before token t) and backward Bn [T, nZ] (after token t)
    F = np.zeros((T, nZ))
    F[0, mdp.start_state] = 1.0
    Ka2 = sparse.csr_matrix(((p * alpha**2).ravel(), (cols, rows)), shape=(nZ, nZ))
    for t in range(T - 1):
        F[t + 1] = Ka2 @ F[t]
    Bn = np.zeros((T, nZ))
    Bn[T - 1] = readout**2
    for t in range(T - 1, 0, -1):
        Bn[t - 1] = (p * gamma**2 * Bn[t][nxt]).sum(axis=1)
    hv = np.eye(V)[None, :, :] - pi[:, None, :]  # [nZ, y, v]
    # diagonal terms
    if beta_t is None:
        W2 = np.einsum("tz,tzy->zy", F, Bn[:, nxt])
    else:
        beta_t = np.asarray(beta_t, dtype=np.float64)
        W2 = np.einsum("tz,tzy->zy", F, beta_t**2 * Bn[:, nxt])
    D = np.einsum("zy,zyv->zv", p * beta**2 * W2, hv**2)
    sec = np.zeros((C, V))
    np.add.at(sec, mdp.state_context, D)
    if T == 1:
        return sec.ravel()
    a = (p * alpha * beta)[:, :, None] * hv  # [nZ, y, v] weight of the earlier token
    b = (p * gamma * beta)[:, :, None] * hv  # [nZ, y'', v] weight of the later token
    a = a.reshape(C, Q, V, V)
    b = b.reshape(C, Q, V, V)
    nxt_c = nxt.reshape(C, Q, V)
    L = 2 * T
    if beta_t is None:
        # corr_n(z, w) for z in block c, w = f(z'', y'') with z'' in block c: [n, C, Q, Q'', V'']
        Ff = np.fft.rfft(F.reshape(T, C, Q), n=L, axis=0)  # [L/2+1, C, Q]
        Bsel = Bn[:, nxt_c]  # [T, C, Q'', V'']
        Bf = np.fft.rfft(Bsel, n=L, axis=0)
        corr = np.empty((T - 1, C, Q, Q, V))
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            prod = np.conj(Ff[:, c0:c1, :, None, None]) * Bf[:, c0:c1, None, :, :]
            full = np.fft.irfft(prod, n=L, axis=0)  # full[m] = Σ_s F_s B_{s+m}
            corr[:, c0:c1] = full[1:T]  # m = n + 1, n = 0..T-2
    # G[c, q, y, q'', y''] = Σ_n K^n(f(z,y), z'') corr_n(z, f(z'',y'')); powers of K kept transposed
    # (KnT = (K^n)ᵀ) and advanced by grouped dense products over destinations sharing a predecessor set
    Kw = sparse.csr_matrix(((p * alpha * gamma).ravel(), (rows, cols)), shape=(nZ, nZ))
    groups = _predecessor_groups(mdp, Kw)
    src = nxt_c  # [C, Q, V] state f(z, y)
    dst = (np.arange(C)[:, None] * Q + np.arange(Q)[None, :])  # [C, Q''] states of block c
    R = np.empty((T - 1, C, Q, Q, V))  # R[n, c, q, q'', y] = K^n(f(z_{c,q}, y), z_{c,q''})
    # rows of KnT are stored in a permuted order that makes every group's destinations a contiguous slice
    order = np.concatenate([dests for _, dests, _ in groups] + [np.setdiff1d(np.arange(nZ), np.concatenate(
        [dests for _, dests, _ in groups]))])
    pos = np.empty(nZ, dtype=np.int64)
    pos[order] = np.arange(nZ)
    slices, start = [], 0
    for pred, dests, W in groups:
        slices.append((pos[pred], slice(start, start + len(dests)), W))
        start += len(dests)
    cur = np.eye(nZ)[order]
    nxt_buf = np.zeros_like(cur)
    rd, rs = pos[dst[:, None, :, None]], src[:, :, None, :]
    for n in range(T - 1):
        R[n] = cur[rd, rs]
        if n < T - 2:
            for prow, sl, W in slices:
                np.matmul(W, cur[prow], out=nxt_buf[sl])
            cur, nxt_buf = nxt_buf, cur
            nxt_buf[start:] = 0.0  # rows of states without predecessors (K^n = 0 there for n >= 1)
    if beta_t is None:
        # batched over (c, q, q''): G[y, y''] = Σ_n R[n, y] corr[n, y'']
        Rm = np.ascontiguousarray(R.transpose(1, 2, 3, 4, 0))  # [C, Q, Q'', V, n]
        Cm = np.ascontiguousarray(corr.transpose(1, 2, 3, 0, 4))  # [C, Q, Q'', n, V'']
        G = np.matmul(Rm, Cm).transpose(0, 1, 3, 2, 4)  # [C, Q, V, Q'', V'']
    else:
        X = (F[:, :, None] * beta_t).reshape(T, C, Q, V)  # X_s(z, y) = F_s(z) β_s(z, y)
        Y = (beta_t * Bn[:, nxt]).reshape(T, C, Q, V)  # Y_t(z'', y'') = β_t(z'', y'') B_t(f(z'', y''))
        G = np.empty((C, Q, V, Q, V))
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            Xf = np.fft.rfft(X[:, c0:c1], n=L, axis=0)  # [L/2+1, c, Q, V]
            Rf = np.fft.rfft(R[:, c0:c1], n=L, axis=0)  # [L/2+1, c, Q, Q'', V]
            # conv[k] = Σ_{s+m=k} X_s R_m, so U_t = conv[t−1] (t = 1..T−1)
            conv = np.fft.irfft(Xf[:, :, :, None, :] * Rf, n=L, axis=0)[: T - 1]  # [k, c, q, q'', y]
            Cm = conv.transpose(1, 3, 2, 4, 0).reshape(c1 - c0, Q, Q * V, T - 1)  # [c, q'', (q, y), k]
            Ym = Y[1:, c0:c1].transpose(1, 2, 0, 3)  # [c, q'', k, y'']
            G[c0:c1] = np.matmul(Cm, Ym).reshape(c1 - c0, Q, Q, V, V).transpose(0, 2, 3, 1, 4)
    cross = np.einsum("cqyv,cpwv,cqypw->cv", a, b, G)
    sec += 2.0 * cross
    return sec.ravel()


def _predecessor_groups(mdp: MarkovMDP, K: sparse.csr_matrix) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Destinations of ``K`` grouped by identical structural predecessor sets: ``(pred, dests, W)`` with
    ``W = K[pred, dests]ᵀ`` dense, so that ``(K^{n+1})ᵀ[dests] = W @ (K^n)ᵀ[pred]``."""
    nZ, V = mdp.num_states, mdp.vocab_size
    preds: dict[int, set[int]] = {z2: set() for z2 in range(nZ)}
    for z in range(nZ):
        for y in range(V):
            preds[int(mdp.next_state[z, y])].add(z)
    by_set: dict[tuple[int, ...], list[int]] = {}
    for z2, ps in preds.items():
        if ps:
            by_set.setdefault(tuple(sorted(ps)), []).append(z2)
    Kd = K.tocsc()
    out = []
    for ps, ds in by_set.items():
        pred, dests = np.array(ps), np.array(ds)
        W = Kd[pred][:, dests].toarray().T
        out.append((pred, dests, W))
    return out
