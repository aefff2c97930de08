"""Real-LLM trajectories: collect, perturb, analyse, plot (Figure 1 of the paper on a model of your choice).

One-shot form (collect → perturb → analyse → plots + ``DIR/summary.json``)::

    python -m ctpo_lab.llm --model smollm2 --out DIR [--quick] [--seed S]

Subcommands::

    python -m ctpo_lab.llm run     --model M --out DIR [...]   # the one-shot form (the default)
    python -m ctpo_lab.llm analyze DIR [--bin-width 50]       # redo statistics/plots from DIR/targets
    python -m ctpo_lab.llm fit     PATH [--step S]            # √t fit of a trajectory parquet or the authors'
                                                              # npz dumps (a directory of step_*_rank_*.npz)
    python -m ctpo_lab.llm bias    --model M --out DIR [--quick] # estimator bias/variance against an on-policy
                                                              # reference (ctpo_lab.llm.bias_run)

``run`` options choose the source of off-policyness (``--source``): ``stale`` (k = ``--k`` optimizer steps
of a GRPO-style update with the loss ``--loss`` on minibatches of a training split; ratios measured on held-out
responses), ``temperature`` (μ sampled at ``--temperature`` ≠ 1, π = the same weights at 1), ``dtype`` (π =
the weights in bf16), ``checkpoints`` (π = ``--target-model``). DIR must be new or empty unless
``--overwrite`` (start again) or ``--resume`` (continue an interrupted collection with the same config).

This module only parses arguments: the pipeline is :mod:`ctpo_lab.llm.pipeline` (``run`` →
:func:`~ctpo_lab.llm.pipeline.run_trajectories`, ``analyze`` → :func:`~ctpo_lab.llm.pipeline.analyze_run`,
``fit`` → :func:`~ctpo_lab.llm.pipeline.fit_dumps`) and :mod:`ctpo_lab.llm.bias_run` (``bias``).  Bad input
ends with one line ``error: <argument>: <expected>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ctpo_lab.cli import ArgumentParser, error_line, finite_float, folder_path, int_at_least
from ctpo_lab.cli import run as run_cli
from ctpo_lab.llm.limits import MAX_BOOT, MIN_BOOT
from ctpo_lab.llm.pipeline import OPTIONS, QUICK, SOURCES, RunConfig, json_default, run  # noqa: F401

# (QUICK, RunConfig and run are re-exported for the callers of the former module layout)

SUBCOMMANDS = ("run", "analyze", "fit", "bias")
SUMMARY_KEYS = ("primary_target", "sigma_hat", "exponent", "exponent_ci", "drift_per_token",
                "clip_rate_fixed_window", "clip_rate_sqrt_t_window", "timings")


def _parse_k(text: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in text.split(",")})  # an empty item ("1,,2") is a typo: int("") fails
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--k: expected comma-separated ints, got {text!r}") from e
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k: expected positive ints, got {text!r}")
    return ks


#: ``--n-boot`` of every subcommand (:mod:`ctpo_lab.llm.limits`).
_BOOT = int_at_least(MIN_BOOT, MAX_BOOT)
_BOOT_RANGE = f"{MIN_BOOT} to {MAX_BOOT:,}"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m ctpo_lab.llm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="collect, perturb, analyse and plot (default)")
    d = RunConfig()
    r.add_argument("--model", default=None, help="smollm2 | tiny-random | local folder | hub id")
    r.add_argument("--out", type=folder_path, required=True, help="output directory")
    r.add_argument("--seed", type=int_at_least(0), default=0)
    r.add_argument("--quick", action="store_true", help="small budget (tiny-random unless --model is given)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r.add_argument("--resume", action="store_true", help="continue an interrupted collection in --out")
    r.add_argument("--prompts", default=None, help="arithmetic | verl parquet file/dir | hf:NAME[:split]")
    r.add_argument("--reward", choices=("binary", "lenient"), default=None,
                   help="binary (the paper's) or lenient (partial credit; default, for small models)")
    r.add_argument("--train-prompts", type=int, default=None, help=f"prompts for the stale updates ({d.train_prompts})")
    r.add_argument("--eval-prompts", type=int, default=None, help=f"held-out prompts measured ({d.eval_prompts})")
    r.add_argument("--group-size", type=int, default=None, help=f"responses per prompt G ({d.group_size})")
    r.add_argument("--max-new-tokens", type=int, default=None, help=f"response length limit ({d.max_new_tokens})")
    r.add_argument("--temperature", type=finite_float(0.0, lo_open=True), default=None,
                   help="sampling temperature of μ (1.0)")
    r.add_argument("--prompts-per-chunk", type=int, default=None, help="prompts per batched decode / shard (8)")
    r.add_argument("--source", choices=SOURCES, default="stale")
    r.add_argument("--k", type=_parse_k, default=None, help="stale updates to measure, e.g. 1,4,15")
    r.add_argument("--loss", default=None,
                   help="loss preset of the stale update (a key of ctpo_lab.losses.PRESETS; ctpo)")
    r.add_argument("--preset", dest="loss", default=None, help=argparse.SUPPRESS)  # the former name of --loss
    r.add_argument("--lr", type=finite_float(0.0, lo_open=True), default=None,
                   help=f"AdamW learning rate of the stale update ({d.lr})")
    r.add_argument("--minibatches", type=int, default=None, help="minibatches per rollout batch (16)")
    r.add_argument("--target-model", default=None, help="π for --source checkpoints")
    r.add_argument("--bin-width", type=int_at_least(1), default=None,
                   help=f"positions per bin ({d.bin_width}; the paper: 50; at most --max-new-tokens)")
    r.add_argument("--n-boot", type=_BOOT, default=None, help=f"bootstrap replicates (1000; {_BOOT_RANGE})")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: best on a shared CPU)")
    r.add_argument("--cache", default=None, help="model cache directory ($CTPO_LAB_CACHE)")
    r.add_argument("--pad-token", default=None, help="pad token for tokenizers without one ('eos')")
    r.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("analyze", help="statistics and plots from an existing run directory")
    a.add_argument("dir")
    a.add_argument("--bin-width", type=int_at_least(1), default=None,
                   help="positions per bin (the run's; at most the longest response)")
    a.add_argument("--n-boot", type=_BOOT, default=None, help=f"bootstrap replicates (the run's; {_BOOT_RANGE})")
    a.add_argument("--seed", type=int_at_least(0), default=0)
    a.add_argument("--overwrite", action="store_true", help="replace existing plots/summary")
    f = sub.add_parser("fit", help="√t fit of a trajectory parquet or a directory of authors' npz dumps")
    f.add_argument("path")
    f.add_argument("--step", type=int_at_least(0), default=None, help="dump step (default: the last one)")
    f.add_argument("--bin-width", type=int_at_least(1), default=50,
                   help="positions per bin (50; at most the longest response)")
    f.add_argument("--min-count", type=int_at_least(1), default=30)
    f.add_argument("--n-boot", type=_BOOT, default=1000, help=f"bootstrap replicates (1000; {_BOOT_RANGE})")
    f.add_argument("--seed", type=int_at_least(0), default=0)
    f.add_argument("--center", action="store_true", help="centre L_t within prompt groups")
    from ctpo_lab.llm.bias_run import add_parser

    add_parser(sub)
    return p


#: Argument names in library messages that are shown as flags (``max_new_tokens`` → ``--max-new-tokens``).
_FLAG_NAMES = frozenset(OPTIONS) | {"out", "seed", "source", "threads", "resume", "overwrite", "step", "min_count",
                                    "bin_width", "n_boot", "params", "directions"}


def _error(e: Exception) -> int:
    """One line ``error: <argument>: <expected>`` on stderr (an option name shown as its flag); status 2."""
    print(error_line(e, _FLAG_NAMES), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 bad input (one line ``error: <argument>: <expected>``), 130 interrupted."""
    return run_cli(lambda: _main(argv), flags=_FLAG_NAMES, prog="python -m ctpo_lab.llm")


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    parser = _parser()
    if not argv:  # no subcommand and none of run's options (run needs at least --out)
        raise ValueError(f"command: required (one of {', '.join(SUBCOMMANDS)}, or run's options: --out DIR [...]; "
                         "--help lists them)")
    ns = parser.parse_args(argv)
    if ns.command == "bias":
        from ctpo_lab.llm.bias_run import main_bias

        return main_bias(ns)
    from ctpo_lab.llm import pipeline

    if ns.command == "run":
        cfg = pipeline.resolve_run_config(out=ns.out, seed=ns.seed, quick=ns.quick, source=ns.source,
                                          threads=ns.threads, progress=not ns.no_progress,
                                          **{name: getattr(ns, name) for name in OPTIONS})
        summary = pipeline.run_trajectories(cfg, overwrite=ns.overwrite, resume=ns.resume)
        print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}, indent=2, default=json_default))
    elif ns.command == "analyze":
        pipeline.analyze_run(ns.dir, bin_width=ns.bin_width, n_boot=ns.n_boot, seed=ns.seed,
                             overwrite=ns.overwrite)
    else:
        res = pipeline.fit_dumps(ns.path, step=ns.step, bin_width=ns.bin_width, min_count=ns.min_count,
                                 n_boot=ns.n_boot, seed=ns.seed, center=ns.center)
        print(json.dumps(res, indent=2, default=json_default))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
