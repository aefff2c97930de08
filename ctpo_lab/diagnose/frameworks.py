"""Readers of the token-level files other RL frameworks write, for ``python -m ctpo_lab.diagnose``.

Every reader returns a list of :class:`Block` (one per file): per-token log-ratios ℓ_t = log π − log μ of the
valid tokens, the mask, the advantages and prompt-group keys when the file has them, and how many valid tokens
sit at a cap (lossy weights).  :mod:`ctpo_lab.diagnose.readers` detects the format and pools the blocks.

``rollout_is``  the CTPO authors' verl fork, ``importance_weights/rollout_is/step_XXXXXXX.npz``
                (``rollout_is_weights`` float32 [B, T], ``response_mask`` int8, ``global_step`` int64[1]), written
                when ``algorithm.rollout_correction`` is on.  The weight is π_old/π_rollout: e^{ℓ_t} clamped to
                e^{±20} and truncated at ``rollout_is_threshold`` (token level, read: ℓ_t = log w, the truncated
                tokens flagged as lossy), or e^{Σℓ} broadcast over the response (sequence level: L_t cannot be
                recovered, refused).
``verl``        a pickled verl ``DataProto`` (``*.dp``: ``DataProto.save_to_disk``, e.g. the rollout-skip cache
                ``genstep_XXXXXX/gen_batch.dp``).  ℓ = ``old_log_probs`` − ``rollout_log_probs`` (the training
                engine against the inference engine); a generation batch holds only ``rollout_log_probs`` and is
                refused with what to dump instead.  Groups from ``non_tensor_batch["uid"]``.
``slime``       ``--save-debug-train-data PATH`` files (``torch.save({"rollout_id", "rank", "rollout_data"})``,
                ``rollout_data`` a dict of per-sample lists): ℓ = ``log_probs`` − ``rollout_log_probs`` on the
                response tokens, ``loss_masks`` the mask, ``advantages`` per token, groups from the prompt tokens.
``skyrl``       ``trainer.dump_data_batch=true`` pickles ``dumped_data/global_step_N_training_input.pkl`` (a
                ``TrainingInputBatch``): ℓ = ``action_log_probs`` − ``rollout_logprobs``, mask ``loss_mask``,
                ``advantages`` per token, groups rebuilt from the prompt tokens of ``sequences``.

The pickles are read with a restricted unpickler: only tensors, arrays, containers and the frameworks' batch
classes are rebuilt (as plain data), so no code from the file runs and neither verl, tensordict nor SkyRL has
to be installed.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Block", "read_rollout_is", "read_verl_dataproto", "read_slime", "read_skyrl", "rollout_is_step",
           "skyrl_step", "verl_step"]


@dataclass
class Block:
    """One file's trajectories.

    log_ratio : float64 [B, T] (0 off the mask); mask : bool [B, T]; advantages : float64 [B] or [B, T] or None;
    group_keys : list of B hashable prompt keys or None; step : int (−1 unknown); capped : valid tokens at a cap.
    """

    log_ratio: np.ndarray
    mask: np.ndarray
    advantages: np.ndarray | None
    group_keys: list[Hashable] | None
    step: int
    capped: int = 0


# ------------------------------------------------------------------------------------- restricted unpickling
class _Record:
    """A framework object rebuilt as data: ``state`` (what ``__setstate__`` got), ``items`` (dict items)."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict items of a dict subclass (not used)
        self.__dict__.setdefault("items", {})[key] = value


def _safe_torch_load(data: bytes, extra: dict[str, Callable[..., Any]] | None = None) -> Any:
    """``torch.load(weights_only=True)`` of bytes, with ``extra`` {"module.name": callable} allowed."""
    buf = io.BytesIO(data)
    if not extra:
        return torch.load(buf, weights_only=True, map_location="cpu")
    with torch.serialization.safe_globals([(fn, name) for name, fn in extra.items()]):
        return torch.load(buf, weights_only=True, map_location="cpu")


def _storage_from_bytes(data: bytes) -> Any:
    return _safe_torch_load(data)


_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric", "numpy.dtypes")
_NUMPY_NAMES = ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer") + tuple(
    f"{k}DType" for k in ("Object", "Str", "Bytes", "Bool", "Int64", "Int32", "Float64", "Float32", "Int8",
                          "UInt8", "Int16", "Float16"))
_TORCH_UTILS = ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter")


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: Any, records: dict[tuple[str, str], type]) -> None:
        super().__init__(f)
        self._records = records

    def find_class(self, module: str, name: str) -> Any:
        cls = self._records.get((module, name))
        if cls is not None:
            return cls
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _storage_from_bytes
        if module == "torch._utils" and name in _TORCH_UTILS:
            return getattr(torch._utils, name)
        if module == "torch" and (name.endswith("Storage") or name in ("device", "Size", "Tensor")
                                  or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex", "range"):
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(f"the file references {module}.{name}, which is not a data type this reader "
                                     "rebuilds")


def _unpickle(path: Path, records: dict[tuple[str, str], type]) -> Any:
    try:
        with open(path, "rb") as f:
            return _Unpickler(f, records).load()
    except Exception as e:  # any failure to rebuild the data means "not a file of this kind"
        raise ValueError(f"path: {path} is not a readable pickle of the expected kind ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None


def _np(x: Any, what: str, path: Path) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64 if x.is_floating_point() else torch.int64).numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"path: {path}: {what} is a {type(x).__name__}, expected a tensor")


def _groups_from_prompts(prompts: list[np.ndarray]) -> list[Hashable]:
    """One key per row: rows with the same prompt tokens are one group."""
    return [np.asarray(p, dtype=np.int64).tobytes() for p in prompts]


def _check_shapes(path: Path, **arrays: np.ndarray) -> None:
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or next(iter(shapes.values())).__len__() != 2:
        raise ValueError(f"path: {path}: expected equal [B, T] shapes, got {shapes}")


# ------------------------------------------------------------------------------------- the fork's rollout_is/
_ROLLOUT_IS_NAME = re.compile(r"^step_(\d+)\.npz$")


def rollout_is_step(path: Path) -> int | None:
    """The step of a ``step_XXXXXXX.npz`` rollout-IS dump name, else None."""
    m = _ROLLOUT_IS_NAME.match(path.name)
    return int(m.group(1)) if m else None


def read_rollout_is(path: Path) -> Block:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, zlib.error, a bad header: all mean "unreadable"
        raise ValueError(f"path: {path} is not a readable npz file ({type(e).__name__})") from None
    for key in ("rollout_is_weights", "response_mask"):
        if key not in arrays:
            raise ValueError(f"path: {path} has no {key!r} array (keys: {sorted(arrays)})")
    try:
        w = arrays["rollout_is_weights"].astype(np.float64)
        m = arrays["response_mask"].astype(np.int64).astype(bool)
    except (TypeError, ValueError):
        raise ValueError(f"path: {path}: rollout_is_weights and response_mask must be numeric arrays (got "
                         f"{arrays['rollout_is_weights'].dtype}, {arrays['response_mask'].dtype})") from None
    _check_shapes(path, rollout_is_weights=w, response_mask=m)
    if not (np.isfinite(w[m]).all() and (w[m] > 0).all()):
        raise ValueError(f"path: {path} holds NaN/inf or non-positive weights on valid tokens")
    lw = np.where(m, np.log(np.where(m, w, 1.0)), 0.0)
    lengths = m.sum(axis=1)
    long_rows = lengths >= 2
    if long_rows.any():
        spread = np.where(m, lw, np.nan)[long_rows]
        rng = np.nanmax(spread, axis=1) - np.nanmin(spread, axis=1)
        if (rng == 0).all() and (np.abs(lw[m]) > 0).any():
            raise ValueError(f"path: {path} holds sequence-level rollout-IS weights (one weight e^(Σℓ) per response, "
                             "truncated): the per-token log-ratios cannot be recovered; run with "
                             "algorithm.rollout_correction.rollout_is=token, or use ctpo_lab's verl plugin dumps")
    # truncation at rollout_is_threshold: several valid tokens tied exactly at the largest weight (> 1)
    top = w[m].max()
    capped = int((w[m] == top).sum()) if top > 1 and (w[m] == top).sum() >= 2 else 0
    step_arr = arrays.get("global_step")
    step = int(step_arr.reshape(-1)[0]) if step_arr is not None and step_arr.size else (rollout_is_step(path) or -1)
    return Block(lw, m, None, None, step, capped)


# ------------------------------------------------------------------------------------- verl DataProto (*.dp)
class _DataProto(_Record):
    pass


_TD_DTYPES = {f"torch.{n}": getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16", "int64",
                                                         "int32", "int16", "int8", "uint8", "bool")}


def _rebuild_consolidated(metadata: dict[str, Any], storage: Any) -> dict[str, Any]:
    """tensordict's consolidated layout: leaves {key: (dtype, shape, start, stop, pad)} of one byte storage."""
    if not isinstance(metadata, dict) or "leaves" not in metadata:
        raise ValueError("tensordict metadata without 'leaves'")
    flat = storage if isinstance(storage, torch.Tensor) else torch.tensor([], dtype=torch.uint8).set_(storage)
    out: dict[str, Any] = {}
    for key, (dtype, shape, start, stop, pad) in metadata["leaves"].items():
        if dtype not in _TD_DTYPES:
            raise ValueError(f"tensordict leaf {key!r} of dtype {dtype}")
        value = flat[start:stop].view(_TD_DTYPES[dtype])
        n = int(np.prod(shape)) if len(shape) else 1
        out[key] = value[:n].view(tuple(shape)).clone() if pad else value.view(tuple(shape)).clone()
    for key, sub in metadata.items():
        if key not in ("leaves", "non_tensors", "cls", "cls_metadata", "size") and isinstance(sub, dict):
            out[key] = _rebuild_consolidated(sub, storage)
    return out


_TD_REBUILD = {"tensordict._reductions._rebuild_tensordict_files_consolidated": _rebuild_consolidated}


def verl_step(path: Path) -> int:
    """Step of a rollout-skip cache file: ``genstep_000012/gen_batch.dp`` or ``12/gen_batch.dp``; −1 unknown."""
    m = re.match(r"^(?:genstep_)?(\d+)$", path.parent.name)
    return int(m.group(1)) if m else -1


def read_verl_dataproto(path: Path) -> Block:
    obj = _unpickle(path, {("verl.protocol", "DataProto"): _DataProto})
    if not isinstance(obj, _DataProto) or not isinstance(obj.state, tuple) or len(obj.state) != 3:
        raise ValueError(f"path: {path} is not a pickled verl DataProto")
    batch_bytes, non_tensor, _meta = obj.state
    if not isinstance(batch_bytes, (bytes, bytearray)):
        raise ValueError(f"path: {path}: the DataProto batch is not in torch's serialisation (saved with "
                         "VERL_DATAPROTO_SERIALIZATION_METHOD=numpy?); re-save it with the default method")
    try:
        batch = _safe_torch_load(bytes(batch_bytes), _TD_REBUILD)
    except Exception as e:
        raise ValueError(f"path: {path}: the DataProto batch is not a consolidated TensorDict this reader knows "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"path: {path}: the DataProto batch is not a TensorDict")
    if "rollout_log_probs" not in batch:
        raise ValueError(f"path: {path} has no rollout_log_probs (keys: {sorted(batch)}); set "
                         "actor_rollout_ref.rollout.calculate_log_probs=True")
    if "old_log_probs" not in batch:
        raise ValueError(f"path: {path} holds only the rollout log-probs (a generation batch, keys: {sorted(batch)}); "
                         "a ratio needs the trainer's log-probs too: run with ctpo_lab's verl plugin and "
                         "CTPO_LAB_VERL_DUMP=DIR (it stores log_prob, old_log_prob and rollout_log_prob), or save "
                         "the training batch after compute_log_prob")
    old = _np(batch["old_log_probs"], "old_log_probs", path).astype(np.float64)
    mu = _np(batch["rollout_log_probs"], "rollout_log_probs", path).astype(np.float64)
    if "response_mask" in batch:
        m = _np(batch["response_mask"], "response_mask", path).astype(bool)
    elif "attention_mask" in batch:
        m = _np(batch["attention_mask"], "attention_mask", path)[:, -old.shape[1]:].astype(bool)
    else:
        raise ValueError(f"path: {path} has neither response_mask nor attention_mask")
    _check_shapes(path, old_log_probs=old, rollout_log_probs=mu, response_mask=m)
    adv = _np(batch["advantages"], "advantages", path).astype(np.float64) if "advantages" in batch else None
    keys = None
    uid = non_tensor.get("uid") if isinstance(non_tensor, dict) else None
    if uid is not None and len(uid) == m.shape[0]:
        keys = [str(u) for u in uid]
    elif "prompts" in batch:
        keys = _groups_from_prompts(list(_np(batch["prompts"], "prompts", path)))
    return Block(np.where(m, old - mu, 0.0), m, adv, keys, verl_step(path))


# ------------------------------------------------------------------------------------- slime (*.pt)
def read_slime(path: Path) -> Block:
    try:
        obj = _safe_torch_load(path.read_bytes())
    except Exception as e:
        raise ValueError(f"path: {path} is not a readable torch file of plain data ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict) or "rollout_data" not in obj:
        raise ValueError(f"path: {path} is not a slime --save-debug-train-data file (no 'rollout_data')")
    rd = obj["rollout_data"]
    for key in ("log_probs", "rollout_log_probs", "response_lengths"):
        if key not in rd or rd[key] is None:
            raise ValueError(f"path: {path}: rollout_data has no {key!r} (keys: {sorted(rd)})"
                             + ("; slime records the rollout log-probs with --use-rollout-logprobs or --use-tis"
                                if key == "rollout_log_probs" else ""))
    n = len(rd["log_probs"])
    lengths = [int(x) for x in rd["response_lengths"]]
    if len(rd["rollout_log_probs"]) != n or len(lengths) != n:
        raise ValueError(f"path: {path}: log_probs, rollout_log_probs and response_lengths differ in length")
    samples = []  # every sample checked before the [n, max length] arrays are allocated
    for i in range(n):
        pi = _np(rd["log_probs"][i], "log_probs", path).reshape(-1).astype(np.float64)
        mu = _np(rd["rollout_log_probs"][i], "rollout_log_probs", path).reshape(-1).astype(np.float64)
        r = lengths[i]
        lm = (_np(rd["loss_masks"][i], "loss_masks", path).reshape(-1).astype(bool) if rd.get("loss_masks") is not None
              else np.ones(len(pi), dtype=bool))
        if not (len(pi) == len(mu) == len(lm) == r):
            raise ValueError(f"path: {path}: sample {i}: log_probs ({len(pi)}), rollout_log_probs ({len(mu)}) and "
                             f"loss_masks ({len(lm)}) must all have response_length {r} (context parallelism "
                             "slices them: dump with --context-parallel-size 1)")
        samples.append((pi, mu, lm))
    width = max([1, *lengths])
    ell = np.zeros((n, width))
    mask = np.zeros((n, width), dtype=bool)
    adv = np.zeros((n, width)) if rd.get("advantages") is not None else None
    prompts = []
    for i, (pi, mu, lm) in enumerate(samples):
        r = lengths[i]
        ell[i, :r] = np.where(lm, pi - mu, 0.0)
        mask[i, :r] = lm
        if adv is not None:
            a = _np(rd["advantages"][i], "advantages", path).reshape(-1).astype(np.float64)
            adv[i, :len(a[:r])] = a[:r]
        if rd.get("tokens") is not None and rd.get("total_lengths") is not None:
            tok = _np(rd["tokens"][i], "tokens", path).reshape(-1)
            total = int(rd["total_lengths"][i])
            if not r <= total <= len(tok):
                raise ValueError(f"path: {path}: sample {i}: total_lengths {total} must lie between its "
                                 f"response_length {r} and its number of tokens {len(tok)}")
            prompts.append(tok[: total - r])
    keys = _groups_from_prompts(prompts) if len(prompts) == n else None
    step = int(obj.get("rollout_id", -1))
    return Block(ell, mask, adv, keys, step)


# ------------------------------------------------------------------------------------- SkyRL (*.pkl)
class _TensorBatch(_Record):
    pass


_SKYRL_NAME = re.compile(r"global_step_(\d+)_training_input\.pkl$")


def skyrl_step(path: Path) -> int:
    m = _SKYRL_NAME.search(path.name)
    return int(m.group(1)) if m else -1


class _SkyrlRecords(dict):
    """Any ``skyrl*`` module's ``*Batch`` class is a :class:`_TensorBatch`."""

    def get(self, key: tuple[str, str], default: Any = None) -> Any:
        module, name = key
        if module.split(".")[0].startswith("skyrl") and name.endswith("Batch"):
            return _TensorBatch
        return default


def read_skyrl(path: Path) -> Block:
    obj = _unpickle(path, _SkyrlRecords())
    if not isinstance(obj, _TensorBatch) or not isinstance(obj.state, dict) or "batch_dict" not in obj.state:
        raise ValueError(f"path: {path} is not a pickled SkyRL TrainingInputBatch")
    data: dict[str, Any] = {}
    for key, raw in obj.state["batch_dict"].items():
        try:
            data[key] = _safe_torch_load(raw) if isinstance(raw, (bytes, bytearray)) else raw
        except Exception as e:
            raise ValueError(f"path: {path}: field {key!r} is unreadable ({type(e).__name__})") from None
    present = sorted(k for k in data if data[k] is not None)
    for key in ("action_log_probs", "rollout_logprobs"):
        if data.get(key) is None:
            raise ValueError(f"path: {path}: the batch has no {key!r} (fields: {present})"
                             + ("; SkyRL keeps the inference engine's log-probs when they are requested "
                                "(generator.sampling_params.logprobs, e.g. for TIS)" if key == "rollout_logprobs"
                                else ""))
    pi = _np(data["action_log_probs"], "action_log_probs", path).astype(np.float64)
    mu = _np(data["rollout_logprobs"], "rollout_logprobs", path).astype(np.float64)
    mkey = "loss_mask" if data.get("loss_mask") is not None else "response_mask"
    if data.get(mkey) is None:
        raise ValueError(f"path: {path}: the batch has neither loss_mask nor response_mask")
    m = _np(data[mkey], mkey, path).astype(bool)
    _check_shapes(path, action_log_probs=pi, rollout_logprobs=mu, **{mkey: m})
    adv = _np(data["advantages"], "advantages", path).astype(np.float64) if data.get("advantages") is not None else None
    keys = None
    seq = data.get("sequences")
    if seq is not None:
        s = _np(seq, "sequences", path)
        if s.ndim == 2 and s.shape[1] > m.shape[1]:
            prompt = s[:, : s.shape[1] - m.shape[1]]
            att = data.get("attention_mask")
            if att is not None:
                prompt = np.where(_np(att, "attention_mask", path)[:, : prompt.shape[1]].astype(bool), prompt, -1)
            keys = _groups_from_prompts(list(prompt))
    return Block(np.where(m, pi - mu, 0.0), m, adv, keys, skyrl_step(path))
