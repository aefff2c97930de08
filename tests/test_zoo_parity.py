"""The zoo presets named after verl and TRL losses equal those frameworks' own functions.

Runs in the verl environment (verl 0.9.1 and TRL 1.16 installed, see .ci/run); each part is skipped where its
framework is absent.

* verl: every verl-named preset, through ``ctpo_lab.losses.compute_policy_loss`` / ``policy_loss`` (``path``
  ``"lean"`` and ``"reference"``, ``diagnostics`` ``"basic"`` and ``"full"``), equals verl's registered function
  (``core_algos.get_policy_loss_fn(mode)``) called as verl's actor calls it, with verl's default ``ActorConfig``
  (overridden only where the preset's default differs): the loss value, the gradient w.r.t. ``log_prob``
  (autograd on both sides) and every metric verl returns (same key, same value), to 1e-7 (rel) / 1e-7 (abs), on
  random float32 batches with holes, one fully masked row, per-token advantages with zeros and both signs, and
  moderate and large (|ℓ| > 20) log-ratios.  verl's config values given to the preset as overrides give verl's
  function with those values.  verl's ``agg_loss`` equals ``ctpo_lab.losses.aggregate`` for every mode, with
  verl's global-batch scaling.
* TRL: ``dr_grpo``, ``bnpo``, ``luspo``, ``vespo`` and ``opsm`` equal TRL's ``GRPOTrainer._compute_loss``
  (``loss_type`` and ``off_policy_mask_threshold``), called unbound on a minimal stub trainer whose model
  returns the given log-probs (no model, no accelerator: one process, no gradient accumulation, no vLLM, β = 0);
  TRL's module-level helpers ``get_off_policy_mask`` / ``get_gamma_weights`` are compared directly too.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ctpo_lab.losses import PRESETS, aggregate, compute_policy_loss, metrics_to_host, policy_loss

RTOL = ATOL = 1e-7
PATHS = ("lean", "reference")
DIAGNOSTICS = ("basic", "full")


# ---------------------------------------------------------------------------------------------------- batches
def _batch(seed: int, large: bool, B: int = 7, T: int = 37, empty_row: bool = True, row_adv: bool = False):
    """float32 log-probs (≤ 0) with off-policy noise, a mask with holes and right padding (one row fully masked
    when ``empty_row``), advantages with both signs and exact zeros (per token, or per row with ``row_adv``).
    ``large``: wide noise and a few tokens with |ℓ| ≈ 25 (beyond verl's ±20 clamp)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    scale = 0.8 if large else 0.1
    lp = (old + scale * torch.randn(B, T, generator=g)).clamp(max=-1e-4)
    if large:
        for _ in range(4):
            i, t = int(torch.randint(B, (1,), generator=g)), int(torch.randint(4, (1,), generator=g))
            old[i, t], lp[i, t] = -26.0, -1.0  # ℓ = +25
            j, s = int(torch.randint(B, (1,), generator=g)), int(torch.randint(4, 8, (1,), generator=g))
            old[j, s], lp[j, s] = -0.5, -25.5  # ℓ = −25
    mask = torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(5, T + 1, (B,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = False
    mask &= torch.rand(B, T, generator=g) > 0.2  # holes
    mask[:, 0] = True
    if empty_row:
        mask[2] = False
    if row_adv:
        adv = torch.randn(B, generator=g)
        adv[1] = 0.0
    else:
        adv = torch.randn(B, 1, generator=g) + 0.3 * torch.randn(B, T, generator=g)
        adv[1] = 0.0  # a row of zero advantages
        adv[torch.rand(B, T, generator=g) < 0.1] = 0.0  # and scattered zeros
    return old, lp.requires_grad_(), adv, mask


def _batches(**kw):
    return [_batch(seed, large, **kw) for seed, large in ((0, False), (1, True), (2, False), (3, True))]


def _close(a, b, what: str):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def test_batches_cover_the_cases():
    """Holes, one fully masked row, zero advantages on valid tokens, and valid tokens with |ℓ| > 20."""
    batches = _batches()
    for _, _, adv, mask in batches:
        assert (~mask.any(-1)).sum() == 1 and (mask[:, :-1] < mask[:, 1:]).any()
        assert ((adv == 0) & mask).any() and ((adv > 0) & mask).any() and ((adv < 0) & mask).any()
    assert sum(int(((lp.detach() - old).abs() > 20)[mask].sum()) for old, lp, _, mask in batches) >= 4


# ------------------------------------------------------------------------------------------------------- verl
@pytest.fixture(scope="module")
def verl_env():
    if os.environ.get("CTPO_LAB_REQUIRE_VERL"):  # CI's verl environment: a missing verl is a failure
        import verl  # noqa: F401
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.ppo import core_algos
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    return SimpleNamespace(core_algos=core_algos, ActorConfig=FSDPActorConfig, PolicyLossConfig=PolicyLossConfig)


def _actor_config(env, loss_mode: str, loss_agg_mode: str = "token-mean", policy: dict | None = None, **actor):
    """verl's actor config as the trainer builds it: defaults, plus the given ActorConfig / PolicyLossConfig
    fields."""
    return env.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2,
                           policy_loss=env.PolicyLossConfig(loss_mode=loss_mode, **(policy or {})),
                           loss_agg_mode=loss_agg_mode, **actor)


def _verl_call(env, mode, cfg, old, lp, adv, mask, weights=None):
    fn = env.core_algos.get_policy_loss_fn(mode)
    return fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=cfg.loss_agg_mode,
              config=cfg, rollout_is_weights=weights)


#: preset → (verl mode, verl loss_agg_mode, ActorConfig overrides, PolicyLossConfig overrides): verl's defaults
#: except where the preset's default differs
VERL_PAIRS: dict[str, tuple[str, str, dict, dict]] = {
    "grpo": ("vanilla", "token-mean", {}, {}),
    "dapo": ("vanilla", "token-mean", {"clip_ratio_high": 0.28}, {}),
    "gspo": ("gspo", "seq-mean-token-mean", {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4}, {}),
    "sapo": ("sapo", "token-mean", {}, {}),  # verl's sapo forces seq-mean-token-mean whatever loss_agg_mode
    "gpg": ("gpg", "token-mean", {}, {}),
    "clip_cov": ("clip_cov", "token-mean", {}, {}),
    "kl_cov": ("kl_cov", "token-mean", {}, {}),
    "gmpo": ("geo_mean", "token-mean", {"clip_ratio": 0.4, "clip_ratio_low": 0.4, "clip_ratio_high": 0.4}, {}),
    "cispo": ("cispo", "token-mean", {}, {}),
    "dppo_tv": ("dppo_tv", "token-mean", {}, {}),
    "dppo_kl": ("dppo_kl", "token-mean", {}, {}),
}

#: preset overrides → the verl config values that mean the same (ActorConfig fields, PolicyLossConfig fields)
VERL_OVERRIDES: list[tuple[str, dict, dict, dict]] = [
    ("grpo", {"eps_low": 0.1, "eps_high": 0.3, "dual_clip": 2.0},
     {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3, "clip_ratio_c": 2.0}, {}),
    ("sapo", {"tau_pos": 2.0, "tau_neg": 0.5}, {"tau_pos": 2.0, "tau_neg": 0.5}, {}),
    ("clip_cov", {"cov_fraction": 0.05, "cov_low": 0.2, "cov_high": 3.0, "eps_high": 0.28},
     {"clip_ratio_high": 0.28}, {"clip_cov_ratio": 0.05, "clip_cov_lb": 0.2, "clip_cov_ub": 3.0}),
    ("kl_cov", {"cov_fraction": 0.1, "kl_coef": 1.0}, {}, {"kl_cov_ratio": 0.1, "ppo_kl_coef": 1.0}),
    ("gmpo", {"eps_low": 0.1, "eps_high": 0.3},
     {"clip_ratio": 0.4, "clip_ratio_low": 0.1, "clip_ratio_high": 0.3}, {}),
    ("cispo", {"eps_low": 0.5, "eps_high": 4.0}, {"clip_ratio_low": 0.5, "clip_ratio_high": 4.0}, {}),
    ("dppo_tv", {"eps_low": 0.05, "eps_high": 0.1, "truncation": 1.5},
     {"clip_ratio_low": 0.05, "clip_ratio_high": 0.1, "clip_ratio_c": 1.5}, {}),
    ("dppo_kl", {"eps_low": 0.05, "eps_high": 0.1, "truncation": 1.5},
     {"clip_ratio_low": 0.05, "clip_ratio_high": 0.1, "clip_ratio_c": 1.5}, {}),
]


def _compare_with_verl(env, preset, mode, cfg, batch, overrides: dict, seed: int, report: dict | None = None):
    """ctpo_lab (both paths, both diagnostics levels) against verl on one batch: value, gradient, verl's metrics.
    The global generator is seeded identically before each call (clip_cov draws with torch.randperm)."""
    old, lp, adv, mask = batch
    torch.manual_seed(seed)
    v_loss, v_metrics = _verl_call(env, mode, cfg, old, lp, adv, mask)
    (v_grad,) = torch.autograd.grad(v_loss, lp)
    assert all(isinstance(v, float) for v in v_metrics.values())
    assert v_grad.any()
    for path in PATHS:
        for diagnostics in DIAGNOSTICS:
            what = f"{preset} vs verl {mode} ({path}, {diagnostics})"
            torch.manual_seed(seed)
            loss, metrics = policy_loss(lp, old, adv, mask, preset, path=path, diagnostics=diagnostics, **overrides)
            (grad,) = torch.autograd.grad(loss, lp)
            assert loss.dtype == v_loss.dtype == torch.float32, what
            _close(loss, v_loss, f"{what}: loss")
            _close(grad, v_grad, f"{what}: gradient")
            assert not grad[~mask].any(), what
            assert metrics["actor/pg_loss"] == pytest.approx(float(loss.detach()), rel=1e-6, abs=1e-7), what
            missing = sorted(set(v_metrics) - set(metrics))
            assert not missing, f"{what}: verl metrics missing from ctpo_lab's: {missing}"
            for key, value in v_metrics.items():
                assert metrics[key] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{what}: {key}"
            if report is not None:
                diff = max([_max_diff(loss.detach(), v_loss.detach()), _max_diff(grad, v_grad)]
                           + [abs(metrics[k] - v) for k, v in v_metrics.items()])
                report[preset] = max(report.get(preset, 0.0), diff)


@pytest.mark.parametrize("preset", list(VERL_PAIRS))
def test_verl_named_preset_equals_verl(verl_env, preset):
    mode, agg, actor, policy = VERL_PAIRS[preset]
    cfg = _actor_config(verl_env, mode, agg, policy, **actor)
    for k, batch in enumerate(_batches()):
        _compare_with_verl(verl_env, preset, mode, cfg, batch, {}, seed=k)


@pytest.mark.parametrize("preset,overrides,actor,policy", VERL_OVERRIDES, ids=[o[0] for o in VERL_OVERRIDES])
def test_verl_config_values_as_preset_overrides(verl_env, preset, overrides, actor, policy):
    """The preset with verl's config values as overrides equals verl's function configured with them."""
    mode, agg, base_actor, base_policy = VERL_PAIRS[preset]
    cfg = _actor_config(verl_env, mode, agg, {**base_policy, **policy}, **{**base_actor, **actor})
    for k, batch in enumerate(_batches()):
        _compare_with_verl(verl_env, preset, mode, cfg, batch, overrides, seed=100 + k)


def test_clip_cov_and_kl_cov_select_tokens(verl_env):
    """The batches above make the covariance rules bite: clip_cov zeroes candidate tokens (verl's
    pg_clipfrac > 0) and kl_cov's penalty changes the loss (against kl_cov_ratio → 0 it would not)."""
    old, lp, adv, mask = _batch(1, True)
    torch.manual_seed(0)
    _, m = _verl_call(verl_env, "clip_cov", _actor_config(verl_env, "clip_cov", policy={"clip_cov_ratio": 0.05}),
                      old, lp, adv, mask)
    assert m["actor/pg_clipfrac"] > 0
    old, lp, adv, mask = _batch(0, False)  # moderate ratios: the penalty is not lost in a 1e10 loss
    with_penalty = policy_loss(lp, old, adv, mask, "kl_cov", kl_coef=1.0, cov_fraction=0.1)[0]
    without = policy_loss(lp, old, adv, mask, "kl_cov", kl_coef=0.0, cov_fraction=0.1)[0]
    assert abs(float((with_penalty - without).detach())) > 1e-4


@pytest.mark.parametrize("preset", ["grpo", "gspo", "sapo", "cispo", "dppo_tv", "clip_cov"])
def test_verl_global_batch_scaling(verl_env, preset):
    """verl's global batch info (dp_size, batch_num_tokens, global_batch_size) given as the preset's overrides:
    the same value and gradient as verl with ``config.global_batch_info`` filled in."""
    mode, agg, actor, policy = VERL_PAIRS[preset]
    for k, batch in enumerate(_batches()):
        old, lp, adv, mask = batch
        info = {"dp_size": 4, "batch_num_tokens": int(mask.sum()) * 3 + 5, "global_batch_size": 4 * mask.shape[0]}
        cfg = _actor_config(verl_env, mode, agg, policy, **actor)
        cfg.global_batch_info.update({**info, "loss_scale_factor": None})
        _compare_with_verl(verl_env, preset, mode, cfg, batch, info, seed=200 + k)


AGG_CASES = [
    ("token-mean", {}), ("token-sum", {}), ("seq-mean-token-mean", {}), ("seq-mean-token-sum", {}),
    ("seq-mean-token-sum-norm", {}), ("seq-mean-token-sum-norm", {"loss_scale_factor": 512}),
    ("token-mean", {"dp_size": 4, "batch_num_tokens": 611}), ("token-mean", {"batch_num_tokens": 611}),
    ("token-sum", {"dp_size": 4}), ("seq-mean-token-mean", {"dp_size": 4, "global_batch_size": 32}),
    ("seq-mean-token-sum", {"dp_size": 4, "global_batch_size": 32}),
    ("seq-mean-token-sum-norm", {"dp_size": 4, "global_batch_size": 32}),
    ("seq-mean-token-sum-norm", {"dp_size": 4, "global_batch_size": 32, "loss_scale_factor": 512}),
    ("seq-mean-token-sum", {"global_batch_size": 32}),
]


@pytest.mark.parametrize("mode,info", AGG_CASES, ids=[f"{m}-{'-'.join(map(str, i.values()))}" for m, i in AGG_CASES])
def test_verl_agg_loss_equals_aggregate(verl_env, mode, info):
    """verl's agg_loss = ctpo_lab.losses.aggregate (value and gradient w.r.t. the per-token loss); verl's
    loss_scale_factor is ctpo_lab's norm_horizon."""
    for k in range(4):
        g = torch.Generator().manual_seed(300 + k)
        _, _, _, mask = _batch(300 + k, large=bool(k % 2))
        loss_mat = (torch.randn(mask.shape, generator=g) * 3).requires_grad_()
        kwargs = {k2: v for k2, v in info.items() if k2 != "loss_scale_factor"}
        v = verl_env.core_algos.agg_loss(loss_mat, mask, mode, **info)
        c = aggregate(loss_mat, mask, mode, info.get("loss_scale_factor"), **kwargs)
        _close(c, v, f"aggregate {mode} {info}")
        _close(torch.autograd.grad(c, loss_mat)[0], torch.autograd.grad(v, loss_mat)[0], f"gradient {mode} {info}")


def test_verl_parity_report(verl_env, capsys):
    """The largest absolute difference per pair over all batches, paths and diagnostics levels (printed with
    ``-s``; each is within the tolerance, asserted above)."""
    report: dict[str, float] = {}
    for preset, (mode, agg, actor, policy) in VERL_PAIRS.items():
        cfg = _actor_config(verl_env, mode, agg, policy, **actor)
        for k, batch in enumerate(_batches()):
            _compare_with_verl(verl_env, preset, mode, cfg, batch, {}, seed=k, report=report)
    with capsys.disabled():
        print("\nmax |ctpo_lab − verl| (loss, gradient, metrics):",
              ", ".join(f"{p} {d:.2e}" for p, d in report.items()))
    assert max(report.values()) <= 1e-6


# -------------------------------------------------------------------------------------------------------- TRL
@pytest.fixture(scope="module")
def trl_trainer():
    pytest.importorskip("trl", reason="trl is not installed")
    from trl import GRPOTrainer

    return GRPOTrainer


def _trl_stub(GRPOTrainer, loss_type: str, *, level: str = "token", epsilon: float = 0.2,
              epsilon_high: float | None = None, off_policy_mask_threshold: float | None = None,
              max_completion_length: int = 512):
    """The attributes ``GRPOTrainer._compute_loss`` reads, for one process in train mode without gradient
    accumulation, vLLM, KL (β = 0), entropy masking or bonus; GRPOConfig's defaults otherwise."""
    args = SimpleNamespace(delta=None, use_bias_correction_kl=True, sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                           vespo_lambda_neg=2.0, steps_per_generation=1)
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction="sum": x, sync_gradients=True)
    stub = SimpleNamespace(
        args=args, accelerator=accelerator, loss_type=loss_type, importance_sampling_level=level,
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high, beta=0.0,
        off_policy_mask_threshold=off_policy_mask_threshold, top_entropy_quantile=1.0, use_vllm=False,
        vllm_importance_sampling_correction=True, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    return stub


def _off_policy(old):
    """Rows 3.. sampled by a behaviour policy 0.7 nats more likely: their mean log μ − log π exceeds OPSM's 0.5."""
    return old + 0.7 * (torch.arange(old.shape[0])[:, None] >= 3)


def _trl_loss(GRPOTrainer, stub, old, lp, adv, mask):
    """TRL's loss on a batch: the stub's model returns ``lp`` as the per-token log-probs."""
    B, T = lp.shape
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp.detach()), None)
    completion_mask = mask.to(torch.int64)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.int64), "prompt_mask": torch.ones(B, 2, dtype=torch.int64),
              "completion_ids": torch.zeros(B, T, dtype=torch.int64), "completion_mask": completion_mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": completion_mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs)


#: preset → (TRL loss_type and options, ctpo_lab overrides that state TRL's setting, whether a fully masked row
#: is allowed (dr_grpo's B·H counts empty rows: ctpo_lab's seq-mean divides by the non-empty rows unless
#: global_batch_size = B is given))
TRL_PAIRS = {
    "dr_grpo": ({"loss_type": "dr_grpo", "max_completion_length": 64}, {"norm_horizon": 64}),
    "bnpo": ({"loss_type": "bnpo"}, {}),
    "luspo": ({"loss_type": "luspo", "level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}, {}),
    "vespo": ({"loss_type": "vespo"}, {}),
    "opsm": ({"loss_type": "dapo", "off_policy_mask_threshold": 0.5}, {}),
}


#: TRL's token-level clip rates (A-aware, over the completion mask) and ctpo_lab's diagnostics of the same
#: (no dual clip in these presets, so ctpo_lab's total rate is TRL's region rate)
TRL_METRICS = {"clip_ratio/high_mean": "pg_update/clip/high/rate", "clip_ratio/low_mean": "pg_update/clip/low/rate",
               "clip_ratio/region_mean": "pg_update/clip/total/rate"}


@pytest.mark.parametrize("preset", list(TRL_PAIRS))
def test_trl_named_preset_equals_trl(trl_trainer, preset):
    """Value and gradient of the preset = TRL's ``_compute_loss`` (per-row advantages, TRL's (B,) input), and
    TRL's token-level clip rates = ctpo_lab's ``pg_update/clip/{high,low,total}/rate`` (PPO-clip loss types)."""
    options, overrides = TRL_PAIRS[preset]
    options = dict(options)
    stub = _trl_stub(trl_trainer, options.pop("loss_type"), **options)
    for k, (seed, large) in enumerate(((0, False), (1, True), (2, False), (3, True))):
        empty = k % 2 == 0
        old, lp, adv, mask = _batch(400 + seed, large, row_adv=True, empty_row=empty)
        if preset == "opsm":  # rows of both signs far enough off-policy that the mask drops some, not all
            old = _off_policy(old)
            dropped = policy_loss(lp, old, adv, mask, preset, diagnostics="full")[1]["pg_update/mask/rate"]
            assert 0 < dropped < 1
        extra = dict(overrides)
        if preset == "dr_grpo" and empty:
            extra["global_batch_size"] = old.shape[0]  # TRL's B counts the empty row
        t_loss = _trl_loss(trl_trainer, stub, old, lp, adv, mask)
        (t_grad,) = torch.autograd.grad(t_loss, lp)
        t_metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
        for path in PATHS:
            what = f"{preset} vs TRL {stub.loss_type} ({path}, seed {seed})"
            loss, metrics = policy_loss(lp, old, adv, mask, preset, path=path, **extra)
            (grad,) = torch.autograd.grad(loss, lp)
            _close(loss, t_loss, f"{what}: loss")
            _close(grad, t_grad, f"{what}: gradient")
            # the PPO-clip loss types; TRL's sequence-level rates count rows (empty ones too), ctpo_lab's tokens
            if "clip_ratio/high_mean" in t_metrics and options.get("level", "token") == "token":
                for trl_key, key in TRL_METRICS.items():
                    assert metrics[key] == pytest.approx(t_metrics[trl_key], rel=RTOL, abs=ATOL), f"{what}: {key}"


def test_opsm_and_vespo_helpers_equal_trl(trl_trainer):
    """ctpo_lab's OPSM keep mask = TRL's get_off_policy_mask; VESPO's φ = TRL's get_gamma_weights."""
    from ctpo_lab import masks

    dropped_rows = 0
    for seed in range(4):
        old, lp, adv, mask = _batch(500 + seed, bool(seed % 2), row_adv=True)
        old = _off_policy(old)
        keep_trl = trl_trainer.get_off_policy_mask(adv[:, None], lp.detach(), old, mask.float(), 0.5)
        cfg = PRESETS["opsm"]
        ell = torch.where(mask, lp.detach() - old, 0.0)
        keep = masks.token_keep(cfg, lp.detach(), old, ell, torch.where(mask, adv[:, None], 0.0), mask)
        assert torch.equal(keep, mask & keep_trl.bool())
        dropped_rows += int((mask.any(-1) & ~keep.any(-1)).sum())
        phi_trl = trl_trainer.get_gamma_weights(adv[:, None], lp.detach() - old, mask.float(), None)
        out = compute_policy_loss(lp, old, adv, mask, "vespo", path="reference")
        phi = out.log_weight_value.exp()
        _close(torch.where(mask, phi, 0.0), torch.where(mask, phi_trl.expand_as(phi), 0.0), "vespo φ")
        assert math.isfinite(metrics_to_host(out.metrics)["actor/pg_loss"])
    assert dropped_rows > 0
