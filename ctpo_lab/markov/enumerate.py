"""Ground truth by exact enumeration of all ``V^T`` sequences (independent of the dynamic programmes).

Everything here is computed from the public model API (``context_index``, ``target``, ``behaviour``,
``reward``/``reward_batch``) on explicit token sequences: per-sequence probabilities, log-ratios, oracle values
from the full prefix tree (``Q^π_t(y_{≤t}) = E_π[R | y_{≤t}]``), and the estimator of each sequence from the loss
itself (the per-token coefficients −∂loss/∂log π_t of :func:`ctpo_lab.losses.policy_loss` by autograd, times the
tabular score). Moments are probability-weighted sums, accumulated in chunks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from ctpo_lab import losses

from .dp import positions_mask
from .estimator import ChainEstimator, loss_token_coefficients
from .exact import Moments, resolve_estimator
from .model import MarkovMDP

__all__ = [
    "MAX_ENUMERATION",
    "all_sequences",
    "prefix_contexts",
    "enumerate_trajectories",
    "tree_values",
    "trajectory_estimates",
    "enumerate_moments",
    "enumerate_gradient",
    "enumerate_performance",
    "old_policy_table",
]

MAX_ENUMERATION = 2_000_000


def _check_size(mdp: MarkovMDP, max_sequences: int) -> int:
    n = mdp.vocab_size**mdp.horizon
    if n > max_sequences:
        raise ValueError(
            f"V^T = {mdp.vocab_size}^{mdp.horizon} = {n:.3g} sequences is too large to enumerate "
            f"(limit {max_sequences:.3g}); use markov.exact_moments (the dynamic programme) instead"
        )
    return n


def all_sequences(vocab_size: int, length: int) -> np.ndarray:
    """All sequences in lexicographic order, ``[V^length, length]`` (row ``n`` is ``n`` written in base V)."""
    n = vocab_size**length
    idx = np.arange(n, dtype=np.int64)
    out = np.zeros((n, length), dtype=np.int64)
    for j in range(length - 1, -1, -1):
        out[:, j] = idx % vocab_size
        idx //= vocab_size
    return out


def prefix_contexts(mdp: MarkovMDP, seqs: np.ndarray) -> np.ndarray:
    """Context index before each token: ``ctx[n, t] = mdp.context_index(seqs[n, :t])``, ``[N, L]``.

    Built from a lookup table filled by calling ``mdp.context_index`` on every short prefix and every
    k-gram (a prefix longer than ``k`` has the same context as its last ``k`` tokens).
    """
    V, k = mdp.vocab_size, mdp.order
    N, L = seqs.shape
    ctx = np.zeros((N, L), dtype=np.int64)
    if k == 0 and mdp.done_token is None:
        return ctx
    full = np.array([mdp.context_index(tail) for tail in itertools.product(range(V), repeat=k)])
    for t in range(L):
        if t < k:
            short = {tuple(p): mdp.context_index(tuple(p)) for p in itertools.product(range(V), repeat=t)}
            if t == 0:
                ctx[:, 0] = short[()]
                continue
            code = np.zeros(N, dtype=np.int64)
            for j in range(t):
                code = code * V + seqs[:, j]
            table = np.array([short[tuple(p)] for p in itertools.product(range(V), repeat=t)])
            ctx[:, t] = table[code]
        else:
            code = np.zeros(N, dtype=np.int64)
            for j in range(t - k, t):
                code = code * V + seqs[:, j]
            ctx[:, t] = full[code]
    if mdp.done_token is not None and L > 1:  # after a DONE token the context is the absorbing DONE row
        seen = np.cumsum(seqs == mdp.done_token, axis=1) > 0
        done_idx = mdp.context_index((mdp.done_token,))
        ctx[:, 1:] = np.where(seen[:, :-1], done_idx, ctx[:, 1:])
    return ctx


def tree_values(mdp: MarkovMDP, policy: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Oracle values of every position of every sequence from the full prefix tree.

    Parameters
    ----------
    policy : ``[C, V]`` table; rewards : ``[V^T]`` rewards of all sequences in lexicographic order.

    Returns
    -------
    q : ``[V^T, T]`` with ``q[n, t-1] = E_policy[R | y_{≤t}]``; v : ``[V^T, T]`` with
    ``v[n, t-1] = E_policy[R | y_{<t}]``.
    """
    V, T = mdp.vocab_size, mdp.horizon
    N = V**T
    vals = [None] * (T + 1)
    vals[T] = np.asarray(rewards, dtype=np.float64)
    for t in range(T, 0, -1):  # combine level t (prefixes of length t) into level t-1
        pre = all_sequences(V, t - 1)
        c = prefix_contexts(mdp, np.concatenate([pre, np.zeros((pre.shape[0], 1), dtype=np.int64)], axis=1))[:, -1]
        probs = policy[c]  # [V^{t-1}, V]
        vals[t - 1] = (probs * vals[t].reshape(-1, V)).sum(axis=1)
    n = np.arange(N)
    q = np.stack([vals[t][n // V ** (T - t)] for t in range(1, T + 1)], axis=1)
    v = np.stack([vals[t - 1][n // V ** (T - t + 1)] for t in range(1, T + 1)], axis=1)
    return q, v


def enumerate_trajectories(mdp: MarkovMDP, max_sequences: int = MAX_ENUMERATION) -> dict[str, np.ndarray]:
    """All sequences with their per-token quantities.

    Returns a dict of arrays: ``seqs [N, T]``, ``ctx [N, T]``, ``log_pi``, ``log_mu``, ``ell [N, T]``
    (``log π − log μ`` of each token), ``p_mu``, ``p_pi [N]`` (sequence probabilities), ``reward [N]``.
    """
    _check_size(mdp, max_sequences)
    V, T = mdp.vocab_size, mdp.horizon
    seqs = all_sequences(V, T)
    ctx = prefix_contexts(mdp, seqs)
    tp = mdp.target[ctx, seqs]
    bp = mdp.behaviour[ctx, seqs]
    with np.errstate(divide="ignore"):
        log_pi, log_mu = np.log(tp), np.log(bp)
    p_mu, p_pi = np.prod(bp, axis=1), np.prod(tp, axis=1)
    with np.errstate(invalid="ignore"):
        ell = np.where(bp > 0, log_pi - log_mu, 0.0)
    return {"seqs": seqs, "ctx": ctx, "log_pi": log_pi, "log_mu": log_mu, "ell": ell, "p_mu": p_mu,
            "p_pi": p_pi, "reward": mdp.reward_batch(seqs)}


def trajectory_estimates(
    mdp: MarkovMDP,
    seqs: np.ndarray,
    ctx: np.ndarray,
    ell: np.ndarray,
    signal: np.ndarray,
    estimator: str | losses.LossConfig | ChainEstimator,
    positions: np.ndarray | None = None,
    *,
    log_prob: np.ndarray | None = None,
    old_log_prob: np.ndarray | None = None,
    batch_size: int | None = None,
    rollout_log_prob: np.ndarray | None = None,
    rollout_correction: object = None,
) -> np.ndarray:
    """The estimator ``X = Σ_t c_t ψ(c_t, y_t)`` of each trajectory, ``[N, C·V]``.

    Parameters
    ----------
    seqs, ctx, ell : ``[N, T]`` tokens, contexts, log-ratios ``ℓ_t``.
    signal : ``[N, T]`` per-token signal ``S_t`` (the outcome signal broadcast: ``R − b`` on every token).
    estimator : preset name, LossConfig or ChainEstimator; ``c_t = −∂ loss / ∂ log π_t`` of the loss on each
        trajectory with the signal as advantages (:func:`ctpo_lab.markov.estimator.loss_token_coefficients`).
    positions : ``[T]`` 0/1, optional: keep only these positions' terms (the weights still see every token).
    log_prob, old_log_prob : ``[N, T]`` log π_t and log μ_t, optional: the loss's inputs (default: read from
        ``mdp`` at ``(ctx, seqs)`` when the estimator reads probabilities, else ℓ alone; see
        :func:`~ctpo_lab.markov.estimator.loss_token_coefficients`).
    batch_size : batch-level estimators only: the loss is evaluated on consecutive batches of this many rows.
    rollout_log_prob, rollout_correction : three policies: the sampler's log π_roll ``[N, T]`` and the rollout
        correction (``old_log_prob`` is then log π_old; see :mod:`ctpo_lab.markov.three_policy`).
    """
    est = estimator if isinstance(estimator, ChainEstimator) else resolve_estimator(estimator, "reward")
    N, T = seqs.shape
    V = mdp.vocab_size
    if log_prob is None and est.reads_probabilities:
        with np.errstate(divide="ignore"):
            log_prob, old_log_prob = np.log(mdp.target[ctx, seqs]), np.log(mdp.behaviour[ctx, seqs])
    coef = loss_token_coefficients(ell, signal, est, log_prob=log_prob, old_log_prob=old_log_prob,
                                   batch_size=batch_size, rollout_log_prob=rollout_log_prob,
                                   rollout_correction=rollout_correction)
    if positions is not None:
        coef = coef * positions[None, :]
    X = np.zeros((N, mdp.dim))
    rows = np.arange(N)[:, None]
    eye = np.eye(V)
    for t in range(T):
        cols = ctx[:, t, None] * V + np.arange(V)[None, :]
        X[rows, cols] += coef[:, t, None] * (eye[seqs[:, t]] - mdp.target[ctx[:, t]])
    return X


def old_policy_table(mdp: MarkovMDP, old_policy: np.ndarray) -> np.ndarray:
    """The π_old table ``[C, V]``, checked against ``mdp`` (rows sum to 1, positive where the sampler is)."""
    tab = np.asarray(old_policy, dtype=np.float64)
    if tab.shape != mdp.target.shape:
        raise ValueError(f"old_policy: expected shape {mdp.target.shape}, got {tab.shape}")
    if not np.all(np.isfinite(tab)) or np.any(tab < 0) or np.any(np.abs(tab.sum(axis=1) - 1.0) > 1e-9):
        raise ValueError("old_policy: expected finite non-negative rows summing to 1")
    if np.any((tab <= 0) & (mdp.behaviour > 0)):
        raise ValueError("old_policy: zero where the sampler (mdp.behaviour) is positive")
    return tab


def _signal_matrix(mdp: MarkovMDP, tr: dict[str, np.ndarray], signal: str, baseline: float) -> np.ndarray:
    T = mdp.horizon
    if signal == "reward":
        return np.repeat((tr["reward"] - baseline)[:, None], T, axis=1)
    pol = mdp.target if signal.endswith("pi") else mdp.behaviour
    q, v = tree_values(mdp, pol, tr["reward"])
    return q - baseline if signal.startswith("q_") else q - v


def enumerate_gradient(mdp: MarkovMDP, max_sequences: int = MAX_ENUMERATION) -> np.ndarray:
    """``∇J = E_π[R Σ_t ψ_t]`` by enumeration, ``[C·V]``."""
    tr = enumerate_trajectories(mdp, max_sequences)
    X = trajectory_estimates(mdp, tr["seqs"], tr["ctx"], np.zeros_like(tr["ell"]),
                             np.repeat(tr["reward"][:, None], mdp.horizon, axis=1), "unclipped_token")
    return tr["p_pi"] @ X


def enumerate_performance(mdp: MarkovMDP, policy: np.ndarray | None = None,
                          max_sequences: int = MAX_ENUMERATION) -> float:
    """``J = Σ_y P(y) R(y)`` by enumeration (``policy`` defaults to the target)."""
    _check_size(mdp, max_sequences)
    pol = mdp.target if policy is None else np.asarray(policy, dtype=np.float64)
    seqs = all_sequences(mdp.vocab_size, mdp.horizon)
    ctx = prefix_contexts(mdp, seqs)
    return float(np.prod(pol[ctx, seqs], axis=1) @ mdp.reward_batch(seqs))


def enumerate_moments(
    mdp: MarkovMDP,
    estimator: str | losses.LossConfig | ChainEstimator = "unclipped_cumulative",
    signal: str = "reward",
    baseline: float = 0.0,
    *,
    positions: Iterable[int] | np.ndarray | None = None,
    max_sequences: int = MAX_ENUMERATION,
    chunk_size: int = 50_000,
    old_policy: np.ndarray | None = None,
    rollout_correction: object = None,
    **overrides: object,
) -> Moments:
    """The same fields as :func:`ctpo_lab.markov.exact_moments`, by exact enumeration (``V^T`` sequences).

    ``E X = Σ_y μ(y) X(y)``, ``E X_j² = Σ_y μ(y) X_j(y)²``, ``∇J = Σ_y π(y) R(y) Σ_t ψ_t(y)``,
    ``Var(uᵀX)`` with ``u = ∇J/‖∇J‖``. Every per-trajectory LossConfig is accepted (the loss of each sequence,
    with its real log π and log μ); batch-level ones (:attr:`ChainEstimator.batch_level`) raise — their
    estimator depends on the other trajectories of the batch: use ``monte_carlo_moments(batch_size=...)``.

    Three policies (:mod:`ctpo_lab.markov.three_policy`): ``mdp.behaviour`` is the sampler π_roll,
    ``old_policy`` ``[C, V]`` the trainer's recompute π_old and ``rollout_correction`` a correction; the loss of
    each sequence is ``policy_loss(log π, log π_old, ..., rollout_log_prob=log π_roll, rollout_correction=...)``
    (``old_policy`` alone: the uncorrected loss with the PPO ratio against π_old, data from π_roll).
    """
    from ctpo_lab.rollout_correction import resolve_rollout_correction

    corr = resolve_rollout_correction(rollout_correction)
    old_tab = None if old_policy is None else old_policy_table(mdp, old_policy)
    if corr is not None and old_tab is None:
        raise ValueError("old_policy: a rollout_correction needs old_policy (the trainer's π_old table)")
    if not isinstance(mdp, MarkovMDP):
        raise TypeError(f"mdp: expected a MarkovMDP, got {type(mdp).__name__}")
    est = resolve_estimator(estimator, signal, overrides)
    if est.batch_level or (corr is not None and corr.rollout_is_batch_normalize):
        raise ValueError(f"estimator: {est.name!r} is batch-level (its loss reads a statistic of the whole batch); "
                         "enumeration measures one trajectory at a time — use "
                         "markov.monte_carlo_moments(..., batch_size=...)")
    pos = positions_mask(positions, mdp.horizon).astype(np.float64)
    tr = enumerate_trajectories(mdp, max_sequences)
    S = _signal_matrix(mdp, tr, signal, float(baseline))
    grad = enumerate_gradient(mdp, max_sequences)
    gn = np.linalg.norm(grad)
    u = grad / gn if gn > 0 else np.zeros_like(grad)
    d = mdp.dim
    s1, s2 = np.zeros(d), np.zeros(d)
    pu1 = pu2 = 0.0
    N = tr["seqs"].shape[0]
    step = max(1, min(chunk_size, int(4e6 // max(d, 1))))
    for a in range(0, N, step):
        sl = slice(a, min(N, a + step))
        pm = tr["p_mu"][sl]
        keep = pm > 0
        if not keep.any():
            continue
        seqs, ctx = tr["seqs"][sl][keep], tr["ctx"][sl][keep]
        if old_tab is None:
            X = trajectory_estimates(mdp, seqs, ctx, tr["ell"][sl][keep], S[sl][keep], est, pos,
                                     log_prob=tr["log_pi"][sl][keep], old_log_prob=tr["log_mu"][sl][keep])
        else:
            with np.errstate(divide="ignore"):
                log_old = np.log(old_tab[ctx, seqs])
            X = trajectory_estimates(mdp, seqs, ctx, tr["log_pi"][sl][keep] - log_old, S[sl][keep], est, pos,
                                     log_prob=tr["log_pi"][sl][keep], old_log_prob=log_old,
                                     rollout_log_prob=tr["log_mu"][sl][keep] if corr is not None else None,
                                     rollout_correction=corr)
        w = pm[keep]
        s1 += w @ X
        s2 += w @ X**2
        proj = X @ u
        pu1 += float(w @ proj)
        pu2 += float(w @ proj**2)
    vag = pu2 - pu1**2 if gn > 0 else float("nan")
    return Moments(est.name, signal, float(baseline), s1, s2, grad, vag, method="enumeration", config=est.config)
