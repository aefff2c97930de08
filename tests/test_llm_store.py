"""Parquet trajectories (round trip, shards, overwrite protection) and the authors' npz dumps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo_lab import dumps
from ctpo_lab.llm import rollout, store
from ctpo_lab.llm.models import tiny_random
from ctpo_lab.llm.prompts import arithmetic_prompts, render_prompts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def batch():
    model, tok = tiny_random(0)
    prompts = arithmetic_prompts(3, seed=0)
    ids = render_prompts(tok, prompts)
    b = rollout.sample(model, ids, group_size=2, max_new_tokens=24, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, seed=0)
    return b, prompts, tok


def test_parquet_round_trip(batch, tmp_path):
    b, prompts, tok = batch
    rewards = np.arange(len(b), dtype=float)
    adv = rewards - rewards.mean()
    target = b.logp - 0.01
    kl = torch.full_like(b.logp, 0.001) * b.mask
    df = store.batch_to_frame(b, prompt_ids=[p.id for p in prompts], rewards=rewards, advantages=adv,
                              texts=["x"] * len(b), logp_target=target, kl=kl, target="t")
    path = store.write_parquet(tmp_path / "t.parquet", df)
    back = store.read_parquet(path)
    assert list(back.columns) == [f.name for f in store.SCHEMA]
    assert back["prompt_id"].tolist() == [prompts[i].id for i in b.prompt_index.tolist()]
    assert back["sample_index"].tolist() == [0, 1] * 3
    b2 = store.frame_to_batch(back, pad_token_id=tok.pad_token_id, temperature=1.0)
    assert torch.equal(b2.tokens, b.tokens) and torch.equal(b2.mask, b.mask)
    assert torch.equal(b2.logp, b.logp) and b2.prompt_ids == b.prompt_ids
    lt = store.padded(back["logp_target"])
    assert np.allclose(lt, (target * b.mask).numpy(), atol=1e-7)
    assert np.allclose(back["advantage"], adv)
    with pytest.raises(FileExistsError, match="exists"):
        store.write_parquet(path, df)
    store.write_parquet(path, df, overwrite=True)


def test_shards_are_resumable(batch, tmp_path):
    b, prompts, _ = batch
    ids = [p.id for p in prompts]
    for c in (0, 2):
        part = b.subset([2 * c, 2 * c + 1]) if c < 3 else b
        df = store.batch_to_frame(part, prompt_ids=ids, rewards=[0, 1], advantages=[-1, 1], chunk=c)
        store.write_shard(tmp_path, c, df)
    (tmp_path / "shard_00001.parquet.tmp").write_text("partial")  # an interrupted write leaves no shard
    assert store.done_chunks(tmp_path) == {0, 2}
    assert store.read_shards(tmp_path)["chunk"].tolist() == [0, 0, 2, 2]
    with pytest.raises(FileNotFoundError):
        store.read_parquet(tmp_path / "nope")


def test_ratio_dump_round_trip_and_authors_layout(tmp_path):
    rng = np.random.default_rng(0)
    L = np.cumsum(0.05 * rng.standard_normal((4, 9)), 1)
    L[0, 3] = 12.0  # above the authors' cap of 10: only the lossless key keeps it
    mask = np.ones((4, 9), dtype=bool)
    mask[1, 6:] = False
    p = dumps.write_ratio_dump(tmp_path, L, mask, step=7, rank=1, advantages=np.array([1.0, -1, 0, 2]),
                               group_ids=np.array([0, 0, 1, 1]))
    assert p.name == "step_0000007_rank_0001.npz"
    with np.load(p) as z:
        assert {"pg_update_is_weights", "response_mask", "global_step", "rank"} <= set(z.files)
        assert z["pg_update_is_weights"].dtype == np.float32 and z["response_mask"].dtype == np.int8
        assert z["pg_update_is_weights"][1, 7] == 0.0
        assert z["pg_update_is_weights"][0, 3] == pytest.approx(np.exp(10.0), rel=1e-6)
    d = dumps.read_ratio_dump(p)
    assert d.step == 7 and d.rank == 1 and d.lossless
    assert np.allclose(d.cum_log_ratio[mask], L[mask], atol=1e-5)
    assert d.advantages[0].tolist() == [1.0] * 9
    with pytest.raises(FileExistsError):
        dumps.write_ratio_dump(tmp_path, L, mask, step=7, rank=1)
    # an authors' file (no lossless key) is read back through log(weights)
    np.savez(tmp_path / "step_0000007_rank_0000.npz", pg_update_is_weights=np.exp(L[:2, :5]).astype(np.float32),
             response_mask=np.ones((2, 5), np.int8), global_step=np.array([7]), rank=np.array([0]))
    assert dumps.list_steps(tmp_path) == [7]
    merged = dumps.read_step(tmp_path, 7)
    assert merged.mask.shape == (6, 9) and not merged.lossless and merged.rank == -1
    assert np.allclose(merged.cum_log_ratio[:2, :5], L[:2, :5], atol=1e-5)
    bad = L.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="cum_log_ratio"):
        dumps.write_ratio_dump(tmp_path / "x.npz", bad, mask, step=0)
    with pytest.raises(ValueError, match="step"):
        dumps.dump_filename(-1)
    with pytest.raises(FileNotFoundError):
        dumps.read_step(tmp_path, 3)
