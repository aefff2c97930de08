"""`python -m ctpo_lab.diagnose` on the files other frameworks write: the CTPO fork's rollout_is/ dumps, verl's
pickled DataProto, slime's --save-debug-train-data files and SkyRL's dump_data_batch pickles.

Each file is written the way its writer writes it (the same containers, keys, dtypes, serialisation and file
names; verl's tensordict and SkyRL's batch class are stood in for by classes that pickle to the same bytes
layout), from per-token log-ratios of known σ and drift that the diagnosis must recover."""

from __future__ import annotations

import io
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ctpo_lab.diagnose import readers
from ctpo_lab.diagnose.__main__ import main
from ctpo_lab.diagnose.pipeline import summarize

SIGMA = 0.05


def _walk(n: int, t: int, seed: int, sigma: float = SIGMA):
    """ℓ ~ N(−σ²/2, σ²), lengths in [t/2, t], groups of 4 prompts, advantages ±1, rollout log-probs μ < 0."""
    rng = np.random.default_rng(seed)
    ell = -0.5 * sigma**2 + sigma * rng.standard_normal((n, t))
    lengths = rng.integers(t // 2, t + 1, n)
    mask = np.arange(t)[None, :] < lengths[:, None]
    adv = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    mu = -2.0 * rng.random((n, t))
    return np.where(mask, ell, 0.0), mask, adv, np.arange(n) // 4, np.where(mask, mu, 0.0)


def _f32(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- writers
def write_rollout_is(d: Path, step: int, level: str = "token", threshold: float = 5.0, seed: int = 0,
                     n: int = 64, t: int = 120):
    """The fork's ray_trainer: compute_rollout_correction_weights, then np.savez_compressed(step_XXXXXXX.npz)."""
    ell, mask, _, _, _ = _walk(n, t, seed)
    lr = torch.as_tensor(ell)
    m = torch.as_tensor(mask, dtype=torch.float32)
    if level == "token":
        w = torch.exp(lr.clamp(-20, 20))
    else:
        w = torch.exp((lr * m).sum(-1, keepdim=True).clamp(-20, 20)).expand_as(lr)
    w = (w * m).clamp(max=threshold)
    out = d / "rollout_is"
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"step_{step:07d}.npz", rollout_is_weights=w.to(torch.float32).numpy(),
                        response_mask=m.to(torch.int8).numpy(), global_step=np.array([step], dtype=np.int64))
    return ell, mask


def _fake_modules(monkeypatch, name: str, **attrs):
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod = sys.modules.get(".".join(parts[:i])) if ".".join(parts[:i]) in sys.modules else None
        if mod is None or not getattr(mod, "_ctpo_fake", False):
            mod = types.ModuleType(".".join(parts[:i]))
            mod._ctpo_fake = True
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), mod)
    for k, v in attrs.items():
        v.__module__ = name
        v.__qualname__ = k
        setattr(sys.modules[name], k, v)


def _rebuild_tensordict_files_consolidated(metadata, storage):  # stands in for tensordict's (never called)
    raise AssertionError("the reader must not call tensordict")


class _ConsolidatedTD:
    """A TensorDict after ``.consolidate()``: one uint8 storage, leaves (dtype, shape, start, stop, pad) into it,
    pickled as tensordict does (``_rebuild_tensordict_files_consolidated(metadata, storage)``)."""

    def __init__(self, tensors: dict[str, torch.Tensor], batch: int):
        self.tensors, self.batch = tensors, batch

    def __reduce__(self):
        chunks, leaves, pos = [], {}, 0
        for k, v in self.tensors.items():
            b = v.contiguous().flatten().view(torch.uint8)
            pad = (-b.numel()) % 8
            chunks.append(torch.cat([b, torch.zeros(pad, dtype=torch.uint8)]))
            leaves[k] = (str(v.dtype), list(v.shape), pos, pos + b.numel() + pad, pad > 0)
            pos += b.numel() + pad
        meta = {"cls": "TensorDict", "non_tensors": {}, "leaves": leaves,
                "cls_metadata": {"device": None, "names": None, "batch_size": torch.Size([self.batch]),
                                 "is_locked": False}}
        return (sys.modules["tensordict._reductions"]._rebuild_tensordict_files_consolidated,
                (meta, torch.cat(chunks)))


class DataProto:
    """verl.protocol.DataProto's pickling: ``__getstate__`` = (torch.save bytes of the consolidated batch,
    non_tensor_batch, meta_info); ``save_to_disk`` = ``pickle.dump(self, f)``."""

    def __init__(self, tensors, non_tensors, meta):
        self.batch, self.non_tensor_batch, self.meta_info = tensors, non_tensors, meta

    def __getstate__(self):
        buf = io.BytesIO()
        torch.save(_ConsolidatedTD(self.batch, len(next(iter(self.batch.values())))), buf)
        return buf.getvalue(), self.non_tensor_batch, self.meta_info

    def save_to_disk(self, path):
        with open(path, "wb") as f:
            pickle.dump(self, f)


@pytest.fixture
def verl_classes(monkeypatch):
    _fake_modules(monkeypatch, "tensordict._reductions",
                  _rebuild_tensordict_files_consolidated=_rebuild_tensordict_files_consolidated)
    _fake_modules(monkeypatch, "verl.protocol", DataProto=DataProto)
    return DataProto


def write_verl(path: Path, *, seed: int = 0, n: int = 64, t: int = 120, old: bool = True):
    """A training batch (after compute_log_prob and the advantages) or, with ``old=False``, the rollout-skip
    cache's generation batch, saved with DataProto.save_to_disk."""
    ell, mask, adv, gid, mu = _walk(n, t, seed)
    tensors = {"responses": torch.zeros(n, t, dtype=torch.int64), "response_mask": torch.as_tensor(mask).long(),
               "rollout_log_probs": _f32(mu)}
    if old:
        tensors["old_log_probs"] = _f32(mu + ell)
        tensors["advantages"] = _f32(adv[:, None] * mask)
    uid = np.array([f"uid-{g}" for g in gid], dtype=object)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.modules["verl.protocol"].DataProto(tensors, {"uid": uid}, {"global_steps": 1}).save_to_disk(path)
    f32 = (_f32(mu + ell).double() - _f32(mu).double()).numpy()
    return np.where(mask, f32, 0.0), mask, gid


def write_slime(path: Path, rollout_id: int, *, seed: int = 0, n: int = 64, t: int = 120):
    """slime's train_dump_utils: torch.save(dict(rollout_id, rank, rollout_data)); rollout_data has per-sample
    lists (tokens = prompt + response, response-length log_probs / rollout_log_probs / loss_masks /
    advantages)."""
    ell, mask, adv, gid, mu = _walk(n, t, seed)
    lengths = mask.sum(1)
    rng = np.random.default_rng(seed + 7)
    prompts = {g: torch.as_tensor(rng.integers(1, 1000, 5 + g % 3)) for g in set(gid.tolist())}
    rd = {"tokens": [], "response_lengths": [], "total_lengths": [], "loss_masks": [], "log_probs": [],
          "rollout_log_probs": [], "advantages": [], "rewards": [], "sample_indices": []}
    for i in range(n):
        r = int(lengths[i])
        toks = torch.cat([prompts[int(gid[i])], torch.as_tensor(rng.integers(1, 1000, r))])
        rd["tokens"].append(toks)
        rd["response_lengths"].append(r)
        rd["total_lengths"].append(len(toks))
        rd["loss_masks"].append(torch.ones(r, dtype=torch.int32))
        rd["log_probs"].append(_f32(mu[i, :r] + ell[i, :r]))
        rd["rollout_log_probs"].append(_f32(mu[i, :r]))
        rd["advantages"].append(torch.full((r,), float(adv[i])))
        rd["rewards"].append(float(adv[i] > 0))
        rd["sample_indices"].append(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(rollout_id=rollout_id, rank=0, rollout_data=rd), path)
    f32 = (_f32(mu + ell).double() - _f32(mu).double()).numpy()
    return np.where(mask, f32, 0.0), mask, gid


class TrainingInputBatch(dict):
    """skyrl_train.training_batch.TrainingInputBatch's pickling (TensorBatch.__getstate__: every field as its
    own torch.save bytes, plus batch_size, device and metadata)."""

    metadata = None

    def __getstate__(self):
        batch_dict = {}
        for key, value in self.items():
            buf = io.BytesIO()
            torch.save(value, buf)
            batch_dict[key] = buf.getvalue()
        return {"batch_dict": batch_dict, "batch_size": len(self["loss_mask"]), "device": torch.device("cpu"),
                "metadata": self.metadata}


@pytest.fixture
def skyrl_classes(monkeypatch):
    _fake_modules(monkeypatch, "skyrl_train.training_batch", TrainingInputBatch=TrainingInputBatch)
    return TrainingInputBatch


def write_skyrl(root: Path, step: int, *, seed: int = 0, n: int = 64, t: int = 120, rollout: bool = True):
    """RayPPOTrainer.dump_data: pickle.dump(batch) to export_path/dumped_data/global_step_N_training_input.pkl;
    sequences = left-padded prompt + response, response-length masks and log-probs."""
    ell, mask, adv, gid, mu = _walk(n, t, seed)
    rng = np.random.default_rng(seed + 3)
    p = 6
    plen = {g: 3 + g % 4 for g in set(gid.tolist())}
    ptok = {g: rng.integers(1, 1000, plen[g]) for g in plen}
    seq = np.zeros((n, p + t), dtype=np.int64)
    att = np.zeros((n, p + t), dtype=np.int64)
    for i in range(n):
        g = int(gid[i])
        seq[i, p - plen[g]:p] = ptok[g]
        att[i, p - plen[g]:p] = 1
        seq[i, p:] = np.where(mask[i], rng.integers(1, 1000, t), 0)
        att[i, p:] = mask[i]
    cls = sys.modules["skyrl_train.training_batch"].TrainingInputBatch
    batch = cls({"sequences": torch.as_tensor(seq), "attention_mask": torch.as_tensor(att),
                 "response_mask": torch.as_tensor(mask).long(), "loss_mask": torch.as_tensor(mask).long(),
                 "action_log_probs": _f32(mu + ell), "base_action_log_probs": _f32(mu),
                 "rollout_logprobs": _f32(mu) if rollout else None, "advantages": _f32(adv[:, None] * mask),
                 "values": None})
    batch.metadata = {"global_step": step}
    out = root / "dumped_data" / f"global_step_{step}_training_input.pkl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        pickle.dump(batch, f)
    f32 = (_f32(mu + ell).double() - _f32(mu).double()).numpy()
    return np.where(mask, f32, 0.0), mask, gid


# ------------------------------------------------------------------------------------------------- readers
def _same_groups(got: np.ndarray, truth: np.ndarray) -> bool:
    """The partitions into groups are equal (ids may differ)."""
    pairs = set(zip(got.tolist(), truth.tolist()))
    return len(pairs) == len(set(got.tolist())) == len(set(truth.tolist()))


def test_rollout_is_token_level_round_trip(tmp_path):
    ell, mask = write_rollout_is(tmp_path / "iw", 10, threshold=1e9)
    tr = readers.read_trajectories(tmp_path / "iw" / "rollout_is")
    assert tr.format == "rollout_is" and tr.steps == [10] and not tr.lossy and tr.advantages is None
    np.testing.assert_array_equal(tr.mask, mask)
    np.testing.assert_allclose(tr.log_ratio, ell, atol=1e-6)
    assert readers.detect_format(tmp_path / "iw" / "rollout_is" / "step_0000010.npz") == "rollout_is"


def test_rollout_is_truncation_is_lossy_and_sequence_level_refused(tmp_path):
    ell, mask = write_rollout_is(tmp_path / "a", 1, threshold=float(np.exp(SIGMA)))  # ~16% of tokens truncated
    tr = readers.read_trajectories(tmp_path / "a" / "rollout_is")
    truncated = int((mask & (ell >= SIGMA)).sum())
    assert tr.lossy and abs(tr.capped_fraction * mask.sum() - truncated) <= 1
    assert any("lossy" in n for n in tr.notes) and "threshold" in tr.cap
    write_rollout_is(tmp_path / "b", 1, level="sequence")
    with pytest.raises(ValueError, match="sequence-level"):
        readers.read_trajectories(tmp_path / "b" / "rollout_is")


def test_fork_folder_with_rollout_is_subfolder_reads_the_pg_dumps(tmp_path):
    from ctpo_lab import dumps

    ell, mask, adv, gid, _ = _walk(16, 60, 0)
    dumps.write_ratio_dump(tmp_path, np.cumsum(ell, 1), mask, step=10, advantages=adv)
    write_rollout_is(tmp_path, 10, n=16, t=60)
    tr = readers.read_trajectories(tmp_path)
    assert tr.format == "npz" and any("rollout_is" in n for n in tr.notes)


def test_verl_dataproto_round_trip(tmp_path, verl_classes):
    ell, mask, gid = write_verl(tmp_path / "dump" / "genstep_000003" / "batch.dp")
    tr = readers.read_trajectories(tmp_path / "dump")
    assert tr.format == "verl" and tr.steps == [3]
    np.testing.assert_array_equal(tr.mask, mask)
    np.testing.assert_allclose(tr.log_ratio, ell, atol=1e-12)
    assert tr.advantages is not None and _same_groups(tr.groups, gid)


def test_verl_generation_batch_is_refused_with_what_to_dump(tmp_path, verl_classes):
    write_verl(tmp_path / "genstep_000001" / "gen_batch.dp", old=False)
    with pytest.raises(ValueError, match="CTPO_LAB_VERL_DUMP"):
        readers.read_trajectories(tmp_path / "genstep_000001" / "gen_batch.dp")


def test_verl_real_dataproto_when_installed(tmp_path):
    protocol = pytest.importorskip("verl.protocol")
    ell, mask, adv, gid, mu = _walk(12, 20, 0)
    protocol.DataProto.from_dict(
        tensors={"response_mask": torch.as_tensor(mask).long(), "rollout_log_probs": _f32(mu),
                 "old_log_probs": _f32(mu + ell), "advantages": _f32(adv[:, None] * mask)},
        non_tensors={"uid": np.array([str(g) for g in gid], dtype=object)}).save_to_disk(tmp_path / "b.dp")
    tr = readers.read_trajectories(tmp_path / "b.dp")
    np.testing.assert_allclose(tr.log_ratio, ell, atol=1e-5)
    assert _same_groups(tr.groups, gid)


def test_a_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "x.dp").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="builtins.print"):
        readers.read_trajectories(tmp_path / "x.dp")


def test_slime_round_trip_steps_pooled_and_selected(tmp_path):
    truth = [write_slime(tmp_path / f"train_{r}_0.pt", r, seed=r) for r in (4, 5)]
    tr = readers.read_trajectories(tmp_path)
    assert tr.format == "slime" and tr.steps == [4, 5]
    width = tr.mask.shape[1]
    pad = [np.pad(e, ((0, 0), (0, width - e.shape[1]))) for e, _, _ in truth]
    np.testing.assert_allclose(tr.log_ratio, np.vstack(pad), atol=1e-12)
    gid = np.concatenate([g + 1000 * k for k, (_, _, g) in enumerate(truth)])
    assert _same_groups(tr.groups, gid)  # groups rebuilt from the prompt tokens, distinct per step
    one = readers.read_trajectories(tmp_path, steps=[5])
    assert one.steps == [5] and one.mask.shape[0] == truth[1][1].shape[0]


def test_skyrl_round_trip(tmp_path, skyrl_classes):
    ell, mask, gid = write_skyrl(tmp_path, 8)
    tr = readers.read_trajectories(tmp_path)
    assert tr.format == "skyrl" and tr.steps == [8]
    np.testing.assert_allclose(tr.log_ratio, ell, atol=1e-12)
    np.testing.assert_array_equal(tr.mask, mask)
    assert tr.advantages is not None and _same_groups(tr.groups, gid)


def test_skyrl_without_rollout_logprobs_refused(tmp_path, skyrl_classes):
    write_skyrl(tmp_path, 1, rollout=False)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        readers.read_trajectories(tmp_path)


@pytest.mark.parametrize("fmt", ["rollout_is", "verl", "slime", "skyrl"])
def test_known_sigma_and_drift_recovered(tmp_path, fmt, verl_classes, skyrl_classes):
    n, t = 160, 150
    if fmt == "rollout_is":
        write_rollout_is(tmp_path, 1, threshold=1e9, n=n, t=t, seed=1)
        path = tmp_path / "rollout_is"
    elif fmt == "verl":
        write_verl(tmp_path / "1" / "batch.dp", n=n, t=t, seed=1)
        path = tmp_path
    elif fmt == "slime":
        write_slime(tmp_path / "train_1.pt", 1, n=n, t=t, seed=1)
        path = tmp_path
    else:
        write_skyrl(tmp_path, 1, n=n, t=t, seed=1)
        path = tmp_path
    tr = readers.read_trajectories(path)
    assert tr.format == fmt
    s = summarize(tr, n_boot=100, chain_seeds=0)
    assert s["sigma_hat_ci"][0] <= SIGMA <= s["sigma_hat_ci"][1], s["sigma_hat_ci"]
    se = SIGMA / np.sqrt(tr.mask.sum())
    assert abs(s["drift_per_token"] + SIGMA**2 / 2) < 4 * se


# ------------------------------------------------------------------------------------------------- the command
def test_cli_slime_end_to_end(tmp_path, capsys):
    write_slime(tmp_path / "dump" / "train_3_0.pt", 3, n=48, t=100)
    rc = main([str(tmp_path / "dump"), "--out", str(tmp_path / "rep"), "--n-boot", "20", "--chain-seeds", "0"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["format"] == "slime" and s["steps"] == [3] and s["num_sequences"] == 48


def _bad(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    write_slime(d / "mixed" / "train_1.pt", 1, n=8, t=20)
    write_rollout_is(d / "mixed", 1, n=8, t=20)
    (d / "mixed" / "rollout_is" / "step_0000001.npz").rename(d / "mixed" / "step_0000001.npz")
    write_rollout_is(d / "seq", 1, level="sequence", n=8, t=20)
    torch.save({"something": torch.zeros(3)}, d / "notslime.pt")
    torch.save(dict(rollout_id=1, rank=0, rollout_data={"log_probs": [torch.zeros(3)],
                                                        "rollout_log_probs": [torch.zeros(3)],
                                                        "response_lengths": [4]}), d / "badlen.pt")
    np.savez(d / "step_0000002.npz", rollout_is_weights=np.ones((2, 3), np.float32))
    (d / "x.pkl").write_bytes(pickle.dumps({"a": 1}))
    torch.save(dict(rollout_id=1, rank=0, rollout_data={"log_probs": [[0.1, 0.2]], "rollout_log_probs": [[0.1, 0.2]],
                                                        "response_lengths": [2]}), d / "lists.pt")  # not tensors
    np.savez(d / "step_0000003.npz", rollout_is_weights=np.array([["a", "b"]]), response_mask=np.ones((1, 2), np.int8))
    (d / "genstep_000001").mkdir()
    one = {"log_probs": [torch.zeros(2)], "rollout_log_probs": [torch.zeros(2)], "loss_masks": [torch.ones(2)]}
    torch.save(dict(rollout_id=1, rank=0, rollout_data={**one, "response_lengths": [10**12]}),
               d / "hugelen.pt")  # a length no sample has: refused before a [1, 10^12] array is allocated
    torch.save(dict(rollout_id=1, rank=0, rollout_data={**one, "response_lengths": [2], "tokens": [torch.arange(6)],
                                                        "total_lengths": [1]}), d / "badtotal.pt")
    return d


@pytest.mark.parametrize("argv, name", [
    (["mixed"], "path"),
    (["seq/rollout_is"], "path"),
    (["notslime.pt"], "path"),
    (["badlen.pt"], "path"),
    (["step_0000002.npz"], "path"),
    (["x.pkl"], "path"),
    (["genstep_000001"], "path"),
    (["lists.pt"], "path"),
    (["step_0000003.npz"], "path"),
    (["seq/rollout_is", "--steps", "9"], "path"),
    (["hugelen.pt"], "path"),
    (["badtotal.pt"], "path"),
])
def test_cli_bad_framework_inputs(tmp_path, capsys, argv, name):
    d = _bad(tmp_path)
    rc = main([str(d / argv[0]), *argv[1:], "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}"), lines
    assert not (tmp_path / "rep").exists()
