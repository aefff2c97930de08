"""Three policies on the exact laboratory: the sampler π_roll, the trainer's recompute π_old and the current π.

Real RL-for-LLM systems sample with one engine (vLLM/SGLang, often bf16, possibly a stale copy of the weights:
π_roll), recompute the log-probs with the trainer (π_old) and optimise π = π_θ. A chain of this module carries
the three tables: ``chain.mdp`` is a :class:`~ctpo_lab.markov.model.MarkovMDP` with ``target = π`` and
``behaviour = π_roll`` (trajectories are sampled from π_roll), ``chain.old`` is π_old.

The estimator of a (policy-loss preset × rollout correction) pair on one trajectory ``y ~ π_roll`` is (the
contract of :mod:`ctpo_lab.markov.estimator`, with the third policy)::

    X(y) = −∇_θ policy_loss(log π(y), log π_old(y), S, mask = 1, preset, aggregation = "seq-mean-token-sum",
                            rollout_log_prob = log π_roll(y), rollout_correction = correction)

so the PPO ratio (clip window, dual clip, CTPO's prefix window) reads ℓ^po_t = log π − log π_old while the data
came from π_roll, and the correction's detached weights and rejection read ℓ^ro_t = log π_old − log π_roll
(bypass mode: the preset is anchored at π_roll and the correction reads sg(log π) − log π_roll).

Target: the true gradient ∇J(π) of the current policy (the quantity every update is meant to follow; the
bias columns of :func:`rollout_moments` are against it). The frameworks' implicit target is the preset's own
expectation had the data come from π_old (``E_{π_old}[X_preset]``, what a perfect correction would recover):
:func:`framework_target` gives it, so that a correction's own error (vs that target) and the preset's bias (that
target vs ∇J) can be read apart.

Exact DP (:func:`rollout_exact_moments`): the moment recursions of :mod:`ctpo_lab.markov.exact` on an augmented
state ``(z, L^po, L^ro, K…)`` carrying only the running statistics the pair reads — the preset's running sum
(CTPO's window, GSPO's sequence clip), the correction's cumulative log-ratio (sequence TIS / IcePop, the
cumulative level) and the sums or maxima of the rejection statistics (``seq_sum_*``, ``seq_mean_*``,
``seq_max_*``); atoms with equal statistics are merged exactly. Per-transition factors (the preset's token
weights and masks, token TIS ``min(π_old/π_roll, U)``, the token IcePop band, token rejection) enter the tables
directly, prefix factors (the cumulative correction ρ_{1:t}(π_old/π_roll) in its log window) at each step,
sequence factors (sequence TIS, sequence rejection, GSPO's clip) in the readout. Not represented, with a
``ValueError`` naming the alternative (:func:`rollout_dp_unsupported_reason`): the preset's own unsupported
rules, token-level rejection with a prefix- or sequence-level ratio or a position-dependent window (rejected
tokens leave the mask, shifting positions and prefix sums), and batch normalisation (batch-level: Monte Carlo
with ``batch_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from ctpo_lab import losses
from ctpo_lab.rollout_correction import SAFETY_BOUND, RolloutCorrection, resolve_rollout_correction

from .dp import (
    BlockFeature,
    moment_step,
    positions_mask,
    projected_feature,
    score_feature,
    signal_tables,
    state_policy_tables,
)
from .enumerate import enumerate_moments, old_policy_table
from .estimator import L_FLOOR, ChainEstimator
from .exact import Moments, exact_moments, performance, resolve_estimator, true_gradient
from .model import MarkovMDP, kl_rows, make_automaton, perturb_rows
from .sample import MonteCarloMoments, monte_carlo_moments

__all__ = [
    "ThreePolicyChain",
    "three_policy_instance",
    "rollout_dp_unsupported_reason",
    "check_rollout_dp_support",
    "rollout_lab_method",
    "rollout_exact_moments",
    "rollout_moments",
    "framework_target",
    "ROLL_DIRECTIONS",
]

#: how π_roll departs from π_old: ``"noise"`` an independent random logit direction per context (bf16-like
#: numerical noise of the sampler), ``"stale"`` further along the π → π_old direction (an older copy of the
#: weights: π_roll is where π_old was a step before)
ROLL_DIRECTIONS = ("noise", "stale")
_EXACT_KEY = 1e-11


@dataclass(frozen=True, eq=False)
class ThreePolicyChain:
    """A chain with three policies: ``mdp.target`` = π, ``mdp.behaviour`` = π_roll (the sampler), ``old`` = π_old.

    Attributes
    ----------
    mdp : MarkovMDP with target π and behaviour π_roll.
    old : ``[C, V]`` the trainer's recompute π_old.
    """

    mdp: MarkovMDP
    old: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.mdp, MarkovMDP):
            raise TypeError(f"mdp: expected a MarkovMDP, got {type(self.mdp).__name__}")
        object.__setattr__(self, "old", old_policy_table(self.mdp, self.old))

    @property
    def target(self) -> np.ndarray:
        return self.mdp.target

    @property
    def rollout(self) -> np.ndarray:
        return self.mdp.behaviour

    def two_policy(self, sampler: str = "old") -> MarkovMDP:
        """The two-policy chain with π as target and ``sampler`` (``"old"``: π_old, ``"rollout"``: π_roll) as μ."""
        if sampler not in ("old", "rollout"):
            raise ValueError(f"sampler: expected 'old' or 'rollout', got {sampler!r}")
        return self.mdp.with_policies(behaviour=self.old.copy() if sampler == "old" else None)

    def mismatch(self) -> dict[str, float]:
        """Mean per-context KL of each pair (rows averaged uniformly): ``kl_roll_old`` = KL(π_roll‖π_old),
        ``kl_old_pi`` = KL(π_old‖π), ``kl_roll_pi`` = KL(π_roll‖π)."""
        return {"kl_roll_old": float(np.mean(kl_rows(self.rollout, self.old))),
                "kl_old_pi": float(np.mean(kl_rows(self.old, self.target))),
                "kl_roll_pi": float(np.mean(kl_rows(self.rollout, self.target)))}


def three_policy_instance(
    vocab_size: int = 3,
    horizon: int = 5,
    order: int = 1,
    seed: int = 0,
    kl_roll_old: float = 1e-3,
    kl_old_pi: float = 0.0,
    *,
    measure: str = "kl",
    roll_direction: str = "noise",
    automaton: str = "count",
    logit_scale: float = 1.0,
) -> ThreePolicyChain:
    """Seeded random three-policy chain: π logits ``~ N(0, logit_scale²)``; π_old = π's logits moved along a random
    direction until each row has ``KL(π_old‖π) = kl_old_pi``; π_roll = π_old's logits moved until each row has
    ``KL(π_roll‖π_old) = kl_roll_old`` (``measure="chi2"``: χ²(π‖π_old) and χ²(π_old‖π_roll) instead), along an
    independent random direction (``roll_direction="noise"``: bf16-like sampler noise) or along the π → π_old
    direction (``"stale"``: an older copy of the weights; needs ``kl_old_pi > 0``).
    """
    if measure not in ("kl", "chi2"):
        raise ValueError(f"measure: expected 'kl' or 'chi2', got {measure!r}")
    if roll_direction not in ROLL_DIRECTIONS:
        raise ValueError(f"roll_direction: expected one of {ROLL_DIRECTIONS}, got {roll_direction!r}")
    for name, v in (("kl_roll_old", kl_roll_old), ("kl_old_pi", kl_old_pi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if roll_direction == "stale" and kl_old_pi == 0:
        raise ValueError("roll_direction: 'stale' extends the π → π_old direction; it needs kl_old_pi > 0")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError("seed must be an int")
    rng = np.random.default_rng(seed)
    auto = make_automaton(automaton, vocab_size, horizon)
    C = sum(vocab_size**j for j in range(order + 1))
    logits = rng.normal(0.0, logit_scale, size=(C, vocab_size))
    d_old = rng.normal(size=(C, vocab_size))
    d_roll = rng.normal(size=(C, vocab_size))
    target = perturb_rows(logits, d_old, 0.0, measure)
    old = perturb_rows(logits, d_old, float(kl_old_pi), measure)
    old_logits = np.log(old)
    if roll_direction == "stale":
        d_roll = old_logits - logits
        d_roll -= d_roll.mean(axis=1, keepdims=True)
    roll = perturb_rows(old_logits, d_roll, float(kl_roll_old), measure)
    mdp = MarkovMDP(vocab_size, horizon, order, auto, target, roll,
                    name=f"three_policy(V={vocab_size},T={horizon},k={order},seed={seed},{measure}: roll‖old="
                         f"{kl_roll_old:g}, old‖pi={kl_old_pi:g}, {roll_direction})")
    return ThreePolicyChain(mdp, old)


# ------------------------------------------------------------------------------------------ classification
def _resolve(preset: str | losses.LossConfig | ChainEstimator, correction: object, signal: str,
             overrides: dict | None = None) -> tuple[ChainEstimator, RolloutCorrection | None, ChainEstimator]:
    """(the preset's estimator, the correction, the estimator the loss runs: bypass ``reinforce`` replaces the
    rule by −A·w·log π, as ``losses``' corrected path does)."""
    est = resolve_estimator(preset, signal, overrides)
    corr = resolve_rollout_correction(correction)
    run = est
    if corr is not None and corr.bypass_mode and corr.loss_type == "reinforce":
        cfg = losses.resolve_config(est.config, name=f"{est.config.name}+reinforce", ratio="token",
                                    clip="reinforce", dual_clip=None)
        run = ChainEstimator(cfg)
    return est, corr, run


def rollout_dp_unsupported_reason(preset: str | losses.LossConfig | ChainEstimator, correction: object = None,
                                  signal: str = "reward") -> str | None:
    """Why the three-policy DP cannot represent (preset, correction) with ``signal`` (None: it can)."""
    _, corr, run = _resolve(preset, correction, signal)
    reason = run.dp_unsupported_reason(signal)
    if reason is not None:
        return reason
    if corr is None:
        return None
    if corr.rollout_is_batch_normalize:
        return (f"rollout_correction: {corr.name!r} normalises its weights by the batch mean (batch-level); the "
                "exact DP and enumeration measure one trajectory at a time — use "
                "markov.monte_carlo_moments(..., old_policy=..., rollout_correction=..., batch_size=...)")
    token_rs = [o.name for o in corr.rejection if o.level == "token"]
    if token_rs and (run.level != "token" or run.position_dependent_window):
        return (f"rollout_correction: {corr.name!r} rejects single tokens ({', '.join(token_rs)}), which leave the "
                f"response mask and shift the positions and prefix sums of {run.name!r} ({run.config.ratio} ratio"
                f"{', position-dependent window' if run.position_dependent_window else ''}); the DP supports token "
                "rejection with token-level ratios and position-independent windows only — use "
                "markov.enumerate_moments / monte_carlo_moments(..., old_policy=..., rollout_correction=...)")
    return None


def check_rollout_dp_support(preset: str | losses.LossConfig | ChainEstimator, correction: object = None,
                             signal: str = "reward") -> None:
    """Raise ``ValueError`` (naming the alternative) where :func:`rollout_exact_moments` does not apply."""
    reason = rollout_dp_unsupported_reason(preset, correction, signal)
    if reason is not None:
        raise ValueError(reason)


def rollout_lab_method(preset: str | losses.LossConfig | ChainEstimator, correction: object = None,
                       signal: str = "reward") -> str:
    """``"dp"``, ``"per_trajectory"`` (enumeration on small chains, Monte Carlo otherwise) or ``"batch"``."""
    est, corr, run = _resolve(preset, correction, signal)
    if run.batch_level or (corr is not None and corr.rollout_is_batch_normalize):
        return "batch"
    return "dp" if rollout_dp_unsupported_reason(preset, correction, signal) is None else "per_trajectory"


# ------------------------------------------------------------------------------------------ the correction
def _bounds(raw: np.ndarray, mode: str, lower: float | None, upper: float) -> np.ndarray:
    """``rollout_correction``'s bounds: TIS min/max, or IcePop's band (0 outside)."""
    if mode == "truncate":
        out = np.minimum(raw, upper)
        return np.maximum(out, lower) if lower is not None else out
    keep = raw <= upper if lower is None else (raw >= lower) & (raw <= upper)
    return np.where(keep, raw, 0.0)


def _clamp(x: np.ndarray, bound: float | None) -> np.ndarray:
    return x if bound is None else np.clip(x, -bound, bound)


_TOKEN_STATS = {
    "k1": lambda e: -e,
    "k2": lambda e: 0.5 * e * e,
    "k3": lambda e: np.expm1(e) - e,
}


def _rs_keep(stat: np.ndarray, opt) -> np.ndarray:  # noqa: ANN001
    return stat <= opt.upper if opt.lower is None else (stat >= opt.lower) & (stat <= opt.upper)


@dataclass
class _Compiled:
    """Per-transition tables and the running statistics a (preset, correction) pair reads."""

    token_factor: np.ndarray  # [|Z|, V]: token TIS / IcePop weight × token rejection keep
    stat_incs: list[np.ndarray]  # per running statistic: the per-transition increment [|Z|, V]
    stat_kinds: list[str]  # "sum" or "max"
    preset_col: int | None  # column of the preset's running sum
    corr_col: int | None  # column of Σ ℓ^ro (sequence / cumulative weight)
    rs_cols: list[tuple[int, object]]  # (column, RejectionOption) of the sequence rejection options


def _compile(mdp: MarkovMDP, run: ChainEstimator, corr: RolloutCorrection | None, ell_po: np.ndarray,
             ell_ro: np.ndarray) -> _Compiled:
    nZ, V = ell_po.shape
    token = np.ones((nZ, V))
    incs: list[np.ndarray] = []
    kinds: list[str] = []
    preset_col = corr_col = None
    rs_cols: list[tuple[int, object]] = []
    if run.needs_augmented:
        preset_col = len(incs)
        incs.append(run.increment(ell_po))
        kinds.append("sum")
    if corr is not None:
        applied = not (corr.bypass_mode and corr.loss_type == "ppo_clip")
        if corr.rollout_is is not None and applied:
            mode, lower, upper = corr.is_bounds
            if corr.rollout_is == "token":
                token = token * _bounds(np.exp(_clamp(ell_ro, corr.safety_bound)), mode, lower, upper)
            else:
                corr_col = len(incs)
                incs.append(ell_ro)
                kinds.append("sum")
        e = np.clip(ell_ro, -SAFETY_BOUND, SAFETY_BOUND)
        for opt in corr.rejection:
            tok = _TOKEN_STATS[opt.statistic](e)
            if opt.level == "token":
                token = token * _rs_keep(tok, opt)
            else:
                rs_cols.append((len(incs), opt))
                incs.append(tok)
                kinds.append("max" if opt.level == "max" else "sum")
    return _Compiled(token, incs, kinds, preset_col, corr_col, rs_cols)


def _cumulative_weight(corr: RolloutCorrection, L: np.ndarray, t: int) -> np.ndarray:
    """The cumulative level's weight of token t (1-based) from L_t = Σ_{k≤t} ℓ^ro_k."""
    mode, _, _ = corr.is_bounds
    s = float(max(t, 1)) ** corr.cumulative_exponent
    lo, hi = -corr.cumulative_eps_low * s, corr.cumulative_eps_high * s
    if mode == "truncate":
        return np.exp(np.clip(L, lo, hi))
    return np.where((L >= lo) & (L <= hi), np.exp(_clamp(L, corr.safety_bound)), 0.0)


def _sequence_factor(corr: RolloutCorrection | None, comp: _Compiled, stats: np.ndarray, T: int) -> np.ndarray:
    """The readout factor of the correction: the sequence weight × the sequence rejection keep."""
    out = np.ones(stats.shape[0])
    if corr is None:
        return out
    if comp.corr_col is not None and corr.rollout_is == "sequence":
        mode, lower, upper = corr.is_bounds
        out = out * _bounds(np.exp(_clamp(stats[:, comp.corr_col], corr.safety_bound)), mode, lower, upper)
    for col, opt in comp.rs_cols:
        s = stats[:, col]
        if opt.level == "mean":
            s = s / (T + 1e-8)  # verl's masked mean: Σ / (count + 1e-8)
        out = out * _rs_keep(s, opt)
    return out


# ------------------------------------------------------------------------------------------ the DP
def _merge(nz: np.ndarray, stats: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, int]:
    """Destination atom ids ``[A, V]`` for keys ``(z', round(stats / 1e-11))`` over valid transitions."""
    A, V = nz.shape
    dest = np.zeros((A, V), dtype=np.int64)
    keys = [nz[valid][:, None]]
    if stats.shape[-1]:
        keys.append(np.floor(stats[valid] / _EXACT_KEY + 0.5).astype(np.int64))
    key = np.concatenate(keys, axis=1)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    dest[valid] = inv.ravel()
    return dest, int(inv.max()) + 1


def _run(mdp: MarkovMDP, run: ChainEstimator, corr: RolloutCorrection | None, comp: _Compiled, tables: tuple,
         feature: BlockFeature, S: np.ndarray | None, G: np.ndarray, sign: float | None, pos: np.ndarray,
         second: bool, max_atoms: int, ell_po: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    alpha, beta, gamma = tables
    T, V = mdp.horizon, mdp.vocab_size
    d, B = feature.d, feature.B
    mu = state_policy_tables(mdp, mdp.behaviour)
    m = len(comp.stat_incs)
    inc = np.stack(comp.stat_incs, axis=-1) if m else np.zeros(mu.shape + (0,))
    is_max = np.array([k == "max" for k in comp.stat_kinds], dtype=bool)
    x_token = run.increment(ell_po) if run.level == "token" else None
    az = np.array([mdp.start_state])
    ast = np.zeros((1, m))
    Q0, P0 = np.ones(1), np.ones(1)
    Q1, P1, P2 = np.zeros((1, d)), np.zeros((1, d)), np.zeros((1, d))
    biggest = 1
    for t in range(T):
        z = az
        A = z.size
        p = mu[z]
        valid = p > 0
        new = ast[:, None, :] + inc[z]
        if is_max.any():
            first = t == 0
            new[..., is_max] = inc[z][..., is_max] if first else np.maximum(ast[:, None, is_max], inc[z][..., is_max])
        a_, g_ = alpha[z], gamma[z]
        b_ = beta[z] * comp.token_factor[z] * float(pos[t])
        if S is not None:
            b_ = b_ * S[t][z]
        sg = np.sign(S[t][z]) if S is not None else sign
        if run.level == "token" and run.has_mask:
            b_ = b_ * run.keep(x_token[z], t + 1, sg)
        if run.level == "prefix" and comp.preset_col is not None:
            x = run.value(np.maximum(new[..., comp.preset_col], L_FLOOR), t + 1, T)
            if run.atom_weighted:
                b_ = b_ * run.weight(x)
            if run.has_mask:
                b_ = b_ * run.keep(x, t + 1, sg)
        if corr is not None and corr.rollout_is == "cumulative" and comp.corr_col is not None:
            b_ = b_ * _cumulative_weight(corr, new[..., comp.corr_col], t + 1)
        nz = mdp.next_state[z]
        dest, A2 = _merge(nz, new, valid)
        if A2 > max_atoms:
            raise ValueError(f"max_atoms: the augmented state of ({run.name!r}, "
                             f"{corr.name if corr is not None else None!r}) has {A2} atoms > max_atoms={max_atoms} at "
                             f"t={t + 1}; use markov.monte_carlo_moments(..., old_policy=..., rollout_correction=...)")
        biggest = max(biggest, A2)
        rows, cols = dest.ravel(), np.repeat(np.arange(A), V)
        vflat = valid.ravel()

        def prop(w: np.ndarray, rows: np.ndarray = rows, cols: np.ndarray = cols, A: int = A, A2: int = A2,
                 vflat: np.ndarray = vflat) -> sparse.csr_matrix:
            return sparse.csr_matrix((np.where(vflat, w.ravel(), 0.0), (rows, cols)), shape=(A2, A))

        new_z = np.zeros(A2, dtype=np.int64)
        new_z[rows[vflat]] = nz.ravel()[vflat]
        new_st = np.zeros((A2, m))
        new_st[rows[vflat]] = new.reshape(A * V, m)[vflat]
        blk, hv = feature.blk[z], feature.hv[z]
        pb = np.where(valid, p * b_, 0.0)
        Q0, Q1, P0, P1, P2 = moment_step(prop, p, a_, b_, g_, pb, blk, hv, dest, A2, d, B, Q0, Q1, P0, P1, P2,
                                         second=second)
        az, ast = new_z, new_st
    u = np.ones(az.size) if S is not None else G[az].astype(np.float64)
    if sign is not None:
        u = np.where(np.sign(u) == sign, u, 0.0)
    if run.level == "sequence" and comp.preset_col is not None:
        x = run.value(ast[:, comp.preset_col], T, T)
        if run.atom_weighted:
            u = u * run.weight(x)
        if run.has_mask:
            u = u * run.keep(x, T, sign if sign is not None else 1.0)
    u = u * _sequence_factor(corr, comp, ast, T)
    mean = u @ Q1
    sec = (u**2) @ P2 if second else None
    if not np.all(np.isfinite(mean)) or (sec is not None and not np.all(np.isfinite(sec))):
        raise FloatingPointError("three-policy DP overflowed: reduce the horizon or the mismatch")
    return mean, sec, biggest


def _log_tables(mdp: MarkovMDP, old: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log π, log π_old, log π_roll) as ``[|Z|, V]`` (−inf where a probability is 0)."""
    with np.errstate(divide="ignore"):
        return (np.log(state_policy_tables(mdp, mdp.target)), np.log(state_policy_tables(mdp, old)),
                np.log(state_policy_tables(mdp, mdp.behaviour)))


def _estimate(chain: ThreePolicyChain, est: ChainEstimator, corr: RolloutCorrection | None, run: ChainEstimator,
              signal: str, baseline: float, feature: BlockFeature, pos: np.ndarray, second: bool,
              max_atoms: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
    mdp = chain.mdp
    lp, lo, lr = _log_tables(mdp, chain.old)
    bypass = corr is not None and corr.bypass_mode
    with np.errstate(invalid="ignore"):
        anchor = lr if bypass else lo
        ell_po = np.where(np.isfinite(anchor), lp - anchor, 0.0)
        train = lp if bypass else lo
        ell_ro = np.where(np.isfinite(lr), train - lr, 0.0)
    ell_po = np.where(np.isnan(ell_po), -np.inf, ell_po)
    ell_ro = np.where(np.isfinite(ell_ro), ell_ro, L_FLOOR)
    comp = _compile(mdp, run, corr, ell_po, ell_ro)
    tables = run.tables(ell_po, mdp.horizon)
    S = signal_tables(mdp, signal, baseline)
    G = mdp.state_reward - baseline
    signs = [1.0, -1.0] if (signal == "reward" and run.sign_dependent) else [None]
    mean = np.zeros(feature.d)
    sec = np.zeros(feature.d) if second else None
    atoms = 1
    for sg in signs:
        m, s, a = _run(mdp, run, corr, comp, tables, feature, S, G, sg, pos, second, max_atoms, ell_po)
        mean += m
        if second:
            sec += s
        atoms = max(atoms, a)
    return mean, sec, {"max_atoms": atoms, "statistics": len(comp.stat_incs)}


def rollout_exact_moments(
    chain: ThreePolicyChain,
    preset: str | losses.LossConfig | ChainEstimator = "grpo",
    correction: object = None,
    signal: str = "reward",
    baseline: float = 0.0,
    *,
    positions: np.ndarray | None = None,
    second_moment: bool = True,
    along_gradient: bool = True,
    max_atoms: int = 2_000_000,
    **overrides: object,
) -> Moments:
    """Exact moments (DP) of the (preset × rollout correction) estimator under ``y ~ π_roll`` (module docstring),
    the reference ``gradient`` being ∇J(π). ``correction``: None (the uncorrected loss: PPO ratio against π_old,
    data from π_roll), a name of :data:`ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS` or a
    ``RolloutCorrection``. Raises ``ValueError`` for the pairs of :func:`rollout_dp_unsupported_reason`."""
    if not isinstance(chain, ThreePolicyChain):
        raise TypeError(f"chain: expected a ThreePolicyChain, got {type(chain).__name__}")
    est, corr, run = _resolve(preset, correction, signal, overrides)
    check_rollout_dp_support(est, corr, signal)
    mdp = chain.mdp
    if not np.isfinite(baseline):
        raise ValueError(f"baseline: expected a finite number, got {baseline!r}")
    pos = positions_mask(positions, mdp.horizon)
    grad = true_gradient(mdp)
    mean, sec, info = _estimate(chain, est, corr, run, signal, float(baseline), score_feature(mdp), pos,
                                second_moment, max_atoms)
    vag = float("nan")
    gn = np.linalg.norm(grad)
    if along_gradient and second_moment and gn > 0:
        pm, ps, _ = _estimate(chain, est, corr, run, signal, float(baseline), projected_feature(mdp, grad / gn), pos,
                              True, max_atoms)
        vag = float(ps[0] - pm[0] ** 2)
    if sec is None:
        sec = np.full_like(mean, np.nan)
    info["correction"] = None if corr is None else corr.name
    return Moments(est.name, signal, float(baseline), mean, sec, grad, vag, method="dp", info=info,
                   config=est.config)


def rollout_moments(
    chain: ThreePolicyChain,
    preset: str | losses.LossConfig | ChainEstimator = "grpo",
    correction: object = None,
    signal: str = "reward",
    baseline: float = 0.0,
    *,
    method: str = "auto",
    n_mc: int = 8192,
    seed: int = 0,
    batch_size: int = 64,
    max_enumeration: int = 20_000,
) -> Moments | MonteCarloMoments:
    """Moments of (preset × correction) by the exact DP where it applies, else exact enumeration (V^T ≤
    ``max_enumeration``), else Monte Carlo (``n_mc`` trajectories; batch-level pairs on batches of
    ``batch_size``). ``method``: ``"auto"``, ``"dp"``, ``"enumeration"`` or ``"mc"``."""
    if method not in ("auto", "dp", "enumeration", "mc"):
        raise ValueError(f"method: expected 'auto', 'dp', 'enumeration' or 'mc', got {method!r}")
    how = rollout_lab_method(preset, correction, signal)
    if method == "auto":
        method = ("dp" if how == "dp" else "enumeration"
                  if how == "per_trajectory" and chain.mdp.vocab_size**chain.mdp.horizon <= max_enumeration else "mc")
    if method == "dp":
        return rollout_exact_moments(chain, preset, correction, signal, baseline, along_gradient=False)
    if method == "enumeration":
        return enumerate_moments(chain.mdp, preset, signal, baseline, old_policy=chain.old,
                                 rollout_correction=correction)
    return monte_carlo_moments(chain.mdp, preset, signal, baseline, n=n_mc, seed=seed, batch_size=batch_size,
                               old_policy=chain.old, rollout_correction=correction)


def framework_target(chain: ThreePolicyChain, preset: str | losses.LossConfig = "grpo", signal: str = "reward",
                     baseline: float | None = None) -> np.ndarray:
    """``E_{π_old}[X_preset]``: the preset's expected estimator had the data come from π_old (no correction
    needed) — the target a rollout correction tries to recover (exact DP on the two-policy chain; ``baseline``
    defaults to J(π_old))."""
    mdp = chain.two_policy("old")
    b = float(performance(mdp, "behaviour")) if baseline is None else float(baseline)
    return exact_moments(mdp, preset, signal, baseline=b, second_moment=False, along_gradient=False).mean
