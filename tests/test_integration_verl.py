"""ctpo_lab's presets inside the real verl (``pip install -e ".[verl]"``; skipped where verl is not installed).

* importing verl alone populates its policy-loss registry with ``ctpo_lab.<preset>`` for every preset;
* each mode, called as verl's actor calls a policy loss with verl's real ``ActorConfig``, equals
  ``ctpo_lab.losses.policy_loss`` (value, gradient, metrics) on random batches with masked holes, and honours
  ``rollout_is_weights``, the global-batch scaling and the ``policy_loss.ctpo_lab`` overrides;
* one update through verl's FSDP engine ``train_batch`` (micro-batching, global token scaling, verl's
  ``ppo_loss``, gradient clipping, optimizer step) on a tiny Llama changes the weights, logs the metrics and
  accumulates the gradient of ctpo_lab's full-batch loss.  The engine runs with an unwrapped module and its
  device helpers pointed at the CPU: on a machine without an accelerator verl selects its CUDA platform, the
  engine is registered for cuda/npu only and moves every micro-batch to ``get_device_id()`` (a CUDA index);
* the dumps (``CTPO_LAB_VERL_DUMP``) from that update and from the loss calls, read by ``python -m
  ctpo_lab.llm fit``;
* the README's verl command composes with verl's own Hydra config (``ppo_trainer.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from ctpo_lab import dumps
from ctpo_lab.integrations.verl import FIXED_AGGREGATION_RULES
from ctpo_lab.losses import PRESETS, aggregate, compute_policy_loss, policy_loss

ROOT = Path(__file__).resolve().parents[1]


def test_module_imports_without_verl():
    """The base install (no verl) imports the plugin module; it registers nothing."""
    code = ("import sys; sys.modules['verl'] = None\n"
            "import ctpo_lab.integrations.verl as v\n"
            "assert v.CtpoLabPolicyLossConfig is None\n"
            "print(v.mode_name('ctpo'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ctpo_lab.ctpo"


@pytest.fixture(scope="module")
def verl_env():
    if os.environ.get("CTPO_LAB_REQUIRE_VERL"):  # CI's verl environment: a missing verl is a failure
        import verl  # noqa: F401
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.ppo import core_algos
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    from ctpo_lab.integrations import verl as plugin

    return core_algos, FSDPActorConfig, PolicyLossConfig, plugin


def _actor_config(verl_env, loss_mode: str, loss_agg_mode: str = "token-mean", overrides: dict | None = None):
    _, FSDPActorConfig, PolicyLossConfig, plugin = verl_env
    if overrides is None:
        policy = PolicyLossConfig(loss_mode=loss_mode)
    else:
        policy = plugin.CtpoLabPolicyLossConfig(loss_mode=loss_mode, ctpo_lab=overrides)
    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, policy_loss=policy,
                           loss_agg_mode=loss_agg_mode)


def _batch(seed: int, B: int = 6, T: int = 23, scale: float = 0.08):
    """Random log-probs with off-policy noise, per-token advantages, and a mask with holes (tool output)
    and right padding; one fully masked row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = (old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T) + 0.1 * torch.randn(
        B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = False
    mask &= torch.rand(B, T, generator=g) > 0.2  # holes
    mask[-1] = False
    return old, lp, adv, mask


def _call(fn, old, lp, adv, mask, cfg, weights=None):
    return fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=cfg.loss_agg_mode,
              config=cfg, rollout_is_weights=weights)


def test_importing_verl_alone_registers_every_preset(verl_env):
    from importlib.metadata import entry_points

    assert any(ep.value == "ctpo_lab.integrations.verl" for ep in entry_points(group="verl.plugins"))
    code = ("import verl; from verl.trainer.ppo import core_algos as c, import json; "
            "print(json.dumps([k for k in c.POLICY_LOSS_REGISTRY if k.startswith('ctpo_lab.')]))").replace(
        "c, import json;", "c; import json;")
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto"})
    assert res.returncode == 0, res.stderr[-3000:]
    modes = json.loads(res.stdout.strip().splitlines()[-1])
    assert modes == [f"ctpo_lab.{k}" for k in PRESETS]


_VERL_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_equals_policy_loss(verl_env, preset):
    core_algos, *_ = verl_env
    fn = core_algos.get_policy_loss_fn(f"ctpo_lab.{preset}")
    own = PRESETS[preset].aggregation
    # verl's loss_agg_mode replaces the preset's aggregation (TRL's all-row means are not verl modes), except for
    # the rules whose aggregation verl fixes itself
    agg = own if own in _VERL_MODES else "token-mean"
    fixed = PRESETS[preset].clip in FIXED_AGGREGATION_RULES
    cfg = _actor_config(verl_env, f"ctpo_lab.{preset}", loss_agg_mode=agg)
    for seed in range(3):
        old, lp, adv, mask = _batch(seed, scale=0.02 + 0.1 * seed)
        torch.manual_seed(seed)  # clip_cov draws its tokens from the global generator
        loss, metrics = _call(fn, old, lp, adv, mask, cfg)
        (grad,) = torch.autograd.grad(loss, lp)
        torch.manual_seed(seed)
        ref, ref_metrics = policy_loss(lp, old, adv, mask, preset=preset, **({} if fixed else {"aggregation": agg}))
        (ref_grad,) = torch.autograd.grad(ref, lp)
        # verl's seq-mean-token-mean divides each row by (count + 1e-8), ctpo_lab by max(count, 1)
        rtol = 1e-7 if agg == "seq-mean-token-mean" else 1e-12
        torch.testing.assert_close(loss, ref, rtol=rtol, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-12)
        assert not grad[~mask].any()
        ref_metrics.pop("actor/pg_loss")
        assert set(metrics) == set(ref_metrics)
        assert {"actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"} <= set(metrics)
        assert all(isinstance(v, float) for v in metrics.values())
        assert metrics == ref_metrics  # computed by the same function: bit-identical


def test_grpo_mode_matches_verls_vanilla_loss(verl_env):
    """ctpo_lab.grpo has the semantics of verl's vanilla loss (ε = 0.2, dual clip 3): same value, gradient and
    verl metrics."""
    core_algos, *_ = verl_env
    cfg = _actor_config(verl_env, "ctpo_lab.grpo")
    old, lp, adv, mask = _batch(7, scale=0.3)
    loss, metrics = _call(core_algos.get_policy_loss_fn("ctpo_lab.grpo"), old, lp, adv, mask, cfg)
    ref, ref_metrics = _call(core_algos.get_policy_loss_fn("vanilla"), old, lp, adv, mask, cfg)
    g1, g2 = (torch.autograd.grad(x, lp)[0] for x in (loss, ref))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    for k in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_rollout_weights_and_global_batch_scaling(verl_env, agg):
    """Per-token rollout weights multiply the loss; with verl's global batch info two micro-batches sum to the
    full-batch loss and gradient, whatever the aggregation."""
    core_algos, *_ = verl_env
    fn = core_algos.get_policy_loss_fn("ctpo_lab.ctpo")
    old, lp, adv, mask = _batch(3, B=8, scale=0.1)
    weights = torch.rand(lp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    full_cfg = _actor_config(verl_env, "ctpo_lab.ctpo", loss_agg_mode=agg)
    full, _ = _call(fn, old, lp, adv, mask, full_cfg, weights)
    (g_full,) = torch.autograd.grad(full, lp)
    out = compute_policy_loss(lp, old, adv, mask, "ctpo", aggregation=agg if agg != "seq-mean-token-sum-norm"
                              else "seq-mean-token-sum")
    expected = aggregate(out.clip.per_token_loss * weights, mask, "token-mean" if agg == "token-mean" else
                         ("seq-mean-token-mean" if agg == "seq-mean-token-mean" else "seq-mean-token-sum"))
    if agg == "seq-mean-token-sum-norm":
        expected = expected / mask.shape[-1]  # verl: row sums / (sequences × horizon)
    torch.testing.assert_close(full, expected, rtol=1e-7, atol=1e-12)
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": int(mask.any(-1).sum()),
            "loss_scale_factor": None}
    total = 0.0
    for rows in (slice(0, 3), slice(3, 8)):
        cfg = _actor_config(verl_env, "ctpo_lab.ctpo", loss_agg_mode=agg)
        cfg.global_batch_info.update(info)
        part, _ = _call(fn, old[rows], lp[rows], adv[rows], mask[rows], cfg, weights[rows])
        total = total + part
    (g_parts,) = torch.autograd.grad(total, lp)
    torch.testing.assert_close(total, full, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-7, atol=1e-12)


def test_overrides_through_the_policy_loss_config(verl_env):
    core_algos, *_ = verl_env
    fn = core_algos.get_policy_loss_fn("ctpo_lab.ctpo")
    old, lp, adv, mask = _batch(5, scale=0.1)
    cfg = _actor_config(verl_env, "ctpo_lab.ctpo", overrides={"eps_high": 0.1, "clip_exponent": 0.0})
    loss, metrics = _call(fn, old, lp, adv, mask, cfg)
    ref, ref_metrics = policy_loss(lp, old, adv, mask, preset="ctpo", eps_high=0.1, clip_exponent=0.0)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert metrics["pg_update/clip/total/rate"] == ref_metrics["pg_update/clip/total/rate"]
    # verl's clip_ratio keys are not read: the preset's window applies
    _, FSDPActorConfig, PolicyLossConfig, _ = verl_env
    wide = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.9,
                           clip_ratio_high=5.0, policy_loss=PolicyLossConfig(loss_mode="ctpo_lab.ctpo"))
    torch.testing.assert_close(_call(fn, old, lp, adv, mask, wide)[0], policy_loss(lp, old, adv, mask, "ctpo")[0])
    with pytest.raises(ValueError, match="unknown loss option"):
        _call(fn, old, lp, adv, mask, _actor_config(verl_env, "ctpo_lab.ctpo", overrides={"eps_hi": 0.1}))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        _call(fn, old, lp, adv, mask, _actor_config(verl_env, "ctpo_lab.ctpo", overrides={"aggregation": "x"}))
    bad = lp.detach().clone()
    bad[0, 0] = float("nan")
    mask2 = mask.clone()
    mask2[0, 0] = True
    with pytest.raises(ValueError, match="NaN"):
        _call(fn, old, bad, adv, mask2, cfg)


# ----------------------------------------------------------------------------------------------------------
# one update through verl's FSDP engine
# ----------------------------------------------------------------------------------------------------------


def _engine_batch(seed: int = 0, B: int = 4, P: int = 5, R: int = 9):
    """A tiny Llama and a verl actor mini-batch as the trainer builds it (left-padded prompts, right-padded
    responses), converted to verl's no-padding layout, with the non-tensor fields the worker adds; also the
    padded inputs and the per-token tensors for the reference computation."""
    from tensordict import TensorDict
    from tensordict.tensorclass import NonTensorData, NonTensorStack
    from transformers import LlamaConfig, LlamaForCausalLM
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    prompts, responses = torch.randint(1, 64, (B, P)), torch.randint(1, 64, (B, R))
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[0, :2] = 0
    rmask = torch.ones(B, R, dtype=torch.long)
    rmask[1, 5:] = 0
    rmask[2, 7:] = 0
    attn = torch.cat([pmask, rmask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": torch.cat([prompts, responses], 1), "attention_mask": attn, "position_ids": pos}
    with torch.no_grad():
        lp = _response_log_probs(model, inputs, responses)
    old = lp + 0.05 * torch.randn(B, R)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(-1).expand(B, R).contiguous()
    td = TensorDict({"prompts": prompts, "responses": responses, **inputs, "response_mask": rmask,
                     "old_log_probs": old, "advantages": adv, "rollout_log_probs": old - 0.01}, batch_size=[B])
    td = left_right_2_no_padding(td)
    td["uid"] = NonTensorStack.from_list([NonTensorData(u) for u in ("a", "a", "b", "b")])
    tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=False, global_batch_size=B, use_remove_padding=False,
                         use_dynamic_bsz=False, micro_batch_size_per_gpu=2, use_fused_kernels=False, pad_token_id=0,
                         global_steps=3)
    return model, td, {"inputs": inputs, "responses": responses, "log_prob": lp, "old": old, "adv": adv,
                       "mask": rmask.bool()}


def _response_log_probs(model, inputs, responses):
    P = inputs["input_ids"].shape[1] - responses.shape[1]
    logits = model(**inputs).logits
    return torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)


def _cpu_engine(model, cfg, monkeypatch):
    import verl.workers.engine.fsdp.transformer_impl as ti

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")
    eng = ti.FSDPEngineWithLMHead.__new__(ti.FSDPEngineWithLMHead)  # __init__ builds the FSDP mesh on CUDA
    for name, value in dict(module=model, pad_to_length=False, use_ulysses_sp=False, ulysses_sequence_parallel_size=1,
                            ulysses_device_mesh=None, _autocast_dtype=torch.float32, scaler=None, _qat_enabled=False,
                            engine_config=cfg.fsdp_config, optimizer_config=cfg.optim).items():
        setattr(eng, name, value)
    eng.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return eng


@pytest.fixture
def engine_update(verl_env, monkeypatch, tmp_path):
    """One ``train_batch`` of verl's FSDP engine (2 micro-batches of 2) with ``ctpo_lab.ctpo`` and dumps on."""
    import copy

    import verl.workers.utils.losses as verl_losses

    _, _, _, plugin = verl_env
    monkeypatch.setenv(plugin.DUMP_ENV, str(tmp_path / "dumps"))
    monkeypatch.setattr(verl_losses, "ppo_loss", verl_losses.ppo_loss)  # the hook is undone after the test
    plugin.install_dump_hook()
    cfg = _actor_config(verl_env, "ctpo_lab.ctpo")
    model, td, ref = _engine_batch()
    initial = copy.deepcopy(model)
    eng = _cpu_engine(model, cfg, monkeypatch)
    eng.optimizer_config = dataclasses.replace(cfg.optim, clip_grad=1e9)  # no clipping: compare raw gradients
    grads: list[torch.Tensor] = []
    step = eng.optimizer.step

    def recording_step(*args, **kwargs):
        grads.extend(p.grad.detach().clone() for p in model.parameters())
        return step(*args, **kwargs)

    eng.optimizer.step = recording_step
    out = eng.train_batch(td, loss_function=partial(verl_losses.ppo_loss, config=cfg))
    return {"model": model, "initial": initial, "grads": grads, "out": out, "ref": ref, "dumps": tmp_path / "dumps"}


def test_actor_update_through_verls_engine(engine_update):
    model, initial, ref = engine_update["model"], engine_update["initial"], engine_update["ref"]
    change = sum((p.detach() - q.detach()).abs().sum().item() for p, q in zip(model.parameters(),
                                                                              initial.parameters()))
    assert change > 0
    metrics = engine_update["out"]["metrics"]
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl",
                "pg_update/clip/total/rate", "pg_update/is_ratio/p99", "grad_norm"):
        assert key in metrics, sorted(metrics)
    # verl's two micro-batches, scaled by the global token count, accumulate ctpo_lab's full-batch gradient
    lp = _response_log_probs(initial, ref["inputs"], ref["responses"])
    loss, _ = policy_loss(lp, ref["old"], ref["adv"], ref["mask"], preset="ctpo")
    loss.backward()
    assert sum(engine_update["out"]["loss"]) == pytest.approx(loss.item(), rel=1e-5)  # per-micro-batch losses
    grads = engine_update["grads"]
    assert len(grads) == len(list(initial.parameters()))
    for g, p in zip(grads, initial.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_dumps_from_the_engine_update(engine_update):
    ref, directory = engine_update["ref"], engine_update["dumps"]
    mask, old, adv = ref["mask"].numpy(), ref["old"].numpy(), ref["adv"].numpy()
    assert dumps.list_steps(directory) == [3]
    files = sorted((directory / "step_0000003").iterdir())
    assert len(files) == 2 and all(re.fullmatch(r"rank_0000_mb_\d{6}\.npz", f.name) for f in files)
    d = dumps.read_step(directory, 3)
    assert d.mask.shape == (4, 9) and (d.mask == mask).all()
    assert d.lossless and d.group_ids_global
    assert d.group_ids[0] == d.group_ids[1] != d.group_ids[2] == d.group_ids[3]
    np.testing.assert_allclose(d.extra["old_log_prob"][mask], old[mask], rtol=1e-6)
    np.testing.assert_allclose(d.extra["rollout_log_prob"][mask], (old - 0.01)[mask], rtol=1e-6)
    np.testing.assert_allclose(d.extra["log_prob"][mask], ref["log_prob"].numpy()[mask], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d.advantages[mask], adv[mask], rtol=1e-6)
    ell = np.where(mask, d.extra["log_prob"] - d.extra["old_log_prob"], 0.0)
    np.testing.assert_allclose(d.cum_log_ratio[mask], np.cumsum(ell, axis=1)[mask], rtol=1e-4, atol=1e-5)


def test_dumps_of_loss_calls_are_read_by_llm_fit(verl_env, monkeypatch, tmp_path):
    """Two ranks × two micro-batches of long responses, dumped by the loss calls, then `python -m ctpo_lab.llm
    fit DIR`."""
    core_algos, _, _, plugin = verl_env
    monkeypatch.setenv(plugin.DUMP_ENV, str(tmp_path))
    fn = core_algos.get_policy_loss_fn("ctpo_lab.ctpo")
    cfg = _actor_config(verl_env, "ctpo_lab.ctpo")
    g = torch.Generator().manual_seed(0)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))  # read when torch.distributed is not initialised
        if torch.distributed.is_initialized():  # (an earlier test initialised a 1-process group)
            monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        for _ in range(2):
            old = -torch.rand(16, 200, generator=g) * 2
            lp = old + 0.05 * torch.randn(16, 200, generator=g)
            mask = torch.ones(16, 200, dtype=torch.bool)
            mask[:, 150:] = torch.rand(16, 50, generator=g) > 0.5
            _call(fn, old, lp, torch.randn(16, 1, generator=g).expand(16, 200), mask, cfg)
    files = sorted((tmp_path / "step_0000000").glob("*.npz"))
    assert [f.name[:9] for f in files] == ["rank_0000"] * 2 + ["rank_0001"] * 2
    res = subprocess.run([sys.executable, "-m", "ctpo_lab.llm", "fit", str(tmp_path), "--bin-width", "25",
                          "--min-count", "10", "--n-boot", "100"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    fit = json.loads(res.stdout[res.stdout.index("{"):])
    assert fit["n_sequences"] == 64
    assert 0.03 < fit["sigma_hat"] < 0.08  # per-token sd of ℓ_t is 0.05 by construction


# ----------------------------------------------------------------------------------------------------------
# the README's command composes with verl's Hydra config
# ----------------------------------------------------------------------------------------------------------


def _readme_overrides() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "python -m verl.trainer.main_ppo" in b)
    tokens = shlex.split(block.replace("\\\n", " "))
    return tokens[tokens.index("verl.trainer.main_ppo") + 1:]


def test_readme_verl_command_composes(verl_env):
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    _, _, _, plugin = verl_env
    overrides = _readme_overrides()
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=ctpo_lab.ctpo" in overrides
    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    actor = cfg.actor_rollout_ref.actor
    assert actor.policy_loss.loss_mode == "ctpo_lab.ctpo"
    assert cfg.trainer.nnodes == 2 and cfg.trainer.n_gpus_per_node == 8
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars[plugin.DUMP_ENV] == "/shared/ctpo-dumps"
    actor_config = omega_conf_to_dataclass(actor)  # what verl's workers do with it
    assert type(actor_config.policy_loss).__name__ == "CtpoLabPolicyLossConfig"
    loss_cfg = plugin.loss_config_from_verl("ctpo", actor_config, actor_config.loss_agg_mode)
    assert loss_cfg == dataclasses.replace(PRESETS["ctpo"], clip_exponent=0.5, aggregation="token-mean")
