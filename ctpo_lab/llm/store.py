"""Storage of trajectories: a documented parquet (one row per response), sharded and resumable, plus the CTPO
authors' npz dumps (:mod:`ctpo_lab.dumps`).

Parquet columns (one row per response; list columns hold one entry per response token, EOS included)
===========================  ==================  ==========================================================
column                       type                meaning
===========================  ==================  ==========================================================
``prompt_id``                string              id of the prompt (``Prompt.id``)
``prompt_index``             int64               index of the prompt in the collection's prompt list
``group_id``                 int64               prompt group (the G responses of one prompt)
``sample_index``             int32               index of the response within its group
``chunk``                    int32               sampling chunk (the unit of sharding and resumption)
``split``                    string              ``train`` (used by stale updates) or ``eval`` (held out)
``prompt_token_ids``         list<int32>         the rendered prompt
``token_ids``                list<int32>         response tokens
``mask``                     list<int8>          1 on valid response tokens (all ones; kept for the layout)
``logp_behaviour``           list<float32>       log μ(y_t|s_t) recorded at sampling (temperature τ_μ)
``logp_target``              list<float32>       log π(y_t|s_t) (null in behaviour-only shards)
``kl``                       list<float32>       exact KL(μ‖π)(s_t) (null when not computed)
``reward``                   float64             verifiable reward (binary correctness)
``advantage``                float64             GRPO advantage within the group
``finished``                 bool                the response ended with EOS
``length``                   int32               number of response tokens
``response``                 string              decoded response text
``target``                   string              name of π (e.g. ``stale_k4``; ``behaviour`` for shards)
===========================  ==================  ==========================================================

Layout of an output directory: ``rollouts/shard_XXXXX.parquet`` (one per sampling chunk, written atomically as
chunks finish; an interrupted collection restarts from the chunks that are missing) and
``targets/<target>.parquet``; ``dumps/<target>/step_XXXXXXX_rank_XXXX.npz`` in the authors' layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from ctpo_lab.llm.rollout import RolloutBatch

__all__ = [
    "SCHEMA",
    "batch_to_frame",
    "frame_to_batch",
    "write_parquet",
    "read_parquet",
    "shard_path",
    "write_shard",
    "done_chunks",
    "shard_is_complete",
    "read_shards",
    "padded",
]

SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt_index", pa.int64()),
    ("group_id", pa.int64()),
    ("sample_index", pa.int32()),
    ("chunk", pa.int32()),
    ("split", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("token_ids", pa.list_(pa.int32())),
    ("mask", pa.list_(pa.int8())),
    ("logp_behaviour", pa.list_(pa.float32())),
    ("logp_target", pa.list_(pa.float32())),
    ("kl", pa.list_(pa.float32())),
    ("reward", pa.float64()),
    ("advantage", pa.float64()),
    ("finished", pa.bool_()),
    ("length", pa.int32()),
    ("response", pa.string()),
    ("target", pa.string()),
])


def _rows(x: Tensor | None, lengths: list[int], dtype: type) -> list[list | None]:
    if x is None:
        return [None] * len(lengths)
    a = x.detach().cpu().numpy()
    return [a[i, :n].astype(dtype).tolist() for i, n in enumerate(lengths)]


def batch_to_frame(
    batch: RolloutBatch,
    *,
    prompt_ids: list[str],
    rewards: Tensor | np.ndarray,
    advantages: Tensor | np.ndarray,
    texts: list[str] | None = None,
    split: str | list[str] = "eval",
    chunk: int | Tensor | np.ndarray = 0,
    logp_target: Tensor | None = None,
    kl: Tensor | None = None,
    target: str = "behaviour",
) -> pd.DataFrame:
    """One row per response of ``batch`` (see the module table). ``prompt_ids`` are indexed by prompt_index."""
    n = len(batch)
    lengths = batch.lengths.tolist()
    pidx = batch.prompt_index.tolist()
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    a = np.asarray(advantages, dtype=np.float64).reshape(-1)
    if r.shape[0] != n or a.shape[0] != n:
        raise ValueError(f"rewards/advantages: expected {n} entries, got {r.shape[0]} and {a.shape[0]}")
    gid = batch.group_id.tolist()
    sample_index, seen = [], {}
    for g in gid:
        sample_index.append(seen.get(g, 0))
        seen[g] = seen.get(g, 0) + 1
    chunks = np.broadcast_to(np.asarray(chunk).reshape(-1), (n,)) if np.ndim(chunk) else np.full(n, int(chunk))
    splits = [split] * n if isinstance(split, str) else list(split)
    return pd.DataFrame({
        "prompt_id": [prompt_ids[i] for i in pidx],
        "prompt_index": pidx,
        "group_id": gid,
        "sample_index": sample_index,
        "chunk": chunks.astype(np.int32),
        "split": splits,
        "prompt_token_ids": [list(p) for p in batch.prompt_ids],
        "token_ids": _rows(batch.tokens, lengths, np.int32),
        "mask": [[1] * k for k in lengths],
        "logp_behaviour": _rows(batch.logp, lengths, np.float32),
        "logp_target": _rows(logp_target, lengths, np.float32),
        "kl": _rows(kl, lengths, np.float32),
        "reward": r,
        "advantage": a,
        "finished": batch.finished.tolist(),
        "length": np.asarray(lengths, dtype=np.int32),
        "response": texts if texts is not None else [""] * n,
        "target": [target] * n,
    })


def padded(column: pd.Series, fill: float = 0.0, dtype: type = np.float32) -> np.ndarray:
    """A list column as a right-padded [N, T_max] array."""
    seqs = [np.asarray(v if v is not None else [], dtype=dtype) for v in column]
    t = max(1, max((len(s) for s in seqs), default=1))
    out = np.full((len(seqs), t), fill, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def frame_to_batch(df: pd.DataFrame, *, pad_token_id: int, temperature: float) -> RolloutBatch:
    """The :class:`RolloutBatch` of a trajectory frame (rows in frame order)."""
    if len(df) == 0:
        raise ValueError("df: empty trajectory frame")
    tokens = torch.from_numpy(padded(df["token_ids"], pad_token_id, np.int64))
    mask = torch.from_numpy(padded(df["mask"], 0, np.int8).astype(bool))
    logp = torch.from_numpy(padded(df["logp_behaviour"], 0.0, np.float32))
    return RolloutBatch(
        [list(map(int, p)) for p in df["prompt_token_ids"]],
        torch.tensor(df["prompt_index"].to_numpy(np.int64)), torch.tensor(df["group_id"].to_numpy(np.int64)),
        tokens, mask, logp, torch.tensor(df["finished"].to_numpy(bool)), float(temperature), int(pad_token_id),
    )


def write_parquet(path: str | os.PathLike[str], df: pd.DataFrame, *, overwrite: bool = False) -> Path:
    """Write a trajectory frame with :data:`SCHEMA` (atomically; refuses to replace a file unless overwrite)."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"path: {p} exists (pass overwrite=True to replace it)")
    p.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[[f.name for f in SCHEMA]], schema=SCHEMA, preserve_index=False)
    from ctpo_lab.runsafety import atomic_path

    with atomic_path(p) as tmp:
        pq.write_table(table, tmp)
    return p


def _read_table(f: Path) -> pd.DataFrame:
    """One parquet file; ``ValueError`` naming it when it is truncated, corrupt or lacks the layout's columns."""
    try:
        df = pq.read_table(f).to_pandas()
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"path: {f} is not a readable parquet file ({' '.join(str(e).split())[:200]}); it is "
                         "corrupt or truncated") from None
    missing = [c for c in ("token_ids", "mask", "logp_behaviour") if c not in df]
    if missing:
        raise ValueError(f"path: {f} lacks the trajectory column(s) {missing} (not a ctpo_lab trajectory parquet)")
    return df


def read_parquet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a trajectory parquet (a file, or a directory of shards concatenated in name order).
    A truncated or corrupt file raises ``ValueError`` naming it."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"path: no parquet shard in {p}")
        return pd.concat([_read_table(f) for f in files], ignore_index=True)
    if not p.is_file():
        raise FileNotFoundError(f"path: no parquet file at {p}")
    return _read_table(p)


def shard_path(directory: str | os.PathLike[str], chunk: int) -> Path:
    return Path(directory) / f"shard_{chunk:05d}.parquet"


def write_shard(directory: str | os.PathLike[str], chunk: int, df: pd.DataFrame) -> Path:
    """Write the shard of one sampling chunk (atomic: a partly written shard never exists)."""
    return write_parquet(shard_path(directory, chunk), df, overwrite=True)


def shard_is_complete(path: str | os.PathLike[str]) -> bool:
    """The shard's parquet footer and every row group read back (a truncated file does not)."""
    try:
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            pf.read_row_group(i, columns=["chunk"])
        return pf.metadata.num_rows > 0
    except (OSError, pa.ArrowException, KeyError):
        return False


def done_chunks(directory: str | os.PathLike[str]) -> set[int]:
    """Chunks whose shard is complete in ``directory``. An incomplete (truncated, corrupt) shard is reported on
    stderr, renamed to ``*.corrupt`` and not counted: a resume samples that chunk again."""
    import sys

    d = Path(directory)
    out = set()
    for f in sorted(d.glob("shard_*.parquet")):
        try:
            chunk = int(f.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if not shard_is_complete(f):
            bad = f.with_name(f.name + ".corrupt")
            os.replace(f, bad)
            print(f"[llm] {f} is incomplete or corrupt: moved to {bad.name}; chunk {chunk} is sampled again",
                  file=sys.stderr, flush=True)
            continue
        out.add(chunk)
    return out


def read_shards(directory: str | os.PathLike[str]) -> pd.DataFrame:
    """All shards of a collection, sorted by (chunk, prompt_index, sample_index)."""
    df = read_parquet(directory)
    return df.sort_values(["chunk", "prompt_index", "sample_index"], kind="stable").reset_index(drop=True)
