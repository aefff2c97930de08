"""The CTPO authors' per-step importance-weight dumps (``step_XXXXXXX_rank_XXXX.npz``), read and written.

Layout of one file, as written by the authors' verl fork (``_maybe_dump_pg_update_is_weights``) and read by
their figure scripts (``scripts/plot_clip_rate_vs_position.py``):

=========================  ==================  ==========================================================
key                        dtype, shape        meaning
=========================  ==================  ==========================================================
``pg_update_is_weights``   float32 [B, T]      the *unclipped* weight used by the PG update, on valid
                                               tokens: e^{min(L_t, 10)} for the cumulative loss
                                               (e^{min(L_t/t, 10)} geomean, e^{min(L_T/|y|, 10)} GSPO,
                                               e^{ℓ_t} vanilla); 0 on padding
``response_mask``          int8 [B, T]         valid-token mask
``global_step``            int64 [1]           training step
``rank``                   int64 [1]           data-parallel rank
``advantages``             float32 [B, T]      optional (read by the clip-rate script when present)
=========================  ==================  ==========================================================

ctpo_lab adds optional keys, ignored by the authors' scripts:

``cum_log_ratio``     float32 [B, T]  L_t itself, without the cap at 10 (lossless; 0 on padding)
``group_ids``         int64 [B]       prompt-group id of each row
``group_ids_global``  int8 [1]        1: the ids are the same on every rank and file (not offset when merged)
any further key       float32 [B, T]  per-token arrays passed as ``extra`` (e.g. ``log_prob``, ``old_log_prob``,
                                      ``rollout_log_prob`` from the verl plugin), 0 on padding

File names: ``step_{step:07d}_rank_{rank:04d}.npz`` in one directory, or any ``*.npz`` in a
``step_{step:07d}/`` sub-directory (accepted by the authors' scripts too; the verl plugin writes one file per
micro-batch there).  Files are written to a temporary name and renamed; names starting with ``.`` or containing
``.tmp`` are never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RatioDump", "dump_filename", "write_ratio_dump", "read_ratio_dump", "read_step", "list_steps", "step_files",
    "to_tensors",
]

#: Safety cap on the log-weight used by the authors' code before exponentiation.
MAX_LOG_WEIGHT = 10.0


def dump_filename(step: int, rank: int = 0) -> str:
    """``step_XXXXXXX_rank_XXXX.npz``."""
    for name, v in (("step", step), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}: expected an int ≥ 0, got {v!r}")
    return f"step_{int(step):07d}_rank_{int(rank):04d}.npz"


@dataclass(frozen=True)
class RatioDump:
    """Content of one dump (or of several rank shards merged, padded to a common width).

    is_weights : float64 [B, T]  the stored weights (0 on padding)
    mask : bool [B, T]
    step, rank : int (rank −1 for a merge of several ranks)
    advantages : float64 [B, T] or None
    cum_log_ratio : float64 [B, T]  stored L_t, else log of the weights (exact only below the cap of 10)
    group_ids : int64 [B] or None
    lossless : whether ``cum_log_ratio`` was stored rather than recovered from the capped weights
    group_ids_global : whether the group ids are global (the same id on every rank and file)
    extra : further per-token arrays of the file (float64 [B, T]), e.g. ``log_prob``
    """

    is_weights: np.ndarray
    mask: np.ndarray
    step: int
    rank: int
    advantages: np.ndarray | None
    cum_log_ratio: np.ndarray
    group_ids: np.ndarray | None
    lossless: bool
    group_ids_global: bool = False
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _np(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


_LAYOUT_KEYS = frozenset({"pg_update_is_weights", "response_mask", "global_step", "rank", "advantages",
                          "cum_log_ratio", "group_ids", "group_ids_global"})


def _readable(f: Path) -> bool:
    """Not a temporary file of an unfinished write."""
    return not f.name.startswith(".") and ".tmp" not in f.name


def write_ratio_dump(
    path: str | os.PathLike[str],
    cum_log_ratio: Tensor | np.ndarray,
    mask: Tensor | np.ndarray,
    *,
    step: int,
    rank: int = 0,
    advantages: Tensor | np.ndarray | None = None,
    group_ids: Tensor | np.ndarray | None = None,
    log_weight: Tensor | np.ndarray | None = None,
    overwrite: bool = False,
    group_ids_global: bool = False,
    extra: dict[str, Tensor | np.ndarray] | None = None,
) -> Path:
    """Write one dump in the authors' layout (plus the lossless ``cum_log_ratio``).

    Parameters
    ----------
    path : directory (the file name is :func:`dump_filename`) or a full ``.npz`` file path.
    cum_log_ratio : [B, T]
        L_t (for the cumulative loss; pass the family's log-weight X_t as ``log_weight`` for other losses).
    mask : [B, T] bool or 0/1
    step, rank : int ≥ 0
    advantages : [B] or [B, T], optional (stored broadcast to [B, T], 0 on padding)
    group_ids : [B], optional
    log_weight : [B, T], optional
        The log-weight whose capped exponential is stored as ``pg_update_is_weights`` (default: L_t).
    overwrite : bool
        Refuse to replace an existing file unless True.
    group_ids_global : bool
        The group ids are global across ranks and files (``read_step`` then does not offset them).
    extra : dict of [B, T] arrays, optional
        Further per-token arrays stored under their names (float32, 0 on padding; NaN/inf on valid tokens
        raise).  Names of the layout above are refused.

    Returns
    -------
    Path of the written file.
    """
    x = _np(cum_log_ratio, "cum_log_ratio").astype(np.float64)
    m = _np(mask, "mask")
    if x.ndim != 2:
        raise ValueError(f"cum_log_ratio: expected shape [B, T], got {x.shape}")
    if m.shape != x.shape:
        raise ValueError(f"mask: shape {m.shape} does not match cum_log_ratio {x.shape}")
    m = m.astype(bool)
    if not np.isfinite(x[m]).all():
        raise ValueError("cum_log_ratio: NaN or inf value(s) on valid tokens")
    lw = x if log_weight is None else _np(log_weight, "log_weight").astype(np.float64)
    if lw.shape != x.shape:
        raise ValueError(f"log_weight: shape {lw.shape} does not match cum_log_ratio {x.shape}")
    if not np.isfinite(lw[m]).all():
        raise ValueError("log_weight: NaN or inf value(s) on valid tokens")
    p = Path(path)
    target = p if p.suffix == ".npz" else p / dump_filename(step, rank)
    dump_filename(step, rank)  # validates step and rank
    if target.exists() and not overwrite:
        raise FileExistsError(f"path: {target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    weights = np.where(m, np.exp(np.minimum(np.where(m, lw, 0.0), MAX_LOG_WEIGHT)), 0.0)
    arrays: dict[str, np.ndarray] = {
        "pg_update_is_weights": weights.astype(np.float32),
        "response_mask": m.astype(np.int8),
        "global_step": np.array([step], dtype=np.int64),
        "rank": np.array([rank], dtype=np.int64),
        "cum_log_ratio": np.where(m, x, 0.0).astype(np.float32),
    }
    if advantages is not None:
        a = _np(advantages, "advantages").astype(np.float64)
        if a.shape == (x.shape[0],):
            a = np.broadcast_to(a[:, None], x.shape)
        if a.shape != x.shape:
            raise ValueError(f"advantages: expected shape [{x.shape[0]}] or {list(x.shape)}, got {list(a.shape)}")
        if not np.isfinite(a[m]).all():
            raise ValueError("advantages: NaN or inf value(s) on valid tokens")
        arrays["advantages"] = np.where(m, a, 0.0).astype(np.float32)
    if group_ids is not None:
        g = _np(group_ids, "group_ids").reshape(-1)
        if g.shape[0] != x.shape[0]:
            raise ValueError(f"group_ids: expected {x.shape[0]} entries, got {g.shape[0]}")
        arrays["group_ids"] = g.astype(np.int64)
        if group_ids_global:
            arrays["group_ids_global"] = np.array([1], dtype=np.int8)
    for key, value in (extra or {}).items():
        if key in _LAYOUT_KEYS or not key.isidentifier():
            raise ValueError(f"extra: {key!r} is not a free array name")
        e = _np(value, f"extra[{key!r}]").astype(np.float64)
        if e.shape != x.shape:
            raise ValueError(f"extra: {key!r} has shape {e.shape}, expected {x.shape}")
        if not np.isfinite(e[m]).all():
            raise ValueError(f"extra: {key!r} has NaN or inf value(s) on valid tokens")
        arrays[key] = np.where(m, e, 0.0).astype(np.float32)
    tmp = target.with_name("." + target.name + ".tmp.npz")  # hidden: no step_* glob sees a leftover
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, target)
    return target


class _Arrays(dict):
    @property
    def files(self) -> list[str]:
        return list(self)


def read_ratio_dump(path: str | os.PathLike[str]) -> RatioDump:
    """Read one dump file (the authors' files or ours)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no dump file at {p}")
    try:
        with np.load(p) as loaded:
            z = _Arrays({k: loaded[k] for k in loaded.files})  # every array read now: a truncation shows here
    except Exception as e:  # BadZipFile, zlib.error, EOFError, a bad header: all mean "unreadable"
        raise ValueError(f"path: {p} is not a readable npz file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); it is corrupt or truncated") from None
    for key in ("pg_update_is_weights", "response_mask"):
        if key not in z.files:
            raise ValueError(f"path: {p} has no {key!r} array (keys: {z.files})")
    w = z["pg_update_is_weights"].astype(np.float64)
    m = z["response_mask"].astype(bool)
    if w.ndim != 2 or m.shape != w.shape:
        raise ValueError(f"path: {p}: weights {w.shape} and mask {m.shape} must be equal 2-D shapes")
    for key in ("global_step", "rank"):
        if key in z.files and (z[key].size == 0 or not np.issubdtype(z[key].dtype, np.integer)):
            raise ValueError(f"path: {p}: {key!r} must hold one int, got {z[key].dtype} of shape {z[key].shape}")
    step = int(z["global_step"].reshape(-1)[0]) if "global_step" in z.files else -1
    rank = int(z["rank"].reshape(-1)[0]) if "rank" in z.files else -1
    adv = z["advantages"].astype(np.float64) if "advantages" in z.files else None
    gid = z["group_ids"].astype(np.int64) if "group_ids" in z.files else None
    if "cum_log_ratio" in z.files:
        L, lossless = z["cum_log_ratio"].astype(np.float64), True
    else:
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero or negative weight is refused just below
            L = np.where(m, np.log(np.where(m, w, 1.0)), 0.0)
        lossless = False
    global_ids = gid is not None and "group_ids_global" in z.files and bool(z["group_ids_global"].reshape(-1)[0])
    extra = {k: z[k].astype(np.float64) for k in z.files if k not in _LAYOUT_KEYS and z[k].shape == w.shape}
    if not np.isfinite(L[m]).all():
        raise ValueError(f"path: {p} holds NaN/inf, zero or negative weights on valid tokens")
    return RatioDump(w, m, step, rank, adv, L, gid, lossless, global_ids, extra)


def list_steps(directory: str | os.PathLike[str]) -> list[int]:
    """Sorted steps that have a ``step_XXXXXXX_rank_XXXX.npz`` file or a ``step_XXXXXXX/`` folder of ``*.npz``."""
    d = Path(directory)
    steps = set()
    for f in d.glob("step_*_rank_*.npz"):
        if not _readable(f):
            continue
        try:
            steps.add(int(f.name.split("_")[1]))
        except (IndexError, ValueError):
            continue
    for sub in d.glob("step_*"):
        if sub.is_dir() and any(_readable(f) for f in sub.glob("*.npz")):
            try:
                steps.add(int(sub.name.split("_")[1]))
            except (IndexError, ValueError):
                continue
    return sorted(steps)


def _pad(blocks: list[np.ndarray], width: int, fill: float | bool) -> np.ndarray:
    return np.vstack([np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=fill) for b in blocks])


def step_files(directory: str | os.PathLike[str], step: int) -> list[Path]:
    """The dump files of one step, sorted: ``step_XXXXXXX_rank_*.npz``, else the ``*.npz`` of ``step_XXXXXXX/``."""
    d = Path(directory)
    files = sorted(f for f in d.glob(f"step_{step:07d}_rank_*.npz") if _readable(f))
    sub = d / f"step_{step:07d}"
    if not files and sub.is_dir():
        files = sorted(f for f in sub.glob("*.npz") if _readable(f))
    if not files:
        raise FileNotFoundError(f"directory: no dump files for step {step} under {d}")
    return files


def read_step(directory: str | os.PathLike[str], step: int) -> RatioDump:
    """Merge every rank shard of one step (rows stacked in rank order, padded to the widest)."""
    parts = [read_ratio_dump(f) for f in step_files(directory, step)]
    width = max(p.mask.shape[1] for p in parts)
    adv = None
    if all(p.advantages is not None for p in parts):
        adv = _pad([p.advantages for p in parts], width, 0.0)  # type: ignore[misc]
    gid = None
    global_ids = all(p.group_ids is not None and p.group_ids_global for p in parts)
    if global_ids:
        gid = np.concatenate([p.group_ids for p in parts])  # type: ignore[misc]
    elif all(p.group_ids is not None for p in parts):
        offset, ids = 0, []
        for p in parts:  # group ids are rank-local: offset them so groups stay distinct
            g = p.group_ids
            assert g is not None
            ids.append(g + offset)
            offset += int(g.max()) + 1 if g.size else 0
        gid = np.concatenate(ids)
    return RatioDump(
        _pad([p.is_weights for p in parts], width, 0.0),
        _pad([p.mask for p in parts], width, False),
        step,
        parts[0].rank if len(parts) == 1 else -1,
        adv,
        _pad([p.cum_log_ratio for p in parts], width, 0.0),
        gid,
        all(p.lossless for p in parts),
        global_ids,
        {k: _pad([p.extra[k] for p in parts], width, 0.0) for k in parts[0].extra
         if all(k in p.extra for p in parts)},
    )


def to_tensors(dump: RatioDump) -> tuple[Tensor, Tensor]:
    """(cum_log_ratio float64 [B, T], mask bool [B, T]) as tensors."""
    return torch.from_numpy(dump.cum_log_ratio), torch.from_numpy(dump.mask)

