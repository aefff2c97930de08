"""Building blocks of the exact dynamic programmes: per-state policy tables, on-policy values and occupancies,
per-transition log-ratio tables, block-sparse score features, oracle signal tables and exact per-position
moments of L_t and ρ_{1:t} under μ (docs/theory.md §2, §5).

States ``z`` of a :class:`~ctpo_lab.markov.model.MarkovMDP` carry their context ``c = state_context[z]``; the
transition ``z --y--> next_state[z, y]`` is deterministic, so every expectation over trajectories is a sum over
``(t, z, y)`` weighted by forward occupancies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .model import MarkovMDP

__all__ = [
    "PolicyValues",
    "state_policy_tables",
    "policy_values",
    "positions_mask",
    "signal_tables",
    "TransitionTables",
    "transition_tables",
    "BlockFeature",
    "score_feature",
    "projected_feature",
    "scalar_feature",
    "scatter_blocks",
    "moment_step",
    "gather_block",
    "position_moments",
]


@dataclass(eq=False)
class PolicyValues:
    """Exact on-policy tables for one policy.

    Attributes
    ----------
    q : np.ndarray ``[T, |Z|, V]``  ``Q_t(z, y)`` (index ``t-1``).
    v : np.ndarray ``[T+1, |Z|]``   ``V_t(z)``; ``v[T] = R``.
    adv : np.ndarray ``[T, |Z|, V]`` ``A_t = Q_t − V_t``.
    occupancy : np.ndarray ``[T+1, |Z|]`` ``d_t(z) = P(z_t = z)``.
    J : float  ``V_1(z_1)``.
    """

    q: np.ndarray
    v: np.ndarray
    adv: np.ndarray
    occupancy: np.ndarray
    J: float


def state_policy_tables(mdp: MarkovMDP, policy: np.ndarray) -> np.ndarray:
    return np.asarray(policy, dtype=np.float64)[mdp.state_context]


def policy_values(mdp: MarkovMDP, policy: np.ndarray | str = "target") -> PolicyValues:
    """Backward values and forward occupancies of ``policy`` ("target", "behaviour" or a ``[C, V]`` table)."""
    if isinstance(policy, str):
        if policy not in ("target", "behaviour"):
            raise ValueError("policy must be 'target', 'behaviour' or an array")
        policy = mdp.target if policy == "target" else mdp.behaviour
    pz = state_policy_tables(mdp, policy)
    T, nZ, V = mdp.horizon, mdp.num_states, mdp.vocab_size
    nxt = mdp.next_state
    v = np.zeros((T + 1, nZ))
    q = np.zeros((T, nZ, V))
    v[T] = mdp.state_reward
    for t in range(T - 1, -1, -1):
        q[t] = v[t + 1][nxt]
        v[t] = (pz * q[t]).sum(axis=1)
    d = np.zeros((T + 1, nZ))
    d[0, mdp.start_state] = 1.0
    for t in range(T):
        d[t + 1] = np.bincount(nxt.ravel(), (d[t][:, None] * pz).ravel(), minlength=nZ)
    return PolicyValues(q=q, v=v, adv=q - v[:T, :, None], occupancy=d, J=float(v[0, mdp.start_state]))



def positions_mask(positions: Iterable[int] | np.ndarray | None, T: int) -> np.ndarray:
    if positions is None:
        return np.ones(T, dtype=bool)
    arr = np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions)
    if arr.dtype == bool:
        if arr.shape != (T,):
            raise ValueError(f"boolean positions must have shape [{T}]")
        return arr
    m = np.zeros(T, dtype=bool)
    if arr.size and (arr.min() < 1 or arr.max() > T):
        raise ValueError(f"positions are 1-based and must lie in 1..{T}")
    m[arr.astype(int) - 1] = True
    return m


def signal_tables(mdp: MarkovMDP, signal: str, baseline: float = 0.0) -> np.ndarray | None:
    """Per-token oracle signal ``S_t(z, y)`` ``[T, |Z|, V]`` (``None`` for the outcome signal).

    ``q_pi`` = ``Q^π − b``, ``adv_pi`` = ``A^π``, ``q_mu`` = ``Q^μ − b``, ``adv_mu`` = ``A^μ``.
    """
    if signal == "reward":
        return None
    pv = policy_values(mdp, "target" if signal.endswith("pi") else "behaviour")
    return pv.q - baseline if signal.startswith("q_") else pv.adv


@dataclass
class TransitionTables:
    """z-level tables shared by the DPs: μ, π, r, ℓ as ``[|Z|, V]``."""

    mu: np.ndarray
    pi: np.ndarray
    r: np.ndarray
    ell: np.ndarray


def transition_tables(mdp: MarkovMDP) -> TransitionTables:
    mu = state_policy_tables(mdp, mdp.behaviour)
    pi = state_policy_tables(mdp, mdp.target)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(mu > 0, pi / np.where(mu > 0, mu, 1.0), 0.0)
        ell = np.where((mu > 0) & (pi > 0), np.log(np.where(pi > 0, pi, 1.0)) - np.log(np.where(mu > 0, mu, 1.0)),
                       -np.inf)
    return TransitionTables(mu=mu, pi=pi, r=r, ell=ell)



@dataclass
class BlockFeature:
    """Block-sparse features: the feature vector of transition (z, y) is ``hv[z, y, :]`` placed at columns
    ``blk[z]*B .. blk[z]*B + B − 1`` of a ``d = nblocks·B`` vector."""

    blk: np.ndarray
    hv: np.ndarray
    d: int
    is_score: bool = False

    @property
    def B(self) -> int:
        return int(self.hv.shape[2])


def score_feature(mdp: MarkovMDP) -> BlockFeature:
    """The score ``ψ(c, y) = e_c ⊗ (e_y − π(·|c))``: block = context, ``hv[z, y, v] = 1{y=v} − π(v|c)``."""
    pi = state_policy_tables(mdp, mdp.target)
    V = mdp.vocab_size
    hv = np.eye(V)[None, :, :] - pi[:, None, :]
    return BlockFeature(blk=mdp.state_context.copy(), hv=hv, d=mdp.dim, is_score=True)


def projected_feature(mdp: MarkovMDP, u: np.ndarray) -> BlockFeature:
    """Scalar feature ``uᵀψ(z, y)`` (one block of width 1)."""
    pi = state_policy_tables(mdp, mdp.target)
    U = np.asarray(u, dtype=np.float64).reshape(mdp.num_contexts, mdp.vocab_size)[mdp.state_context]
    h = U - (U * pi).sum(axis=1, keepdims=True)
    return BlockFeature(blk=np.zeros(mdp.num_states, dtype=np.int64), hv=h[:, :, None], d=1)


def scalar_feature(mdp: MarkovMDP) -> BlockFeature:
    """The constant feature 1 (for scalar surrogates such as ``Σ_t w_t S_t``)."""
    return BlockFeature(blk=np.zeros(mdp.num_states, dtype=np.int64), hv=np.ones((mdp.num_states, mdp.vocab_size, 1)),
                    d=1)


def scatter_blocks(dest: np.ndarray, blk: np.ndarray, vals: np.ndarray, n_out: int, d: int) -> np.ndarray:
    """Sum ``vals[a, y, b]`` into ``out[dest[a, y], blk[a]*B + b]`` (``out`` is ``[n_out, d]``)."""
    A, V, B = vals.shape
    flat = (dest[:, :, None] * d + (blk[:, None, None] * B + np.arange(B)[None, None, :]))
    return np.bincount(flat.ravel(), vals.ravel(), minlength=n_out * d).reshape(n_out, d)


def gather_block(X: np.ndarray, blk: np.ndarray, B: int) -> np.ndarray:
    """``X[a, blk[a]*B + b]`` -> ``[A, B]``."""
    cols = blk[:, None] * B + np.arange(B)[None, :]
    return np.take_along_axis(X, cols, axis=1)



def position_moments(mdp: MarkovMDP) -> dict[str, np.ndarray]:
    """Exact per-position quantities under ``μ``, each ``[T]`` (index ``t-1``).

    ``mean_L = E L_t``, ``var_L = Var L_t`` (``L_t = Σ_{k≤t} ℓ_k``), ``mean_rho = E ρ_{1:t}``,
    ``var_rho = Var ρ_{1:t}`` (kernels ``π`` and ``π²/μ``), ``ess = (E ρ)²/E ρ²`` (ESS/N of ``ρ_{1:t}``),
    ``kl = E KL(μ‖π)(z_t)``, ``sigma2 = E Var(ℓ_t | z_t)``, ``var_martingale = Σ_{k≤t} sigma2_k``,
    ``alive = P(token t is generated before DONE)`` (1 without a DONE token; ``L`` is frozen after DONE, so
    the other profiles are unconditional).
    """
    tab = transition_tables(mdp)
    T, nZ = mdp.horizon, mdp.num_states
    nxt = mdp.next_state.ravel()
    mu = tab.mu
    ell = np.where(mu > 0, tab.ell, 0.0)
    m0 = np.zeros(nZ)
    m0[mdp.start_state] = 1.0
    m1, m2 = np.zeros(nZ), np.zeros(nZ)
    e1, e2 = m0.copy(), m0.copy()
    out = {k: np.zeros(T) for k in ("mean_L", "var_L", "mean_rho", "var_rho", "ess", "kl", "sigma2", "alive")}
    live = np.ones(nZ, dtype=bool)
    if mdp.done_token is not None:
        live = mdp.state_context != mdp.num_contexts - 1
    kl_z = -(mu * ell).sum(axis=1)
    s2_z = (mu * ell**2).sum(axis=1) - kl_z**2
    for t in range(T):
        out["alive"][t] = m0[live].sum()
        out["kl"][t] = m0 @ kl_z
        out["sigma2"][t] = m0 @ s2_z
        n1 = np.bincount(nxt, (mu * (m1[:, None] + ell * m0[:, None])).ravel(), minlength=nZ)
        n2 = np.bincount(nxt, (mu * (m2[:, None] + 2 * ell * m1[:, None] + ell**2 * m0[:, None])).ravel(),
                         minlength=nZ)
        m0 = np.bincount(nxt, (mu * m0[:, None]).ravel(), minlength=nZ)
        m1, m2 = n1, n2
        e1 = np.bincount(nxt, (mu * tab.r * e1[:, None]).ravel(), minlength=nZ)
        e2 = np.bincount(nxt, (mu * tab.r**2 * e2[:, None]).ravel(), minlength=nZ)
        out["mean_L"][t] = m1.sum()
        out["var_L"][t] = m2.sum() - m1.sum() ** 2
        out["mean_rho"][t] = e1.sum()
        out["var_rho"][t] = e2.sum() - e1.sum() ** 2
        out["ess"][t] = e1.sum() ** 2 / e2.sum()
    out["var_martingale"] = np.cumsum(out["sigma2"])
    out["t"] = np.arange(1, T + 1, dtype=np.float64)
    return out




def moment_step(prop, p: np.ndarray, a: np.ndarray, b: np.ndarray, g: np.ndarray, pb: np.ndarray, blk: np.ndarray,
                hv: np.ndarray, dest: np.ndarray, size: int, d: int, block: int, Q0: np.ndarray, Q1: np.ndarray,
                P0: np.ndarray | None, P1: np.ndarray | None, P2: np.ndarray | None, *, second: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """One step of the forward moment recursions on an augmented (merged) state, shared by the ``(z, L)`` DP and
    the three-policy DP.

    ``prop(w)`` is the sparse propagation matrix of per-transition weights ``w`` ``[A, V]`` onto the ``size``
    next states; ``p`` the transition probabilities, ``(a, b, g)`` the compact weight tables (α, β, γ) of the
    transition, ``pb`` = ``p·b`` (zero where the transition is masked), ``blk``/``hv`` the score's feature blocks
    (``block`` wide, ``d`` coordinates), ``dest`` the next state of each transition.  With ``Q0 = Σ mass·Πα``,
    ``Q1`` the first moment, ``P0, P1, P2`` the second-moment accumulators::

        Q1' = prop(p g) Q1 + scatter(p b Q0 h)
        P2' = prop(p g²) P2 + scatter(2 p b g h · P1[blk]) + scatter(p b² P0 h²)
        P1' = prop(p a g) P1 + scatter(p b a P0 h),   P0' = prop(p a²) P0,   Q0' = prop(p a) Q0

    (every right-hand side reads the accumulators before the step).  ``second=False`` skips P0, P1, P2.
    """
    Q1 = prop(p * g) @ Q1 + scatter_blocks(dest, blk, (pb * Q0[:, None])[:, :, None] * hv, size, d)
    if second:
        h_p1 = gather_block(P1, blk, block)
        P2 = (prop(p * g**2) @ P2
              + scatter_blocks(dest, blk, (2.0 * pb * g)[:, :, None] * hv * h_p1[:, None, :], size, d)
              + scatter_blocks(dest, blk, (pb * b * P0[:, None])[:, :, None] * hv**2, size, d))
        P1 = prop(p * a * g) @ P1 + scatter_blocks(dest, blk, (pb * a * P0[:, None])[:, :, None] * hv, size, d)
        P0 = prop(p * a**2) @ P0
    Q0 = prop(p * a) @ Q0
    return Q0, Q1, P0, P1, P2
