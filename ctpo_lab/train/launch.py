"""One training run from command-line-shaped inputs: what ``python -m ctpo_lab.train --preset ... --loss ...`` does.

:func:`launch` resolves the config (trainer preset < recipe < ``key=value`` overrides < explicit arguments, see
:mod:`ctpo_lab.train.config`), chooses the run folder and runs the :class:`~ctpo_lab.train.loop.Trainer`.  Bad
input raises ``ValueError``/``TypeError`` naming the argument before any work starts; a run stopped on repeated
non-finite losses raises :class:`~ctpo_lab.train.loop.NanLossError`.  Turning these into exit codes is the
CLI's job (:mod:`ctpo_lab.train.__main__`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctpo_lab.losses import LossConfig
from ctpo_lab.train.config import TrainConfig, resolve_train_config
from ctpo_lab.train.loop import Trainer, TrainResult

__all__ = ["DEFAULT_TRAIN_PRESET", "LaunchResult", "default_run_dir", "launch"]

#: The trainer preset of a run when neither a preset nor a recipe is given.
DEFAULT_TRAIN_PRESET = "cpu-smoke"

#: Keys of the one-line summary of a finished run (``LaunchResult.summary``).
SUMMARY_KEYS = ("step", "reward_mean", "eval_accuracy", "offpolicy/kl", "wall_time")


@dataclass
class LaunchResult:
    """``config``: the resolved config; ``result``: the run (None with ``dry_run``); ``is_main``: this process is
    rank 0 (only rank 0 reports); ``summary``: the run folder and the final record's main metrics."""

    config: TrainConfig
    result: TrainResult | None = None
    is_main: bool = True
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return self.result is not None and self.result.interrupted


def default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<trainer preset>-<loss>-s<seed>``."""
    return Path(f"runs/{cfg.preset}-{cfg.loss_name}-s{cfg.seed}")


def launch(
    preset: str | None = None,
    recipe: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] | dict[str, Any] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    loss: str | LossConfig | None = None,
    seed: int | None = None,
    steps: int | None = None,
    track: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    dry_run: bool = False,
) -> LaunchResult:
    """Resolve the config and (unless ``dry_run``) train into ``out`` (default :func:`default_run_dir`).

    ``preset``: a key of :data:`~ctpo_lab.train.config.TRAIN_PRESETS` (default :data:`DEFAULT_TRAIN_PRESET`
    unless ``recipe`` is given, which may name one); ``loss``: a key of :data:`ctpo_lab.losses.PRESETS` or a
    :class:`~ctpo_lab.losses.LossConfig`; ``None`` arguments leave the preset's / recipe's value.
    """
    if preset is None and recipe is None:
        preset = DEFAULT_TRAIN_PRESET
    if isinstance(overrides, (list, tuple)):
        overrides = list(overrides)
    cfg = resolve_train_config(preset, recipe, overrides, loss=loss, seed=seed, steps=steps, track=track)
    if dry_run:
        return LaunchResult(cfg)
    from ctpo_lab.runsafety import check_writable

    check_writable(out if out is not None else default_run_dir(cfg))
    trainer = Trainer(cfg, out if out is not None else default_run_dir(cfg), resume=resume, overwrite=overwrite,
                      progress=progress)
    result = trainer.train()
    f = result.final
    summary = {"out": str(result.out), **{k: f.get(k) for k in SUMMARY_KEYS}}
    return LaunchResult(cfg, result, trainer.dist.is_main, summary)
