"""Forward+backward time (and peak memory) of the loss presets against verl's own functions, in one run.

    python benchmarks/bench_losses.py [--batch 64] [--length 4096] [--rounds 25] [--threads 1] [--device cpu]

Baselines, measured in the same run on the same inputs: verl's ``compute_policy_loss_vanilla`` (GRPO/PPO,
dual clip 3) and ``compute_policy_loss_gspo`` when verl is installed (e.g. a separate venv with
``pip install verl==0.9.1``; ctpo_lab never imports it), else the six-line plain PPO loss below for both.
verl's functions return their three metrics as Python floats, so every ctpo_lab call includes the single
host transfer of its metrics (``metrics_to_host``).  Timing: ``--rounds`` interleaved rounds (each function once
per round, the order rotated by one each round), the median per function; the ratios are ratios of medians.
``faults`` is the mean number of minor page faults per call: glibc hands large freed blocks back to the OS, so
a fresh [B, T] tensor may be faulted in page by page, and on a small CPU that is a large and state-dependent
share of the time.  ``--retain-freed-memory`` times them with freed memory kept in the heap
(:func:`ctpo_lab.allocator.retain_freed_memory`, what every ``python -m ctpo_lab...`` command does; verl's
functions then run under the same allocator); by default the process keeps glibc's own policy, as a trainer
that calls these losses (TRL's, verl's) does.

Targets: ``grpo``/``gspo`` with ``diagnostics="basic"`` ≤ 1.0× verl's vanilla / GSPO; ``ctpo``
"basic" ≤ 1.0× ``grpo`` "basic"; ``"full"`` (every ctpo_lab metric) ≤ 1.5× verl's vanilla.  ``cumsum alone``
times torch's row-wise cumulative sum of one [B, T] input, the operation ``ctpo`` needs beyond ``grpo``'s, so that
the run also prints (``grpo`` basic + cumsum) / ``grpo`` basic: the ratio a ``ctpo`` that did nothing else beyond
``grpo`` would reach.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ctpo_lab, not an installed one

import argparse
import statistics
import time

import torch

from ctpo_lab.allocator import retain_freed_memory, retaining_freed_memory
from ctpo_lab.losses import PRESETS, compute_policy_loss, metrics_to_host

try:  # verl is optional: the comparison falls back to the plain baseline
    from verl.trainer.ppo import core_algos as _verl
    from verl.workers.config import ActorConfig as _VerlActorConfig
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _verl = None


def plain_ppo_loss(log_prob, old_log_prob, advantages, mask):
    """The six-line baseline: token ratio, PPO clip 0.2, token-mean."""
    ratio = torch.exp(log_prob - old_log_prob)
    pg1 = -advantages[:, None] * ratio
    pg2 = -advantages[:, None] * torch.clamp(ratio, 0.8, 1.2)
    return (torch.maximum(pg1, pg2) * mask).sum() / mask.sum()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run_plain(lp, old, adv, mask):
    loss = plain_ppo_loss(lp, old, adv, mask)
    loss.backward()
    return loss.item()


def _verl_runner(kind: str):
    preset = PRESETS["grpo" if kind == "vanilla" else "gspo"]
    cfg = _VerlActorConfig(strategy="fsdp", clip_ratio=preset.eps_low, clip_ratio_low=preset.eps_low,
                           clip_ratio_high=preset.eps_high, ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False,
                           rollout_n=1, ppo_mini_batch_size=1)
    fn = _verl.compute_policy_loss_vanilla if kind == "vanilla" else _verl.compute_policy_loss_gspo
    agg = "token-mean" if kind == "vanilla" else "seq-mean-token-mean"

    def run(lp, old, adv, mask):
        loss, metrics = fn(old, lp, adv[:, None].expand_as(lp), mask, loss_agg_mode=agg, config=cfg)
        loss.backward()
        return metrics

    return run


def _run_preset(name, diagnostics="full"):
    def run(lp, old, adv, mask):
        out = compute_policy_loss(lp, old, adv, mask, preset=name, diagnostics=diagnostics)
        out.loss.backward()
        return metrics_to_host(out.metrics, out.num_nonfinite)

    return run


def _run_cumsum(lp, old, adv, mask):
    """The one [B, T] operation ``ctpo`` needs that ``grpo`` does not: the row-wise cumulative sum of the
    log-ratios (torch's serial scan per row, accumulating in float64 on the CPU)."""
    return torch.cumsum(old, -1)


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on Linux/macOS
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(fns: dict, inputs, rounds: int, device: torch.device
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Median time of each function over ``rounds`` rounds in which every function runs once, and its mean
    number of minor page faults per call (memory the allocator had handed back to the OS and asks for again:
    on the CPU a large share of these functions' time, and the part that varies with the allocator's state)."""
    lp = inputs[0]
    for fn in fns.values():  # warm-up
        for _ in range(2):
            lp.grad = None
            fn(*inputs)
    times: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, int] = dict.fromkeys(fns, 0)
    order = list(fns)
    for r in range(rounds):
        # rotated each round: what a call finds in the allocator depends on the call before it
        for k in order[r % len(order):] + order[:r % len(order)]:
            fn = fns[k]
            lp.grad = None
            _sync(device)
            f0 = _minor_faults()
            start = time.perf_counter()
            fn(*inputs)
            _sync(device)
            times[k].append(time.perf_counter() - start)
            faults[k] += _minor_faults() - f0
    return {k: statistics.median(v) for k, v in times.items()}, {k: v / rounds for k, v in faults.items()}


def time_it(fn, inputs, repeats: int, device: torch.device) -> float:
    lp = inputs[0]
    for _ in range(3):  # warm-up
        lp.grad = None
        fn(*inputs)
    times = []
    for _ in range(repeats):
        lp.grad = None
        _sync(device)
        start = time.perf_counter()
        fn(*inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn, inputs, device: torch.device) -> float:
    """Peak bytes allocated by one forward+backward, beyond what was live before it."""
    lp = inputs[0]
    lp.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*inputs)
    # running sum of each op's own (net) allocations in start order: the live-bytes curve of the call
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return float(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (the issue's setting: 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", nargs="*", default=["grpo", "gspo", "ctpo"],
                    help="presets timed with both diagnostics sets (any key of PRESETS)")
    ap.add_argument("--memory", action="store_true", help="also report the peak memory of each function")
    ap.add_argument("--retain-freed-memory", action="store_true",
                    help="keep freed memory in the heap, as the ctpo_lab commands do (default: glibc's policy)")
    args = ap.parse_args()
    if args.retain_freed_memory:
        retain_freed_memory()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.length
    old = (-torch.rand(B, T, generator=g) * 3).to(device)
    lp = (old.cpu() + torch.randn(B, T, generator=g) * 0.05).to(device).requires_grad_()
    adv = torch.randn(B, generator=g).to(device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    inputs = (lp, old, adv, mask)
    fns = {"plain PPO": _run_plain}
    if _verl is not None:
        fns["verl vanilla"] = _verl_runner("vanilla")
        fns["verl gspo"] = _verl_runner("gspo")
        base_v, base_g = "verl vanilla", "verl gspo"
    else:
        base_v = base_g = "plain PPO"
    for name in args.presets:
        for diag in ("basic", "full"):
            fns[f"{name} {diag}"] = _run_preset(name, diag)
    if "ctpo basic" in fns and "grpo basic" in fns:
        fns["cumsum alone"] = _run_cumsum
    print(f"device={device} batch=[{B}, {T}] float32, {int(mask.sum())} valid tokens, median of {args.rounds} "
          f"interleaved rounds, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"freed memory retained: {retaining_freed_memory()}, "
          f"verl {'installed' if _verl is not None else 'NOT installed (baseline: plain PPO)'}")
    t, faults = time_interleaved(fns, inputs, args.rounds, device)
    mem = {k: peak_memory(fn, inputs, device) for k, fn in fns.items()} if args.memory else {}
    print(f"{'function':<16}{'fwd+bwd ms':>12}{'/plain':>8}{'faults':>8}" + (f"{'peak MiB':>10}" if mem else ""))
    for k in fns:
        print(f"{k:<16}{t[k] * 1e3:>12.2f}{t[k] / t['plain PPO']:>8.2f}{faults[k]:>8.0f}"
              + (f"{mem[k] / 2**20:>10.1f}" if mem else ""))
    print("ratios (target):")

    def line(label, num, den, target):
        if num in t and den in t:
            r = t[num] / t[den]
            print(f"  {label:<44}{r:>6.2f}x  (<= {target}: {'met' if r <= target else 'NOT met'})")

    line(f"grpo basic / {base_v}", "grpo basic", base_v, 1.0)
    line(f"gspo basic / {base_g}", "gspo basic", base_g, 1.0)
    line("ctpo basic / grpo basic", "ctpo basic", "grpo basic", 1.0)
    if "cumsum alone" in t:
        # a lower bound for any ctpo that does grpo's work plus the scan: how far the target is from it
        floor = (t["grpo basic"] + t["cumsum alone"]) / t["grpo basic"]
        print(f"    ctpo basic - grpo basic {(t['ctpo basic'] - t['grpo basic']) * 1e3:.2f} ms; the cumulative sum "
              f"alone {t['cumsum alone'] * 1e3:.2f} ms: (grpo basic + cumsum) / grpo basic = {floor:.2f}x")
    for name in args.presets:
        line(f"{name} full / {base_v}", f"{name} full", base_v, 1.5)


if __name__ == "__main__":
    main()
