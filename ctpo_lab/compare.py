"""Estimator comparison at scale: a grid of loss presets × seeds, run in parallel, resumable, aggregated.

    python -m ctpo_lab.train                      # the `cpu` grid: grpo, gspo, ctpo, ctpo_fixed × 3 seeds
    python -m ctpo_lab.train compare --preset cpu --loss grpo ctpo --seeds 0 1 2 3 --out runs/cmp

Each cell is an ordinary run of ``python -m ctpo_lab.train`` in ``OUT/runs/<loss>-seed<S>``; a finished run
(its ``FINISHED`` marker present) is reused, an interrupted one is resumed with ``--resume``.
:func:`summarize_grid` reads every ``metrics.jsonl`` and writes into ``OUT/``:

* ``curves.csv``       mean and 95% bootstrap band over seeds of each metric vs step, per loss;
* ``table2.csv/.md``   per loss: held-out accuracy at the start and at the end, its change, clip fraction,
                       KL of the last mini-batch, response length — mean [95% CI] over seeds;
* ``paired.csv/.md``   paired-seed comparisons of the final accuracy against a reference loss: mean difference
                       with a bootstrap CI and an exact two-sided sign-flip permutation test;
* ``table3.csv/.md``   CTPO with the √t window vs the fixed window (when both are in the grid);
* ``fig2.png/.pdf``    accuracy, clip fraction, response length and KL vs step with bands.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpo_lab import prefork, stats
from ctpo_lab.cli import MAX_INT, ArgumentParser, consecutive_seeds, folder_path, int_at_least
from ctpo_lab.losses import PRESETS as LOSS_PRESETS
from ctpo_lab.runsafety import (
    LOCK,
    MARKER,
    PARENT_ENV,
    atomic_path,
    atomic_write_text,
    check_writable,
    holder_pid,
    marker_command,
    prepare_output,
    read_json,
    read_jsonl,
    read_yaml,
)
from ctpo_lab.train.runfolder import FINISHED_FILE, RunFolder  # FINISHED_FILE: written by a run when it completes

__all__ = [
    "GridSpec",
    "extends",
    "METRICS",
    "run_grid",
    "load_grid",
    "read_grid_spec",
    "check_metric_records",
    "check_run_folder",
    "read_run_records",
    "shown_value",
    "metric_curves",
    "final_table",
    "paired_comparison",
    "plot_curves",
    "summarize_grid",
    "run_comparison",
    "main",
]

#: Metrics aggregated vs step (JSONL key → axis label).
METRICS: dict[str, str] = {
    "eval_accuracy": "held-out accuracy",
    "reward_mean": "training reward",
    "pg_update/clip/total/rate": "clip fraction (advantage-aware)",
    "response_length/mean": "response length (tokens)",
    "offpolicy/kl_k3": "KL(μ‖π after the last update), k3 estimate (nats/token)",
    "actor/ppo_kl": "ppo_kl",
}
#: Keys of a run's ``metrics.jsonl`` that the summaries (here and in :mod:`ctpo_lab.train.regime`) read as
#: numbers: a record's value must be a number or ``null`` (a non-finite value as the trainer logs it).
NUMERIC_KEYS: tuple[str, ...] = (*METRICS, "train/nan_updates", "actor/pg_clipfrac")
#: ``key=value`` overrides a grid refuses: the grid sets them itself for every run (use the flag instead).
GRID_KEYS = {"seed": "--seeds (or --seed/--num-seeds)", "loss": "--loss", "steps": "--steps"}


@dataclass(frozen=True)
class GridSpec:
    """A grid of training runs: every loss × every seed, on one trainer preset with shared overrides."""

    train_preset: str = "cpu"
    losses: tuple[str, ...] = ("grpo", "gspo", "ctpo", "ctpo_fixed")
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = ()  #: ``key=value`` strings passed to every run
    steps: int | None = None

    def __post_init__(self) -> None:
        unknown = [x for x in self.losses if x not in LOSS_PRESETS]
        if unknown:
            raise ValueError(f"losses: unknown loss preset(s) {unknown}; expected names from {sorted(LOSS_PRESETS)}")
        if not self.losses or not self.seeds:
            raise ValueError("losses/seeds: the grid needs at least one loss and one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicate seeds in {list(self.seeds)}")
        if len(set(self.losses)) != len(self.losses):
            raise ValueError(f"losses: duplicate losses in {list(self.losses)}")
        if len(self.seeds) > MAX_GRID_SEEDS:
            raise ValueError(f"seeds: expected at most {MAX_GRID_SEEDS} seeds, got {len(self.seeds)}")
        for s in self.seeds:
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_INT:
                raise ValueError(f"seeds: expected ints in [0, 2**63 - 1], got {s!r}")
        for o in self.overrides:
            if not isinstance(o, str) or "=" not in o:
                raise ValueError(f"overrides: expected key=value, got {o!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: expected ≥ 1, got {self.steps}")

    def cells(self) -> list[tuple[str, int]]:
        return list(itertools.product(self.losses, self.seeds))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def extends(spec: GridSpec, previous: Any) -> bool:
    """Whether ``spec`` extends the grid recorded as ``previous`` (a ``grid.json`` dict): the same trainer
    preset, overrides (in order) and steps, and a superset of its seeds and of its losses.  A run depends only on
    its loss, its seed and that shared configuration, so the previous grid's finished runs are runs of the new
    grid and can be reused."""
    if not isinstance(previous, dict):
        return False
    new = spec.to_dict()
    same = all(previous.get(k) == new[k] for k in ("train_preset", "overrides", "steps"))
    old_seeds, old_losses = previous.get("seeds"), previous.get("losses")
    if not same or not isinstance(old_seeds, list) or not isinstance(old_losses, list):
        return False
    return set(old_seeds) <= set(new["seeds"]) and set(old_losses) <= set(new["losses"])


def run_dir(out: Path, loss: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{loss}-seed{seed}"


def check_override_keys(overrides: Sequence[str], *, steps: int | None = None) -> None:
    """``ValueError`` for a ``key=value`` override the grid would silently replace: ``seed`` and ``loss`` (every
    run gets its own from the grid) and ``steps`` together with ``--steps``."""
    for o in overrides:
        key = str(o).split("=", 1)[0].strip().split(".")[0]
        if key in ("seed", "loss") or (key == "steps" and steps is not None):
            raise ValueError(f"overrides: {o!r}: the grid sets {key!r} of every run itself; use {GRID_KEYS[key]} "
                             "instead of a key=value override")


def shown_value(v: Any) -> str:
    """``repr(v)``, cut to 60 characters: a bad value as an error message shows it."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_metric_records(records: Sequence[dict[str, Any]], path: Path, *, name: str = "out") -> None:
    """``ValueError`` naming ``path`` (a run's ``metrics.jsonl``, its steps checked when read:
    ``read_jsonl(step_key="step")``) unless every record holds a number (or ``null``) under each of
    :data:`NUMERIC_KEYS` it holds."""
    for i, rec in enumerate(records, 1):
        step = rec.get("step")
        for key in NUMERIC_KEYS:
            v = rec.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{name}: {path}: record {i} (step {step}): expected {key!r} to be a number, got "
                                 f"{shown_value(v)}; the file is corrupt")


def read_run_records(run: Path, *, name: str, warn: bool = True
                     ) -> tuple[list[dict[str, Any]], bool]:
    """The validated records of one run's ``metrics.jsonl`` and whether the run is finished.  A finished run
    (``finished.json``) must have a non-empty log; an unfinished one may have none yet (``[]``)."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"{name}: {run}: expected a run folder, found a file")
    finished = RunFolder.finished_summary(run, name=name) is not None  # validated as the trainer reads it
    path = run / "metrics.jsonl"
    if path.exists() and not path.is_file():
        raise ValueError(f"{name}: {path}: expected a file (the run's metrics log)")
    if not path.is_file():
        if finished:
            raise ValueError(f"{name}: {path}: no such file, but the run is finished ({FINISHED_FILE}); the run "
                             f"folder is damaged (remove {run} to run it again)")
        return [], False
    records = read_jsonl(path, name=name, warn=warn, step_key="step")
    if finished and not records:
        raise ValueError(f"{name}: {path}: the metrics log of a finished run is empty; the file is corrupt (remove "
                         f"{run} to run it again)")
    check_metric_records(records, path, name=name)
    return records, finished


def _looks_like_checkpoint(p: Path) -> bool:
    import zipfile

    try:
        return p.is_file() and p.stat().st_size > 0 and zipfile.is_zipfile(p)  # torch.save writes a zip archive
    except OSError:
        return False


def check_run_folder(run: str | os.PathLike[str], *, name: str = "out") -> None:
    """What a grid will reuse or resume in the existing run folder ``run`` is readable, before any work: the
    folder was made by the trainer (its marker), no other process holds it, its ``finished.json`` is well-formed
    (a finished run is reused: its ``metrics.jsonl`` must then be readable and non-empty), and an interrupted run
    that will be resumed has a readable ``metrics.jsonl``, ``config.yaml`` and at least one checkpoint that is a
    torch archive.  ``ValueError`` naming the folder or the file."""
    run = Path(run)
    if not run.exists() and not run.is_symlink():
        return
    if not run.is_dir():
        raise ValueError(f"{name}: {run}: expected a run folder of the grid, found a file; move it away or choose "
                         "another --out")
    if not any(e.name != LOCK for e in run.iterdir()):
        return  # created and never written: started afresh
    made_by = marker_command(run)
    if made_by != "python -m ctpo_lab.train":
        what = f"no {MARKER} marker" if made_by is None else f"it holds the output of `{made_by}`"
        raise ValueError(f"{name}: {run} is not a run folder of `python -m ctpo_lab.train` ({what}); the grid would "
                         "reuse or replace it: move it away, or choose another --out")
    pid = holder_pid(run)
    if pid is not None and pid != os.getpid():
        raise ValueError(f"{name}: {run} is in use by another ctpo_lab process (PID {pid}); wait for it to finish or "
                         "stop it, or choose another --out")
    _, finished = read_run_records(run, name=name)
    if finished:
        return
    ckpt = run / "ckpt"
    if not (ckpt.is_dir() and any(ckpt.iterdir())):
        return  # never checkpointed: the grid starts it afresh
    if (run / "config.yaml").exists():
        read_yaml(run / "config.yaml", name=name)
    checkpoints = sorted(ckpt.glob("step_*.pt"))
    if not any(_looks_like_checkpoint(p) for p in checkpoints):
        found = ", ".join(p.name for p in checkpoints[-3:]) or "no step_*.pt file"
        raise ValueError(f"{name}: {ckpt}: no readable checkpoint to resume the interrupted run from ({found}: not a "
                         f"torch checkpoint); remove {run} to run it again from the start")


def _train_args(spec: GridSpec, loss: str, seed: int, path: Path, resume: bool) -> list[str]:
    """The arguments of one run's ``python -m ctpo_lab.train``."""
    cmd = ["--preset", spec.train_preset, "--loss", loss, "--seed", str(seed), "--out", str(path), "--no-progress"]
    if spec.steps is not None:
        cmd += ["--steps", str(spec.steps)]
    if resume:
        cmd.append("--resume")
    return cmd + list(spec.overrides)


def _train_config(spec: GridSpec, loss: str, seed: int):
    from ctpo_lab.train.config import resolve_train_config

    return resolve_train_config(spec.train_preset, overrides=list(spec.overrides), loss=loss, seed=seed,
                                steps=spec.steps)


def _prepare_warm_start(spec: GridSpec, *, threads: int, progress: bool) -> None:
    """Train (or find) the shared warm-start cache once, in this process, before the parallel runs start."""
    from ctpo_lab.train.policy import prepare_warm_start

    t0 = time.time()
    info = prepare_warm_start(_train_config(spec, spec.losses[0], spec.seeds[0]), threads=threads,
                              progress=progress)
    if progress and info is not None:
        print(f"[compare] warm start {info.get('warmstart_key')} ready in {time.time() - t0:.0f} s (held-out "
              f"accuracy {info.get('initial_eval_accuracy')})", file=sys.stderr)


#: What a training run imports that takes seconds: preloaded once per worker (:mod:`ctpo_lab.prefork`).
#: The most seeds one grid takes (a larger grid is a typo, not a study).
MAX_GRID_SEEDS = 10_000

TRAIN_PRELOAD = ("ctpo_lab.train.launch", "ctpo_lab.train.policy", "transformers",
                 "transformers.models.llama.modeling_llama")
#: ``0`` turns the pre-imported workers off (every run a fresh ``python -m ctpo_lab.train``).
PREFORK_ENV = "CTPO_LAB_PREFORK"


class _ServerPool:
    """One :class:`~ctpo_lab.prefork.PreforkServer` per worker thread, started on its first run; ``None`` (plain
    subprocesses) where forking is unavailable, turned off, or the server failed to start."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._local = threading.local()
        self._all: list[prefork.PreforkServer] = []
        self._lock = threading.Lock()
        self._enabled = prefork.available() and os.environ.get(PREFORK_ENV, "1") != "0"

    def get(self) -> prefork.PreforkServer | None:
        if not self._enabled:
            return None
        server = getattr(self._local, "server", None)
        if server is None or not server.alive:
            try:
                server = prefork.PreforkServer(TRAIN_PRELOAD, env=self._env)
            except RuntimeError as e:
                print(f"[compare] pre-imported workers unavailable, starting plain processes: {e}", file=sys.stderr)
                self._enabled = False
                return None
            self._local.server = server
            with self._lock:
                self._all.append(server)
        return server

    def close(self) -> None:
        with self._lock:
            for server in self._all:
                server.close()
            self._all.clear()


def run_grid(spec: GridSpec, out: str | os.PathLike[str], *, jobs: int | None = None, overwrite: bool = False,
             progress: bool = True) -> dict[tuple[str, int], Path]:
    """Run (or reuse, or resume) every cell of the grid; returns {(loss, seed): run folder}.

    Every run's configuration is validated first; the shared warm start is then computed once in this process
    before the runs start, so parallel runs never train it twice.
    Up to ``jobs`` runs in parallel (default: the number of CPU cores), each pinned to one thread. The grid's
    specification is written to ``OUT/grid.json``; an existing grid folder with a different specification is
    refused unless ``overwrite`` (which deletes it first), except a grid that the new one extends
    (:func:`extends`: more seeds or losses, everything else equal), whose finished runs are kept and reused.
    A failed run raises ``RuntimeError`` naming its log.
    """
    out = Path(out)
    check_override_keys(spec.overrides, steps=spec.steps)
    for loss, seed in spec.cells():  # every run's configuration is valid before any work starts
        _train_config(spec, loss, seed)
    check_writable(out)
    prepare_output(out, command="python -m ctpo_lab.train compare", existing="update", check_only=True)  # busy?
    spec_path = out / "grid.json"
    command = "python -m ctpo_lab.train compare"
    if out.is_dir() and any(e.name != LOCK for e in out.iterdir()):
        previous = read_json(spec_path, name="out") if spec_path.is_file() else None
        if not extends(spec, previous):  # the same grid also extends itself
            if not overwrite:
                raise ValueError(
                    f"out: {out} holds another grid or other files (grid.json differs); pass --overwrite to "
                    "replace it, or choose another --out"
                )
            prepare_output(out, command=command, overwrite=True)  # only a ctpo_lab folder nobody else holds
        else:
            # the same grid: finished runs are reused and interrupted ones resumed, so everything they hold is
            # checked before the folder is touched, the warm start trained or any run launched
            prepare_output(out, command=command, resume=True, check_only=True)
            for sub in ("runs", "logs"):
                if (out / sub).exists() and not (out / sub).is_dir():
                    raise ValueError(f"out: {out / sub}: expected a folder (the grid's {sub}), found a file")
            for loss, seed in spec.cells():
                check_run_folder(run_dir(out, loss, seed), name="out")
            prepare_output(out, command=command, resume=True)
    else:
        prepare_output(out, command=command)
    atomic_write_text(spec_path, json.dumps(spec.to_dict(), indent=1))
    (out / "logs").mkdir(exist_ok=True)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(spec.cells())))
    todo = []
    paths = {}
    for loss, seed in spec.cells():
        path = run_dir(out, loss, seed)
        paths[(loss, seed)] = path
        if (path / FINISHED_FILE).is_file():
            continue
        todo.append((loss, seed, path, path.exists() and any(path.glob("ckpt/*"))))
    if progress:
        print(f"[compare] {len(paths) - len(todo)} finished run(s) reused, {len(todo)} to run, {jobs} in parallel",
              file=sys.stderr)
    if todo:
        _prepare_warm_start(spec, threads=1, progress=progress)  # more threads: no gain at this size, and
        # oversubscription on a busy machine slowed it 30×

    # the worker checkpoints and stops when this process dies (ctpo_lab.runsafety.watch_parent)
    worker_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{PARENT_ENV: str(os.getpid())})
    servers = _ServerPool(worker_env)

    def launch(loss: str, seed: int, path: Path, resume: bool) -> tuple[str, int, int, float]:
        if path.exists() and not resume and holder_pid(path) is None:
            shutil.rmtree(path)  # a run that never wrote a checkpoint: nothing to keep
        log = out / "logs" / f"{loss}-seed{seed}.log"
        args = _train_args(spec, loss, seed, path, resume)
        start = time.time()
        server = servers.get()
        if server is not None:
            rc = server.run("ctpo_lab.train", args, log, env={PARENT_ENV: str(server.pid)})
        else:
            with log.open("a") as fh:
                rc = subprocess.run([sys.executable, "-m", "ctpo_lab.train", *args], stdout=fh,
                                    stderr=subprocess.STDOUT, env=worker_env, check=False).returncode
        return loss, seed, rc, time.time() - start

    failures = []
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="grid runs", unit="run")
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(launch, *item) for item in todo]
            for fut in as_completed(futures):
                loss, seed, rc, secs = fut.result()
                if rc != 0:
                    failures.append(f"{loss}-seed{seed} (exit {rc}, log {out / 'logs' / f'{loss}-seed{seed}.log'})")
                if bar is not None:
                    bar.set_postfix_str(f"{loss}-seed{seed} {secs:.0f}s")
                    bar.update(1)
    finally:
        servers.close()
    if bar is not None:
        bar.close()
    if failures:
        raise RuntimeError("compare: run(s) failed: " + "; ".join(failures))
    return paths


def read_grid_spec(out: str | os.PathLike[str], *, name: str = "out") -> GridSpec:
    """The validated :class:`GridSpec` of the grid folder ``out`` (its ``grid.json``); ``ValueError`` naming the
    file when it is missing or is not a grid specification."""
    out = Path(out)
    spec_path = out / "grid.json"
    if not spec_path.is_file():
        raise ValueError(f"{name}: {out} is not a grid folder (no grid.json)")
    saved = read_json(spec_path, name=name)

    def bad(what: str) -> ValueError:
        return ValueError(f"{name}: {spec_path}: {what} (not a grid.json of ctpo_lab, or a corrupt one)")

    if not (isinstance(saved.get("losses"), list) and isinstance(saved.get("seeds"), list)):
        raise bad("expected 'losses' and 'seeds' lists")
    fields = {f.name for f in dataclasses.fields(GridSpec)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise bad(f"unknown key(s) {unknown}; expected keys from {sorted(fields)}")
    if not all(isinstance(x, str) for x in saved["losses"]):
        raise bad(f"expected 'losses' to be a list of loss preset names, got {shown_value(saved['losses'])}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in saved["seeds"]):
        raise bad(f"expected 'seeds' to be a list of ints, got {shown_value(saved['seeds'])}")
    if "train_preset" in saved and not isinstance(saved["train_preset"], str):
        raise bad(f"expected 'train_preset' to be a preset name, got {shown_value(saved['train_preset'])}")
    overrides = saved.get("overrides", [])
    if not (isinstance(overrides, list) and all(isinstance(x, str) for x in overrides)):
        raise bad(f"expected 'overrides' to be a list of key=value strings, got {shown_value(overrides)}")
    steps = saved.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise bad(f"expected 'steps' to be an int or null, got {shown_value(steps)}")
    try:
        return GridSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    except ValueError as e:
        raise bad(" ".join(str(e).split())) from None


def load_grid(out: str | os.PathLike[str], *, name: str = "out", warn: bool = True) -> pd.DataFrame:
    """Every record of every run's ``metrics.jsonl`` in one long table with ``loss`` and ``seed`` columns
    (``name``: the argument a ``ValueError`` names).

    Every file is validated first (:func:`read_grid_spec`, :func:`check_metric_records`): a finished run whose
    log is missing or empty is corrupt input.  An unfinished run contributes what it has logged so far (nothing
    when it has not started); ``warn`` says so on stderr, naming the runs."""
    out = Path(out)
    spec = read_grid_spec(out, name=name)
    if (out / "runs").exists() and not (out / "runs").is_dir():
        raise ValueError(f"{name}: {out / 'runs'}: expected a folder (the grid's run folders), found a file")
    frames = []
    unfinished = []
    for loss, seed in spec.cells():
        run = run_dir(out, loss, seed)
        records, finished = read_run_records(run, name=name, warn=warn)
        if not finished:
            unfinished.append(f"{run / 'metrics.jsonl'}" + ("" if records else " (none yet: left out)"))
        if not records:
            continue
        df = pd.DataFrame.from_records(records)
        df.insert(0, "seed", seed)
        df.insert(0, "loss", loss)
        frames.append(df)
    if not frames:
        raise ValueError(f"{name}: no metrics.jsonl under {out / 'runs'}")
    if warn and unfinished:
        shown = "; ".join(unfinished[:4]) + (f"; and {len(unfinished) - 4} more" if len(unfinished) > 4 else "")
        print(f"[compare] warning: {len(unfinished)} unfinished run(s) (no {FINISHED_FILE}) summarized as far as "
              f"they got: {shown}", file=sys.stderr)
    return pd.concat(frames, ignore_index=True)


def _pivot(df: pd.DataFrame, loss: str, metric: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """[n_seeds, n_steps] matrix of ``metric`` for ``loss`` (NaN where a seed has no value), steps, seeds."""
    sub = df[(df["loss"] == loss) & df[metric].notna()] if metric in df else df.iloc[0:0]
    if sub.empty:
        return np.empty((0, 0)), np.empty(0), []
    table = sub.pivot_table(index="seed", columns="step", values=metric, aggfunc="last")
    return table.to_numpy(dtype=np.float64), table.columns.to_numpy(dtype=np.float64), list(table.index)


def metric_curves(df: pd.DataFrame, metric: str, *, n_boot: int = 2000, seed: int = 0) -> dict[str, stats.CurveBands]:
    """Mean over seeds with a 95% percentile-bootstrap band, per loss, of one metric vs step."""
    bands = {}
    for loss in df["loss"].unique():
        values, steps, _ = _pivot(df, loss, metric)
        if values.size:
            bands[loss] = stats.curve_bands(values, x=steps, n_boot=n_boot, seed=seed)
    return bands


def _last_values(df: pd.DataFrame, loss: str, metric: str, *, first: bool = False) -> pd.Series:
    sub = df[(df["loss"] == loss) & df[metric].notna()] if metric in df else df.iloc[0:0]
    if sub.empty:
        return pd.Series(dtype=float)
    sub = sub.sort_values("step")
    return (sub.groupby("seed")[metric].first() if first else sub.groupby("seed")[metric].last()).astype(float)


def _mean_over_steps(df: pd.DataFrame, loss: str, metric: str) -> pd.Series:
    sub = df[(df["loss"] == loss) & df[metric].notna()] if metric in df else df.iloc[0:0]
    return sub.groupby("seed")[metric].mean().astype(float) if not sub.empty else pd.Series(dtype=float)


def _ci_text(values: pd.Series, digits: int = 3, seed: int = 0) -> tuple[float, float, float, str]:
    x = values.dropna().to_numpy(dtype=np.float64)
    if x.size == 0:
        return np.nan, np.nan, np.nan, "n/a"
    ci = stats.bootstrap_ci(x, n_boot=4000, seed=seed)
    return ci.estimate, ci.low, ci.high, stats.format_ci(ci.estimate, ci.low, ci.high, digits, style="f")


def final_table(df: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Table 2 analogue: per loss, mean [95% bootstrap CI over seeds] of the run-level summaries.

    Columns: initial and final held-out accuracy (first and last evaluation), their difference, the best
    accuracy, and the mean over steps of the clip fraction, of the KL after the last mini-batch and of the
    response length.
    """
    rows = []
    for loss in df["loss"].unique():
        first = _last_values(df, loss, "eval_accuracy", first=True)
        last = _last_values(df, loss, "eval_accuracy")
        row: dict[str, Any] = {"loss": loss, "seeds": int(last.size)}
        for name, series in (
            ("initial accuracy", first),
            ("final accuracy", last),
            ("accuracy gain", (last - first).dropna()),
            ("clip fraction", _mean_over_steps(df, loss, "pg_update/clip/total/rate")),
            ("KL after last update", _mean_over_steps(df, loss, "offpolicy/kl_k3")),
            ("response length", _mean_over_steps(df, loss, "response_length/mean")),
        ):
            est, lo, hi, text = _ci_text(series, digits=4 if name.startswith(("KL", "clip")) else 3, seed=seed)
            row[name] = text
            row[f"{name} mean"], row[f"{name} low"], row[f"{name} high"] = est, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def paired_comparison(df: pd.DataFrame, reference: str, others: Sequence[str] | None = None,
                      metric: str = "eval_accuracy", *, seed: int = 0) -> pd.DataFrame:
    """Paired-seed comparison of the final ``metric`` of each loss against ``reference``.

    For each seed s present in both runs, d_s = final(loss, s) − final(reference, s).  Reports mean(d) with a
    95% percentile-bootstrap CI over seeds and the two-sided sign-flip permutation p-value (the test
    statistic |mean d|; the 2^n sign patterns are counted exactly up to 40 seeds, estimated by Monte Carlo beyond:
    the ``test`` column says which).  With 3 seeds the smallest attainable p-value is
    0.25: a claim needs more seeds.
    """
    ref = _last_values(df, reference, metric)
    rows = []
    for loss in others or [x for x in df["loss"].unique() if x != reference]:
        vals = _last_values(df, loss, metric)
        common = sorted(set(ref.index) & set(vals.index))
        if not common:
            continue
        d = (vals.loc[common] - ref.loc[common]).to_numpy(dtype=np.float64)
        ci = stats.bootstrap_ci(d, n_boot=4000, seed=seed)
        rows.append({"loss": loss, "reference": reference, "metric": metric, "paired seeds": len(common),
                     "mean difference": ci.estimate, "CI low": ci.low, "CI high": ci.high,
                     "sign-flip p": stats.sign_flip_p_value(d),
                     "test": ("exact" if stats.sign_flip_is_exact(d.size) else "Monte Carlo")
                     + " paired sign-flip permutation"})
    return pd.DataFrame(rows)


def plot_curves(df: pd.DataFrame, metrics: Sequence[str] | None = None, *, title: str | None = None):
    """Figure 2 analogue: one panel per metric, mean over seeds with a 95% bootstrap band, per loss."""
    import matplotlib.pyplot as plt  # the caller chooses the backend (inline in notebooks, Agg in scripts)

    from ctpo_lab.style import estimator_color, estimator_label

    metrics = [m for m in (metrics or ("eval_accuracy", "pg_update/clip/total/rate", "response_length/mean",
                                       "offpolicy/kl_k3")) if m in df]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for loss, band in metric_curves(df, metric).items():
            c = estimator_color(loss)
            n = df[df["loss"] == loss]["seed"].nunique()
            ax.plot(band.x, band.estimate, color=c, label=f"{estimator_label(loss)} (n={n})")
            ax.fill_between(band.x, band.low, band.high, color=c, alpha=0.2, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(METRICS.get(metric, metric))
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    if not plt.rcParams.get("figure.constrained_layout.use"):
        fig.tight_layout()
    return fig


def _write_md(df: pd.DataFrame, path: Path, note: str) -> None:
    atomic_write_text(path, df.to_markdown(index=False, floatfmt=".4g") + "\n\n" + note.strip() + "\n")


def _csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def summarize_grid(out: str | os.PathLike[str], *, reference: str = "ctpo", seed: int = 0,
                   warn: bool = True) -> dict[str, Any]:
    """Write curves.csv, table2.*, paired.*, table3.* and fig2.* into ``out``; return the tables (``warn``: of
    unfinished runs, :func:`load_grid`)."""
    out = Path(out)
    df = load_grid(out, warn=warn)
    curve_rows = []
    for metric in METRICS:
        if metric not in df:
            continue
        for loss, band in metric_curves(df, metric, seed=seed).items():
            for x, e, lo, hi in zip(band.x, band.estimate, band.low, band.high):
                curve_rows.append({"loss": loss, "metric": metric, "step": int(x), "mean": e, "low": lo, "high": hi})
    _csv(pd.DataFrame(curve_rows), out / "curves.csv")
    table2 = final_table(df, seed=seed)
    shown = ["loss", "seeds", "initial accuracy", "final accuracy", "accuracy gain", "clip fraction",
             "KL after last update", "response length"]
    _csv(table2, out / "table2.csv")
    _write_md(table2[shown], out / "table2.md",
              "Mean [95% percentile-bootstrap CI] over seeds. Accuracy: held-out, first and last evaluation.")
    result: dict[str, Any] = {"table2": table2}
    if reference in set(df["loss"]):
        paired = paired_comparison(df, reference, seed=seed)
        _csv(paired, out / "paired.csv")
        _write_md(paired, out / "paired.md", f"Final held-out accuracy of each loss minus {reference}'s, paired by "
                  "seed; exact two-sided sign-flip permutation test.")
        result["paired"] = paired
    if {"ctpo", "ctpo_fixed"} <= set(df["loss"]):
        table3 = paired_comparison(df, "ctpo_fixed", ["ctpo"], seed=seed)
        table3 = pd.concat([table2[table2["loss"].isin(["ctpo", "ctpo_fixed"])][shown].reset_index(drop=True),
                            table3.drop(columns=["loss"]).rename(columns=lambda c: f"ctpo − ctpo_fixed: {c}")
                            .reindex([0, 0]).reset_index(drop=True)], axis=1)
        _csv(table3, out / "table3.csv")
        _write_md(table3, out / "table3.md", "Table 3 analogue: CTPO with the √t (adaptive) window vs the fixed "
                  "window, paired by seed.")
        result["table3"] = table3
    fig = plot_curves(df)
    for suffix in ("png", "pdf"):
        with atomic_path(out / f"fig2.{suffix}") as tmp:
            fig.savefig(tmp, dpi=150, format=suffix)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return result


def run_comparison(spec: GridSpec, out: str | os.PathLike[str] | None = None, *, jobs: int | None = None,
                   overwrite: bool = False, summarize_only: bool = False, reference: str = "ctpo",
                   progress: bool = True) -> dict[str, Any]:
    """Run the grid (unless ``summarize_only``) into ``out`` (default ``runs/compare-<trainer preset>``) and
    summarize it (:func:`summarize_grid`); returns its tables plus ``out`` and ``seconds``. What
    ``python -m ctpo_lab.train compare`` does; bad input raises ``ValueError`` naming the argument. The caller
    chooses the matplotlib backend (the command line: Agg)."""
    out = Path(out if out is not None else f"runs/compare-{spec.train_preset}")
    if reference not in LOSS_PRESETS:
        raise ValueError(f"reference: unknown loss preset {reference!r}; expected one of {sorted(LOSS_PRESETS)}")
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs: expected an int ≥ 1, got {jobs!r}")
    start = time.time()
    if summarize_only:
        load_grid(out)  # a grid folder with readable logs, before anything is written
        prepare_output(out, command="python -m ctpo_lab.train compare", resume=True)
    else:
        run_grid(spec, out, jobs=jobs, overwrite=overwrite, progress=progress)
    result = summarize_grid(out, reference=reference, warn=not summarize_only)  # (load_grid has warned)
    return {**result, "out": out, "seconds": time.time() - start}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m ctpo_lab.train compare", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", help="trainer preset of every run (default: cpu)")
    ap.add_argument("--loss", "--losses", nargs="+", dest="losses", default=list(GridSpec.losses), metavar="NAME",
                    help="loss presets to compare (keys of ctpo_lab.losses.PRESETS)")
    ap.add_argument("--seeds", nargs="+", type=int_at_least(0), default=None, help="seeds (default 0 1 2)")
    ap.add_argument("--seed", type=int_at_least(0), default=None,
                    help="first seed; with --num-seeds gives seed..seed+n-1")
    ap.add_argument("--num-seeds", type=int_at_least(1, MAX_GRID_SEEDS), default=None,
                    help="number of seeds from --seed (default 3)")
    ap.add_argument("--steps", type=int_at_least(1), default=None, help="override the preset's number of steps")
    ap.add_argument("--out", type=folder_path, default=None, help="grid folder (default runs/compare-<preset>)")
    ap.add_argument("--jobs", type=int_at_least(1), default=None, help="parallel runs (default: number of cores)")
    ap.add_argument("--reference", default=None,
                    help="loss the others are compared with (paired seeds), one of --loss (default ctpo when compared)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing, different grid folder (not needed to add seeds or losses: "
                    "a grid this one extends keeps its finished runs)")
    ap.add_argument("--summarize-only", "--aggregate-only", dest="summarize_only", action="store_true",
                    help="only summarize existing runs (no training); --aggregate-only is the old spelling")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctpo_lab.train compare``: parse, :func:`run_comparison`, print the tables; bad input: one line
    ``error: <argument>: <expected>`` on stderr and exit status 2."""
    from ctpo_lab import cli

    flags = {name: f"--{name.replace('_', '-')}" for name in ("out", "seeds", "seed", "steps", "jobs", "reference",
                                                            "overwrite", "preset", "num_seeds")}
    return cli.run(lambda: _main(argv), flags={**flags, "losses": "--loss"},
                   prog="python -m ctpo_lab.train compare")


def _main(argv: Sequence[str] | None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # a command-line run writes files only
    args = build_parser().parse_args(argv)
    if args.seeds is not None and (args.seed is not None or args.num_seeds is not None):
        raise ValueError("seeds: give either --seeds or --seed/--num-seeds, not both")
    if args.seeds is not None and len(args.seeds) > MAX_GRID_SEEDS:
        raise ValueError(f"seeds: expected at most {MAX_GRID_SEEDS} seeds, got {len(args.seeds)}")
    first, count = args.seed or 0, 3 if args.num_seeds is None else args.num_seeds
    seeds = args.seeds if args.seeds is not None else consecutive_seeds(first, count)
    check_override_keys(args.overrides, steps=args.steps)
    if args.reference is not None and args.reference not in args.losses:
        raise ValueError(f"reference: expected one of the compared losses {args.losses}, got {args.reference!r}")
    spec = GridSpec(args.preset, tuple(args.losses), tuple(seeds), tuple(args.overrides), args.steps)
    try:
        result = run_comparison(spec, args.out, jobs=args.jobs, overwrite=args.overwrite,
                                summarize_only=args.summarize_only, reference=args.reference or "ctpo")
    except RuntimeError as e:  # a run of the grid failed: its log says why
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    shown = ["loss", "seeds", "initial accuracy", "final accuracy", "accuracy gain", "clip fraction",
             "KL after last update"]
    print(result["table2"][shown].to_markdown(index=False))
    if "paired" in result:
        print()
        print(result["paired"][["loss", "reference", "paired seeds", "mean difference", "CI low", "CI high",
                                "sign-flip p"]].to_markdown(index=False, floatfmt=".4g"))
    print(f"\n[compare] wrote {result['out']}/table2.md, paired.md, curves.csv, fig2.png in {result['seconds']:.0f} s")
    return 0
