"""Sources of off-policyness: how a target π differs from the behaviour μ that sampled the responses.

================  =================================================================================
source            π versus μ
================  =================================================================================
``stale``         π = μ after k optimizer steps of a GRPO-style update (AdamW, a loss preset of
                  :mod:`ctpo_lab.losses`) on minibatches of the sampled batch, as in the paper's PPO
                  loop (512 prompts × 8 rollouts, 16 minibatch updates per rollout batch: update j
                  sees a ratio that is j updates stale). The ratios are measured on held-out
                  responses of μ that no update has seen.
``temperature``   μ = the model sampled at temperature τ ≠ 1, π = the same weights at τ = 1.
``dtype``         μ = float32 weights (sampling), π = the same weights run in bfloat16: the train /
                  inference numerical mismatch.
``checkpoints``   μ = checkpoint A (sampling), π = checkpoint B, both given by path.
================  =================================================================================

Every source returns π's per-token log-probs on μ's responses and, with a :class:`ReferenceCache` of μ, the
exact per-token KL(μ‖π)(s_t), whose prefix sums are the drift of L_t: E_μ[L_t] = −Σ_{k≤t} E_μ[KL(μ‖π)(s_k)].
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ctpo_lab import losses
from ctpo_lab.llm.rollout import ReferenceCache, RolloutBatch, ScoreResult, score, token_log_probs

__all__ = [
    "SOURCES",
    "split_minibatches",
    "StaleConfig",
    "UpdateRecord",
    "stale_updates",
    "score_target",
    "bf16_copy",
]

SOURCES: tuple[str, ...] = ("stale", "temperature", "dtype", "checkpoints")


def split_minibatches(group_id: Tensor | np.ndarray, num_minibatches: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of ``num_minibatches`` minibatches made of whole prompt groups (shuffled with ``seed``)."""
    g = np.asarray(group_id)
    groups = np.unique(g)
    if isinstance(num_minibatches, bool) or not isinstance(num_minibatches, int) or num_minibatches < 1:
        raise ValueError(f"num_minibatches: expected a positive int, got {num_minibatches!r}")
    if num_minibatches > len(groups):
        raise ValueError(f"num_minibatches: {num_minibatches} minibatches need at least as many prompt groups, "
                         f"got {len(groups)}")
    order = np.random.default_rng(seed).permutation(groups)
    return [np.nonzero(np.isin(g, part))[0] for part in np.array_split(order, num_minibatches)]


@dataclass(frozen=True)
class StaleConfig:
    """A GRPO-style update on the sampled batch.

    preset : loss preset of :data:`ctpo_lab.losses.PRESETS` (default ``ctpo``, the paper's training loss).
    lr, weight_decay, betas, grad_clip : AdamW and gradient-norm clipping (paper: lr 1e-6 for 4B/14B models).
    num_minibatches : minibatches per rollout batch (paper: 16); update j uses minibatch j mod M.
    temperature : τ of π in the loss (the behaviour log-probs come from sampling).
    skip_zero_advantage : build minibatches only from responses with a non-zero advantage (their tokens give
        no gradient under any preset; DAPO's dynamic-sampling filter drops all-equal groups for the same
        reason). Saves compute; the token-mean denominator then counts informative tokens only.
    minibatch_unit : ``row`` (responses shuffled into minibatches) or ``group`` (whole prompt groups, as verl's
        prompt minibatches). With fewer units than ``num_minibatches`` each unit is its own minibatch and later
        updates cycle through them (PPO epochs).
    """

    preset: str = "ctpo"
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    num_minibatches: int = 16
    temperature: float = 1.0
    skip_zero_advantage: bool = True
    minibatch_unit: str = "row"
    loss_overrides: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        losses.resolve_config(self.preset, **self.loss_overrides)  # validates preset and overrides
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr: expected a learning rate in (0, 1), got {self.lr!r}")
        if self.minibatch_unit not in ("row", "group"):
            raise ValueError(f"minibatch_unit: expected 'row' or 'group', got {self.minibatch_unit!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected > 0 or None, got {self.grad_clip!r}")


@dataclass
class UpdateRecord:
    """One optimizer update: its index j (π_j → π_{j+1}), the minibatch rows, the log-ratio of π_j vs μ on
    that minibatch before the step ([b, T], the authors' dump), and the loss metrics."""

    update: int
    rows: np.ndarray
    log_ratio: Tensor
    mask: Tensor
    advantages: Tensor
    metrics: dict[str, float]


def stale_updates(
    model: torch.nn.Module,
    train: RolloutBatch,
    advantages: Tensor,
    config: StaleConfig,
    *,
    num_updates: int,
    seed: int = 0,
    on_update: Callable[[int, torch.nn.Module, UpdateRecord], None] | None = None,
    progress: bool = False,
) -> list[UpdateRecord]:
    """Run ``num_updates`` optimizer steps of a GRPO-style update on minibatches of ``train``.

    Update j (0-based) computes log π_j on minibatch j mod M with gradients, the loss
    ``losses.policy_loss(logp_π, logp_μ, A, mask, preset)``, and an AdamW step; afterwards the model is π_{j+1}
    and ``on_update(j + 1, model, record)`` is called (score held-out data there for "k = j + 1 stale updates").

    Parameters
    ----------
    model : the behaviour model μ, trained in place (put in train mode during the call, eval mode after)
    train : RolloutBatch sampled from μ (its ``logp`` are the old log-probs)
    advantages : float [N] (e.g. :func:`ctpo_lab.advantages.grpo_advantages`)
    config : StaleConfig
    num_updates : k_max
    seed : minibatch shuffling

    Returns
    -------
    list of :class:`UpdateRecord`, one per update.
    """
    if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
        raise ValueError(f"num_updates: expected an int ≥ 0, got {num_updates!r}")
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    if adv.shape != (len(train),):
        raise ValueError(f"advantages: expected shape [{len(train)}], got {tuple(adv.shape)}")
    if not torch.isfinite(adv).all():
        raise ValueError("advantages: NaN or inf value(s)")
    gid = train.group_id.numpy()
    rows_used = np.arange(len(train))
    if config.skip_zero_advantage:
        rows_used = np.nonzero((adv != 0).numpy())[0]
        if rows_used.size == 0:
            raise ValueError("advantages: every response has A = 0 (all-equal rewards in every group): no update "
                             "is possible; use more prompts, a larger group size or a lenient reward")
    if config.minibatch_unit == "group":
        n_parts = min(config.num_minibatches, int(np.unique(gid[rows_used]).size))
        parts = [rows_used[p] for p in split_minibatches(gid[rows_used], n_parts, seed)]
    else:
        order = np.random.default_rng(seed).permutation(rows_used)
        parts = [np.sort(p) for p in np.array_split(order, min(config.num_minibatches, rows_used.size))]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    records: list[UpdateRecord] = []
    it = range(num_updates)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"update ({config.preset})", unit="step")
    model.train()
    try:
        for j in it:
            rows = parts[j % len(parts)]
            mb = train.subset(rows)
            res = token_log_probs(model, mb.prompt_ids, mb.tokens, mb.mask, temperature=config.temperature,
                                  pad_token_id=mb.pad_token_id)
            loss, metrics = losses.policy_loss(res.logp, mb.logp, adv[rows], mb.mask, config.preset,
                                               **config.loss_overrides)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                metrics["actor/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            opt.step()
            with torch.no_grad():
                lr_ = torch.where(mb.mask, res.logp.detach() - mb.logp, 0.0)
            rec = UpdateRecord(j, rows, lr_, mb.mask.clone(), adv[rows].clone(), metrics)
            records.append(rec)
            if on_update is not None:
                model.eval()
                on_update(j + 1, model, rec)
                model.train()
    finally:
        model.eval()
        opt.zero_grad(set_to_none=True)
    return records


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy of ``model`` (eval mode), for the dtype-mismatch source."""
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def score_target(
    target: torch.nn.Module,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    reference: ReferenceCache | None = None,
    rows_per_chunk: int = 8,
    progress: bool = False,
    desc: str = "score",
) -> ScoreResult:
    """log π on μ's responses (and the exact KL(μ‖π) with μ's reference cache); a thin wrapper of
    :func:`ctpo_lab.llm.rollout.score` that names the step in progress bars."""
    return score(target, batch, temperature=temperature, reference=reference, rows_per_chunk=rows_per_chunk,
                 progress=progress, desc=desc)
