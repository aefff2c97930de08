"""Forward+backward time and peak memory of every loss preset vs a plain token-level PPO loss.

    python benchmarks/bench_losses.py [--batch 64] [--length 4096] [--repeats 30] [--device cpu] [--seed 0]

Both the preset (including all of its diagnostics and the single host transfer of the metrics) and the
baseline are measured in the same run on the same inputs; the table prints median times and their ratio.
Peak memory is the peak of live tensor allocations during one forward+backward (CUDA: the allocator's peak;
CPU: the running sum of the profiler's per-op net allocations, in start order).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctpo_lab.losses import PRESETS, compute_policy_loss, metrics_to_host


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


def _run_preset(name):
    def run(lp, old, adv, mask):
        out = compute_policy_loss(lp, old, adv, mask, preset=name)
        out.loss.backward()
        return metrics_to_host(out.metrics, out.num_nonfinite)

    return run


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
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", nargs="*", default=sorted(PRESETS))
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.length
    old = (-torch.rand(B, T, generator=g) * 3).to(device)
    lp = (old.cpu() + torch.randn(B, T, generator=g) * 0.05).to(device).requires_grad_()
    adv = torch.randn(B, generator=g).to(device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    inputs = (lp, old, adv, mask)
    print(f"device={device} batch=[{B}, {T}] float32, {int(mask.sum())} valid tokens, "
          f"median of {args.repeats}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    t_plain = time_it(_run_plain, inputs, args.repeats, device)
    m_plain = peak_memory(_run_plain, inputs, device)
    print(f"{'loss':<14}{'fwd+bwd ms':>12}{'ratio':>8}{'peak MiB':>10}{'ratio':>8}")
    print(f"{'plain PPO':<14}{t_plain * 1e3:>12.2f}{1.0:>8.2f}{m_plain / 2**20:>10.1f}{1.0:>8.2f}")
    for name in args.presets:
        fn = _run_preset(name)
        t = time_it(fn, inputs, args.repeats, device)
        m = peak_memory(fn, inputs, device)
        print(f"{name:<14}{t * 1e3:>12.2f}{t / t_plain:>8.2f}{m / 2**20:>10.1f}{m / max(m_plain, 1):>8.2f}")


if __name__ == "__main__":
    main()
