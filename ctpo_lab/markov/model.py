"""Synthetic autoregressive Markov chains: contexts, reward automata, tabular policies, random instances.

The model (docs/theory.md §1.2): tokens ``y ∈ {0..V-1}``, fixed horizon ``T``; the policy context at step ``t`` is the
last ``k`` tokens of ``(BOS,)*k + y_<t`` (so there are ``Σ_{j=0..k} V^j`` reachable contexts); the terminal
reward ``R = r(q_{T+1})`` is read from a finite automaton run over the token stream. The dynamic-programming
state is ``z = (context c, automaton state q)`` flattened as ``z = c * Q + q``; its transition
``z' = f(z, y)`` is deterministic. Policies are tabular softmax tables ``θ ∈ R^{C×V}`` and the score is
``ψ(c, y) = e_c ⊗ (e_y − π(·|c))`` flattened row-major (``d = C·V`` coordinates).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Automaton",
    "MarkovMDP",
    "count_mod",
    "count_fraction",
    "contains_pattern",
    "parity",
    "sum_mod",
    "make_automaton",
    "kl_rows",
    "perturb_rows",
    "chi2_rows",
    "random_instance",
    "latent_mode_instance",
]

_ROW_TOL = 1e-9


# ----------------------------------------------------------------------------------------------- automata
@dataclass(frozen=True)
class Automaton:
    """Deterministic finite automaton over tokens with a terminal reward per state.

    Attributes
    ----------
    name : str
        Human-readable description.
    transitions : np.ndarray
        Integer array ``[Q, V]``: ``q' = transitions[q, y]``.
    start : int
        Initial state ``q_1``.
    values : np.ndarray
        Float array ``[Q]``: terminal reward ``R = values[q_{T+1}]``.
    """

    name: str
    transitions: np.ndarray
    start: int
    values: np.ndarray

    def __post_init__(self) -> None:
        tr = np.asarray(self.transitions)
        if tr.ndim != 2 or not np.issubdtype(tr.dtype, np.integer):
            raise TypeError("Automaton.transitions must be an integer array [Q, V]")
        q = tr.shape[0]
        if tr.min() < 0 or tr.max() >= q:
            raise ValueError("Automaton.transitions must map into 0..Q-1")
        vals = np.asarray(self.values, dtype=np.float64)
        if vals.shape != (q,):
            raise ValueError(f"Automaton.values must have shape [{q}], got {vals.shape}")
        if not np.all(np.isfinite(vals)):
            raise ValueError("Automaton.values must be finite")
        if not 0 <= int(self.start) < q:
            raise ValueError("Automaton.start out of range")
        object.__setattr__(self, "transitions", tr.astype(np.int64))
        object.__setattr__(self, "values", vals)

    @property
    def num_states(self) -> int:
        return int(self.transitions.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.transitions.shape[1])

    def run(self, sequences: np.ndarray) -> np.ndarray:
        """Final automaton state for each row of ``sequences`` (int array ``[N, T]``) -> ``[N]``."""
        seqs = np.asarray(sequences, dtype=np.int64)
        q = np.full(seqs.shape[0], self.start, dtype=np.int64)
        for t in range(seqs.shape[1]):
            q = self.transitions[q, seqs[:, t]]
        return q


def count_mod(vocab_size: int, token: int = 0, modulus: int = 2, target: int = 0) -> Automaton:
    """Reward 1 when (number of occurrences of ``token``) mod ``modulus`` equals ``target``, else 0."""
    _check_pos_int(vocab_size, "vocab_size")
    _check_pos_int(modulus, "modulus")
    if not 0 <= token < vocab_size:
        raise ValueError(f"token must be in 0..{vocab_size - 1}")
    tr = np.repeat(np.arange(modulus)[:, None], vocab_size, axis=1)
    tr[:, token] = (np.arange(modulus) + 1) % modulus
    vals = (np.arange(modulus) == target % modulus).astype(np.float64)
    return Automaton(f"count({token}) mod {modulus} == {target}", tr, 0, vals)


def sum_mod(vocab_size: int, modulus: int = 3, target: int = 0) -> Automaton:
    """Reward 1 when (sum of tokens) mod ``modulus`` equals ``target``, else 0."""
    _check_pos_int(vocab_size, "vocab_size")
    _check_pos_int(modulus, "modulus")
    tr = (np.arange(modulus)[:, None] + np.arange(vocab_size)[None, :]) % modulus
    vals = (np.arange(modulus) == target % modulus).astype(np.float64)
    return Automaton(f"sum mod {modulus} == {target}", tr, 0, vals)


def parity(vocab_size: int) -> Automaton:
    """Reward 1 when the number of odd tokens is even (parity of the token sum)."""
    a = sum_mod(vocab_size, 2, 0)
    return Automaton("parity (sum even)", a.transitions, 0, a.values)


def contains_pattern(vocab_size: int, pattern: tuple[int, ...]) -> Automaton:
    """Reward 1 when ``pattern`` occurs as a contiguous substring (KMP automaton, absorbing on match)."""
    _check_pos_int(vocab_size, "vocab_size")
    pat = tuple(int(p) for p in pattern)
    if not pat or any(not 0 <= p < vocab_size for p in pat):
        raise ValueError(f"pattern must be a non-empty tuple of tokens in 0..{vocab_size - 1}")
    m = len(pat)
    fail = [0] * (m + 1)
    k = 0
    for i in range(1, m):
        while k > 0 and pat[i] != pat[k]:
            k = fail[k]
        if pat[i] == pat[k]:
            k += 1
        fail[i + 1] = k
    tr = np.zeros((m + 1, vocab_size), dtype=np.int64)
    for q in range(m + 1):
        for y in range(vocab_size):
            if q == m:
                tr[q, y] = m
                continue
            s = q
            while s > 0 and pat[s] != y:
                s = fail[s]
            tr[q, y] = s + 1 if pat[s] == y else 0
    vals = np.zeros(m + 1)
    vals[m] = 1.0
    return Automaton(f"contains {pat}", tr, 0, vals)


def count_fraction(vocab_size: int, token: int = 0, max_count: int = 8) -> Automaton:
    """Graded reward ``min(count(token), max_count) / max_count`` (``max_count + 1`` states).

    With ``max_count = T`` this is the fraction of ``token`` in the sequence, a reward whose gradient does not
    vanish as ``T`` grows (unlike parity-type rewards, whose ∇J decays geometrically in ``T``).
    """
    _check_pos_int(vocab_size, "vocab_size")
    _check_pos_int(max_count, "max_count")
    if not 0 <= token < vocab_size:
        raise ValueError(f"token must be in 0..{vocab_size - 1}")
    q = np.arange(max_count + 1)
    tr = np.repeat(q[:, None], vocab_size, axis=1)
    tr[:, token] = np.minimum(q + 1, max_count)
    return Automaton(f"min(count({token}), {max_count})/{max_count}", tr, 0, q / max_count)


def make_automaton(spec: str | Automaton, vocab_size: int, horizon: int | None = None) -> Automaton:
    """Build an automaton from a short spec: ``"count"``, ``"count:TOKEN:MOD"``, ``"sum:MOD"``, ``"parity"``,
    ``"contains:0-1-0"``, ``"frac"`` / ``"frac:TOKEN"`` (fraction of ``TOKEN`` over the horizon), or pass an
    :class:`Automaton` through."""
    if isinstance(spec, Automaton):
        if spec.vocab_size != vocab_size:
            raise ValueError(f"automaton vocab {spec.vocab_size} != vocab_size {vocab_size}")
        return spec
    if not isinstance(spec, str):
        raise TypeError("automaton must be a str spec or an Automaton")
    parts = spec.split(":")
    kind = parts[0]
    try:
        if kind == "count":
            tok = int(parts[1]) if len(parts) > 1 else 0
            mod = int(parts[2]) if len(parts) > 2 else 2
            return count_mod(vocab_size, tok, mod)
        if kind == "sum":
            return sum_mod(vocab_size, int(parts[1]) if len(parts) > 1 else 3)
        if kind == "frac":
            if horizon is None:
                raise ValueError("the 'frac' automaton needs the horizon")
            return count_fraction(vocab_size, int(parts[1]) if len(parts) > 1 else 0, horizon)
        if kind == "parity":
            return parity(vocab_size)
        if kind == "contains":
            pat = tuple(int(x) for x in parts[1].split("-")) if len(parts) > 1 else (0, 1)
            return contains_pattern(vocab_size, tuple(p % vocab_size for p in pat))
    except (IndexError, ValueError) as exc:
        raise ValueError(f"bad automaton spec {spec!r}: {exc}") from exc
    raise ValueError(f"unknown automaton spec {spec!r} (count, count:T:M, sum:M, parity, contains:a-b-c, frac:T)")


# ----------------------------------------------------------------------------------------------- the MDP
@dataclass(eq=False)
class MarkovMDP:
    """A k-th order autoregressive chain with tabular target/behaviour policies and an automaton reward.

    Parameters
    ----------
    vocab_size : int
        ``V``.
    horizon : int
        ``T``, the fixed number of generated tokens.
    order : int
        ``k``: the policy context is the last ``k`` tokens, BOS-padded (``k = 0``: one context, i.i.d. tokens).
    automaton : Automaton
        Terminal reward automaton.
    target, behaviour : np.ndarray
        ``[C, V]`` probability tables (rows sum to 1). ``behaviour`` must be positive wherever ``target`` is.

    Notes
    -----
    Contexts are ordered by number of BOS pads (``k`` pads first, i.e. the start context is index 0), then
    lexicographically. DP state ``z = c * Q + q``; start state ``z_1 = (BOS^k, q_start)``.
    """

    vocab_size: int
    horizon: int
    order: int
    automaton: Automaton
    target: np.ndarray
    behaviour: np.ndarray
    name: str = "markov"
    done_token: int | None = None
    _contexts: list[tuple[int, ...]] = field(default_factory=list, init=False, repr=False)
    _ctx_lookup: dict[tuple[int, ...], int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_pos_int(self.vocab_size, "vocab_size")
        _check_pos_int(self.horizon, "horizon")
        if not isinstance(self.order, (int, np.integer)) or self.order < 0:
            raise ValueError("order must be a non-negative int")
        if self.automaton.vocab_size != self.vocab_size:
            raise ValueError("automaton vocab_size differs from vocab_size")
        V, k = self.vocab_size, self.order
        bos = V
        ctxs: list[tuple[int, ...]] = []
        for pads in range(k, -1, -1):
            for tail in itertools.product(range(V), repeat=k - pads):
                ctxs.append((bos,) * pads + tuple(tail))
        if self.done_token is not None:
            if isinstance(self.done_token, bool) or not isinstance(self.done_token, (int, np.integer)) or not (
                    0 <= self.done_token < V):
                raise ValueError(f"done_token must be an int in 0..{V - 1} or None")
            ctxs.append((-1,))  # the absorbing DONE context, last row
        self._contexts = ctxs
        self._ctx_lookup = {c: i for i, c in enumerate(ctxs)}
        self.target = self._check_table(self.target, "target")
        self.behaviour = self._check_table(self.behaviour, "behaviour")
        if self.done_token is not None:
            onehot = np.eye(V)[self.done_token]
            for name, tab in (("target", self.target), ("behaviour", self.behaviour)):
                if not np.allclose(tab[-1], onehot):
                    raise ValueError(f"{name} row of the DONE context (last row) must be one-hot on done_token "
                                     f"{self.done_token}")
        bad = np.where(np.any((self.behaviour <= 0) & (self.target > 0), axis=1))[0]
        if bad.size:
            names = [self.context_name(int(c)) for c in bad[:10]]
            raise ValueError(
                f"support violation: behaviour is zero where target is positive in contexts {names}"
                + (f" (+{bad.size - 10} more)" if bad.size > 10 else "")
            )
        self._build_tables()

    # -- validation ---------------------------------------------------------------------------------
    def _check_table(self, table: np.ndarray, name: str) -> np.ndarray:
        if not isinstance(table, np.ndarray):
            raise TypeError(f"{name} must be a numpy array [num_contexts, V]")
        tab = np.asarray(table, dtype=np.float64)
        shape = (len(self._contexts), self.vocab_size)
        if tab.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tab.shape}")
        if not np.all(np.isfinite(tab)):
            raise ValueError(f"{name} contains NaN or inf")
        if np.any(tab < 0):
            raise ValueError(f"{name} has negative probabilities")
        sums = tab.sum(axis=1)
        bad = np.where(np.abs(sums - 1.0) > _ROW_TOL)[0]
        if bad.size:
            raise ValueError(
                f"{name} rows must sum to 1; rows {bad[:10].tolist()} sum to {sums[bad[:10]].round(6).tolist()}"
            )
        return tab / sums[:, None]

    # -- contexts -----------------------------------------------------------------------------------
    @property
    def num_contexts(self) -> int:
        return len(self._contexts)

    @property
    def dim(self) -> int:
        """Number of score coordinates ``d = C·V``."""
        return self.num_contexts * self.vocab_size

    @property
    def contexts(self) -> list[tuple[int, ...]]:
        """Context tuples (BOS encoded as ``V``), in row order."""
        return list(self._contexts)

    def context_name(self, c: int) -> str:
        if self._contexts[c] == (-1,):
            return "DONE"
        return "(" + ",".join("BOS" if x == self.vocab_size else str(x) for x in self._contexts[c]) + ")"

    def context_index(self, prefix: tuple[int, ...] | list[int]) -> int:
        """Row index of the policy context after generating ``prefix`` (tuple of tokens ``y_<t``)."""
        k = self.order
        pre = tuple(int(x) for x in prefix)
        if any(not 0 <= x < self.vocab_size for x in pre):
            raise ValueError(f"prefix tokens must be in 0..{self.vocab_size - 1}")
        if self.done_token is not None and self.done_token in pre:
            return self.num_contexts - 1
        if k == 0:
            return 0
        padded = (self.vocab_size,) * (k - len(pre)) + pre if len(pre) < k else pre[-k:]
        return self._ctx_lookup[padded]

    def reward(self, sequence: tuple[int, ...] | list[int]) -> float:
        """Terminal reward of a full sequence of ``T`` tokens (with a DONE token: the automaton reads the
        tokens before the first DONE)."""
        seq = tuple(int(x) for x in sequence)
        if len(seq) != self.horizon:
            raise ValueError(f"sequence must have length T={self.horizon}, got {len(seq)}")
        q = self.automaton.start
        for y in seq:
            if not 0 <= y < self.vocab_size:
                raise ValueError(f"tokens must be in 0..{self.vocab_size - 1}")
            if self.done_token is not None and y == self.done_token:
                break
            q = int(self.automaton.transitions[q, y])
        return float(self.automaton.values[q])

    def reward_batch(self, sequences: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`reward` for an int array ``[N, T]`` -> ``[N]``."""
        seqs = np.asarray(sequences, dtype=np.int64)
        if self.done_token is None:
            return self.automaton.values[self.automaton.run(seqs)]
        q = np.full(seqs.shape[0], self.automaton.start, dtype=np.int64)
        alive = np.ones(seqs.shape[0], dtype=bool)
        for t in range(seqs.shape[1]):
            alive &= seqs[:, t] != self.done_token
            q = np.where(alive, self.automaton.transitions[q, seqs[:, t]], q)
        return self.automaton.values[q]

    def score(self, context: int, token: int) -> np.ndarray:
        """``ψ(c, y) = e_c ⊗ (e_y − π(·|c))`` flattened row-major, shape ``[C·V]``."""
        out = np.zeros(self.dim)
        c, y = int(context), int(token)
        if not 0 <= c < self.num_contexts or not 0 <= y < self.vocab_size:
            raise ValueError("context or token out of range")
        V = self.vocab_size
        out[c * V : (c + 1) * V] = -self.target[c]
        out[c * V + y] += 1.0
        return out

    # -- DP tables ----------------------------------------------------------------------------------
    def _build_tables(self) -> None:
        V, k, Q = self.vocab_size, self.order, self.automaton.num_states
        C = self.num_contexts
        next_ctx = np.zeros((C, V), dtype=np.int64)
        done_c = C - 1 if self.done_token is not None else -1
        for c, ctx in enumerate(self._contexts):
            for y in range(V):
                if c == done_c or y == self.done_token:
                    next_ctx[c, y] = done_c
                    continue
                nxt = (ctx + (y,))[1:] if k > 0 else ()
                next_ctx[c, y] = self._ctx_lookup[nxt]
        self.next_context = next_ctx
        nZ = C * Q
        zc = np.repeat(np.arange(C), Q)
        zq = np.tile(np.arange(Q), C)
        self.state_context = zc
        self.state_automaton = zq
        frozen = np.zeros((nZ, V), dtype=bool)
        if self.done_token is not None:  # the automaton stops at DONE
            frozen[:, self.done_token] = True
            frozen[zc == done_c] = True
        self.next_state = next_ctx[zc] * Q + np.where(frozen, zq[:, None], self.automaton.transitions[zq])
        self.state_reward = self.automaton.values[zq]
        self.start_state = int(0 * Q + self.automaton.start)
        self.num_states = nZ

    def with_policies(self, target: np.ndarray | None = None, behaviour: np.ndarray | None = None) -> MarkovMDP:
        """A copy with replaced target and/or behaviour tables."""
        return MarkovMDP(
            self.vocab_size,
            self.horizon,
            self.order,
            self.automaton,
            self.target.copy() if target is None else target,
            self.behaviour.copy() if behaviour is None else behaviour,
            name=self.name,
            done_token=self.done_token,
        )

    def with_horizon(self, horizon: int) -> MarkovMDP:
        return MarkovMDP(self.vocab_size, horizon, self.order, self.automaton, self.target.copy(),
                         self.behaviour.copy(), name=self.name, done_token=self.done_token)

    def per_token_kl(self) -> np.ndarray:
        """``KL(μ‖π)`` per context row, ``[C]``."""
        return kl_rows(self.behaviour, self.target)

    def per_token_chi2(self) -> np.ndarray:
        """``χ²(π‖μ) = Σ_y π²/μ − 1`` per context row, ``[C]``."""
        return chi2_rows(self.target, self.behaviour)

    def __repr__(self) -> str:
        return (f"MarkovMDP(V={self.vocab_size}, T={self.horizon}, k={self.order}, C={self.num_contexts}, "
                f"|Z|={self.num_states}, reward={self.automaton.name!r})")


# ----------------------------------------------------------------------------------------------- helpers
def _check_pos_int(x: object, name: str) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``KL(p‖q) = Σ_y p log(p/q)`` per row (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return t.sum(axis=-1)


def chi2_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``χ²(p‖q) = Σ_y p²/q − 1`` per row."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = np.where(p > 0, p * p / q, 0.0)
    return t.sum(axis=-1) - 1.0


def _mismatch(pi_logits: np.ndarray, direction: np.ndarray, s: np.ndarray, measure: str) -> np.ndarray:
    """Per-row mismatch of ``μ = softmax(pi_logits + s·direction)`` against ``π = softmax(pi_logits)``."""
    pi = _softmax(pi_logits)
    mu = _softmax(pi_logits + s[:, None] * direction)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return kl_rows(mu, pi) if measure == "kl" else chi2_rows(pi, mu)


def _perturb_rows(pi_logits: np.ndarray, direction: np.ndarray, level: float, measure: str) -> np.ndarray:
    """Behaviour rows ``softmax(pi_logits + s·direction)`` with ``s`` solved per row (vectorised bisection)
    so that each row's ``KL(μ‖π)`` (measure="kl") or ``χ²(π‖μ)`` (measure="chi2") equals ``level``.

    A direction whose limit (``−log π(argmax direction)`` for the KL) stays below ``level`` is replaced by its
    negative, then by the direction towards the least likely token."""
    pi_logits = np.atleast_2d(pi_logits)
    direction = np.atleast_2d(direction).copy()
    C, V = pi_logits.shape
    if level == 0:
        return _softmax(pi_logits)
    big = np.full(C, 1e3)
    pi = _softmax(pi_logits)
    fallback = np.eye(V)[np.argmin(pi, axis=1)] - 1.0 / V
    ok = _mismatch(pi_logits, direction, big, measure) >= level
    for alt in (-direction, fallback):
        bad = ~ok
        if not bad.any():
            break
        good_alt = _mismatch(pi_logits[bad], alt[bad], big[bad], measure) >= level
        idx = np.where(bad)[0][good_alt]
        direction[idx] = alt[idx]
        ok[idx] = True
    if not ok.all():
        raise ValueError(f"cannot reach per-token {measure}={level}: target rows {np.where(~ok)[0][:5].tolist()} "
                         "are too peaked")
    lo, hi = np.zeros(C), np.ones(C)
    for _ in range(40):
        under = _mismatch(pi_logits, direction, hi, measure) < level
        if not under.any():
            break
        hi = np.where(under, hi * 2.0, hi)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        under = _mismatch(pi_logits, direction, mid, measure) < level
        lo, hi = np.where(under, mid, lo), np.where(under, hi, mid)
    return _softmax(pi_logits + (0.5 * (lo + hi))[:, None] * direction)


def perturb_rows(logits: np.ndarray, direction: np.ndarray, level: float, measure: str = "kl") -> np.ndarray:
    """``softmax(logits + s·direction)`` per row with ``s`` solved so that each row's ``KL(μ‖π)`` (``"kl"``) or
    ``χ²(π‖μ)`` (``"chi2"``) against ``π = softmax(logits)`` equals ``level`` (the perturbation of
    :func:`random_instance`)."""
    if measure not in ("kl", "chi2"):
        raise ValueError(f"measure: expected 'kl' or 'chi2', got {measure!r}")
    return _perturb_rows(np.asarray(logits, dtype=np.float64), np.asarray(direction, dtype=np.float64),
                         float(level), measure)


def _perturb_to(pi_logits: np.ndarray, direction: np.ndarray, level: float, measure: str) -> np.ndarray:
    """One row of :func:`_perturb_rows`."""
    return _perturb_rows(pi_logits[None, :], direction[None, :], level, measure)[0]


def random_instance(
    vocab_size: int = 3,
    horizon: int = 5,
    order: int = 1,
    seed: int = 0,
    kl: float | None = 0.05,
    chi2: float | None = None,
    automaton: str | Automaton = "count",
    logit_scale: float = 1.0,
    done_token: int | None = None,
    done_logit: float = 0.0,
) -> MarkovMDP:
    """Seeded random instance: target logits ``~ N(0, logit_scale²)``; behaviour logits = target logits plus
    a random direction scaled per context so that each row has ``KL(μ‖π) = kl`` (or ``χ²(π‖μ) = chi2``).

    Parameters
    ----------
    vocab_size, horizon, order : int
        ``V``, ``T``, ``k``.
    seed : int
        Seed of ``np.random.default_rng``.
    kl, chi2 : float, optional
        Per-token mismatch; give at most one (``chi2`` takes precedence when both are given).
    automaton : str or Automaton
        Reward automaton spec (see :func:`make_automaton`).
    logit_scale : float
        Standard deviation of the target logits.
    done_token : int, optional
        Variable length: this token ends the response (absorbing DONE context, π = μ = 1 on ``done_token``,
        score 0, ℓ = 0; the reward automaton reads the tokens before it).
    done_logit : float
        Added to the target logit of ``done_token`` in every live context (controls the length).
    """
    _check_pos_int(vocab_size, "vocab_size")
    _check_pos_int(horizon, "horizon")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError("seed must be an int")
    measure, level = ("chi2", chi2) if chi2 is not None else ("kl", kl if kl is not None else 0.0)
    if not np.isfinite(level) or level < 0:
        raise ValueError(f"{measure} must be a finite non-negative float")
    rng = np.random.default_rng(seed)
    auto = make_automaton(automaton, vocab_size, horizon)
    C = sum(vocab_size**j for j in range(order + 1))
    logits = rng.normal(0.0, logit_scale, size=(C, vocab_size))
    if done_token is not None:
        logits[:, done_token] += done_logit
    target = _softmax(logits)
    direction = rng.normal(size=(C, vocab_size))
    behaviour = _perturb_rows(logits, direction, level, measure)
    if done_token is not None:
        onehot = np.eye(vocab_size)[done_token][None, :]
        target, behaviour = np.vstack([target, onehot]), np.vstack([behaviour, onehot])
    return MarkovMDP(vocab_size, horizon, order, auto, target, behaviour,
                     name=f"random(V={vocab_size},T={horizon},k={order},seed={seed},{measure}={level})",
                     done_token=done_token)


def latent_mode_instance(
    horizon: int = 64,
    kl_modes: tuple[float, float] = (0.002, 0.02),
    seed: int = 0,
    half_vocab: int = 2,
) -> MarkovMDP:
    """A chain with a persistent latent mode: ``V = 2·half_vocab``, ``k = 1``. The first token (uniform
    under both policies) picks mode A (tokens ``0..h-1``) or mode B (``h..2h-1``); afterwards both policies
    put probability 0 on the other half, so the mode persists; all rows of a mode are equal (increments are
    i.i.d. given the mode) with ``KL(μ‖π) = kl_modes[0]`` (``[1]``). Then
    ``Var(L_t) = (t−1)·E σ²_mode + (t−1)²·Var(κ_mode)``: a ``t²`` component from the mode-dependent drift.
    """
    h = int(half_vocab)
    V = 2 * h
    rng = np.random.default_rng(seed)
    C = 1 + V
    target = np.zeros((C, V))
    behaviour = np.zeros((C, V))
    target[0] = behaviour[0] = 1.0 / V
    rows = []
    for mode in range(2):
        logits = rng.normal(size=h)
        rows.append((_softmax(logits), _perturb_to(logits, rng.normal(size=h), kl_modes[mode], "kl")))
    for c in range(1, C):
        mode = 0 if c - 1 < h else 1
        sl = slice(0, h) if mode == 0 else slice(h, V)
        target[c, sl], behaviour[c, sl] = rows[mode]
    return MarkovMDP(V, horizon, 1, count_mod(V, 0, 2), target, behaviour,
                     name=f"latent_mode(kl={kl_modes})")
