"""Compact GRPO-family trainer with explicit off-policyness: ``python -m ctpo_lab.train``.

>>> from ctpo_lab.train import resolve_train_config, train
>>> cfg = resolve_train_config("cpu-smoke", loss="ctpo", seed=0)
>>> result = train(cfg, "runs/smoke-ctpo")          # result.history: the logged records

Modules: :mod:`~ctpo_lab.train.tasks` (tasks and exact checkers), :mod:`~ctpo_lab.train.tokenizer`,
:mod:`~ctpo_lab.train.policy` (tiny Llama + cached warm start, or an HF model), :mod:`~ctpo_lab.train.rollout`
(KV-cache sampling with recorded log-probs, scoring), :mod:`~ctpo_lab.train.loop` (the trainer),
:mod:`~ctpo_lab.train.runfolder` (config, metrics, checkpoints, resume), :mod:`~ctpo_lab.train.config`.
"""

from ctpo_lab.advantages import grpo_advantages
from ctpo_lab.train.config import TRAIN_PRESETS, TrainConfig, parse_overrides, resolve_train_config
from ctpo_lab.train.loop import NanLossError, Trainer, TrainResult, train
from ctpo_lab.train.tasks import TASKS, Problem, make_task

__all__ = [
    "TRAIN_PRESETS",
    "TrainConfig",
    "parse_overrides",
    "resolve_train_config",
    "NanLossError",
    "Trainer",
    "TrainResult",
    "grpo_advantages",
    "train",
    "TASKS",
    "Problem",
    "make_task",
]
