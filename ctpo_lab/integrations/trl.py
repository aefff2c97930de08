"""Use a ctpo_lab loss preset inside TRL's ``GRPOTrainer``.

>>> from ctpo_lab.integrations.trl import ctpo_grpo_trainer_class
>>> Trainer = ctpo_grpo_trainer_class()
>>> trainer = Trainer(model=..., reward_funcs=..., args=GRPOConfig(num_iterations=4, ...),
...                   loss="ctpo", loss_overrides={"clip_exponent": 0.5})

``loss`` is a key of :data:`ctpo_lab.losses.PRESETS` or any :class:`~ctpo_lab.losses.LossConfig`
(``loss_preset`` is its former name); the loss used is ``losses.resolve_config(loss, **loss_overrides)``.

The subclass replaces only the policy-loss computation of ``GRPOTrainer._compute_loss``: TRL still generates,
scores and computes group advantages; the per-token log-probs of the current policy, the behaviour log-probs
(``old_per_token_logps``), the completion mask (times the tool mask) and the advantages are handed to
:func:`ctpo_lab.losses.compute_policy_loss`, and every ctpo_lab diagnostic is logged under its own name.

Off-policyness in TRL: with ``num_iterations == 1`` and ``steps_per_generation <= gradient_accumulation_steps``
TRL reuses the current log-probs as the behaviour ones, so every ratio is exactly 1 ("clip ratio is always 0").
Set ``num_iterations > 1`` (or ``steps_per_generation`` larger than the accumulation) to make later updates
off-policy; the trainer warns when it detects the on-policy configuration.  KL penalties (``beta``), entropy
bonuses and TRL's vLLM importance-sampling correction are not applied by this subclass.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ctpo_lab.losses import LossConfig, compute_policy_loss, metrics_to_host, resolve_config

__all__ = ["ctpo_grpo_trainer_class"]

_CLASS_CACHE: dict[str, type] = {}


def ctpo_grpo_trainer_class() -> type:
    """Return a subclass of ``trl.GRPOTrainer`` whose policy loss is a ctpo_lab preset.

    Extra constructor arguments: ``loss`` (a key of :data:`ctpo_lab.losses.PRESETS` or a
    :class:`~ctpo_lab.losses.LossConfig`, default ``"ctpo"``; ``loss_preset`` is accepted as its former name)
    and ``loss_overrides`` (a dict of :class:`ctpo_lab.losses.LossConfig` fields).  Raises ImportError with
    an install hint when ``trl`` is missing.
    """
    if "cls" in _CLASS_CACHE:
        return _CLASS_CACHE["cls"]
    try:
        from trl import GRPOTrainer
    except ImportError as exc:  # pragma: no cover - exercised only without trl
        raise ImportError("ctpo_grpo_trainer_class needs TRL: pip install 'ctpo_lab[trl]'") from exc

    class CTPOGRPOTrainer(GRPOTrainer):
        """``GRPOTrainer`` with the policy loss of a ctpo_lab preset (see the module docstring)."""

        def __init__(self, *args: Any, loss: str | LossConfig | None = None, loss_preset: str | None = None,
                     loss_overrides: dict | None = None, **kwargs: Any) -> None:
            if loss is not None and loss_preset is not None:
                raise ValueError("loss: give loss or its former name loss_preset, not both")
            chosen = loss if loss is not None else (loss_preset if loss_preset is not None else "ctpo")
            self.ctpo_loss_config = resolve_config(chosen, **(loss_overrides or {}))
            super().__init__(*args, **kwargs)
            if self.beta != 0.0:
                raise ValueError("args.beta: CTPOGRPOTrainer does not apply a KL penalty; set beta=0.0")
            steps = self.args.steps_per_generation or self.args.gradient_accumulation_steps
            if self.num_iterations == 1 and steps <= self.args.gradient_accumulation_steps:
                warnings.warn(
                    "num_iterations == 1 and steps_per_generation <= gradient_accumulation_steps: every update is "
                    "on-policy, all importance ratios equal 1 and no estimator differs. Set num_iterations > 1.",
                    stacklevel=2,
                )

        def _compute_loss(self, model, inputs):  # noqa: D401 - TRL hook
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
            )
            old = inputs.get("old_per_token_logps")
            old = per_token_logps.detach() if old is None else old
            out = compute_policy_loss(per_token_logps, old, inputs["advantages"], mask, self.ctpo_loss_config)
            mode = "train" if self.model.training else "eval"
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            metrics = metrics_to_host(out.metrics, out.num_nonfinite)
            mask_b = mask.bool()
            metrics["entropy"] = (entropies.detach()[mask_b].float().mean().item() if mask_b.any() else 0.0)
            for name, value in metrics.items():
                self._metrics[mode][name].append(value)
            return out.loss / normalizer

    _CLASS_CACHE["cls"] = CTPOGRPOTrainer
    return CTPOGRPOTrainer
