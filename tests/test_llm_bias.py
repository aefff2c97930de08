"""ctpo_lab.llm.directions / bias / bias_run: forward-mode projections, estimator weights, the reference
comparison, and an enumerable tiny model on which the exact expectations are known."""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from ctpo_lab import losses
from ctpo_lab.advantages import group_advantages
from ctpo_lab.llm import bias, bias_run, rollout
from ctpo_lab.llm.directions import ParameterDirections, select_parameters, token_directional_derivatives
from ctpo_lab.llm.models import tiny_random
from ctpo_lab.llm.prompts import arithmetic_prompts, render_prompts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_random(0)
    ids = render_prompts(tok, arithmetic_prompts(4, seed=0))
    batch = rollout.sample(model, ids, group_size=3, max_new_tokens=20, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, seed=0, prompts_per_chunk=4)
    return model, tok, batch


@pytest.mark.parametrize("spec,path", [("all", "generic"), ("last:2", "decoder"), ("*mlp*", "generic")])
def test_forward_mode_projections_equal_autograd(lm, spec, path):
    model, tok, b = lm
    dirs = ParameterDirections.for_model(model, 3, params=spec, seed=1)
    d = token_directional_derivatives(model, b.prompt_ids, b.tokens, b.mask, dirs, pad_token_id=tok.pad_token_id,
                                      rows_per_chunk=5, directions_per_pass=2, path=path)
    assert d.shape == (3, *b.tokens.shape) and torch.all(d[:, ~b.mask] == 0)
    c = torch.randn(b.tokens.shape, generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    lp = rollout.token_log_probs(model, b.prompt_ids, b.tokens, b.mask, pad_token_id=tok.pad_token_id).logp
    torch.where(b.mask, c * lp, 0.0).sum().backward()
    named = dict(model.named_parameters())
    tang = dirs.tangents(model, range(3))
    for k in range(3):
        auto = sum(float((named[n].grad * tang[n][k]).sum()) for n in dirs.names)
        fwd = float((c * d[k]).sum())
        assert fwd == pytest.approx(auto, rel=1e-4, abs=1e-4)
    model.zero_grad()


def test_directions_are_seeded_and_independent_of_chunking(lm):
    model, tok, b = lm
    dirs = ParameterDirections.for_model(model, 4, params="last", seed=5)
    before = model.config._attn_implementation
    t_all = dirs.tangents(model, range(4))
    t_one = dirs.tangents(model, [2])
    assert all(torch.equal(t_all[n][2], t_one[n][0]) for n in dirs.names)
    assert not torch.equal(t_all[dirs.names[0]][0], t_all[dirs.names[0]][1])
    d1 = token_directional_derivatives(model, b.prompt_ids, b.tokens, b.mask, dirs, pad_token_id=tok.pad_token_id,
                                       rows_per_chunk=12, directions_per_pass=4)
    d2 = token_directional_derivatives(model, b.prompt_ids, b.tokens, b.mask, dirs, pad_token_id=tok.pad_token_id,
                                       rows_per_chunk=5, directions_per_pass=1)
    assert torch.allclose(d1, d2, atol=1e-5)
    # the attention implementation is restored after the forward-mode pass
    assert model.config._attn_implementation == before


def test_parameter_selection_and_bad_input(lm):
    model, tok, b = lm
    assert select_parameters(model, "all") == tuple(n for n, _ in model.named_parameters())
    last = select_parameters(model, "last")
    assert all("layers.1." in n or n == "model.norm.weight" for n in last) and "model.norm.weight" in last
    with pytest.raises(ValueError, match="params"):
        select_parameters(model, "*nothing*")
    with pytest.raises(ValueError, match="params"):
        select_parameters(model, "last:x")
    with pytest.raises(ValueError, match="num_directions"):
        ParameterDirections(last, 0)
    dirs = ParameterDirections(("model.embed_tokens.weight",), 1)
    with pytest.raises(ValueError, match="decoder"):
        token_directional_derivatives(model, b.prompt_ids, b.tokens, b.mask, dirs, path="decoder")
    with pytest.raises(ValueError, match="prompt_ids"):
        token_directional_derivatives(model, b.prompt_ids[:2], b.tokens, b.mask, dirs)


def test_estimator_weights_closed_forms_and_clip_masks():
    g = torch.Generator().manual_seed(0)
    N, T = 6, 9
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3, 2:] = False
    lq = -torch.rand(N, T, generator=g)
    lp = lq + 0.15 * torch.randn(N, T, generator=g)
    adv = np.array([1.0, -0.5, 2.0, 0.3, -1.0, 0.0])
    ell = torch.where(mask, lp - lq, 0.0).double()
    L = ell.cumsum(-1)
    A = torch.tensor(adv)[:, None]
    expected = {"unclipped_token": ell.exp() * A, "unclipped_cumulative": L.exp() * A,
                "unclipped_sequence": L[:, -1:].exp() * A,
                "unclipped_sequence_geomean": (L[:, -1:] / mask.sum(-1, keepdim=True)).exp() * A}
    for name, want in expected.items():
        c, dropped = bias.estimator_token_weights(name, lp, lq, adv, mask)
        assert torch.allclose(c, torch.where(mask, want, 0.0), atol=1e-12)
        assert not dropped.any()
    # grpo: a token with A > 0 and r > 1.2 loses its gradient, one with r inside the window keeps r·A
    c, dropped = bias.estimator_token_weights("grpo", lp, lq, adv, mask)
    r = ell.exp()
    hi = mask & (r > 1.2) & (A > 0)
    inside = mask & (r > 0.8) & (r < 1.2)
    assert hi.any() and torch.all(c[hi] == 0) and torch.all(dropped[hi])
    assert torch.allclose(c[inside], (r * A.expand_as(r))[inside])
    # ctpo: the √t log window on L_t
    c, dropped = bias.estimator_token_weights("ctpo", lp, lq, adv, mask)
    t = mask.cumsum(-1).double()
    out_hi = mask & (L > 0.05 * t.sqrt()) & (A > 0)
    assert out_hi.any() and torch.all(c[out_hi] == 0)
    with pytest.raises(ValueError, match="estimator"):
        bias.estimator_token_weights("nope", lp, lq, adv, mask)
    with pytest.raises(ValueError, match="NaN"):
        bias.estimator_token_weights("unclipped_token", torch.where(mask, lp, lp).index_put_((torch.tensor([1]),
                                     torch.tensor([1])), torch.tensor(float("nan"))), lq, adv, mask)


def test_pi_equal_mu_every_estimator_is_the_on_policy_one(lm):
    model, tok, b = lm
    s = rollout.score(model, b)
    ell = torch.where(b.mask, s.logp - b.logp, 0.0)
    assert float(ell.abs().max()) < 1e-4  # every ratio is 1 (sampling and scoring agree)
    rewards = np.arange(len(b), dtype=float) % 3
    adv = group_advantages(rewards, b.group_id.numpy(), "grpo")
    dirs = ParameterDirections.for_model(model, 2, params="last", seed=0)
    d = token_directional_derivatives(model, b.prompt_ids, b.tokens, b.mask, dirs, pad_token_id=tok.pad_token_id)
    ref = bias.sequence_projections(torch.where(b.mask, torch.as_tensor(adv)[:, None], 0.0), d)
    for name in bias.ESTIMATORS:
        c, dropped = bias.estimator_token_weights(name, s.logp, b.logp, adv, b.mask)
        assert not dropped.any(), name
        x = bias.sequence_projections(c, d)
        assert np.allclose(x, ref, rtol=1e-3, atol=1e-3), name
    prof = bias.ratio_position_profile(ell, b.mask, b.group_id.numpy(), n_boot=50)
    assert np.allclose(prof["mean"], 1.0, atol=1e-3) and np.allclose(prof["ess"], 1.0, atol=1e-6)


def test_estimators_are_presets_or_loss_configs():
    assert bias.ESTIMATORS == ("unclipped_token", "unclipped_cumulative", "unclipped_sequence",
                               "unclipped_sequence_geomean", "grpo", "gspo", "ctpo", "ctpo_fixed")
    for name in bias.ESTIMATORS:
        cfg = bias.estimator_config(name)
        assert cfg == losses.resolve_config(name, aggregation="seq-mean-token-sum") and cfg.name == name
        assert bias.estimator_name(name) == name
    # a LossConfig is an estimator too, labelled by its name; overrides apply, the aggregation stays the token sum
    mine = losses.resolve_config("ctpo", name="ctpo_wide", eps_high=0.2, aggregation="token-mean")
    cfg = bias.estimator_config(mine)
    assert cfg.name == "ctpo_wide" and cfg.eps_high == 0.2 and cfg.aggregation == "seq-mean-token-sum"
    assert bias.estimator_config("gspo", eps_high=1e-3).eps_high == 1e-3
    with pytest.raises(ValueError, match="aggregation"):
        bias.estimator_config("grpo", aggregation="token-mean")
    with pytest.raises(ValueError, match="estimator"):
        bias.estimator_config("token")  # the old name of unclipped_token is no preset
    with pytest.raises(TypeError, match="preset"):
        bias.estimator_config(3)
    # a LossConfig gives the same weights as its preset name
    g = torch.Generator().manual_seed(1)
    lq = -torch.rand(4, 6, generator=g)
    lp = lq + 0.2 * torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    adv = np.array([1.0, -1.0, 0.5, 2.0])
    c1, d1 = bias.estimator_token_weights("ctpo", lp, lq, adv, mask)
    c2, d2 = bias.estimator_token_weights(losses.PRESETS["ctpo"], lp, lq, adv, mask)
    assert torch.equal(c1, c2) and torch.equal(d1, d2)


def test_ratio_position_profile_weight_families():
    g = torch.Generator().manual_seed(2)
    ell = 0.1 * torch.randn(8, 5, generator=g)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[0, 3:] = False
    prof = bias.ratio_position_profile(ell, mask, np.repeat(np.arange(4), 2), n_boot=0)
    assert list(dict.fromkeys(prof["weight"])) == ["cumulative", "token", "sequence_geomean"]
    L = torch.where(mask, ell, 0.0).double().cumsum(-1)
    row = prof[(prof["weight"] == "sequence_geomean") & (prof["position"] == 5)].iloc[0]
    lengths = mask.sum(-1).double()
    assert row["mean"] == pytest.approx(float((L[:, -1] / lengths).exp().mean()))


def _legacy_names(names):
    """The old names of the current ones (from the one rename map)."""
    inverse = {new: old for old, new in bias_run.LEGACY_NAMES["estimator"].items()}
    return tuple(inverse.get(n, n) for n in names)


def test_legacy_run_names_are_read_as_the_new_ones():
    old = _legacy_names(bias.ESTIMATORS)
    assert len(set(old)) == len(old) and old != bias.ESTIMATORS
    info = pd.DataFrame({"source": "stale_k1", "estimator": list(old), "x": range(8)})
    assert bias_run.is_legacy(info)
    new = bias_run.rename_legacy(info)
    assert tuple(new["estimator"]) == bias.ESTIMATORS and list(new["x"]) == list(range(8))
    # a folder of the current names is left alone (its gspo is the clipped preset)
    assert not bias_run.is_legacy(new)
    assert bias_run.rename_legacy(new).equals(new)
    assert bias_run.rename_legacy_key("stale_k1/gspo_clip", True) == "stale_k1/gspo"
    assert bias_run.rename_legacy_key("stale_k1/gspo", True) == "stale_k1/unclipped_sequence_geomean"
    assert bias_run.rename_legacy_key("stale_k1/gspo", False) == "stale_k1/gspo"
    assert bias_run.rename_legacy_key("stale_k1/reference", True) == "stale_k1/reference"
    prof = pd.DataFrame({"weight": ["cumulative", "token", "gspo"]})
    assert list(bias_run.rename_legacy(prof)["weight"]) == ["cumulative", "token", "sequence_geomean"]
    # a prediction read with a legacy table is renamed with it even if it held only shared names
    pred = pd.DataFrame({"estimator": ["grpo", "gspo"]})
    assert list(bias_run.rename_legacy(pred, True)["estimator"]) == ["grpo", "unclipped_sequence_geomean"]


def test_compare_to_reference_recovers_known_bias_and_flags_bad_input():
    rng = np.random.default_rng(0)
    P, K = 400, 64
    g = rng.normal(size=K)
    bias_vec = 0.5 * rng.normal(size=K)
    ref = g + rng.normal(size=(P, K))
    est = g + bias_vec + 2.0 * rng.normal(size=(P, K))
    res = bias.compare_to_reference(est, ref, batch_size=16, n_boot=400, seed=0)
    true_rel = np.linalg.norm(bias_vec) / np.linalg.norm(g)
    assert res.ci["rel_bias"][0] <= true_rel <= res.ci["rel_bias"][1]
    assert res.ci["var_ratio"][0] <= 4.0 <= res.ci["var_ratio"][1]
    assert res.values["rel_bias"] == pytest.approx(true_rel, rel=0.25)
    # identical distributions: the noise-corrected bias is small and its CI reaches 0
    same = bias.compare_to_reference(g + rng.normal(size=(P, K)), ref, n_boot=400, seed=1)
    assert same.ci["rel_bias"][0] == 0.0 and same.values["rel_bias"] < 0.1
    assert same.values["cosine"] == pytest.approx(1.0, abs=0.05)
    assert len(res.per_direction) == K and set(res.row()) >= {"rel_bias", "rel_bias_lo", "rel_bias_hi"}
    with pytest.raises(ValueError, match="shapes"):
        bias.compare_to_reference(est, ref[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        bad = est.copy()
        bad[0, 0] = np.inf
        bias.compare_to_reference(bad, ref)


# --------------------------------------------------------------------------- an enumerable tiny model
V, T_RESP = 4, 3


def _enumerable_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    # vocabulary of V tokens, no pad row; the EOS id V is outside the vocabulary: every response has 3 tokens
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=None,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    mu = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        mu.lm_head.weight *= 40.0  # peaked, non-uniform next-token distributions
    pi = copy.deepcopy(mu)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in [*pi.model.layers[0].mlp.parameters(), pi.lm_head.weight]:
            p.add_(0.6 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return mu, pi


def _reward(tokens: torch.Tensor) -> np.ndarray:
    t = tokens.numpy()
    return (t[:, 0] == t[:, 2]).astype(float) + 0.5 * (t[:, 1] == 0)


def test_sequence_estimator_is_unbiased_on_an_enumerable_model():
    mu, pi = _enumerable_pair()
    prompt = [1, 2]
    dirs = ParameterDirections.for_model(pi, 4, params="all", seed=0)
    # exact: all V^3 responses
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T_RESP)))
    full = torch.ones_like(seqs, dtype=torch.bool)
    lp_pi = rollout.token_log_probs(pi, [prompt] * len(seqs), seqs, full, pad_token_id=0).logp.detach().double()
    lp_mu = rollout.token_log_probs(mu, [prompt] * len(seqs), seqs, full, pad_token_id=0).logp.detach().double()
    p_pi, p_mu = lp_pi.sum(-1).exp(), lp_mu.sum(-1).exp()
    assert float(p_pi.sum()) == pytest.approx(1.0, abs=1e-5) and float(p_mu.sum()) == pytest.approx(1.0, abs=1e-5)
    rho = (lp_pi - lp_mu).cumsum(-1).exp()
    # stopped martingale: E_μ[ρ_{1:t}] = 1 for every t
    assert torch.allclose((p_mu[:, None] * rho).sum(0), torch.ones(T_RESP, dtype=torch.float64), atol=1e-5)
    d_all = token_directional_derivatives(pi, [prompt] * len(seqs), seqs, full, dirs, pad_token_id=0).double()
    R = torch.as_tensor(_reward(seqs))
    exact_grad = (p_pi * R)[None, :, None].mul(d_all).sum((1, 2))  # ∇J · v_k = Σ_y π(y) R(y) Σ_t d_t(y)
    # the same by autograd of J = Σ_y π(y) R(y) (an independent method)
    pi.zero_grad()
    J = (rollout.token_log_probs(pi, [prompt] * len(seqs), seqs, full, pad_token_id=0).logp.sum(-1).exp()
         * R.float()).sum()
    J.backward()
    named = dict(pi.named_parameters())
    tang = dirs.tangents(pi, range(4))
    auto = torch.tensor([sum(float((named[n].grad * tang[n][k]).sum()) for n in dirs.names) for k in range(4)])
    assert torch.allclose(exact_grad.float(), auto, rtol=1e-3, atol=1e-4)
    pi.zero_grad()
    # exact expectation of the token estimator with leave-one-out baselines: E[b] = J(μ)
    J_mu = float((p_mu * R).sum())
    r_tok = (lp_pi - lp_mu).exp()
    exact_token = (p_mu * (R - J_mu))[None, :, None].mul(r_tok[None] * d_all).sum((1, 2))

    # sampled: P prompt groups of G responses from μ and from π
    P, G = 300, 4
    kw = dict(group_size=G, max_new_tokens=T_RESP, eos_token_id=V, pad_token_id=0, prompts_per_chunk=100)
    mb = rollout.sample(mu, [prompt] * P, seed=11, **kw)
    pb = rollout.sample(pi, [prompt] * P, seed=12, **kw)
    assert bool(mb.mask.all()) and bool(pb.mask.all())
    lp_pi_on_mu = rollout.score(pi, mb).logp
    adv_mu = group_advantages(_reward(mb.tokens), mb.group_id.numpy(), "rloo")
    adv_pi = group_advantages(_reward(pb.tokens), pb.group_id.numpy(), "rloo")
    d_mu = token_directional_derivatives(pi, mb.prompt_ids, mb.tokens, mb.mask, dirs, pad_token_id=0)
    d_pi = token_directional_derivatives(pi, pb.prompt_ids, pb.tokens, pb.mask, dirs, pad_token_id=0)
    _, ref = bias.group_means(bias.sequence_projections(torch.as_tensor(adv_pi)[:, None].expand(-1, T_RESP)
                                                        .contiguous(), d_pi), pb.group_id.numpy())
    units = {}
    for name in ("unclipped_sequence", "unclipped_token"):
        c, _ = bias.estimator_token_weights(name, lp_pi_on_mu, mb.logp, adv_mu, mb.mask)
        _, units[name] = bias.group_means(bias.sequence_projections(c, d_mu), mb.group_id.numpy())
    seq = bias.compare_to_reference(units["unclipped_sequence"], ref, n_boot=500, seed=0)
    assert seq.ci["rel_bias"][0] == 0.0  # the CI of the sequence estimator's bias covers 0
    # each sampled mean agrees with its exact expectation within 4 standard errors, per direction
    se = lambda u: u.std(0, ddof=1) / np.sqrt(P)  # noqa: E731
    for u, exact in ((ref, exact_grad), (units["unclipped_sequence"], exact_grad),
                     (units["unclipped_token"], exact_token)):
        z = (u.mean(0) - exact.numpy()) / se(u)
        assert np.all(np.abs(z) < 4), z
    # the instance is off-policy enough for the token estimator's exact bias to be visible
    assert float(torch.linalg.norm(exact_token - exact_grad)) > 0.05 * float(torch.linalg.norm(exact_grad))
    prof = bias.ratio_position_profile(torch.where(mb.mask, lp_pi_on_mu - mb.logp, 0.0), mb.mask,
                                       mb.group_id.numpy(), positions=[1, 2, 3], n_boot=300)
    cum = prof[prof["weight"] == "cumulative"]
    assert np.all((cum["mean_lo"] <= 1.0) & (cum["mean_hi"] >= 1.0))


def test_bias_cli_end_to_end(tmp_path, capsys):
    from ctpo_lab.llm.__main__ import main

    out = tmp_path / "bias"
    args = ["bias", "--quick", "--out", str(out), "--eval-prompts", "4", "--train-prompts", "4", "--group-size", "2",
            "--max-new-tokens", "10", "--directions", "3", "--sources", "stale,dtype", "--k", "1",
            "--minibatches", "2", "--n-boot", "30", "--chain-seeds", "1", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    for f in ("table.csv", "table.md", "per_direction.csv", "ratio_profiles.csv", "prediction.csv",
              "projections.npz", "bias_variance.png", "bias_noise_variance.png", "ratio_profiles.png",
              "summary.json", "config.json", "estimator_info.csv", "sources.json"):
        assert (out / f).is_file(), f
    table = pd.read_csv(out / "table.csv")
    assert set(table["source"]) == {"dtype_bf16", "stale_k1"}
    assert list(dict.fromkeys(table["estimator"])) == list(bias.ESTIMATORS)
    pred = pd.read_csv(out / "prediction_summary.csv")  # the chain side measures the same presets
    assert list(dict.fromkeys(pred["estimator"])) == list(bias.ESTIMATORS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources"]["stale_k1"]["kl_per_token_exact"] > 0
    first = table.copy()
    capsys.readouterr()
    assert main(args) == 2  # user errors: one line, exit 2 (no SystemExit with status 1)
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0  # the same seed gives the same numbers
    again = pd.read_csv(out / "table.csv")
    assert np.allclose(first["rel_bias"].to_numpy(), again["rel_bias"].to_numpy(), equal_nan=True)
    # --reanalyze: the statistics again from the saved projections, no model (more bootstrap replicates)
    assert main(["bias", "--out", str(out), "--reanalyze", "--n-boot", "60", "--no-progress"]) == 0
    re_table = pd.read_csv(out / "table.csv")
    assert np.allclose(re_table["rel_bias"].to_numpy(), first["rel_bias"].to_numpy(), equal_nan=True)
    assert json.loads((out / "summary.json").read_text())["n_boot"] == 60
    # a folder written with the earlier estimator names: --reanalyze reads it and writes the current names
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    info = pd.read_csv(legacy / "estimator_info.csv")
    to_old = dict(zip(bias.ESTIMATORS, _legacy_names(bias.ESTIMATORS)))
    info["estimator"] = info["estimator"].map(to_old)
    info.to_csv(legacy / "estimator_info.csv", index=False)
    with np.load(legacy / "projections.npz") as z:
        arrays = {k.rsplit("/", 1)[0] + "/" + to_old.get(k.rsplit("/", 1)[1], k.rsplit("/", 1)[1]): z[k]
                  for k in z.files}
    np.savez_compressed(legacy / "projections.npz", **arrays)
    prof = pd.read_csv(legacy / "ratio_profiles.csv")
    prof["weight"] = prof["weight"].replace({"sequence_geomean": "gspo"})
    prof.to_csv(legacy / "ratio_profiles.csv", index=False)
    for f in ("table.csv", "prediction_summary.csv"):
        df = pd.read_csv(legacy / f)
        df["estimator"] = df["estimator"].map(to_old)
        df.to_csv(legacy / f, index=False)
    # the figures read it with the current names
    from ctpo_lab.figures import llm_bias_figs

    figs = tmp_path / "figs"
    llm_bias_figs.make(figs, quick=True, seed=0, cache=tmp_path / "cache", command="test", bias_run=legacy)
    shown = pd.read_csv(figs / "llm_bias_table.csv")
    assert list(dict.fromkeys(shown["estimator"])) == list(bias.ESTIMATORS)
    assert shown.loc[shown["estimator"] == "unclipped_sequence", "‖E(X − X_seq)‖² / tr Cov_ref (same μ samples)"
                     ].eq("0 (itself)").all()
    assert "chain: var ratio" in shown.columns and shown["chain: var ratio"].notna().all()
    assert (figs / "llm_ratio_profiles.png").is_file()
    assert main(["bias", "--out", str(legacy), "--reanalyze", "--n-boot", "60", "--no-progress"]) == 0
    leg_table = pd.read_csv(legacy / "table.csv")
    assert list(leg_table["estimator"]) == list(re_table["estimator"])
    assert np.allclose(leg_table["rel_bias"].to_numpy(), re_table["rel_bias"].to_numpy(), equal_nan=True)
    capsys.readouterr()
    for argv, match in ((["--out", str(tmp_path), "--reanalyze"], "lacks"),
                        (["--out", str(tmp_path / "x"), "--sources", "stale,bogus"], "--sources"),
                        (["--out", str(tmp_path / "x"), "--mu-temperature", "1"], "--mu-temperature")):
        assert main(["bias", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
