"""Every ctpo_lab loss preset as a verl policy-loss mode (a ``verl.plugins`` entry point).

After ``pip install -e ".[verl]"``, importing verl imports this module (verl loads every entry point of the
group ``verl.plugins``), which registers each key of :data:`ctpo_lab.losses.PRESETS` as the loss mode
``ctpo_lab.<preset>``::

    python -m verl.trainer.main_ppo ... actor_rollout_ref.actor.policy_loss.loss_mode=ctpo_lab.ctpo

What a mode computes, called as verl's actor calls a policy loss
(``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights``):

* the loss of :func:`ctpo_lab.losses.compute_policy_loss` with the preset's constants (ratio family, clip or
  surrogate rule, mask rule, ε_low, ε_high, exponent p, dual clip, caps), aggregated by
  :func:`ctpo_lab.losses.aggregate` — verl's ``agg_loss`` — with verl's ``loss_agg_mode`` and
  ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``
  as ``norm_horizon``): the global-batch scaling of verl's own losses, so gradients do not depend on how the
  batch is split into micro-batches and ranks.  The preset's own ``aggregation`` is therefore replaced by
  ``actor.loss_agg_mode`` (verl's default ``token-mean``; set ``seq-mean-token-mean`` for GSPO's form), except
  for the rules whose aggregation verl itself fixes (:data:`FIXED_AGGREGATION_RULES`: SAPO, GMPO);
* multiplied per token by ``rollout_is_weights`` before the aggregation when verl passes them (rollout
  correction), as verl's own losses do;
* metrics: every ctpo_lab diagnostic as a float (``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``,
  ``actor/ppo_kl`` with verl's definitions, the ``clip_ratio/*`` and ``pg_update/*`` rates, quantiles and ESS);
  verl adds ``actor/pg_loss`` itself and prefixes the other names with ``actor/`` in its logs.

Overriding the preset's constants: verl's ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high`` and
``clip_ratio_c`` are *not* read (verl's config always fills them with PPO's 0.2 / 0.2 / 3, which would
silently replace e.g. CTPO's log-space window).  Instead, swap the policy-loss config class for
:class:`CtpoLabPolicyLossConfig` (verl's ``PolicyLossConfig`` plus one ``ctpo_lab`` dict of
:class:`~ctpo_lab.losses.LossConfig` fields) and set the fields through Hydra::

    actor_rollout_ref.actor.policy_loss._target_=ctpo_lab.integrations.verl.CtpoLabPolicyLossConfig \\
    +actor_rollout_ref.actor.policy_loss.ctpo_lab.eps_high=0.1 \\
    +actor_rollout_ref.actor.policy_loss.ctpo_lab.clip_exponent=0.0

Unknown fields raise ``ValueError`` on the first loss call; ``aggregation`` cannot be overridden there (use
``actor.loss_agg_mode``).  NaN or inf on valid tokens raise ``ValueError`` (ctpo_lab's convention).

Dumps: with the environment variable ``CTPO_LAB_VERL_DUMP=DIR`` set in the training workers, every call of a
``ctpo_lab.*`` loss writes one file ``DIR/step_{step:07d}/rank_{rank:04d}_mb_{n:06d}.npz`` in the layout of
:mod:`ctpo_lab.dumps` (the CTPO fork's keys, ctpo_lab's lossless ``cum_log_ratio`` L_t, advantages) plus the
per-token ``log_prob`` (log π), ``old_log_prob`` (log π_old), ``rollout_log_prob`` (when verl's batch has
``rollout_log_probs``), ``rollout_is_weights`` (when given) and ``group_ids`` (a stable 63-bit hash of verl's
``uid`` of each row, the same id on every rank).  Files are written atomically (temporary file + rename).
``step`` is verl's ``global_steps`` when the micro-batch carries it, else 0; ``n`` counts the loss calls of
the process (each micro-batch once per PPO epoch).  ``python -m ctpo_lab.llm fit DIR`` reads such a run.

This module imports without verl: verl is imported only by :func:`register` (called on import when verl is
importable) and by :func:`make_policy_loss_fn`'s returned function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctpo_lab import dumps
from ctpo_lab.losses import PRESETS, LossConfig, aggregate, compute_policy_loss, metrics_to_host, resolve_config

__all__ = [
    "MODE_PREFIX",
    "DUMP_ENV",
    "mode_name",
    "loss_config_from_verl",
    "make_policy_loss_fn",
    "register",
    "install_dump_hook",
    "CtpoLabPolicyLossConfig",
]

#: Loss modes are ``ctpo_lab.<preset>``.
MODE_PREFIX = "ctpo_lab."
#: Environment variable naming the dump directory.
DUMP_ENV = "CTPO_LAB_VERL_DUMP"
#: The ``policy_loss`` key holding LossConfig overrides.
OVERRIDES_KEY = "ctpo_lab"

_REGISTERED: dict[str, Callable[..., tuple[Tensor, dict[str, Any]]]] = {}
_CALLS = itertools.count()
_STASH = threading.local()


def mode_name(preset: str) -> str:
    """The verl loss mode of a preset: ``ctpo_lab.<preset>``."""
    return MODE_PREFIX + preset


def _overrides_of(config: Any) -> dict[str, Any]:
    """The ``policy_loss.ctpo_lab`` dict of a verl actor config (empty when absent)."""
    if config is None:
        return {}
    policy = config.get("policy_loss", None) if isinstance(config, Mapping) else getattr(config, "policy_loss", None)
    if policy is None:
        return {}
    raw = policy.get(OVERRIDES_KEY, None) if isinstance(policy, Mapping) else getattr(policy, OVERRIDES_KEY, None)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"policy_loss.{OVERRIDES_KEY}: expected a dict of LossConfig fields, got {type(raw).__name__}")
    return {str(k): v for k, v in raw.items()}


#: rules whose aggregation verl fixes whatever ``loss_agg_mode`` says (verl's sapo: seq-mean-token-mean; verl's
#: geo_mean: the mean over the micro-batch's rows): their presets keep their own aggregation
FIXED_AGGREGATION_RULES: tuple[str, ...] = ("sapo", "gmpo")
_VERL_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def loss_config_from_verl(preset: str | LossConfig, config: Any, loss_agg_mode: str) -> LossConfig:
    """The preset's :class:`LossConfig` with the ``policy_loss.ctpo_lab`` overrides, verl's aggregation (except for
    :data:`FIXED_AGGREGATION_RULES`) and verl's global-batch scaling (``global_batch_info``: ``dp_size``,
    ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor`` → ``norm_horizon``)."""
    overrides = _overrides_of(config)
    if "aggregation" in overrides:
        raise ValueError(f"policy_loss.{OVERRIDES_KEY}.aggregation: set actor.loss_agg_mode instead")
    cfg = resolve_config(preset, **overrides)
    changes: dict[str, Any] = {}
    if loss_agg_mode in _VERL_AGGREGATIONS and cfg.clip not in FIXED_AGGREGATION_RULES:
        changes["aggregation"] = loss_agg_mode
    info = _global_batch_info(config) if config is not None else {}
    for key in ("dp_size", "batch_num_tokens", "global_batch_size"):
        if info.get(key) is not None:
            changes[key] = int(info[key])
    if info.get("loss_scale_factor") is not None:
        changes["norm_horizon"] = int(info["loss_scale_factor"])
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = config.get("global_batch_info", None) if isinstance(config, Mapping) else None
    if info is None:
        info = getattr(config, "global_batch_info", None)
    return dict(info or {})


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0"))


def _uid_hash(uid: Any) -> int:
    return int.from_bytes(hashlib.blake2b(str(uid).encode(), digest_size=8).digest(), "little") >> 1


def _stashed() -> dict[str, Any]:
    return getattr(_STASH, "data", None) or {}


def _write_dump(directory: str, out: Any, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                rollout_is_weights: Tensor | None) -> Path:
    from ctpo_lab import ratios

    mask = out.mask
    cum = ratios.cumulative_log_ratio(out.log_ratio.detach(), mask)
    adv = advantages.detach()
    extra: dict[str, Tensor] = {"log_prob": log_prob.detach(), "old_log_prob": old_log_prob.detach()}
    if rollout_is_weights is not None:
        extra["rollout_is_weights"] = torch.as_tensor(rollout_is_weights).detach().expand_as(log_prob)
    info = _stashed()
    if info.get("rollout_log_prob") is not None and tuple(info["rollout_log_prob"].shape) == tuple(log_prob.shape):
        extra["rollout_log_prob"] = info["rollout_log_prob"]
    group_ids = info.get("group_ids")
    if group_ids is not None and len(group_ids) != log_prob.shape[0]:
        group_ids = None
    step = int(info.get("step") or 0)
    rank = _rank()
    n = next(_CALLS)
    target = Path(directory) / f"step_{step:07d}" / f"rank_{rank:04d}_mb_{n:06d}.npz"
    return dumps.write_ratio_dump(
        target, cum, mask, step=step, rank=rank, advantages=adv, log_weight=out.log_weight_value.detach(),
        group_ids=None if group_ids is None else torch.as_tensor(group_ids, dtype=torch.int64),
        group_ids_global=group_ids is not None, extra=extra, overwrite=True,
    )


def make_policy_loss_fn(preset: str | LossConfig) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """A function with verl's policy-loss signature computing the ctpo_lab loss of ``preset``."""

    def ctpo_lab_policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        cfg = loss_config_from_verl(preset, config, loss_agg_mode)
        out = compute_policy_loss(log_prob, old_log_prob, advantages, response_mask, cfg, path="reference")
        loss = out.loss
        if rollout_is_weights is not None:  # verl's per-token rollout weights multiply the loss before aggregation
            per_token = torch.where(out.mask, out.clip.per_token_loss * rollout_is_weights.to(out.loss.dtype), 0.0)
            loss = aggregate(per_token, out.mask, cfg.aggregation, cfg.norm_horizon, dp_size=cfg.dp_size,
                             batch_num_tokens=cfg.batch_num_tokens, global_batch_size=cfg.global_batch_size)
        metrics = metrics_to_host(out.metrics, out.num_nonfinite)
        metrics.pop("actor/pg_loss", None)  # verl logs its own (the aggregated, globally scaled loss)
        directory = os.environ.get(DUMP_ENV)
        if directory:
            _write_dump(directory, out, log_prob, old_log_prob, advantages, rollout_is_weights)
        return loss, metrics

    name = preset if isinstance(preset, str) else preset.name
    ctpo_lab_policy_loss.__name__ = f"ctpo_lab_{name}_policy_loss"
    ctpo_lab_policy_loss.__qualname__ = ctpo_lab_policy_loss.__name__
    ctpo_lab_policy_loss.__doc__ = f"ctpo_lab preset {name!r} as a verl policy loss (see ctpo_lab.integrations.verl)."
    return ctpo_lab_policy_loss


def _stash_from_data(data: Any) -> dict[str, Any]:
    """Rollout log-probs, group ids and step of a verl micro-batch TensorDict (best effort, for the dumps)."""
    info: dict[str, Any] = {}
    try:
        from verl.utils import tensordict_utils as tu

        step = tu.get_non_tensor_data(data=data, key="global_steps", default=None)
        info["step"] = int(step) if step is not None else None
    except Exception:  # noqa: BLE001 - optional information
        info["step"] = None
    try:
        if "rollout_log_probs" in data.keys():
            info["rollout_log_prob"] = data.select("rollout_log_probs").to_padded_tensor()["rollout_log_probs"]
    except Exception:  # noqa: BLE001
        pass
    try:
        if "uid" in data.keys():
            uids = data["uid"]
            uids = uids.tolist() if hasattr(uids, "tolist") else list(uids)
            info["group_ids"] = [_uid_hash(u) for u in uids]
    except Exception:  # noqa: BLE001
        pass
    return info


def install_dump_hook() -> None:
    """Wrap verl's actor loss ``verl.workers.utils.losses.ppo_loss`` so that the dumps also see the micro-batch's
    rollout log-probs, uids and step (done on import when ``CTPO_LAB_VERL_DUMP`` is set; idempotent)."""
    import sys

    import verl.workers.utils.losses as losses_mod

    original = losses_mod.ppo_loss
    if getattr(original, "_ctpo_lab_wrapped", False):
        return

    def ppo_loss(config, model_output, data, dp_group=None):
        _STASH.data = _stash_from_data(data)
        try:
            return original(config, model_output, data, dp_group=dp_group)
        finally:
            _STASH.data = None

    ppo_loss._ctpo_lab_wrapped = True  # type: ignore[attr-defined]
    ppo_loss.__wrapped__ = original  # type: ignore[attr-defined]
    losses_mod.ppo_loss = ppo_loss
    workers = sys.modules.get("verl.workers.engine_workers")
    if workers is not None and getattr(workers, "ppo_loss", None) is original:
        workers.ppo_loss = ppo_loss


def register() -> list[str]:
    """Register every preset of :data:`ctpo_lab.losses.PRESETS` as ``ctpo_lab.<preset>``; return the modes."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    names = []
    for preset in PRESETS:
        fn = make_policy_loss_fn(preset)
        register_policy_loss(mode_name(preset))(fn)
        _REGISTERED[mode_name(preset)] = fn
        names.append(mode_name(preset))
    if os.environ.get(DUMP_ENV):
        install_dump_hook()
    return names


def _policy_loss_config_class() -> type | None:
    try:
        from verl.workers.config import PolicyLossConfig
    except Exception:  # noqa: BLE001 - verl absent or broken: the class is unavailable
        return None

    @dataclasses.dataclass
    class CtpoLabPolicyLossConfig(PolicyLossConfig):
        """verl's ``PolicyLossConfig`` plus ``ctpo_lab``: a dict of :class:`ctpo_lab.losses.LossConfig` fields."""

        ctpo_lab: dict = dataclasses.field(default_factory=dict)

    CtpoLabPolicyLossConfig.__module__ = __name__
    CtpoLabPolicyLossConfig.__qualname__ = "CtpoLabPolicyLossConfig"  # importable by name (Hydra, pickling)
    return CtpoLabPolicyLossConfig


def _verl_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("verl") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["verl"] = None
        return False


if _verl_importable():
    CtpoLabPolicyLossConfig = _policy_loss_config_class()
    register()
else:  # the base install: nothing to register
    CtpoLabPolicyLossConfig = None
