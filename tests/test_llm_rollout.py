"""ctpo_lab.llm.rollout and offpolicy on the tiny random Llama: sampling, scoring agreement, KL, stale updates."""

from __future__ import annotations

import pytest
import torch

from ctpo_lab.advantages import grpo_advantages
from ctpo_lab.llm import offpolicy, rollout
from ctpo_lab.llm.models import tiny_random
from ctpo_lab.llm.prompts import arithmetic_prompts, render_prompts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_random(0)
    ids = render_prompts(tok, arithmetic_prompts(4, seed=0))
    return model, tok, ids


def _sample(lm, **kw):
    model, tok, ids = lm
    args = dict(group_size=3, max_new_tokens=48, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                seed=0, prompts_per_chunk=2)
    args.update(kw)
    return rollout.sample(model, ids, **args)


def test_sample_shapes_masks_and_reproducibility(lm):
    b = _sample(lm)
    assert b.tokens.shape == b.mask.shape == b.logp.shape and len(b) == 12
    # valid tokens form a prefix; EOS ends a finished response
    assert torch.all(b.mask[:, 1:] <= b.mask[:, :-1])
    eos = lm[1].eos_token_id
    for i in range(len(b)):
        n = int(b.lengths[i])
        assert bool(b.finished[i]) == (int(b.tokens[i, n - 1]) == eos)
    assert torch.all(b.logp[b.mask] <= 0) and torch.all(b.logp[~b.mask] == 0)
    assert b.group_id.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    again = _sample(lm)
    assert torch.equal(again.tokens, b.tokens) and torch.equal(again.logp, b.logp)
    # a chunk sampled alone equals the same chunk of the full collection (resumable collections)
    part = _sample(lm, chunks=[1])
    assert torch.equal(part.tokens, b.tokens[6:, : part.tokens.shape[1]])
    assert not torch.equal(_sample(lm, seed=1).tokens[:, :5], b.tokens[:, :5])


def test_sampling_and_scoring_log_probs_agree(lm):
    model = lm[0]
    for tau in (1.0, 0.7):
        b = _sample(lm, temperature=tau)
        s = rollout.score(model, b, temperature=tau, rows_per_chunk=5)
        assert float(((s.logp - b.logp).abs() * b.mask).max()) <= 1e-4


def test_kv_cache_and_no_cache_give_the_same_samples(lm):
    a = _sample(lm, use_cache=True)
    b = _sample(lm, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert float((a.logp - b.logp).abs().max()) <= 1e-4


def test_hidden_states_and_exact_kl(lm, monkeypatch):
    model = lm[0]
    b = _sample(lm, keep_hidden=True)
    s = rollout.score(model, b, keep_hidden=True)
    assert float(((b.hidden - s.hidden).abs() * b.mask[..., None]).max()) <= 1e-4
    ref = rollout.reference_cache(model, b.hidden)
    same = rollout.score(model, b, reference=ref)
    assert float(same.kl.abs().max()) <= 1e-5
    hot = rollout.score(model, b, temperature=1.5, reference=ref)
    assert torch.all(hot.kl[b.mask] >= -1e-6) and float(hot.kl[b.mask].mean()) > 1e-3
    # the generic full-logits path gives the same log-probs
    monkeypatch.setattr(rollout, "_PLAIN_HEAD_TYPES", set())
    generic = rollout.score(model, b)
    assert float(((generic.logp - s.logp).abs() * b.mask).max()) <= 1e-5


def test_sample_bad_input(lm):
    model, tok, ids = lm
    with pytest.raises(ValueError, match="temperature"):
        _sample(lm, temperature=0.0)
    with pytest.raises(ValueError, match="group_size"):
        _sample(lm, group_size=0)
    with pytest.raises(ValueError, match="prompt_ids"):
        rollout.sample(model, [], group_size=1, max_new_tokens=4, eos_token_id=2, pad_token_id=0)


def test_minibatches():
    parts = offpolicy.split_minibatches([0, 0, 1, 1, 2, 2, 3, 3], 2, seed=0)
    assert sorted(int(i) for p in parts for i in p) == list(range(8)) and all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match="num_minibatches"):
        offpolicy.split_minibatches([0, 1], 3)


def test_stale_updates_move_the_policy(lm):
    model0, tok, _ = lm
    import copy

    model = copy.deepcopy(model0)
    b = _sample(lm)
    rewards = torch.tensor([1.0, 0.0, 0.0] * 4)
    adv = grpo_advantages(rewards, b.group_id)
    seen = []

    def on_update(k, m, rec):
        seen.append(k)
        assert rec.log_ratio.shape == rec.mask.shape

    cfg = offpolicy.StaleConfig(preset="grpo", lr=1e-3, num_minibatches=2)
    recs = offpolicy.stale_updates(model, b, adv, cfg, num_updates=3, on_update=on_update)
    assert seen == [1, 2, 3] and len(recs) == 3
    assert float(recs[0].log_ratio.abs().max()) <= 1e-4  # update 0 is on-policy
    after = rollout.score(model, b)
    assert float(((after.logp - b.logp).abs() * b.mask).max()) > 1e-3
    assert not model.training
    with pytest.raises(ValueError, match="advantages"):
        offpolicy.stale_updates(model, b, torch.zeros(len(b)), cfg, num_updates=1)
    with pytest.raises(ValueError, match="preset"):
        offpolicy.StaleConfig(preset="nope")
    assert next(offpolicy.bf16_copy(model).parameters()).dtype == torch.bfloat16
