"""The regime map: where, in training, the ratio estimators separate.

    python -m ctpo_lab.train regime [--preset cpu] [--out DIR] [--seeds N] [--seed S] [--cells NAME ...]
                                    [--losses NAME ...] [--resume] [--overwrite] [--workers W]
                                    [--summarize-only] [--list]

A study is a set of *cells* (off-policyness × response length × sampler), each an ordinary comparison grid of
:mod:`ctpo_lab.compare` (every loss × the same paired seeds) in ``OUT/cells/<cell>/``; the default ``OUT`` is
``$CTPO_LAB_CACHE/regime/<preset>`` (``~/.cache/ctpo_lab`` by default), outside the work tree, so that a later
session continues an interrupted study with ``--resume`` (finished runs are reused, interrupted ones resumed
from their checkpoint).  The axes:

* off-policyness: optimizer updates per rollout batch (``updates_per_rollout``: 1 = the on-policy control, 16;
  32 in the catalogue; set through ``batch_prompts`` / ``mini_batch_prompts`` / ``ppo_epochs``) and the
  asynchronous staleness
  ``k`` (config field ``staleness``: rollouts from the policy k steps older; run at one update per rollout
  batch, where "k optimizer steps" and "k rollout steps" coincide);
* response length: the chain task at ≈120 tokens and a long variant (``task_options.min_steps/max_steps``) at
  ≈ 425 tokens;
* the sampler (config field ``sampler``: ``same``, ``bf16`` or ``temperature:<τ>``).

A cell whose overrides name a config field this version of the trainer lacks (``staleness``, ``sampler``,
``rollout_correction`` before they exist) is skipped with a message; the other cells run.

Outcomes per run (:func:`run_outcomes`): final and area-under-curve held-out accuracy, collapse (the final
accuracy ≥ 0.2 below the run's best, or any non-finite update), the mean clip fraction and the measured
per-token KL(μ‖π after the last update).  :func:`summarize_study` gives per (cell, loss) the mean final accuracy
with a 95% bootstrap CI over seeds, the collapse rate and the exact paired sign-flip p-value against ``grpo``
(``regime_map.csv``), and a side table with AUC, clip fraction, KL, length and the exact chain's prediction at
the cell's measured KL and length (``regime_map_detail.csv``).  ``python -m ctpo_lab.figures --only regime``
draws ``regime_map.png`` from the same cached study.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpo_lab import compare, stats
from ctpo_lab.cli import ArgumentParser, consecutive_seeds, folder_path, int_at_least
from ctpo_lab.runsafety import atomic_path, atomic_write_text, prepare_output, read_json
from ctpo_lab.train.config import resolve_train_config
from ctpo_lab.train.runfolder import FINISHED_FILE

__all__ = [
    "Cell",
    "StudyPreset",
    "STUDY_PRESETS",
    "MAP_COLUMNS",
    "default_out",
    "missing_fields",
    "run_study",
    "run_outcomes",
    "read_study",
    "check_study",
    "summarize_study",
    "plot_regime_map",
    "main",
]

#: The columns of ``regime_map.csv``, in order.
MAP_COLUMNS = ("cell", "staleness", "updates_per_rollout", "response_tokens", "sampler", "loss", "seeds",
               "final_accuracy", "ci_low", "ci_high", "collapse_rate", "p_vs_grpo")
#: An accuracy fall of at least this much from the run's best is a collapse.
COLLAPSE_DROP = 0.2
REFERENCE = "grpo"
STUDY_FILE = "regime.json"
COMMAND = "python -m ctpo_lab.train regime"


@dataclass(frozen=True)
class Cell:
    """One point of the map: ``updates_per_rollout`` optimizer updates per rollout batch, asynchronous
    ``staleness`` k, response ``length`` (a key of the study preset's ``lengths``), ``sampler``
    (``same`` | ``bf16`` | ``temperature:<τ>``) and ``extra`` ``key=value`` overrides."""

    updates_per_rollout: int = 1
    staleness: int = 0
    length: str = "short"
    sampler: str = "same"
    extra: tuple[str, ...] = ()
    label: str | None = None  #: the name; default ``<length>-u<updates>-k<staleness>-<sampler>``

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        sampler = self.sampler.replace("temperature:", "t")
        return f"{self.length}-u{self.updates_per_rollout}-k{self.staleness}-{sampler}"

    def overrides(self, study: StudyPreset) -> tuple[str, ...]:
        """The ``key=value`` overrides of this cell's runs (the study's shared ones come first)."""
        if self.length not in study.lengths:
            raise ValueError(f"cells: {self.name}: unknown length {self.length!r}; expected one of "
                             f"{sorted(study.lengths)}")
        b, u = study.batch_prompts, self.updates_per_rollout
        if u < 1 or (u <= b and b % u) or (u > b and u % b):
            raise ValueError(f"cells: {self.name}: updates_per_rollout={u} must divide, or be a multiple of, "
                             f"batch_prompts={b}")
        mini, epochs = (b // u, 1) if u <= b else (1, u // b)
        out = [*study.overrides, f"batch_prompts={b}", f"mini_batch_prompts={mini}", f"ppo_epochs={epochs}",
               *study.lengths[self.length]]
        if self.staleness:
            out.append(f"staleness={self.staleness}")
        if self.sampler != "same":
            out.append(f"sampler={self.sampler}")
        return (*out, *self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "updates_per_rollout": self.updates_per_rollout, "staleness": self.staleness,
                "length": self.length, "sampler": self.sampler, "extra": list(self.extra)}


@dataclass(frozen=True)
class StudyPreset:
    """The run settings every cell shares: a trainer preset, its overrides, the rollout batch (prompt groups),
    the steps, the ``key=value`` overrides of each response length, the cell catalogue (default cells first),
    the losses and the number of seeds."""

    train_preset: str
    batch_prompts: int
    steps: int
    overrides: tuple[str, ...]
    lengths: dict[str, tuple[str, ...]]
    catalogue: tuple[Cell, ...]
    default_cells: tuple[str, ...]
    losses: tuple[str, ...]
    seeds: int
    note: str = ""

    def cell(self, name: str) -> Cell:
        for c in self.catalogue:
            if c.name == name:
                return c
        raise ValueError(f"cells: unknown cell {name!r}; expected names from {[c.name for c in self.catalogue]}")

    def to_dict(self) -> dict[str, Any]:
        return {"train_preset": self.train_preset, "batch_prompts": self.batch_prompts, "steps": self.steps,
                "overrides": list(self.overrides), "lengths": {k: list(v) for k, v in self.lengths.items()}}


#: Estimators of the study: the paper's four and two from the zoo (``--losses ... icepop`` adds a seventh: +1/6
#: of the time).
DEFAULT_LOSSES = ("grpo", "gspo", "ctpo", "ctpo_fixed", "cispo", "sapo")

_CPU_CELLS = (
    Cell(1), Cell(16), Cell(1, staleness=8), Cell(1, sampler="temperature:0.9"), Cell(16, length="long"),
    # in the catalogue, not run by default: the five default cells fill the study's ≈ 3-hour budget on 2 cores
    # (a long cell costs ≈ 3 short ones; 32 updates per batch ≈ 1.4 short ones)
    Cell(32), Cell(1, length="long"), Cell(1, staleness=16), Cell(16, staleness=8), Cell(1, sampler="bf16"),
    Cell(32, length="long"), Cell(1, staleness=8, length="long"),
)

#: Study presets (``--preset``).  ``cpu``: the study sized for ≤ 3 hours on 2 cores (see the README); ``tiny``:
#: cpu-tiny-sized runs (1-layer 32-wide model, 3 steps on 1-digit addition) for the tests and ``figures --quick``.
STUDY_PRESETS: dict[str, StudyPreset] = {
    "cpu": StudyPreset(
        train_preset="cpu",
        batch_prompts=8,
        steps=16,
        overrides=("group_size=8", "eval_every=4", "eval_prompts=64", "eval_samples=4", "dump_every=0",
                   "ckpt_every=4", "max_nan_steps=1000000", "tensorboard=false"),
        lengths={"short": ("task_options.min_steps=13", "task_options.max_steps=16"),
                 # the short task's warm start (per-step error 0.10) gives 0.9^47 ≈ 0 held-out accuracy on 47
                 # steps: all rewards 0, no learning (measured: accuracy 0.0, KL 0.0).  Per-step error 0.035
                 # would give 0.965^47 ≈ 0.19, but 1000 warm-start steps do not learn the two-letter-label task
                 # (measured: supervised loss 0.41, labels and length right, digits wrong, accuracy 0.0): 3000.
                 # Evaluation on 32 prompts × 4 samples at steps 0, 8, 16: at 425 tokens per response the
                 # 5 evaluations of the short cells would cost more than the training itself.
                 "long": ("task_options.min_steps=45", "task_options.max_steps=49", "warmstart_noise=0.035",
                          "warmstart_steps=3000", "eval_every=8", "eval_prompts=32")},
        catalogue=_CPU_CELLS,
        default_cells=tuple(c.name for c in _CPU_CELLS[:5]),
        losses=DEFAULT_LOSSES,
        seeds=8,
        note="the cpu trainer preset's model (2 layers, 64 wide, noisy warm start), 8 prompts × 8 responses per "
             "rollout batch, 16 rollout steps (at 16 updates per batch the held-out accuracy plateaus by step 12), "
             "held-out accuracy every 4 steps on 64 prompts × 4 samples",
    ),
    "tiny": StudyPreset(
        train_preset="cpu-tiny",
        batch_prompts=4,
        steps=3,
        overrides=("eval_every=1", "dump_every=0", "ckpt_every=1", "max_nan_steps=1000000"),
        lengths={"short": ("task_options.digits=1",), "long": ("task_options.digits=2",)},
        catalogue=(Cell(1), Cell(4), Cell(1, staleness=2), Cell(4, length="long")),
        default_cells=("short-u1-k0-same", "short-u4-k0-same"),
        losses=("grpo", "ctpo"),
        seeds=2,
        note="structural runs only (a tiny model, 3 steps): the numbers say nothing about the estimators",
    ),
}


def default_out(preset: str) -> Path:
    """``$CTPO_LAB_CACHE/regime/<preset>`` (default cache ``~/.cache/ctpo_lab``)."""
    root = Path(os.environ.get("CTPO_LAB_CACHE", Path.home() / ".cache" / "ctpo_lab"))
    return root / "regime" / preset


def missing_fields(overrides: Sequence[str]) -> list[str]:
    """Top-level config keys among ``overrides`` that :class:`~ctpo_lab.train.config.TrainConfig` lacks."""
    from ctpo_lab.train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    keys = [o.split("=", 1)[0].strip().split(".")[0] for o in overrides]
    return sorted({k for k in keys if k not in names})


def _study_preset(preset: str | StudyPreset) -> tuple[str, StudyPreset]:
    if isinstance(preset, StudyPreset):
        return "custom", preset
    if preset not in STUDY_PRESETS:
        raise ValueError(f"preset: unknown study preset {preset!r}; expected one of {sorted(STUDY_PRESETS)}")
    return preset, STUDY_PRESETS[preset]


def _resolve_cells(study: StudyPreset, cells: Sequence[str | Cell] | None) -> list[Cell]:
    items = [study.cell(c) if isinstance(c, str) else c for c in (cells or study.default_cells)]
    names = [c.name for c in items]
    if not items:
        raise ValueError("cells: expected at least one cell")
    if len(set(names)) != len(names):
        raise ValueError(f"cells: duplicate cells in {names}")
    for c in items:
        c.overrides(study)  # unknown length, bad updates_per_rollout → ValueError before any work
    return items


def _spec(study: StudyPreset, cell: Cell, losses: Sequence[str], seeds: Sequence[int]) -> compare.GridSpec:
    return compare.GridSpec(study.train_preset, tuple(losses), tuple(seeds), cell.overrides(study), study.steps)


def _cell_dir(out: Path, cell: str) -> Path:
    return out / "cells" / cell


def run_study(
    out: str | os.PathLike[str] | None = None,
    *,
    preset: str | StudyPreset = "cpu",
    cells: Sequence[str | Cell] | None = None,
    losses: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    summarize_only: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) the study into ``out`` and summarize it; returns the tables of
    :func:`summarize_study` plus ``out``, ``skipped`` ({cell: reason}), ``failed`` and ``seconds``.

    Every cell is a :class:`ctpo_lab.compare.GridSpec` run by :func:`ctpo_lab.compare.run_grid` in
    ``out/cells/<cell>``.  A non-empty ``out`` needs ``resume`` (the same study: preset, losses and seeds; the
    cells may differ) or ``overwrite``.  Bad input raises ``ValueError`` naming the argument before any work.
    """
    name, study = _study_preset(preset)
    out = Path(out) if out is not None else default_out(name)
    losses = tuple(losses or study.losses)
    seeds = tuple(seeds if seeds is not None else range(study.seeds))
    cell_list = _resolve_cells(study, cells)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers: expected an int ≥ 1, got {workers!r}")
    if REFERENCE not in losses:
        raise ValueError(f"losses: the map compares every loss with {REFERENCE!r}; include it")
    compare.GridSpec(study.train_preset, losses, seeds)  # unknown / duplicate losses and seeds → ValueError
    spec = {"preset": name, "study": study.to_dict(), "losses": list(losses), "seeds": list(seeds)}
    start = time.time()
    skipped: dict[str, str] = {}
    runnable = []
    for cell in cell_list:
        missing = missing_fields(cell.overrides(study))
        if missing:
            skipped[cell.name] = (f"needs the trainer config field(s) {missing}, which this version of "
                                  "ctpo_lab.train.config.TrainConfig does not have; skipped")
        else:
            runnable.append(cell)
    for cell in runnable:  # every run's configuration is valid before any work starts
        for loss in losses:
            resolve_train_config(study.train_preset, overrides=list(cell.overrides(study)), loss=loss,
                                 seed=seeds[0], steps=study.steps)
    if summarize_only:
        saved = read_study(out)
        if saved["preset"] != spec["preset"] or saved["study"] != spec["study"]:
            raise ValueError(f"out: {out} holds a study of another preset or run settings; pass its --preset")
        # every finished run's files are read (and refused when corrupt) before a summary is written
        check_study(out, cells=[c.name for c in runnable], warn=False)
        prepare_output(out, command=COMMAND, resume=True)  # one writer; a study folder ctpo_lab made
    else:
        spec_path = out / STUDY_FILE
        if resume and spec_path.is_file():
            saved = read_study(out)
            diff = [k for k in ("preset", "study", "losses", "seeds") if saved.get(k) != spec[k]]
            if diff:
                raise ValueError(f"resume: {out} holds a study with other {diff} (saved "
                                 f"{[saved.get(k) for k in diff]}); use the same options, another --out or "
                                 "--overwrite")
            spec["cells"] = {**saved.get("cells", {})}
        prepare_output(out, command=COMMAND, resume=resume, overwrite=overwrite)
        spec.setdefault("cells", {})
        for cell in runnable:
            spec["cells"][cell.name] = cell.to_dict()
        atomic_write_text(spec_path, json.dumps(spec, indent=1))
    failed: dict[str, str] = {}
    for reason_cell, reason in skipped.items():
        print(f"[regime] cell {reason_cell} {reason}", file=sys.stderr)
    if not summarize_only:
        for i, cell in enumerate(runnable, 1):
            if progress:
                print(f"[regime] cell {i}/{len(runnable)} {cell.name}: {len(losses)} losses × {len(seeds)} seeds",
                      file=sys.stderr, flush=True)
            t0 = time.time()
            try:
                compare.run_grid(_spec(study, cell, losses, seeds), _cell_dir(out, cell.name), jobs=workers,
                                 progress=progress)
            except RuntimeError as e:  # a run crashed: the other cells still run; --resume retries it
                failed[cell.name] = str(e)
                print(f"[regime] cell {cell.name}: {e}", file=sys.stderr)
            if progress:
                print(f"[regime] cell {cell.name} done in {time.time() - t0:.0f} s", file=sys.stderr)
    result = summarize_study(out, cells=[c.name for c in runnable], prediction_cache=out / "prediction-cache")
    _write_summaries(out, result)
    return {**result, "out": out, "skipped": skipped, "failed": failed, "seconds": time.time() - start}


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def read_study(out: str | os.PathLike[str], *, name: str = "out") -> dict[str, Any]:
    """The validated ``regime.json`` of the study folder ``out``: ``preset`` (a name), ``study`` (an object),
    ``losses`` (distinct loss preset names), ``seeds`` (distinct ints ≥ 0) and ``cells`` (cell name → an object
    with ``updates_per_rollout`` an int ≥ 1, ``staleness`` an int ≥ 0, ``length`` and ``sampler`` strings).
    ``ValueError`` naming the file (``name``: the argument it belongs to) when it is anything else."""
    from ctpo_lab.losses import PRESETS as LOSS_PRESETS

    out = Path(out)
    path = out / STUDY_FILE
    if not path.is_file():
        raise ValueError(f"{name}: {out} is not a regime study folder (no {STUDY_FILE})")
    saved = read_json(path, name=name)

    def bad(what: str) -> ValueError:
        return ValueError(f"{name}: {path}: {what} (not a regime study of ctpo_lab, or a corrupt one)")

    missing = [k for k in ("preset", "study", "losses", "seeds") if k not in saved]
    if missing:
        raise bad(f"expected 'preset', 'study', 'losses' and 'seeds'; {missing} missing")
    if not isinstance(saved["preset"], str):
        raise bad(f"expected 'preset' to be a preset name, got {compare.shown_value(saved['preset'])}")
    if not isinstance(saved["study"], dict):
        raise bad(f"expected 'study' to be an object of run settings, got {type(saved['study']).__name__}")
    losses, seeds = saved["losses"], saved["seeds"]
    if not (isinstance(losses, list) and losses and all(isinstance(x, str) and x in LOSS_PRESETS for x in losses)
            and len(set(losses)) == len(losses)):
        raise bad(f"expected 'losses' to be a list of distinct loss preset names, got {compare.shown_value(losses)}")
    if not (isinstance(seeds, list) and seeds and all(_is_int(x) for x in seeds) and len(set(seeds)) == len(seeds)):
        raise bad(f"expected 'seeds' to be a list of distinct ints ≥ 0, got {compare.shown_value(seeds)}")
    cells = saved.get("cells", {})
    if not isinstance(cells, dict):
        raise bad(f"expected 'cells' to be an object (cell name → its settings), got {type(cells).__name__}")
    for cell, info in cells.items():
        if not cell or cell in (".", "..") or "/" in cell or "\0" in cell:
            raise bad(f"expected 'cells' names that are folder names, got {cell!r}")
        if not isinstance(info, dict):
            raise bad(f"'cells': {cell}: expected an object of cell settings, got {type(info).__name__}")
        for key, ok, what in (("updates_per_rollout", lambda v: _is_int(v, 1), "an int ≥ 1"),
                              ("staleness", _is_int, "an int ≥ 0"), ("length", lambda v: isinstance(v, str), "a name"),
                              ("sampler", lambda v: isinstance(v, str), "a name")):
            if not ok(info.get(key)):
                got = compare.shown_value(info[key]) if key in info else "nothing"
                raise bad(f"'cells': {cell}: expected {key!r} to be {what}, got {got}")
    return saved


def _finite_mean(values: list[float]) -> float:
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def run_outcomes(run: str | os.PathLike[str], *, name: str = "out", warn: bool = True) -> dict[str, Any] | None:
    """Outcomes of one finished run folder (``None`` while it is unfinished): ``final_accuracy``,
    ``auc_accuracy`` (trapezoidal area under the held-out accuracy vs step, divided by the step range: the mean
    accuracy over training), ``best_accuracy``, ``collapsed`` (final ≤ best − 0.2, or any non-finite update),
    ``nonfinite_updates``, ``clip_fraction`` (mean over steps of the advantage-aware clip rate, else
    ``actor/pg_clipfrac``), ``kl`` (mean over steps of KL(μ‖π after the last update), k3), ``response_tokens``
    (mean response length), ``wall_time`` (s).

    A finished run's files are validated (:func:`ctpo_lab.compare.check_metric_records`): a missing or empty
    ``metrics.jsonl``, one without any held-out accuracy, or a corrupt ``finished.json`` is a ``ValueError``
    naming the file (``name``: the argument it belongs to)."""
    run = Path(run)
    records, finished = compare.read_run_records(run, name=name, warn=warn)
    if not finished:
        return None
    evals = sorted((int(r["step"]), float(r["eval_accuracy"])) for r in records
                   if r.get("eval_accuracy") is not None)
    if not evals:
        raise ValueError(f"{name}: {run / 'metrics.jsonl'}: the finished run logged no held-out accuracy "
                         "('eval_accuracy'); the file is corrupt or the run evaluated nothing")
    steps = np.array([s for s, _ in evals], dtype=np.float64)
    acc = np.array([a for _, a in evals], dtype=np.float64)
    span = steps[-1] - steps[0]
    auc = float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(steps)) / span) if span > 0 else float(acc[-1])
    nonfinite = int(sum(r.get("train/nan_updates") or 0 for r in records))
    nonfinite += int(np.sum(~np.isfinite(acc)))
    best = float(np.nanmax(acc)) if np.isfinite(acc).any() else math.nan
    final = float(acc[-1])
    clip_key = "pg_update/clip/total/rate" if any("pg_update/clip/total/rate" in r for r in records) \
        else "actor/pg_clipfrac"
    finished_info = read_json(run / FINISHED_FILE, name=name)
    return {
        "final_accuracy": final,
        "auc_accuracy": auc,
        "best_accuracy": best,
        "collapsed": bool(nonfinite > 0 or not math.isfinite(final) or best - final >= COLLAPSE_DROP - 1e-12),
        "nonfinite_updates": nonfinite,
        "clip_fraction": _finite_mean([r.get(clip_key) for r in records]),
        "kl": _finite_mean([r.get("offpolicy/kl_k3") for r in records]),
        "response_tokens": _finite_mean([r.get("response_length/mean") for r in records]),
        "wall_time": float(finished_info.get("wall_time") or math.nan),
    }


def _ci(x: np.ndarray) -> tuple[float, float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    ci = stats.bootstrap_ci(x, n_boot=4000, seed=0)
    return ci.estimate, ci.low, ci.high


def _prediction(kl: float, horizon: int, losses: Sequence[str], cache: Path | None) -> dict[str, dict[str, Any]]:
    """The exact chain's relative bias and variance ratio per loss at per-token KL ``kl`` and length
    ``horizon`` (:func:`ctpo_lab.markov.matched_chain_prediction`, 3 random chains; cached in ``cache``)."""
    if not (math.isfinite(kl) and kl >= 0 and horizon >= 1):
        return {}
    key = f"kl{kl:.3e}-T{horizon}-" + "-".join(losses)
    path = cache / f"{key}.json" if cache is not None else None
    if path is not None and path.is_file():
        try:
            return read_json(path, name="prediction cache")
        except ValueError:
            pass
    from ctpo_lab.markov import matched_chain_prediction, summarize_prediction

    out: dict[str, dict[str, Any]] = {}

    def predict(estimators: Sequence[str]) -> None:
        df = matched_chain_prediction(float(f"{kl:.3e}"), horizon, estimators=tuple(estimators), seeds=(0, 1, 2),
                                      group_size=8)
        for _, row in summarize_prediction(df).iterrows():
            out[row["estimator"]] = {"predicted_relative_bias": float(row["relative_bias_median"]),
                                     "predicted_var_ratio": float(row["var_ratio_median"]),
                                     "prediction_horizon": int(row["horizon"])}

    try:  # one call: the chains and the on-policy reference are shared by every estimator
        predict(losses)
    except (ValueError, NotImplementedError):
        for loss in losses:
            try:
                predict((loss,))
            except (ValueError, NotImplementedError) as e:  # an estimator the chain cannot compile
                out[loss] = {"error": str(e).splitlines()[0]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(out))
    return out


def check_study(out: str | os.PathLike[str], *, cells: Sequence[str] | None = None, name: str = "out",
                warn: bool = True) -> pd.DataFrame:
    """Read every run of the study in ``out`` (:func:`read_study`, :func:`run_outcomes`; ``ValueError`` naming
    the file of a corrupt one) and return one row per finished run; writes nothing.  Unfinished runs are left
    out of the summaries (they have no final accuracy yet); ``warn`` names them on stderr, one line per cell."""
    out = Path(out)
    saved = read_study(out, name=name)
    losses, seeds = list(saved["losses"]), list(saved["seeds"])
    known = saved.get("cells", {})
    rows = []
    for cell in (list(cells) if cells is not None else list(known)):
        info = known.get(cell)
        if info is None:
            continue
        grid = _cell_dir(out, cell)
        if grid.exists() and not grid.is_dir():
            raise ValueError(f"{name}: {grid}: expected the cell's grid folder, found a file")
        unfinished = []
        for loss in losses:
            for seed in seeds:
                run = compare.run_dir(grid, loss, seed)
                o = run_outcomes(run, name=name, warn=warn)
                if o is None:
                    unfinished.append(run.name)
                    continue
                rows.append({"cell": cell, "staleness": info["staleness"],
                             "updates_per_rollout": info["updates_per_rollout"], "length": info["length"],
                             "sampler": info["sampler"], "loss": loss, "seed": seed, **o})
        if warn and unfinished:
            print(f"[regime] warning: cell {cell}: {len(unfinished)} of {len(losses) * len(seeds)} run(s) unfinished "
                  f"(no {FINISHED_FILE}), left out of the summary: {', '.join(unfinished[:6])}"
                  f"{', ...' if len(unfinished) > 6 else ''} in {grid / 'runs'}", file=sys.stderr)
    return pd.DataFrame(rows)


def summarize_study(out: str | os.PathLike[str], *, cells: Sequence[str] | None = None,
                    prediction: bool = True, prediction_cache: Path | None = None, name: str = "out",
                    warn: bool = True) -> dict[str, pd.DataFrame]:
    """Read every finished run of the study in ``out``; returns ``runs`` (one row per run), ``map`` (the
    columns :data:`MAP_COLUMNS`, one row per (cell, loss)) and ``detail`` (AUC, paired difference vs grpo,
    clip fraction, KL, length and the exact chain's prediction at the cell's measured KL and length).

    ``cells``: the cells to include (default: every cell the study has run).  p_vs_grpo is the two-sided
    sign-flip p-value (exact up to 40 seeds) of the final-accuracy differences paired by seed
    (:func:`ctpo_lab.stats.sign_flip_p_value`;
    with n seeds the smallest attainable is 2/2^n: 0.0078 for 8).  Every file is read and validated
    (:func:`check_study`) before anything (the prediction cache) is written; ``name``: the argument a
    ``ValueError`` names; ``warn``: name the unfinished runs left out on stderr.
    """
    out = Path(out)
    saved = read_study(out, name=name)
    losses = list(saved["losses"])
    known = saved.get("cells", {})
    names = list(cells) if cells is not None else list(known)
    runs = check_study(out, cells=names, name=name, warn=warn)
    map_rows, detail_rows = [], []
    for cell in names:
        sub = runs[runs["cell"] == cell] if not runs.empty else runs
        if sub.empty:
            continue
        info = known[cell]
        kl, tokens = float(sub["kl"].mean()), float(sub["response_tokens"].mean())
        pred = (_prediction(kl, max(1, int(round(tokens))), losses, prediction_cache)
                if prediction and math.isfinite(tokens) else {})
        ref = sub[sub["loss"] == REFERENCE].set_index("seed")
        for loss in losses:
            g = sub[sub["loss"] == loss].set_index("seed")
            if g.empty:
                continue
            est, lo, hi = _ci(g["final_accuracy"].to_numpy(dtype=np.float64))
            common = sorted(set(g.index) & set(ref.index))
            p = d_est = d_lo = d_hi = math.nan
            if loss != REFERENCE and common:
                d = (g.loc[common, "final_accuracy"] - ref.loc[common, "final_accuracy"]).to_numpy(np.float64)
                p = stats.sign_flip_p_value(d)
                d_est, d_lo, d_hi = _ci(d)
            map_rows.append({"cell": cell, "staleness": info["staleness"],
                             "updates_per_rollout": info["updates_per_rollout"],
                             "response_tokens": round(tokens, 1), "sampler": info["sampler"], "loss": loss,
                             "seeds": int(len(g)), "final_accuracy": est, "ci_low": lo, "ci_high": hi,
                             "collapse_rate": float(g["collapsed"].mean()), "p_vs_grpo": p})
            a_est, a_lo, a_hi = _ci(g["auc_accuracy"].to_numpy(dtype=np.float64))
            detail_rows.append({"cell": cell, "loss": loss, "seeds": int(len(g)), "auc_accuracy": a_est,
                                "auc_ci_low": a_lo, "auc_ci_high": a_hi, "difference_vs_grpo": d_est,
                                "difference_ci_low": d_lo, "difference_ci_high": d_hi,
                                "clip_fraction": float(g["clip_fraction"].mean()),
                                "kl_per_token": float(g["kl"].mean()), "cell_kl_per_token": kl,
                                "response_tokens": float(g["response_tokens"].mean()),
                                "predicted_relative_bias": pred.get(loss, {}).get("predicted_relative_bias", math.nan),
                                "predicted_var_ratio": pred.get(loss, {}).get("predicted_var_ratio", math.nan),
                                "prediction_horizon": pred.get(loss, {}).get("prediction_horizon", math.nan),
                                "run_seconds": float(g["wall_time"].mean())})
    map_df = pd.DataFrame(map_rows, columns=list(MAP_COLUMNS))
    return {"runs": runs, "map": map_df, "detail": pd.DataFrame(detail_rows)}


def _write_summaries(out: Path, result: dict[str, pd.DataFrame]) -> None:
    for name, key in (("regime_runs.csv", "runs"), ("regime_map.csv", "map"), ("regime_map_detail.csv", "detail")):
        with atomic_path(out / name) as tmp:
            result[key].to_csv(tmp, index=False)


def plot_regime_map(map_df: pd.DataFrame, detail: pd.DataFrame | None = None, *, alpha: float = 0.05):
    """One panel per cell: the losses ranked by mean final held-out accuracy with their 95% CI; a loss whose
    paired sign-flip p against grpo is below ``alpha`` is drawn filled and marked ``*`` (``p`` printed).  With
    ``detail``, each loss's label carries the exact chain's prediction at the cell's measured KL and length
    (``b`` relative bias ‖E X − ∇J‖ / ‖∇J‖, ``v`` tr Cov relative to the on-policy estimator) and a nonzero
    collapse rate."""
    import matplotlib.pyplot as plt

    from ctpo_lab.style import estimator_color, estimator_label

    cells = list(dict.fromkeys(map_df["cell"]))
    if not cells:
        raise ValueError("map: no finished runs to draw")
    ncols = min(4, len(cells))
    nrows = math.ceil(len(cells) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 0.55 * map_df["loss"].nunique() * nrows + 1.6 * nrows),
                             squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        sub = map_df[map_df["cell"] == cell].sort_values("final_accuracy")
        y = np.arange(len(sub))
        for yi, (_, r) in zip(y, sub.iterrows()):
            c = estimator_color(r["loss"])
            sig = bool(np.isfinite(r["p_vs_grpo"]) and r["p_vs_grpo"] < alpha)
            err = [[max(0.0, r["final_accuracy"] - r["ci_low"])], [max(0.0, r["ci_high"] - r["final_accuracy"])]]
            ax.errorbar(r["final_accuracy"], yi, xerr=err, fmt="o", color=c, mfc=c if sig or r["loss"] == REFERENCE
                        else "white", capsize=2)
            if sig:
                ax.annotate(f"* p={r['p_vs_grpo']:.3f}", (r["ci_high"], yi), xytext=(3, -3),
                            textcoords="offset points", fontsize=7)
        ref = sub[sub["loss"] == REFERENCE]
        if not ref.empty:
            ax.axvline(float(ref["final_accuracy"].iloc[0]), color="0.6", lw=0.8, ls="--")
        labels = []
        for _, r in sub.iterrows():
            label = estimator_label(r["loss"])
            if detail is not None and not detail.empty:
                d = detail[(detail["cell"] == cell) & (detail["loss"] == r["loss"])]
                if not d.empty and np.isfinite(d["predicted_relative_bias"].iloc[0]):
                    label += (f"\nchain: b {float(d['predicted_relative_bias'].iloc[0]):.2f}, "
                              f"v {float(d['predicted_var_ratio'].iloc[0]):.2f}")
            if r["collapse_rate"] > 0:
                label += f"\ncollapse {r['collapse_rate']:.2f}"
            labels.append(label)
        ax.set_yticks(y, labels, fontsize=7)
        first = sub.iloc[0]
        kl = ""
        if detail is not None and not detail.empty:
            d = detail[detail["cell"] == cell]
            if not d.empty:
                kl = f", KL {float(d['cell_kl_per_token'].iloc[0]):.1e}"
        ax.set_title(f"{cell}\nT≈{first['response_tokens']:.0f}{kl}, n={int(sub['seeds'].max())}", fontsize=9)
        ax.set_xlabel("final held-out accuracy")
    for ax in list(axes.flat)[len(cells):]:
        ax.set_visible(False)
    return fig


# ----------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", default="cpu", help=f"study preset: {', '.join(STUDY_PRESETS)} (default cpu)")
    ap.add_argument("--out", type=folder_path, default=None,
                    help="study folder (default $CTPO_LAB_CACHE/regime/<preset>)")
    ap.add_argument("--seeds", type=int_at_least(2, compare.MAX_GRID_SEEDS), default=None,
                    help="number of paired seeds per cell (default: the preset's, 8 for cpu)")
    ap.add_argument("--seed", type=int_at_least(0), default=0, help="first seed (seeds S..S+N-1)")
    ap.add_argument("--cells", nargs="+", default=None, metavar="CELL", help="cells to run (default: the "
                    "preset's default cells; --list shows the catalogue)")
    ap.add_argument("--losses", "--loss", nargs="+", dest="losses", default=None, metavar="NAME",
                    help="loss presets (keys of ctpo_lab.losses.PRESETS; must include grpo)")
    ap.add_argument("--resume", action="store_true", help="continue the study in --out (finished runs reused)")
    ap.add_argument("--overwrite", action="store_true", help="replace the study in --out")
    ap.add_argument("--workers", type=int_at_least(1), default=None, help="parallel runs (default: CPU cores)")
    ap.add_argument("--summarize-only", action="store_true", help="only summarize the finished runs")
    ap.add_argument("--list", action="store_true", help="print the preset's cells and their overrides, then exit")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 a run failed (its log named; --resume retries it), 2 bad input (one line
    ``error: <argument>: <expected>``), 130 interrupted."""
    from ctpo_lab import cli

    flags = {n: f"--{n.replace('_', '-')}" for n in ("preset", "out", "seeds", "seed", "cells", "losses", "resume",
                                                    "overwrite", "workers")}
    return cli.run(lambda: _main(argv), flags={**flags, "summarize_only": "--summarize-only"}, prog=COMMAND)


def _main(argv: Sequence[str] | None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    name, study = _study_preset(args.preset)
    if args.list:
        for c in study.catalogue:
            mark = "*" if c.name in study.default_cells else " "
            missing = missing_fields(c.overrides(study))
            note = f"  (skipped: no config field {missing})" if missing else ""
            print(f"{mark} {c.name:24s} {' '.join(c.overrides(study)[len(study.overrides):])}{note}")
        print(f"(* default cells; every run: --preset {study.train_preset} --steps {study.steps} "
              f"{' '.join(study.overrides)})")
        return 0
    if args.resume and args.overwrite:
        raise ValueError("overwrite: --resume and --overwrite are mutually exclusive")
    n = args.seeds if args.seeds is not None else study.seeds
    result = run_study(args.out, preset=name, cells=args.cells, losses=args.losses,
                       seeds=consecutive_seeds(args.seed, n), resume=args.resume, overwrite=args.overwrite,
                       workers=args.workers, summarize_only=args.summarize_only)
    m = result["map"]
    if not m.empty:
        shown = m.assign(final=[stats.format_ci(e, lo, hi, 3, style="f")
                                for e, lo, hi in zip(m["final_accuracy"], m["ci_low"], m["ci_high"])])
        print(shown[["cell", "loss", "seeds", "final", "collapse_rate", "p_vs_grpo"]].to_markdown(
            index=False, floatfmt=".4g"))
    for cell, reason in result["skipped"].items():
        print(f"skipped: {cell}: {reason}")
    print(f"\n[regime] wrote {result['out']}/regime_map.csv, regime_map_detail.csv, regime_runs.csv in "
          f"{result['seconds']:.0f} s")
    if result["failed"]:
        print("error: run(s) failed in cell(s) " + ", ".join(result["failed"]) + " (see the logs under "
              f"{result['out']}/cells/*/logs); --resume retries them", file=sys.stderr)
        return 1
    return 0

