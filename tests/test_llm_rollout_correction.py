"""ctpo_lab.llm.bias / bias_run with three policies: a bf16 sampler μ of π_old (``rollout_log_prob``), π_old's
float32 scoring (``old_log_prob``) and the current π; estimator weights with a rollout correction."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ctpo_lab import losses
from ctpo_lab.llm import bias, bias_run, offpolicy, rollout
from ctpo_lab.llm.models import tiny_random
from ctpo_lab.llm.prompts import arithmetic_prompts, render_prompts
from ctpo_lab.rollout_correction import ROLLOUT_CORRECTIONS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def three():
    """μ = π_old in bf16 samples; π_old scores in float32; π = π_old with perturbed weights."""
    model, tok = tiny_random(0)
    ids = render_prompts(tok, arithmetic_prompts(4, seed=0))
    sampler = offpolicy.bf16_copy(model)
    b = rollout.sample(sampler, ids, group_size=3, max_new_tokens=16, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, seed=0, prompts_per_chunk=4)
    old = rollout.score(model, b).logp
    g = torch.Generator().manual_seed(1)
    pi = {n: p + 0.02 * torch.randn(p.shape, generator=g) for n, p in model.state_dict().items()}
    model_pi = tiny_random(0)[0]
    model_pi.load_state_dict(pi)
    logp = rollout.score(model_pi, b).logp
    adv = torch.randn(len(b), generator=g, dtype=torch.float64)
    return b, old, logp, adv


def test_bf16_sampler_log_probs_differ_slightly_from_float32_scoring(three):
    b, old, logp, _ = three
    d = (old - b.logp)[b.mask]
    assert torch.isfinite(d).all()
    assert (d != 0).float().mean() > 0.5  # rollout_log_prob ≠ old_log_prob on most tokens
    assert float(d.abs().max()) < 0.1 and float(d.abs().mean()) < 0.02  # … by a small amount (bf16 rounding)
    assert float((logp - old)[b.mask].abs().mean()) > float(d.abs().mean())  # π moved further than the bf16 gap


@pytest.mark.parametrize("estimator", list(bias.ESTIMATORS))
def test_no_correction_equals_the_two_policy_weights(three, estimator):
    b, old, logp, adv = three
    c2, d2 = bias.estimator_token_weights(estimator, logp, old, adv, b.mask)
    for corr in ("none", None, "disabled", ROLLOUT_CORRECTIONS["disabled"]):
        c3, d3 = bias.estimator_token_weights(estimator, logp, old, adv, b.mask, rollout_log_prob=b.logp,
                                              rollout_correction=corr)
        assert torch.allclose(c3, c2, rtol=1e-12, atol=1e-14), corr
        assert torch.equal(d3, d2)


@pytest.mark.parametrize("corr", ["decoupled_token_is", "decoupled_seq_is", "decoupled_token_icepop",
                                  "decoupled_geo_rs", "cumulative_sqrt_t", "bypass_pg_is", "areal_decoupled"])
@pytest.mark.parametrize("estimator", ["unclipped_token", "grpo", "ctpo"])
def test_correction_weights_are_minus_the_loss_gradient(three, estimator, corr):
    b, old, logp, adv = three
    c, dropped = bias.estimator_token_weights(estimator, logp, old, adv, b.mask, rollout_log_prob=b.logp,
                                              rollout_correction=corr)
    lp = logp.double().requires_grad_(True)
    loss, _ = losses.policy_loss(lp, old.double(), adv, b.mask, estimator, aggregation="seq-mean-token-sum",
                                 rollout_log_prob=b.logp.double(), rollout_correction=corr)
    (grad,) = torch.autograd.grad(loss, lp)
    expect = torch.where(b.mask, -grad * len(b), 0.0)
    assert torch.allclose(c, expect, rtol=1e-10, atol=1e-12)
    assert not dropped[~b.mask].any()


def test_token_is_weights_closed_form(three):
    """unclipped_token with verl's token TIS: c = r_t · min(π_old/μ, 2) · A (r_t = π/π_old)."""
    b, old, logp, adv = three
    c, _ = bias.estimator_token_weights("unclipped_token", logp, old, adv, b.mask, rollout_log_prob=b.logp,
                                        rollout_correction="decoupled_token_is")
    w = (old.double() - b.logp.double()).exp().clamp(max=2.0)
    expect = torch.where(b.mask, (logp.double() - old.double()).exp() * w * adv[:, None], 0.0)
    assert torch.allclose(c, expect, rtol=1e-10, atol=1e-12)
    two = bias.estimator_token_weights("unclipped_token", logp, old, adv, b.mask)[0]
    assert not torch.allclose(c, two)  # the correction changes the weights


def test_correction_names_and_bad_input(three):
    b, old, logp, adv = three
    assert bias.correction_name(None) == bias.correction_name("none") == "none"
    assert bias.correction_name("decoupled_seq_is") == "decoupled_seq_is"
    with pytest.raises(ValueError, match="rollout_correction"):
        bias.correction_name("bogus")
    with pytest.raises(ValueError, match="rollout_log_prob"):
        bias.estimator_token_weights("grpo", logp, old, adv, b.mask, rollout_correction="decoupled_token_is")
    assert bias_run.projection_key("s", "grpo") == bias_run.projection_key("s", "grpo", "none") == "s/grpo"
    assert bias_run.projection_key("s", "grpo", float("nan")) == "s/grpo"
    assert bias_run.projection_key("s", "grpo", "decoupled_seq_is") == "s/grpo@decoupled_seq_is"


def test_bf16_sampler_cli_end_to_end(tmp_path, capsys):
    from ctpo_lab.llm.__main__ import main

    out = tmp_path / "three"
    corrs = ["none", "disabled", "decoupled_token_is", "cumulative_sqrt_t"]
    args = ["bias", "--quick", "--out", str(out), "--eval-prompts", "4", "--train-prompts", "4", "--group-size", "2",
            "--max-new-tokens", "10", "--directions", "3", "--sources", "stale,bf16_sampler", "--k", "1",
            "--minibatches", "2", "--n-boot", "30", "--chain-seeds", "1", "--threads", "1", "--no-progress",
            "--estimators", "unclipped_token,grpo,ctpo", "--rollout-corrections", ",".join(corrs[1:])]
    assert main(args) == 0
    assert (out / "rollout_corrections.png").is_file()
    table = pd.read_csv(out / "table.csv")
    ests = ["unclipped_sequence", "unclipped_token", "grpo", "ctpo"]
    stale = table[table["source"] == "stale_k1"]
    assert list(stale["estimator"]) == ests and stale["rollout_correction"].isna().all()
    three_rows = table[table["source"] == "bf16_sampler_k1"]
    assert len(three_rows) == len(ests) * len(corrs)  # none is always measured
    assert set(three_rows["rollout_correction"]) == set(corrs)
    with np.load(out / "projections.npz") as z:
        for est in ests:  # the correction "disabled" is the two-policy loss against π_old
            assert np.allclose(z[f"bf16_sampler_k1/{est}"], z[f"bf16_sampler_k1/{est}@disabled"], rtol=1e-10)
        assert "bf16_sampler_k1/paired" in z.files
    src = json.loads((out / "sources.json").read_text())["bf16_sampler_k1"]
    assert 0 < src["kl_rollout_old"] < 1e-3 < src["kl_old_pi"]  # bf16 vs float32: a small mismatch
    assert src["kl_rollout_old_exact"] == src["kl_rollout_old"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["three_policy"]["bf16_sampler_k1"]["kl_rollout_old"] == src["kl_rollout_old"]
    pred = pd.read_csv(out / "prediction_summary.csv")
    assert set(pred["source"]) == {"stale_k1"}  # the two-policy chain does not represent π_old ≠ μ
    md = (out / "table.md").read_text()
    assert "rollout correction" in md and "cumulative_sqrt_t" in md
    # --reanalyze reads the three-policy folder back and gives the same numbers
    assert main(["bias", "--out", str(out), "--reanalyze", "--n-boot", "30", "--no-progress"]) == 0
    again = pd.read_csv(out / "table.csv")
    assert list(again["rollout_correction"].fillna("")) == list(table["rollout_correction"].fillna(""))
    assert np.allclose(again["bias_to_noise"], table["bias_to_noise"], equal_nan=True)
    capsys.readouterr()
    for argv, match in ((["--rollout-corrections", "none,bogus"], "--rollout-corrections"),
                        (["--rollout-corrections", ","], "--rollout-corrections"),
                        (["--sources", "bf16"], "--sources")):
        assert main(["bias", "--out", str(tmp_path / "x"), "--quick", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not (tmp_path / "x").exists()
