"""KV-cache sampling with recorded log-probs, teacher-forced log-probs and GRPO advantages."""

import pytest
import torch

from ctpo_lab.train.loop import derived_seed, grpo_advantages
from ctpo_lab.train.policy import TinyLlamaSpec, build_tiny_llama
from ctpo_lab.train.rollout import left_pad, response_log_probs, sample
from ctpo_lab.train.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = CharTokenizer()
    model = build_tiny_llama(
        TinyLlamaSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok.vocab_size, seed=0
    ).eval()
    return model, tok


def _prompts(tok):
    return [tok.encode(s, add_bos=True) for s in ("1+2=", "37+45=", "9=", "38+5:K")]


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_log_probs_match_teacher_forcing_with_left_padding(tiny, temperature, lean):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    batch = sample(
        model,
        _prompts(tok),
        max_new_tokens=12,
        temperature=temperature,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=g,
        lean=lean,
    )
    assert batch.response_ids.shape == batch.log_probs.shape == batch.response_mask.shape
    with torch.no_grad():
        lp, ent = response_log_probs(model, batch, temperature, with_entropy=True)
    m = batch.response_mask
    torch.testing.assert_close(lp[m], batch.log_probs[m], atol=2e-5, rtol=0)
    torch.testing.assert_close(batch.entropy[m], ent[m], atol=2e-5, rtol=0)  # the sampler's entropy
    assert (batch.entropy[~m] == 0).all() and batch.select(torch.tensor([1, 0])).entropy.shape[0] == 2
    assert (ent[m] > 0).all() and (lp[~m] == 0).all() and (batch.log_probs[~m] == 0).all()
    assert (batch.log_probs[m] <= 0).all()


def test_lean_decoder_matches_transformers_decoding_with_gqa():
    from ctpo_lab.llm.models import load_model
    from ctpo_lab.train.rollout import lean_decoding_supported

    lm = load_model("tiny-random")  # GQA: 4 query heads, 2 key/value heads
    assert lean_decoding_supported(lm.model)
    prompts = [lm.tokenizer("What is 2+3?")["input_ids"], lm.tokenizer("Hi")["input_ids"]]
    kw = dict(
        max_new_tokens=10,
        temperature=0.0,
        eos_token_id=lm.tokenizer.eos_token_id,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    a = sample(lm.model, prompts, lean=True, **kw)
    b = sample(lm.model, prompts, lean=False, **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=2e-5, rtol=0)


def test_sampling_is_seeded_and_stops_at_eos(tiny):
    model, tok = tiny
    kw = dict(
        max_new_tokens=20, temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    a = sample(model, _prompts(tok), generator=torch.Generator().manual_seed(3), **kw)
    b = sample(model, _prompts(tok), generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.log_probs, b.log_probs)
    for row, m, fin in zip(a.response_ids, a.response_mask, a.finished):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # valid tokens form a prefix
        if fin:
            assert row[n - 1] == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
        else:
            assert n == 20
    greedy = sample(
        model,
        _prompts(tok),
        max_new_tokens=5,
        temperature=0.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert greedy.response_ids.shape[0] == 4


def test_sample_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, _prompts(tok), max_new_tokens=0, temperature=1.0, eos_token_id=2, pad_token_id=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, _prompts(tok), max_new_tokens=3, temperature=-1.0, eos_token_id=2, pad_token_id=0)
    with pytest.raises(ValueError, match="prompts"):
        left_pad([], 0, torch.device("cpu"))


def test_grpo_advantages_known_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as verl
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-6))
    assert (adv[4:] == 0).all()
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.ones(6), 4)


def test_derived_seed_is_stable_and_distinct():
    assert derived_seed(0, 1, 0) == derived_seed(0, 1, 0)
    assert len({derived_seed(s, t, p) for s in range(3) for t in range(3) for p in range(3)}) == 27
    assert 0 <= derived_seed(2**31, 10**6, 3) < 2**63
