"""The run folder: ``config.yaml``, ``metrics.jsonl``, ``tb/`` (TensorBoard), ``ckpt/``, ``ratios/``.

* An existing, non-empty folder is never reused without ``resume=True`` or ``overwrite=True``
  (``ValueError`` before any work).
* Checkpoints ``ckpt/step_XXXXXXX.pt`` hold the model, the optimizer, every RNG state (Python, NumPy,
  torch CPU and CUDA) and the trainer counters; they are written atomically and the newest ``keep`` are kept.
* On resume, ``metrics.jsonl`` is truncated to the checkpoint's step and TensorBoard purges later events, so a
  resumed run logs exactly what an uninterrupted one does.
* W&B only when ``track=True`` (imported lazily; offline machines never need it).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

__all__ = ["RunFolder", "rng_state", "set_rng_state", "FINISHED_FILE"]

FINISHED_FILE = "finished.json"


def rng_state() -> dict[str, Any]:
    """Every global RNG state (Python, NumPy, torch CPU, every CUDA device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class RunFolder:
    """Owns one run directory. Construct it first: it refuses to clobber before anything else happens."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume: bool = False,
        overwrite: bool = False,
        keep: int = 2,
        writer: bool = True,
    ) -> None:
        self.path = Path(path)
        self.writer = writer
        if writer:
            nonempty = self.check(path, resume=resume, overwrite=overwrite)
            if nonempty and overwrite:
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.path / "ckpt"
        self.ratio_dir = self.path / "ratios"
        self.metrics_path = self.path / "metrics.jsonl"
        self.keep = keep
        self._tb = None
        self._wandb = None

    @staticmethod
    def check(path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> bool:
        """Read-only checks (raise ``ValueError``); returns whether the folder exists and is non-empty.
        A non-``writer`` RunFolder (data-parallel ranks > 0) never writes: its writing methods are no-ops."""
        if resume and overwrite:
            raise ValueError("overwrite: --resume and --overwrite are mutually exclusive")
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise ValueError(f"out: {str(p)!r} exists and is not a directory")
        nonempty = p.is_dir() and any(p.iterdir())
        if nonempty and not resume and not overwrite:
            raise ValueError(
                f"out: run folder {str(p)!r} already exists; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        return nonempty

    # ------------------------------------------------------------------ config
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def read_config(self) -> dict[str, Any] | None:
        return yaml.safe_load(self.config_path.read_text()) if self.config_path.is_file() else None

    def write_config(self, config: dict[str, Any]) -> None:
        if not self.writer:
            return
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("step_*.pt")) if self.ckpt_dir.is_dir() else []

    def latest_checkpoint(self) -> Path | None:
        ck = self.checkpoints()
        return ck[-1] if ck else None

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        target = self.ckpt_dir / f"step_{step:07d}.pt"
        if not self.writer:
            return target
        self.ckpt_dir.mkdir(exist_ok=True)
        tmp = target.with_suffix(".pt.tmp")
        torch.save({**state, "step": step, "rng": rng_state()}, tmp)
        os.replace(tmp, target)
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return target

    def load_checkpoint(
        self, path: Path | None = None, map_location: str | torch.device = "cpu"
    ) -> dict[str, Any]:
        path = path or self.latest_checkpoint()
        if path is None:
            raise ValueError(f"resume: no checkpoint in {str(self.ckpt_dir)!r}")
        return torch.load(path, map_location=map_location, weights_only=False)

    # ------------------------------------------------------------------ logging
    def open_loggers(
        self,
        *,
        start_step: int,
        tensorboard: bool,
        track: bool,
        config: dict[str, Any],
        project: str = "ctpo_lab",
        name: str | None = None,
    ) -> None:
        """Truncate ``metrics.jsonl`` to ``start_step`` and open TensorBoard / W&B."""
        if not self.writer:
            return
        if self.metrics_path.is_file():  # a fresh start (step 0) keeps nothing
            kept = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if start_step > 0 and line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            self.metrics_path.write_text("".join(k + "\n" for k in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"), purge_step=start_step + 1 if start_step else None)
        if track:
            import wandb  # noqa: F401  (checked by the trainer before any work)

            self._wandb = wandb.init(
                project=project,
                name=name or self.path.name,
                config=config,
                dir=str(self.path),
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must contain ``step``) to every open logger."""
        if not self.writer:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        step = int(record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if (
                    k != "step"
                    and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                ):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def mark_finished(self, summary: dict[str, Any]) -> None:
        if not self.writer:
            return
        (self.path / FINISHED_FILE).write_text(json.dumps(summary, indent=1))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
