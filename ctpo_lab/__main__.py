"""`python -m ctpo_lab`: compare loss presets on one synthetic off-policy batch.

Per-token log-ratios are drawn as a Gaussian random walk with drift, ℓ_t ~ N(−σ²/2, σ²) (the per-token KL is
then σ²/2, the paper's Figure-1 regime for σ ≈ 0.035), responses have random lengths, advantages are ±1.
``--loss NAME [NAME ...]`` chooses the estimators (any key of :data:`ctpo_lab.losses.PRESETS`, ``all`` for
every one); the default is the training losses :data:`ctpo_lab.losses.TRAINING_PRESETS`.
The table shows, per preset, the loss, the advantage-aware clip rates, the weight quantiles and the ESS;
then the clip rate by position for the √t window (``ctpo``) and the fixed log window (``ctpo_fixed``),
computed whether or not they are in the table.
"""

from __future__ import annotations

import sys

import torch

from ctpo_lab.cli import ArgumentParser, finite_float, int_at_least, run
from ctpo_lab.diagnostics import position_profile
from ctpo_lab.losses import PRESETS, TRAINING_PRESETS, compute_policy_loss, metrics_to_host


def synthetic_batch(batch: int, length: int, sigma: float, seed: int):
    """(log_prob, old_log_prob, advantages, mask), shapes [B, T], [B, T], [B], [B, T], float64."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 2.0
    ell = -0.5 * sigma**2 + sigma * torch.randn(batch, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(length // 8, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    adv = torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return old + ell, old, adv, mask


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m ctpo_lab", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int_at_least(1), default=128, help="responses in the batch (default 128)")
    ap.add_argument("--length", type=int_at_least(1), default=2048, help="maximum response length (default 2048)")
    ap.add_argument("--sigma", type=finite_float(0.0, 10.0), default=0.035,
                    help="std of the per-token log-ratio, a finite number in [0, 10] (default 0.035)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--loss", nargs="+", default=None, metavar="NAME",
                    help=f"estimators to tabulate: keys of ctpo_lab.losses.PRESETS or 'all' (default: the training "
                         f"losses {' '.join(TRAINING_PRESETS)})")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 bad input (one line ``error: <argument>: <expected>``), 130 interrupted."""
    return run(lambda: _main(argv), prog="python -m ctpo_lab")


def _main(argv: list[str] | None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    names = list(TRAINING_PRESETS) if args.loss is None else (
        list(PRESETS) if args.loss == ["all"] else list(dict.fromkeys(args.loss)))
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"--loss: unknown preset(s) {unknown}; expected keys of ctpo_lab.losses.PRESETS "
                         f"{sorted(PRESETS)} or 'all'")
    if args.batch * args.length > 50_000_000:
        raise ValueError(f"--batch/--length: {args.batch} × {args.length} tokens is more than the 5e7 this demo "
                         "allows")
    lp, old, adv, mask = synthetic_batch(args.batch, args.length, args.sigma, args.seed)
    print(f"synthetic batch: {args.batch} responses, {int(mask.sum())} tokens, per-token log-ratio "
          f"N(−σ²/2, σ²) with σ = {args.sigma}, advantages ±1, seed {args.seed}\n")
    cols = [("loss", "actor/pg_loss"), ("clip total", "pg_update/clip/total/rate"),
            ("clip high", "pg_update/clip/high/rate"), ("clip low", "pg_update/clip/low/rate"),
            ("dual", "pg_update/clip/dual/rate"), ("w p50", "pg_update/is_ratio/p50"),
            ("w p99", "pg_update/is_ratio/p99"), ("w max", "pg_update/is_ratio/max"),
            ("ESS tok", "pg_update/ess/token")]
    print(f"{'preset':<{max(14, *(len(n) + 2 for n in names))}}" + "".join(f"{c:>11}" for c, _ in cols))
    outputs = {}
    width = max(14, *(len(n) + 2 for n in names))
    for name in names:
        out = compute_policy_loss(lp, old, adv, mask, preset=name)
        outputs[name] = out
        m = metrics_to_host(out.metrics, out.num_nonfinite)
        print(f"{name:<{width}}" + "".join(f"{m.get(k, float('nan')):>11.4g}" for _, k in cols))
    print("\nclip rate by position (advantage-aware), √t window vs fixed log window:")
    profiles = {}
    for name in ("ctpo", "ctpo_fixed"):
        o = outputs[name] if name in outputs else compute_policy_loss(lp, old, adv, mask, preset=name)
        clipped = o.clip.clipped_high | o.clip.clipped_low | o.clip.clipped_dual
        cum = o.log_weight_value  # X_t = L_t for the cumulative family
        profiles[name] = position_profile(cum, o.mask, bin_width=max(1, args.length // 8), clipped=clipped)
    p = profiles["ctpo"]
    print(f"{'positions':>14}{'std L_t':>10}{'ctpo':>10}{'ctpo_fixed':>12}")
    for b in range(p.count.numel()):
        if p.count[b] == 0:
            continue
        lo = int(p.bin_start[b])
        print(f"{f'{lo}-{lo + p.bin_width - 1}':>14}{p.std[b].item():>10.4f}{p.clip_rate[b].item():>10.3f}"
              f"{profiles['ctpo_fixed'].clip_rate[b].item():>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
