"""Benchmark of the Markov lab's dynamic programmes (prints ratios against baselines measured in this run).

1. Linear cost in T: time(2T) / time(T) of the full moment DP (mean + diagonal second moment).
2. V = 32, k = 2 (1,057 contexts), T = 256: mean and trace of the covariance for token / cumulative /
   sequence with the outcome signal and with the per-token oracle signal ``adv_pi``, measured in full (mean:
   forward-backward, O(T·|Z|·V); diagonal second moment: the Toeplitz path, O(T·|Z|²·V), with time-dependent
   β_t for per-token signals and position masks). ``--full`` adds the former general path (the forward DP,
   O(T·|Z|·V·d)), timed on a slice of coordinate blocks and a few steps and extrapolated.
2c. V = 12, k = 2, T = 256: the general path (per-token signal, a position mask) / the outcome signal.
3. DP vs enumeration speed ratio at V = 4, T = 10 (k = 1).

Usage: ``python benchmarks/bench_markov.py [--full] [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ctpo_lab, not an installed one

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from ctpo_lab import markov  # noqa: E402
from ctpo_lab.markov import dp, exact  # noqa: E402


def _time(fn, repeat: int = 1) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_linear(quick: bool) -> None:
    V, k, T = (6, 2, 64) if quick else (8, 2, 128)
    for signal, path in (("reward", "outcome signal"), ("adv_pi", "per-token signal")):
        times = {}
        for h in (T, 2 * T):
            mdp = markov.random_instance(V, h, k, seed=0, kl=0.01, automaton="count")
            times[h] = _time(lambda mdp=mdp, sig=signal: markov.exact_moments(mdp, "unclipped_cumulative", sig, 0.5,
                                                                  along_gradient=False), repeat=3)
        print(f"[1] mean + second moment, V={V}, k={k}, signal {signal} ({path}, Toeplitz path): time(T={T}) = "
              f"{times[T]:.3f} s, time(2T) = {times[2 * T]:.3f} s, ratio = {times[2 * T] / times[T]:.2f} "
              "(target <= 2.3)")


def _three(mdp, signal: str, **kw) -> tuple[float, list[str]]:
    total, lines = 0.0, []
    for est in ("unclipped_token", "unclipped_cumulative", "unclipped_sequence"):
        t0 = time.perf_counter()
        m = markov.exact_moments(mdp, est, signal, 0.5, along_gradient=False, **kw)
        dt = time.perf_counter() - t0
        total += dt
        lines.append(f"    {est:>20} {signal:>7}: mean + trace cov {dt:6.1f} s ({m.info.get('second_moment_path')} "
                     f"path), tr Cov = {m.trace_cov:.4e}")
    return total, lines


def bench_large(full: bool) -> None:
    """V = 32: the outcome signal and the per-token oracle signal A^π, each for the three estimators."""
    V, k, T = 32, 2, 256
    t0 = time.perf_counter()
    mdp = markov.random_instance(V, T, k, seed=0, kl=0.01, automaton="count")
    t_build = time.perf_counter() - t0
    print(f"[2] V={V}, k={k}, T={T}: {mdp.num_contexts} contexts, |Z|={mdp.num_states}, d={mdp.dim}; "
          f"instance built in {t_build:.2f} s")
    t_out, lines = _three(mdp, "reward")
    print("\n".join(lines))
    print(f"    total, outcome signal: {t_out:.1f} s (target <= 30 s)")
    t_tok, lines = _three(mdp, "adv_pi")
    print("\n".join(lines))
    print(f"    total, per-token oracle signal adv_pi: {t_tok:.1f} s (target <= 60 s); ratio to the outcome signal "
          f"{t_tok / t_out:.2f}")
    if full:  # the old general path: the forward DP, O(T·|Z|·V·d), timed on a slice and extrapolated
        tab = dp.transition_tables(mdp)
        feat = dp.score_feature(mdp)
        u = mdp.state_reward - 0.5
        a, b, c = markov.chain_estimator("unclipped_cumulative").tables(tab.ell, T)
        nblk, steps = 64, 4
        inside = feat.blk < nblk
        sub = dp.BlockFeature(blk=np.where(inside, feat.blk, 0), hv=np.where(inside[:, None, None], feat.hv, 0.0),
                              d=nblk * V)
        t0 = time.perf_counter()
        exact.run_moment_dp(mdp.with_horizon(steps), a, b, c, sub, u)
        t_slice = time.perf_counter() - t0
        est_full = t_slice * (mdp.num_contexts / nblk) * (T / steps)
        print(f"    forward DP (the former general path), cumulative: ~{est_full:.0f} s (extrapolated from "
              f"{nblk}/{mdp.num_contexts} context blocks x {steps} steps = {t_slice:.2f} s)")


def bench_general(V: int = 12, forward: bool = False) -> None:
    """The general path (per-token signals, position masks) against the outcome signal on the same instance."""
    mdp = markov.random_instance(V, 256, 2, seed=0, kl=0.01, automaton="count")
    rounds = {"reward": [], "adv_pi": [], "positions": []}
    for _ in range(5):  # interleaved rounds, medians
        rounds["reward"].append(_three(mdp, "reward")[0])
        rounds["adv_pi"].append(_three(mdp, "adv_pi")[0])
        rounds["positions"].append(_three(mdp, "reward", positions=range(1, 129))[0])
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    print(f"[2c] V={V}, k=2 ({mdp.num_contexts} contexts, d={mdp.dim}), T=256, the three estimators, median of 5 "
          f"interleaved rounds: outcome signal {med['reward']:.2f} s, per-token adv_pi {med['adv_pi']:.2f} s "
          f"(ratio {med['adv_pi'] / med['reward']:.2f}), positions 1..128 {med['positions']:.2f} s "
          f"(ratio {med['positions'] / med['reward']:.2f}); target <= 3")
    if forward:
        tab = dp.transition_tables(mdp)
        S = dp.signal_tables(mdp, "adv_pi", 0.5)
        a, b, c = markov.chain_estimator("unclipped_cumulative").tables(tab.ell, 256)
        t0 = time.perf_counter()
        exact.run_moment_dp(mdp, a, b, c, dp.score_feature(mdp), np.ones(mdp.num_states), beta_t=S)
        print(f"     the former general path (forward DP), cumulative adv_pi: {time.perf_counter() - t0:.1f} s")


def bench_feasible(V: int = 12) -> None:
    """A k=2, T=256 instance whose full trace of covariance fits the budget on this machine."""
    mdp = markov.random_instance(V, 256, 2, seed=0, kl=0.01, automaton="count")
    t0 = time.perf_counter()
    for est in ("unclipped_token", "unclipped_cumulative", "unclipped_sequence"):
        markov.exact_moments(mdp, est, "reward", 0.5, along_gradient=False)
    dt = time.perf_counter() - t0
    print(f"[2b] V={V}, k=2 ({mdp.num_contexts} contexts, d={mdp.dim}), T=256: mean + trace cov for the three "
          f"estimators, measured in full: {dt:.1f} s")


def bench_enumeration() -> None:
    mdp = markov.random_instance(4, 10, 1, seed=0, kl=0.05, automaton="contains:0-1")
    t_dp = _time(lambda: markov.exact_moments(mdp, "unclipped_cumulative", "reward", 0.5), repeat=3)
    t0 = time.perf_counter()
    en = markov.enumerate_moments(mdp, "unclipped_cumulative", "reward", 0.5)
    t_en = time.perf_counter() - t0
    dpm = markov.exact_moments(mdp, "unclipped_cumulative", "reward", 0.5)
    err = np.abs(dpm.second_moment_diag - en.second_moment_diag).max() / np.abs(en.second_moment_diag).max()
    print(f"[3] V=4, k=1, T=10 (4^10 = {4**10} sequences): DP {t_dp * 1e3:.1f} ms, enumeration {t_en:.2f} s, "
          f"speed ratio enumeration/DP = {t_en / t_dp:.0f}x (max rel. diff {err:.1e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="also time the former general path (the forward DP)")
    ap.add_argument("--quick", action="store_true", help="smaller linear-cost check")
    args = ap.parse_args()
    bench_linear(args.quick)
    bench_general(forward=args.full)
    bench_large(args.full)
    bench_feasible()
    bench_enumeration()


if __name__ == "__main__":
    main()
