"""`python -m ctpo_lab.diagnose PATH [--out DIR] [--steps ...]`: diagnose your own run.

PATH is a ctpo_lab trajectory parquet (a file or a directory of shards), importance-weight npz dumps (a file,
or a directory of step_XXXXXXX_rank_XXXX.npz files or step_XXXXXXX/ folders) as written by ctpo_lab's trainer,
its verl plugin or the CTPO authors' verl fork (--dump-mode says which loss wrote weights-only dumps), the
fork's rollout_is/ dumps, a pickled verl DataProto (*.dp), slime --save-debug-train-data files (*.pt) or SkyRL
dump_data_batch pickles (*_training_input.pkl); the format is detected from the path. Writes DIR/summary.json,
DIR/report.md, PNG figures and a self-contained DIR/report.html.
"""

from __future__ import annotations

import argparse
import sys

from ctpo_lab.cli import ArgumentParser, finite_float, folder_path, int_at_least, run
from ctpo_lab.diagnose.clip import DEFAULT_TARGET_CLIP_RATE
from ctpo_lab.diagnose.pipeline import diagnose
from ctpo_lab.diagnose.readers import DUMP_MODES
from ctpo_lab.llm.limits import MAX_BOOT, MAX_CHAIN_SEEDS, MIN_BOOT

#: The longest A-B range ``--steps`` takes (a longer one is a typo; dump folders hold far fewer steps).
MAX_STEPS_IN_RANGE = 1_000_000


def _steps(text: str) -> list[int]:
    """``5`` or ``10-20`` (inclusive)."""
    lo, sep, hi = text.partition("-")
    try:
        a = int(lo)
        b = int(hi) if sep else a
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step (an int ≥ 0) or a range A-B, got {text!r}") from None
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"expected a step ≥ 0 or a range A-B with A ≤ B, got {text!r}")
    if b - a >= MAX_STEPS_IN_RANGE:
        raise argparse.ArgumentTypeError(f"expected a range of at most {MAX_STEPS_IN_RANGE:,} steps, got {text!r}")
    return list(range(a, b + 1))


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m ctpo_lab.diagnose", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="trajectory parquet, dump file or dump directory (any format above)")
    ap.add_argument("--out", type=folder_path, default="outputs/diagnose",
                    help="output folder (default outputs/diagnose)")
    ap.add_argument("--steps", nargs="+", type=_steps, default=None, metavar="STEP",
                    help="dump steps to pool (ints or ranges A-B; default every step)")
    ap.add_argument("--dump-mode", choices=DUMP_MODES, default="cumprod",
                    help="loss mode that wrote weights-only dumps (default cumprod; ctpo_lab's dumps store L_t "
                         "and ignore it; gspo is refused)")
    ap.add_argument("--bin-width", type=int_at_least(1), default=50,
                    help="position bin width (default 50; at most the longest response)")
    ap.add_argument("--n-boot", type=int_at_least(MIN_BOOT, MAX_BOOT), default=1000,
                    help=f"bootstrap resamples (default 1000; {MIN_BOOT} to {MAX_BOOT:,})")
    ap.add_argument("--target-clip-rate", type=finite_float(0, 1, lo_open=True, hi_open=True),
                    default=DEFAULT_TARGET_CLIP_RATE,
                    help=f"clip rate the recommended thresholds are calibrated to (default {DEFAULT_TARGET_CLIP_RATE})")
    ap.add_argument("--chain-seeds", type=int_at_least(0, MAX_CHAIN_SEEDS), default=1,
                    help="random chains of the exact bias/variance prediction per preset (default 1; 0: none; "
                         f"at most {MAX_CHAIN_SEEDS:,})")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace DIR if ctpo_lab created it")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 bad input (one line ``error: <argument>: <expected>``), 130 interrupted."""
    return run(lambda: _main(argv), prog="python -m ctpo_lab.diagnose",
               flags=("out", "steps", "dump_mode", "bin_width", "n_boot", "seed", "target_clip_rate",
                      "chain_seeds"))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    steps = None if args.steps is None else sorted({s for group in args.steps for s in group})
    s = diagnose(args.path, args.out, steps=steps, seed=args.seed, dump_mode=args.dump_mode,
                 overwrite=args.overwrite, bin_width=args.bin_width, n_boot=args.n_boot,
                 target_clip_rate=args.target_clip_rate, chain_seeds=args.chain_seeds)
    lo, hi = s["exponent_ci"]
    print(f"{s['format']}: {s['num_sequences']} sequences, {s['num_tokens']} tokens; KL/token (k3) "
          f"{_num(s['kl_per_token'], '.3g')}, σ̂ {_num(s['sigma_hat'], '.4g')}, exponent "
          f"{_num(s['exponent'], '.3f')} [{_num(lo, '.3f')}, {_num(hi, '.3f')}]"
          + (f"; LOSSY input (weights at the cap {s['cap']})" if s["lossy"] else ""))
    rec = s["recommendation"]
    th = rec["thresholds"]
    print(f"recommended: {rec['preset']}" + (f" {rec['overrides']}" if rec["overrides"] else "")
          + ("" if th is None else f" eps_low={th['eps_low']:.4g} eps_high={th['eps_high']:.4g}"
             + (f" dual_clip={th['dual_clip']:.4g}" if "dual_clip" in th else "")))
    print(f"report: {args.out}/report.html")
    return 0


def _num(x: float | None, spec: str) -> str:
    """A summary number (None where it is undefined) as text."""
    return "n/a" if x is None else format(x, spec)


if __name__ == "__main__":
    sys.exit(main())
