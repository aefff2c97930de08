"""Readers of other people's runs for ``python -m ctpo_lab.diagnose``: the format is detected from the path.

Formats (:data:`FORMATS`):

``parquet``  ctpo_lab's trajectory parquet (:mod:`ctpo_lab.llm.store`: a file or a directory of shards); the
             columns ``group_id``, ``mask``, ``logp_behaviour``, ``logp_target`` and ``advantage`` are used, and
             ``kl`` (the exact per-token KL) when it is present on every row.
``npz``      the importance-weight dumps of :mod:`ctpo_lab.dumps` (one ``.npz`` file, or a directory of
             ``step_XXXXXXX_rank_XXXX.npz`` files or of ``step_XXXXXXX/`` sub-directories), written by ctpo_lab's
             trainer and its verl plugin (lossless: L_t is stored) or by the CTPO authors' verl
             fork (only the weights, capped at e^10; ``dump_mode`` says which loss wrote them, see
             :data:`DUMP_MODES`).  All steps and ranks are pooled unless ``steps`` selects some.
``rollout_is`` the fork's ``rollout_is/step_XXXXXXX.npz`` (π_old against the inference engine), ``verl`` a pickled
             ``DataProto`` (``*.dp``), ``slime`` ``--save-debug-train-data`` files (``*.pt``), ``skyrl``
             ``dump_data_batch`` pickles (``*_training_input.pkl``): see :mod:`ctpo_lab.diagnose.frameworks`.

Every reader returns :class:`Trajectories`: per-token log-ratios ℓ_t = log π − log μ of the valid tokens, the
mask, the advantages and prompt groups when known, and whether the input lost information (weights at the cap).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctpo_lab import dumps
from ctpo_lab.diagnose import frameworks

__all__ = ["FORMATS", "FRAMEWORK_FORMATS", "DUMP_MODES", "Trajectories", "detect_format",
           "read_parquet_trajectories", "read_dump_trajectories", "read_framework_trajectories", "read_trajectories"]

FORMATS = ("parquet", "npz", "rollout_is", "verl", "slime", "skyrl")

#: the formats read by :mod:`ctpo_lab.diagnose.frameworks` (one :class:`~ctpo_lab.diagnose.frameworks.Block` per
#: file) and the file pattern of each in a directory
FRAMEWORK_FORMATS = ("rollout_is", "verl", "slime", "skyrl")

#: How the authors' fork's ``pg_update_is_weights`` relate to L_t, per loss mode (w stored, capped at e^10):
#: ``cumprod`` log w = L_t; ``geomean`` log w = L_t / t, so L_t = t · log w; ``vanilla`` log w = ℓ_t;
#: ``gspo`` log w = L_T / |y| for every token (L_t cannot be recovered: refused).
DUMP_MODES = ("cumprod", "geomean", "vanilla", "gspo")

#: tolerance of "at the cap" for a float32 weight e^10
_CAP_TOL = 1e-4


@dataclass(frozen=True)
class Trajectories:
    """Pooled trajectories of one input.

    log_ratio : float64 [N, T]  ℓ_t on valid tokens, 0 elsewhere
    mask : bool [N, T]
    advantages : float64 [N] or [N, T], or None
    groups : int64 [N] prompt-group ids (distinct across steps and files), or None
    kl : float64 [N, T] exact per-token KL(μ‖π), or None
    format : one of :data:`FORMATS`
    steps : the steps read (empty for a parquet)
    lossy : the weights were stored capped at e^10 and some valid token is at the cap
    capped_fraction : fraction of the valid tokens at the cap (0 for lossless inputs)
    notes : human-readable remarks for the report
    cap : what the cap is (``e^10``, the fork's safety cap, or a truncation threshold)
    """

    log_ratio: np.ndarray
    mask: np.ndarray
    advantages: np.ndarray | None
    groups: np.ndarray | None
    kl: np.ndarray | None
    format: str
    steps: list[int] = field(default_factory=list)
    lossy: bool = False
    capped_fraction: float = 0.0
    notes: list[str] = field(default_factory=list)
    cap: str = "e^10"


def _framework_files(p: Path) -> dict[str, list[Path]]:
    """The files of each framework format directly in the directory ``p`` (rollout skip: in sub-folders)."""
    vis = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and ".tmp" not in f.name]
    found = {
        "rollout_is": sorted(f for f in vis if frameworks.rollout_is_step(f) is not None),
        "verl": sorted(f for f in vis if f.suffix == ".dp") or sorted(
            f for f in p.glob("**/*.dp") if not f.name.startswith(".") and f.name != "new_batch.dp"),
        "slime": sorted(f for f in vis if f.suffix == ".pt"),
        "skyrl": sorted(f for f in vis if f.name.endswith("_training_input.pkl")) or sorted(
            f for f in (p / "dumped_data").glob("*_training_input.pkl") if (p / "dumped_data").is_dir()),
    }
    return {k: v for k, v in found.items() if v}


def _file_format(p: Path) -> str | None:
    if p.suffix == ".parquet":
        return "parquet"
    if p.suffix == ".npz":
        try:
            with np.load(p) as z:
                return "rollout_is" if "rollout_is_weights" in z.files else "npz"
        except Exception:
            return "npz"  # unreadable: the npz reader says so
    return {".dp": "verl", ".pt": "slime", ".pkl": "skyrl"}.get(p.suffix)


def detect_format(path: str | os.PathLike[str]) -> str:
    """One of :data:`FORMATS` from the path; ``ValueError``/``FileNotFoundError`` naming ``path`` otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: {p} does not exist")
    if p.is_file():
        fmt = _file_format(p)
        if fmt is None:
            raise ValueError(f"path: {p} is of no known format; expected a trajectory .parquet, a dump .npz, a verl "
                             ".dp, a slime .pt, a SkyRL .pkl or a directory of them")
        return fmt
    kinds = []
    if any(p.glob("*.parquet")):
        kinds.append("parquet")
    if dumps.list_steps(p):
        kinds.append("npz")
    kinds += list(_framework_files(p))
    if "npz" in kinds and "verl" in kinds and not any(p.glob("*.dp")):
        kinds.remove("verl")  # .dp files deep below a dump directory are not its content
    if len(kinds) > 1:
        raise ValueError(f"path: {p} mixes formats ({', '.join(kinds)}); point at a folder of one of them")
    if kinds:
        return kinds[0]
    raise ValueError(f"path: {p} holds no known format; expected *.parquet shards, step_XXXXXXX_rank_XXXX.npz "
                     "files or step_XXXXXXX/ folders of *.npz, rollout_is/step_XXXXXXX.npz, verl *.dp, slime *.pt "
                     "or SkyRL *_training_input.pkl files")


def _pad(rows: Sequence[np.ndarray], width: int, dtype: type) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def read_parquet_trajectories(path: str | os.PathLike[str]) -> Trajectories:
    """A ctpo_lab trajectory parquet (file or directory of shards)."""
    from ctpo_lab.llm import store

    p = Path(path)
    df = store.read_parquet(p)
    if len(df) == 0:
        raise ValueError(f"path: {p} holds no trajectories")
    missing = [c for c in ("group_id", "mask", "logp_behaviour", "logp_target", "advantage") if c not in df]
    if missing:
        raise ValueError(f"path: {p} lacks the column(s) {missing}")
    if df["logp_target"].isna().any():
        raise ValueError(f"path: {p} has rows without logp_target (a behaviour-only shard?); diagnose needs both "
                         "log-probabilities")
    try:
        mu = [np.asarray(v, dtype=np.float64) for v in df["logp_behaviour"]]
        pi = [np.asarray(v, dtype=np.float64) for v in df["logp_target"]]
        mk = [np.asarray(v, dtype=np.float64).astype(bool) for v in df["mask"]]
        adv = np.array(df["advantage"], dtype=np.float64)
        gid = np.array(df["group_id"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"path: {p} has a column of the wrong type ({e})") from None
    for i, (a, b, m) in enumerate(zip(mu, pi, mk)):
        if not (a.shape == b.shape == m.shape) or a.ndim != 1:
            raise ValueError(f"path: {p} row {i}: mask, logp_behaviour and logp_target have different lengths")
    width = max(1, max(len(a) for a in mu))
    mask = _pad(mk, width, bool)
    ell = _pad([b - a for a, b in zip(mu, pi)], width, np.float64)
    if not np.isfinite(ell[mask]).all():
        raise ValueError(f"path: {p} holds NaN or inf log-probabilities on valid tokens")
    if not np.isfinite(adv).all():
        raise ValueError(f"path: {p} holds NaN or inf advantages")
    ell = np.where(mask, ell, 0.0)
    kl = None
    if "kl" in df and not df["kl"].isna().any():
        kl = _pad([np.asarray(v, dtype=np.float64) for v in df["kl"]], width, np.float64)
        if not np.isfinite(kl[mask]).all():
            raise ValueError(f"path: {p} holds NaN or inf in the kl column on valid tokens")
    if not mask.any():
        raise ValueError(f"path: {p} has no valid token")
    return Trajectories(ell, mask, adv, gid, kl, "parquet")


def _per_token(L: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ℓ_t from L_t on the valid tokens (differences along each row's valid tokens)."""
    rows = np.nonzero(mask)[0]
    flat = L[mask]
    prev = np.concatenate([[0.0], flat[:-1]])
    first = np.concatenate([[True], rows[1:] != rows[:-1]])
    out = np.zeros_like(L, dtype=np.float64)
    out[mask] = flat - np.where(first, 0.0, prev)
    return out


def _file_log_ratio(d: dumps.RatioDump, f: Path, mode: str) -> tuple[np.ndarray, int]:
    """(ℓ [B, T], number of valid tokens at the cap) of one dump file."""
    m = d.mask
    if d.lossless:
        return _per_token(d.cum_log_ratio, m), 0
    lw = np.where(m, d.cum_log_ratio, 0.0)  # log of the stored weights
    capped = int((m & (lw >= dumps.MAX_LOG_WEIGHT - _CAP_TOL)).sum())
    lengths = m.sum(axis=1)
    spread = np.where(m, lw, np.nan)
    long_rows = lengths >= 2
    if long_rows.any():
        with np.errstate(all="ignore"):
            rng = np.nanmax(spread[long_rows], axis=1) - np.nanmin(spread[long_rows], axis=1)
        if mode != "vanilla" and (rng <= 1e-6).all() and (np.abs(lw) > 1e-6).any():
            raise ValueError(f"path: {f} holds one constant weight per response, as GSPO's sequence weight "
                             "e^{L_T/|y|}: L_t cannot be recovered from it (dump a token-level loss, or use "
                             "ctpo_lab's dumps, which store L_t)")
    if mode == "cumprod":
        return _per_token(lw, m), capped
    if mode == "geomean":
        t = np.cumsum(m, axis=1)
        return _per_token(np.where(m, t * lw, 0.0), m), capped
    return np.where(m, lw, 0.0), capped  # vanilla: log w = ℓ_t


def read_dump_trajectories(path: str | os.PathLike[str], *, steps: Sequence[int] | None = None,
                           dump_mode: str = "cumprod") -> Trajectories:
    """npz dumps (one file or a directory, both layouts), every step and rank pooled unless ``steps``."""
    if dump_mode not in DUMP_MODES:
        raise ValueError(f"dump_mode: expected one of {list(DUMP_MODES)}, got {dump_mode!r}")
    if dump_mode == "gspo":
        raise ValueError("dump_mode: GSPO dumps store e^{L_T/|y|} for every token, from which L_t cannot be "
                         "recovered; dump a token-level loss (cumprod, geomean, vanilla) or use ctpo_lab's dumps")
    p = Path(path)
    if p.is_file():
        if steps is not None:
            raise ValueError(f"steps: {p} is a single dump file; --steps selects steps of a dump directory")
        files = [p]
        step_of = {}
    else:
        available = dumps.list_steps(p)
        if not available:
            raise FileNotFoundError(f"path: no dump files under {p}")
        chosen = available if steps is None else [s for s in available if s in set(steps)]
        if not chosen:
            raise ValueError(f"steps: {sorted(set(steps or []))} selects none of the steps in {p} "
                             f"({available[0]}…{available[-1]}, {len(available)} steps)")
        files, step_of = [], {}
        for s in chosen:
            for f in dumps.step_files(p, s):
                files.append(f)
                step_of[f] = s
    ells, masks, advs, gids, n_capped, lossless_all = [], [], [], [], 0, True
    all_adv, all_gid, seen_steps = True, True, set()
    for i, f in enumerate(files):
        d = dumps.read_ratio_dump(f)
        ell, capped = _file_log_ratio(d, f, dump_mode)
        n_capped += capped
        lossless_all &= d.lossless
        step = step_of.get(f, d.step)
        seen_steps.add(int(step))
        ells.append(ell)
        masks.append(d.mask)
        if d.advantages is None:
            all_adv = False
        else:
            advs.append(d.advantages)
        if d.group_ids is None:
            all_gid = False
        else:  # global ids are shared by the files of a step; rank-local ones are not
            scope = np.full(d.group_ids.shape, -1 if d.group_ids_global else i, dtype=np.int64)
            gids.append(np.stack([np.full(d.group_ids.shape, step, dtype=np.int64), scope, d.group_ids], 1))
    width = max(m.shape[1] for m in masks)

    def stack(blocks: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.vstack([np.pad(b.astype(dtype), ((0, 0), (0, width - b.shape[1]))) for b in blocks])

    mask = stack(masks, bool)
    if not mask.any():
        raise ValueError(f"path: {p} has no valid token")
    ell = stack(ells, np.float64)
    if not np.isfinite(ell[mask]).all():
        raise ValueError(f"path: {p} holds NaN or inf log-ratios on valid tokens")
    adv = stack(advs, np.float64) if all_adv else None
    if adv is not None and not np.isfinite(adv[mask]).all():
        raise ValueError(f"path: {p} holds NaN or inf advantages on valid tokens")
    groups = np.unique(np.vstack(gids), axis=0, return_inverse=True)[1].reshape(-1) if all_gid else None
    n_valid = int(mask.sum())
    notes = []
    if not lossless_all:
        notes.append(f"weights-only dumps read in the {dump_mode!r} loss mode (L_t recovered from the stored "
                     "weights)")
    if n_capped:
        notes.append(f"lossy input: {n_capped} of {n_valid} valid tokens have a weight at the cap e^10, so their "
                     "log-ratio is underestimated")
    return Trajectories(ell, mask, adv, groups, None, "npz", sorted(seen_steps), n_capped > 0,
                        n_capped / n_valid, notes)


_READERS = {"rollout_is": frameworks.read_rollout_is, "verl": frameworks.read_verl_dataproto,
            "slime": frameworks.read_slime, "skyrl": frameworks.read_skyrl}

_CAP_OF = {"rollout_is": "the truncation threshold (algorithm.rollout_correction.rollout_is_threshold)"}


def read_framework_trajectories(path: str | os.PathLike[str], fmt: str, *,
                                steps: Sequence[int] | None = None) -> Trajectories:
    """The files of one framework format (a file or a directory), every step and rank pooled unless ``steps``."""
    p = Path(path)
    files = [p] if p.is_file() else _framework_files(p).get(fmt, [])
    if not files:
        raise FileNotFoundError(f"path: no {fmt} files under {p}")
    blocks = [_READERS[fmt](f) for f in files]
    available = sorted({b.step for b in blocks})
    if steps is not None:
        blocks = [b for b in blocks if b.step in set(steps)]
        if not blocks:
            raise ValueError(f"steps: {sorted(set(steps))} selects none of the steps in {p} ({available})")
    width = max(b.mask.shape[1] for b in blocks)

    def stack(arrs: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.vstack([np.pad(a.astype(dtype), ((0, 0), (0, width - a.shape[1]))) for a in arrs])

    mask = stack([b.mask for b in blocks], bool)
    if not mask.any():
        raise ValueError(f"path: {p} has no valid token")
    ell = stack([b.log_ratio for b in blocks], np.float64)
    if not np.isfinite(ell[mask]).all():
        raise ValueError(f"path: {p} holds NaN or inf log-probabilities on valid tokens")
    adv = None
    if all(b.advantages is not None for b in blocks):
        adv = stack([b.advantages if b.advantages.ndim == 2 else np.broadcast_to(b.advantages[:, None], b.mask.shape)
                     for b in blocks], np.float64)
        if not np.isfinite(adv[mask]).all():
            raise ValueError(f"path: {p} holds NaN or inf advantages on valid tokens")
    groups = None
    if all(b.group_keys is not None for b in blocks):  # a prompt key is one group within one step
        keys = [(b.step, k) for b in blocks for k in b.group_keys]  # type: ignore[union-attr]
        index: dict[object, int] = {}
        groups = np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)
    n_capped = sum(b.capped for b in blocks)
    n_valid = int(mask.sum())
    notes = []
    if fmt in ("rollout_is", "verl", "slime", "skyrl"):
        notes.append("ℓ = log π_old − log μ_rollout: the training engine's log-probs against the inference "
                     "engine's (the train/inference mismatch), not the policy update's ratio")
    if fmt == "rollout_is":
        notes.append("rollout-IS weights read as e^ℓ (token level); batch-normalised weights "
                     "(rollout_is_batch_normalize=True) would shift every ℓ by a constant")
    if n_capped:
        notes.append(f"lossy input: {n_capped} of {n_valid} valid tokens have a weight at "
                     f"{_CAP_OF.get(fmt, 'a cap')}, so their log-ratio is underestimated")
    return Trajectories(ell, mask, adv, groups, None, fmt, sorted({b.step for b in blocks if b.step >= 0}),
                        n_capped > 0, n_capped / n_valid, notes, _CAP_OF.get(fmt, "e^10"))


def read_trajectories(path: str | os.PathLike[str], *, steps: Sequence[int] | None = None,
                      dump_mode: str = "cumprod") -> Trajectories:
    """Detect the format of ``path`` and read it; every failure is a ``ValueError``/``FileNotFoundError`` whose
    message names the argument (``path``, ``steps`` or ``dump_mode``)."""
    fmt = detect_format(path)
    try:
        return _read(path, fmt, steps, dump_mode)
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        if msg.split(":")[0] in ("path", "steps", "dump_mode"):
            raise
        raise ValueError(f"path: {path} could not be read as {fmt} ({type(e).__name__}: {msg[:200]})") from None


def _read(path: str | os.PathLike[str], fmt: str, steps: Sequence[int] | None, dump_mode: str) -> Trajectories:
    if fmt == "parquet":
        if steps is not None:
            raise ValueError("steps: a trajectory parquet has no training steps; --steps applies to dumps")
        return read_parquet_trajectories(path)
    if fmt in FRAMEWORK_FORMATS:
        return read_framework_trajectories(path, fmt, steps=steps)
    tr = read_dump_trajectories(path, steps=steps, dump_mode=dump_mode)
    p = Path(path)
    if p.is_dir() and (p / "rollout_is").is_dir():
        tr.notes.append(f"{p / 'rollout_is'} holds the rollout-IS dumps (π_old against the inference engine): "
                        "diagnose that folder separately")
    return tr
