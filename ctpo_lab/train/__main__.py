"""``python -m ctpo_lab.train`` (no arguments): the main job (:mod:`ctpo_lab.train.main_job`: the paper's four
losses × 20 paired seeds on an off-policy cell of the regime map, and a verdict stated only where the paired
test separates them); ``python -m ctpo_lab.train main [...]``: the same with options;
``python -m ctpo_lab.train compare [...]``: a comparison grid with options (:mod:`ctpo_lab.compare`);
``python -m ctpo_lab.train regime [...]``: the regime map (:mod:`ctpo_lab.train.regime`);
``python -m ctpo_lab.train --preset NAME --loss NAME --seed S --out DIR [--steps N] [--resume] [--overwrite]
[--config recipe.yaml] [key=value ...]``

Examples::

    python -m ctpo_lab.train --preset cpu-smoke --loss ctpo --out runs/smoke-ctpo
    python -m ctpo_lab.train --preset cpu-smoke --loss grpo lr=5e-4 loss_overrides.eps_high=0.28
    python -m ctpo_lab.train --out runs/smoke-ctpo --preset cpu-smoke --loss ctpo --resume

Data parallel: ``torchrun --nproc_per_node N -m ctpo_lab.train ...`` (see :mod:`ctpo_lab.train.distributed`).

The run itself is :func:`ctpo_lab.train.launch.launch`; this module only parses arguments.

Exit status: 0 finished (``--resume`` of a finished run: reported, nothing changed), 130 interrupted by Ctrl-C
or SIGTERM (checkpoint written), 3 stopped on repeated NaN losses, 2 bad input (one line
``error: <argument>: <expected>`` on stderr; a run folder another process is writing counts as bad input).
"""

from __future__ import annotations

import argparse
import json
import sys

from ctpo_lab.cli import ArgumentParser, folder_path, int_at_least, run
from ctpo_lab.losses import PRESETS as LOSS_PRESETS
from ctpo_lab.losses import TRAINING_PRESETS
from ctpo_lab.train.config import TRAIN_PRESETS
from ctpo_lab.train.launch import DEFAULT_TRAIN_PRESET

DEFAULT_PRESET = DEFAULT_TRAIN_PRESET


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m ctpo_lab.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(TRAIN_PRESETS),
        help=f"trainer preset (default {DEFAULT_PRESET!r} unless --config names one)",
    )
    p.add_argument(
        "--loss",
        default=None,
        help=f"loss preset: a key of ctpo_lab.losses.PRESETS (training losses: {', '.join(TRAINING_PRESETS)}; "
        f"all: {', '.join(LOSS_PRESETS)})",
    )
    p.add_argument("--seed", type=int_at_least(0), default=None, help="run seed (same seed, same numbers on CPU)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="number of rollout steps")
    p.add_argument("--out", type=folder_path, default=None, help="run folder (default runs/<preset>-<loss>-s<seed>)")
    p.add_argument("--config", default=None, help="YAML recipe (config keys; may name a preset)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--track", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. lr=5e-4 loss_overrides.eps_high=0.28 task_options.max_steps=20",
    )
    return p


#: Argument names of library messages shown as flags.
FLAGS = ("out", "seed", "steps", "loss", "preset", "config", "resume", "overwrite", "track")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "main":
        from ctpo_lab.train import main_job

        return main_job.main(argv[1:])
    if argv[0] == "compare":
        from ctpo_lab import compare

        return compare.main(argv[1:])
    if argv[0] == "regime":
        from ctpo_lab.train import regime

        return regime.main(argv[1:])
    from ctpo_lab.runsafety import watch_parent

    watch_parent()  # a grid's worker stops (checkpointing) when its parent dies
    return run(lambda: _main(argv), flags=FLAGS, prog="python -m ctpo_lab.train")


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ctpo_lab.train.launch import launch
    from ctpo_lab.train.loop import NanLossError

    try:
        result = launch(
            args.preset,
            args.config,
            args.overrides,
            out=args.out,
            loss=args.loss,
            seed=args.seed,
            steps=args.steps,
            track=True if args.track else None,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            dry_run=args.print_config,
        )
    except NanLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if args.print_config:
        print(json.dumps(result.config.to_dict(), indent=1))
        return 0
    if result.interrupted:
        return 130
    if result.is_main:
        print(json.dumps(result.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
