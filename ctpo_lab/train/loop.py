"""The GRPO-family training loop with explicit off-policyness.

One step:

1. sample ``batch_prompts`` training prompts (B) × ``group_size`` responses (G) with a KV cache, recording
   log μ of every sampled token (``rollout_log_prob``); μ is the policy itself, or with ``sampler`` /
   ``staleness`` a bf16 engine, another temperature, weights k updates old (see :class:`TrainConfig`)
                                                                              (time/gen)
2. score them with the task's exact checker; GRPO advantages (R − mean_g) / (std_g + 1e-6)   (time/score)
3. recompute log π_old (``old_log_prob``) with a teacher-forced forward of the current weights (so the first
   update is exactly on-policy) and the entropy; with ``recompute_old_log_prob=false`` reuse the sampler's
   log μ and entropy instead (no extra forward; on CPU in float32 they agree with the recomputed ones to
   ~1e-6, under bf16 sampling on CUDA less closely); with a mismatched sampler the trainer logs
   ``rollout_corr/kl`` = mean(log μ − log π_old) and ``rollout_corr/k3_kl`` on the whole batch
                                                                              (time/old_log_prob)
4. split the rollout batch into B / mini_batch_prompts mini-batches of whole groups and take one optimizer
   step per mini-batch (``ppo_epochs`` passes): update k sees a policy k−1 updates away from μ  (time/update)
5. measure KL(π_old ‖ π) between the anchor and the policy after the last update on the whole batch:
   ``offpolicy/kl`` = mean(log π_old − log π) (k1) and ``offpolicy/kl_k3`` = mean(e^{ℓ} − 1 − ℓ)
   (π_old = μ with ``sampler=same``, ``staleness=0``)                         (time/kl)

Losses come from :func:`ctpo_lab.losses.compute_policy_loss` (float32; bf16 autocast only for the model on
CUDA); their diagnostics are logged under their own names (``actor/ppo_kl``, ``clip_ratio/*``,
``pg_update/*``), averaged over the updates of the step, and for the last update under ``offpolicy/last_mb/``.
All randomness of step s is drawn from generators seeded by (seed, s, purpose), and the global RNG states are
checkpointed, so a resumed run on CPU reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ctpo_lab.advantages import grpo_advantages
from ctpo_lab.diagnostics import masked_mean
from ctpo_lab.losses import LossConfig, compute_policy_loss, metrics_to_host
from ctpo_lab.runsafety import read_jsonl
from ctpo_lab.train.config import TrainConfig, parse_sampler
from ctpo_lab.train.distributed import init_distributed
from ctpo_lab.train.policy import Policy, evaluate, load_policy, sampler_copy
from ctpo_lab.train.rollout import RolloutBatch, response_log_probs, sample, score
from ctpo_lab.train.runfolder import FINISHED_FILE, RunFolder, set_rng_state
from ctpo_lab.train.tasks import Problem, make_task

__all__ = [
    "Trainer",
    "TrainResult",
    "NanLossError",
    "derived_seed",
    "train",
]

#: Metrics whose values depend on the machine's speed (excluded when comparing a resumed run).
TIMING_KEYS = ("time/", "perf/", "wall_time")


class NanLossError(RuntimeError):
    """Raised after ``max_nan_steps`` consecutive steps with a non-finite loss (last checkpoint intact)."""


@dataclass
class TrainResult:
    out: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    finished: bool = False  #: ``resume`` of an already finished run: nothing was run or written


def derived_seed(seed: int, step: int, purpose: int, rank: int = 0) -> int:
    """A 63-bit seed for the generator of (run seed, step, purpose[, data-parallel rank > 0])."""
    entropy = [seed, step, purpose] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Trainer:
    """Builds everything from a validated config and runs :meth:`train`.

    Construction order guarantees that every error about the config or the run folder is raised before any
    model is built or loaded.  The loss is ``cfg.loss`` (a preset name or a :class:`~ctpo_lab.losses.LossConfig`)
    or, when given, ``loss`` (the same kinds; it replaces ``cfg.loss``, ``cfg.loss_overrides`` still apply);
    the loss trained with is always ``losses.resolve_config(loss, **cfg.loss_overrides)``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        loss: str | LossConfig | None = None,
    ) -> None:
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg: expected TrainConfig, got {type(cfg).__name__}")
        if loss is not None:
            if not isinstance(loss, (str, LossConfig)):
                raise TypeError(f"loss: expected a preset name or a LossConfig, got {type(loss).__name__}")
            cfg = dataclasses.replace(cfg, loss=loss)
        cfg.validate()
        if cfg.track:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ValueError("track: --track needs the wandb package (pip install wandb)") from None
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.device)
        d = self.dist
        if d.active and (cfg.batch_prompts % d.world or cfg.mini_batch_prompts % d.world):
            raise ValueError(
                f"mini_batch_prompts: batch_prompts={cfg.batch_prompts} and mini_batch_prompts="
                f"{cfg.mini_batch_prompts} must be multiples of the {d.world} data-parallel ranks"
            )
        self.progress = progress and d.is_main
        printer = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._print = printer if d.is_main else (lambda s: None)
        RunFolder.check(out, resume=resume, overwrite=overwrite)  # every rank, before anyone writes
        if resume:  # a folder named metrics.jsonl, a file named tb or ckpt, ...: refused before anything is touched
            RunFolder.check_entries(out)
        #: the finished.json of a run completed to ≥ cfg.steps given ``resume``: :meth:`train` then reports it and
        #: changes nothing (a larger ``steps`` extends the run)
        self.finished = RunFolder.finished_summary(out) if resume else None
        if self.finished is not None:
            saved = RunFolder(out, writer=False).read_config()
            if saved is not None:
                _check_resume_config(saved, cfg)
            if self.finished["steps"] >= cfg.steps:  # validated: an int ≥ 1
                self.run = RunFolder(out, writer=False)
                return
        d.barrier()
        self.run = RunFolder(
            out, resume=resume, overwrite=overwrite, keep=cfg.keep_checkpoints, writer=d.is_main
        )
        # everything a resume reads is checked before anything is built or written: config.yaml, metrics.jsonl and
        # the newest readable checkpoint (a corrupt newest one falls back to the previous one, saying so)
        resume_state = self._check_resumable(cfg) if resume else None
        if self.finished is not None and d.is_main:  # extending a finished run: it is not finished any more
            (self.run.path / FINISHED_FILE).unlink(missing_ok=True)
        self.finished = None
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.task = make_task(cfg.task, **cfg.task_options)
        self.loss_config: LossConfig = cfg.loss_config()
        self.max_new_tokens = cfg.max_new_tokens or self.task.max_response_tokens
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        if not d.is_main:
            d.barrier()  # rank 0 builds (or reads) the warm-start cache first
        self.policy: Policy = load_policy(cfg, self.task, self.device, progress=self.progress)
        if d.is_main:
            d.barrier()
        self.model = self.policy.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
        )
        self.eval_set = self.task.test_set(cfg.eval_prompts)
        # the rollout policy μ (TrainConfig: sampler, staleness): a separate engine only when it differs
        kind, tau = parse_sampler(cfg.sampler)
        self.sampler_kind = kind
        self.sampler_temperature = tau if kind == "temperature" else cfg.temperature
        #: the trainer's precision: float32 (no autocast, on CUDA too) whenever the sampler is another engine
        self.precision = "auto" if kind == "same" else "float32"
        self.sampler_model: torch.nn.Module | None = None
        if kind == "bf16" or cfg.staleness > 0:
            self.sampler_model = sampler_copy(self.model, bf16=kind == "bf16")
        #: the weights before each of the last ``staleness`` optimizer updates, oldest first
        self.stale_weights: deque[dict[str, Tensor]] = deque(maxlen=max(cfg.staleness, 1))
        self.mismatch = kind != "same" or cfg.staleness > 0 or cfg.rollout_correction is not None
        self.start_step = 0
        self.consecutive_nan = 0
        self.wall_offset = 0.0
        if resume_state is not None:
            state = resume_state
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            self.start_step = int(state["step"])
            self.consecutive_nan = int(state.get("consecutive_nan", 0))
            self.wall_offset = float(state.get("wall_time", 0.0))
            self.stale_weights.extend(state.get("stale_weights") or [])
        self.train_model: torch.nn.Module = self.model
        if d.active:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.run.write_config(
            {
                **cfg.to_dict(),
                "resolved_loss": dataclasses.asdict(self.loss_config),
                "policy": {k: v for k, v in self.policy.info.items() if not isinstance(v, dict)},
                "updates_per_step": cfg.updates_per_step,
                "device": str(self.device),
                "world_size": d.world,
                "max_new_tokens_resolved": self.max_new_tokens,
            }
        )
        self._stop = False

    def _check_resumable(self, cfg: TrainConfig) -> dict[str, Any] | None:
        """The checkpoint state a resume continues from (None: nothing to continue, a fresh start).

        ``ValueError`` naming the file, before any model is built or any file written, when ``config.yaml`` or
        ``metrics.jsonl`` is corrupt, when the config differs from the one the run was started with (the
        checkpoint's copy decides where ``config.yaml`` was cut short or edited), when checkpoints exist but none
        is readable, or when the folder logged training steps but holds no checkpoint (a fresh start would replace
        them)."""
        saved = self.run.read_config()
        if saved is not None:
            _check_resume_config(saved, cfg)
        logged = read_jsonl(self.run.metrics_path, name="resume", warn=False, step_key="step") \
            if self.run.metrics_path.is_file() else []
        if not self.run.checkpoints():
            # only the step-0 evaluation logged (stopped during step 1): a fresh start logs it again, identically
            steps = [r["step"] for r in logged if r["step"] > 0]
            if steps:
                raise ValueError(
                    f"resume: {self.run.path} has no checkpoint to continue from, but metrics.jsonl logs steps up to "
                    f"{max(steps)}; pass --overwrite to start the run again, or choose another folder")
            return None
        state = self.run.load_checkpoint(None, map_location=self.device)
        if isinstance(state.get("config"), dict):
            _check_resume_config(state["config"], cfg, source="its newest checkpoint's config")
        if int(state["step"]) > cfg.steps:
            raise ValueError(f"steps: the run in {self.run.path} is at step {int(state['step'])} already; pass --steps "
                             f"{int(state['step'])} or more to continue it")
        return state

    # ------------------------------------------------------------------ pieces
    def describe_batch_structure(self) -> str:
        c = self.cfg
        return (
            f"[ctpo_lab.train] {c.updates_per_step} optimizer updates per rollout batch: "
            f"{c.batch_prompts} prompts × {c.group_size} responses = {c.rollout_batch_size} responses, "
            f"mini-batches of {c.mini_batch_prompts} prompts "
            f"({c.mini_batch_prompts * c.group_size} responses) × {c.ppo_epochs} epoch(s); update 1 is "
            f"on-policy, updates 2..{c.updates_per_step} are off-policy. loss={c.loss_name} device={self.device}"
            + (f" data-parallel ranks={self.dist.world}" if self.dist.active else "")
            + (
                f"; rollout policy μ: sampler={c.sampler} staleness={c.staleness} (optimizer updates), "
                f"rollout_correction={c.rollout_correction}, old_log_prob recomputed in "
                f"{'float32' if self.precision == 'float32' else 'the trainer precision'}"
                if self.mismatch
                else ""
            )
        )

    def rollout(self, step: int) -> tuple[list[Problem], RolloutBatch]:
        cfg = self.cfg
        rng = np.random.default_rng(derived_seed(cfg.seed, step, 0))
        problems = self.task.sample(rng, cfg.batch_prompts, "train")
        per_rank = cfg.batch_prompts // self.dist.world
        problems = problems[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
        expanded = [p for p in problems for _ in range(cfg.group_size)]
        gen = torch.Generator(device=self.device).manual_seed(derived_seed(cfg.seed, step, 1, self.dist.rank))
        self.model.eval()
        batch = sample(
            self.rollout_model(),
            [self.policy.encode_prompt(p) for p in expanded],
            max_new_tokens=self.max_new_tokens,
            temperature=self.sampler_temperature,
            eos_token_id=self.policy.tokenizer.eos_token_id,
            pad_token_id=self.policy.tokenizer.pad_token_id,
            generator=gen,
        )
        return expanded, batch

    def rollout_model(self) -> torch.nn.Module:
        """The sampler μ of this step: the policy itself, or the separate engine loaded with the weights of
        ``staleness`` optimizer updates ago (the oldest kept ones while fewer updates exist; the current ones
        for ``staleness=0``), cast to its dtype."""
        if self.sampler_model is None:
            return self.model
        source = self.stale_weights[0] if self.cfg.staleness > 0 and self.stale_weights else self.model.state_dict()
        self.sampler_model.load_state_dict(source)
        return self.sampler_model

    @property
    def sampler_lag(self) -> int:
        """How many optimizer updates the next rollout's weights are behind the current ones."""
        return len(self.stale_weights) if self.cfg.staleness > 0 else 0

    def _snapshot(self) -> None:
        """Keep the weights before an optimizer update (``staleness`` > 0)."""
        if self.cfg.staleness > 0:
            self.stale_weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    def evaluate(self, step: int) -> dict[str, float]:
        d = self.dist
        gen = torch.Generator(device=self.device).manual_seed(derived_seed(self.cfg.seed, step, 3, d.rank))
        t0 = time.perf_counter()
        shard = self.eval_set[d.rank :: d.world]
        ev = evaluate(
            self.policy,
            self.task,
            shard,
            samples=self.cfg.eval_samples,
            temperature=self.cfg.eval_temperature,
            max_new_tokens=self.max_new_tokens,
            generator=gen,
        )
        if d.active:
            n = float(len(shard))
            acc, length, total = d.sum(
                [ev["eval_accuracy"] * n, ev["eval/response_length"] * n, n], self.device
            )
            ev = {"eval_accuracy": acc / total, "eval/response_length": length / total}
        ev["time/eval"] = time.perf_counter() - t0
        return ev

    def checkpoint(self, step: int, wall: float) -> Path:
        return self.run.save_checkpoint(
            step,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "consecutive_nan": self.consecutive_nan,
                "wall_time": wall,
                "config": self.cfg.to_dict(),
                **({"stale_weights": list(self.stale_weights)} if self.cfg.staleness > 0 else {}),
            },
        )

    def train_step(self, step: int) -> dict[str, Any]:
        """One rollout batch and its ``updates_per_step`` optimizer updates; returns the step's record."""
        cfg, model, device = self.cfg, self.model, self.device
        t_start = time.perf_counter()
        lag = self.sampler_lag
        problems, batch = self.rollout(step)
        t_gen = time.perf_counter() - t_start

        sc = score(self.task, self.policy.tokenizer, problems, batch)
        rewards = sc.rewards.to(device)  # [N]
        adv = grpo_advantages(rewards, cfg.group_size)  # [N], consecutive groups of G, on the device
        mask = batch.response_mask  # [N, R]

        t0 = time.perf_counter()
        if cfg.recompute_old_log_prob:
            with torch.no_grad():
                old_lp, entropy = response_log_probs(
                    model, batch, cfg.temperature, with_entropy=True, precision=self.precision
                )  # [N, R]
            old = old_lp
            pre = {
                "entropy": masked_mean(entropy, mask),
                "rollout/log_prob_abs_diff": masked_mean((old_lp - batch.log_probs).abs(), mask),
            }
            if self.mismatch:  # ℓ = log π_old − log μ: rollout_correction.offpolicy_metrics' kl and k3_kl
                ell = torch.where(mask, old_lp - batch.log_probs, 0.0)
                pre["rollout_corr/kl"] = masked_mean(-ell, mask)
                pre["rollout_corr/k3_kl"] = masked_mean(ell.exp() - 1 - ell, mask)
        else:  # the sampler's log-probs: the policy has not changed since sampling (no extra forward)
            old = batch.log_probs
            pre = {"entropy": masked_mean(batch.entropy, mask)} if batch.entropy is not None else {}
        t_old = time.perf_counter() - t0

        t0 = time.perf_counter()
        model.train()
        n_groups = cfg.batch_prompts // self.dist.world  # this rank's prompt groups
        mb_groups = cfg.mini_batch_prompts // self.dist.world
        shuffle = torch.Generator().manual_seed(derived_seed(cfg.seed, step, 2))
        per_update: list[dict[str, float]] = []
        last_out, last_rows = None, None
        nan_updates = 0
        for _epoch in range(cfg.ppo_epochs):
            order = (
                torch.randperm(n_groups, generator=shuffle)
                if cfg.shuffle_mini_batches
                else torch.arange(n_groups)
            )
            for k in range(cfg.num_mini_batches):
                groups = order[k * mb_groups : (k + 1) * mb_groups]
                rows = (groups[:, None] * cfg.group_size + torch.arange(cfg.group_size)).flatten().to(device)
                sub = batch.select(rows)
                lp, _ = response_log_probs(self.train_model, sub, cfg.temperature, precision=self.precision)
                correction = (
                    {"rollout_log_prob": sub.log_probs, "rollout_correction": cfg.rollout_correction}
                    if cfg.rollout_correction is not None
                    else {}
                )
                out = compute_policy_loss(
                    lp, old[rows], adv[rows], sub.response_mask, preset=self.loss_config, **correction
                )
                host = metrics_to_host(
                    {
                        **out.metrics,
                        "_nonfinite": out.num_nonfinite.to(torch.float32),
                        "_loss": out.loss.detach(),
                    }
                )
                bad = host.pop("_nonfinite") > 0 or not math.isfinite(host.pop("_loss"))
                if self.dist.any(bad, device):  # every rank skips together (DDP needs matching backwards)
                    nan_updates += 1
                    warnings.warn(
                        f"step {step}: non-finite loss in update {k + 1}; update skipped", stacklevel=2
                    )
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                if not math.isfinite(grad_norm):
                    nan_updates += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    warnings.warn(
                        f"step {step}: non-finite gradient in update {k + 1}; update skipped", stacklevel=2
                    )
                    continue
                self._snapshot()
                self.optimizer.step()
                host["actor/grad_norm"] = grad_norm
                per_update.append(host)
                last_out, last_rows = out, rows
        self.optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0

        t0 = time.perf_counter()
        post: dict[str, Tensor] = {}
        if cfg.measure_final_kl:
            model.eval()
            with torch.no_grad():
                new_lp, _ = response_log_probs(model, batch, cfg.temperature, precision=self.precision)
            ell = torch.where(mask, new_lp - old, 0.0)
            post["offpolicy/kl"] = masked_mean(-ell, mask)
            post["offpolicy/kl_k3"] = masked_mean(ell.exp() - 1 - ell, mask)
            post["offpolicy/max_abs_log_ratio"] = torch.where(mask, ell.abs(), 0.0).amax()
        t_kl = time.perf_counter() - t0

        lengths = batch.lengths.float()
        groups_r = rewards.view(-1, cfg.group_size)
        dev_metrics = {
            **pre,
            **post,
            "reward_mean": rewards.mean(),
            "reward_std": rewards.std(),
            "response_length/mean": lengths.mean(),
            "response_length/max": lengths.max(),
            "response_length/min": lengths.min(),
            "response_length/clip_ratio": (~batch.finished).float().mean(),
            "adv/zero_std_groups": (groups_r.std(-1) == 0).float().mean(),
        }
        host_metrics = metrics_to_host(dev_metrics)
        record: dict[str, Any] = {"step": step, **host_metrics}
        if per_update:
            for key in per_update[0]:
                record[key] = float(np.mean([u[key] for u in per_update]))
            first, last = per_update[0], per_update[-1]
            record["offpolicy/first_mb/ppo_kl"] = first["actor/ppo_kl"]
            for key in (
                "actor/ppo_kl",
                "actor/pg_clipfrac",
                "pg_update/clip/total/rate",
                "clip_ratio/region_mean",
            ):
                record[f"offpolicy/last_mb/{key.split('/', 1)[1]}"] = last[key]
        for key in ("rollout_corr/kl", "rollout_corr/k3_kl"):  # the trainer's whole-batch values win
            if key in host_metrics:
                record[key] = host_metrics[key]
        if cfg.staleness > 0:
            record["rollout/staleness"] = lag
        record["offpolicy/updates_per_step"] = cfg.updates_per_step
        record["train/nan_updates"] = nan_updates
        record["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        n_tokens = int(mask.sum())
        t_total = time.perf_counter() - t_start
        record.update(
            {
                "time/gen": t_gen,
                "time/score": sc.seconds,
                "time/old_log_prob": t_old,
                "time/update": t_update,
                "time/kl": t_kl,
                "time/step": t_total,
                "perf/tokens_per_s": n_tokens / max(t_total, 1e-9),
                "perf/gen_tokens_per_s": n_tokens / max(t_gen, 1e-9),
            }
        )
        if cfg.dump_every and step % cfg.dump_every == 0 and last_out is not None:
            self._dump(step, last_out, adv, last_rows)
        record = self.dist.reduce_record(record, device)
        record["step"] = step
        record["_nan_step"] = nan_updates > 0
        return record

    def _dump(self, step: int, out: Any, adv: Tensor, rows: Tensor) -> None:
        """Ratio dump of the last (most off-policy) mini-batch in the CTPO npz layout."""
        from ctpo_lab import dumps

        self.run.ratio_dir.mkdir(parents=True, exist_ok=True)
        cum = torch.where(out.mask, out.log_ratio, 0.0).cumsum(-1)
        dumps.write_ratio_dump(
            self.run.ratio_dir,
            cum,
            out.mask,
            step=step,
            rank=self.dist.rank,
            advantages=adv[rows],
            group_ids=(rows // self.cfg.group_size),
            log_weight=out.log_weight_value,
            overwrite=True,
        )

    # ------------------------------------------------------------------ main loop
    def train(self, *, interrupt_after: int | None = None) -> TrainResult:
        """Run to ``cfg.steps``; Ctrl-C (or ``interrupt_after`` steps in this session, for tests) finishes the
        current step, writes a checkpoint and returns with ``interrupted=True``."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        if self.finished is not None:
            self._print(f"[ctpo_lab.train] {self.run.path} is a finished run (step {self.finished.get('steps')}); "
                        "nothing to resume, nothing changed")
            self.dist.close()
            return TrainResult(out=self.run.path, final=dict(self.finished.get("final") or {}), finished=True)
        self._print(self.describe_batch_structure())
        self.run.open_loggers(
            start_step=self.start_step,
            tensorboard=cfg.tensorboard,
            track=cfg.track,
            config=cfg.to_dict(),
            project=cfg.wandb_project,
        )
        result = TrainResult(out=self.run.path)
        t_session = time.perf_counter()
        wall = self.wall_offset
        restore = self._install_sigint()
        last_acc = float("nan")
        try:
            if self.start_step == 0 and cfg.eval_every:
                ev = self.evaluate(0)
                last_acc = ev["eval_accuracy"]
                rec = {
                    "step": 0,
                    **ev,
                    "initial_eval_accuracy_warmstart": self.policy.info.get("initial_eval_accuracy"),
                }
                self.run.log({k: v for k, v in rec.items() if v is not None})
                result.history.append(rec)
            bar = tqdm(
                range(self.start_step + 1, cfg.steps + 1),
                initial=self.start_step,
                total=cfg.steps,
                desc=cfg.loss_name,
                disable=not self.progress,
                dynamic_ncols=True,
            )
            done_here = 0
            for step in bar:
                record = self.train_step(step)
                nan_step = record.pop("_nan_step")
                self.consecutive_nan = self.consecutive_nan + 1 if nan_step else 0
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    ev = self.evaluate(step)
                    record.update(ev)
                    last_acc = ev["eval_accuracy"]
                wall = self.wall_offset + time.perf_counter() - t_session
                record["wall_time"] = wall
                self.run.log(record)
                result.history.append(record)
                bar.set_postfix(
                    reward=f"{record['reward_mean']:.3f}",
                    acc=f"{last_acc:.3f}",
                    kl=f"{record.get('offpolicy/kl', float('nan')):.2e}",
                )
                if self.consecutive_nan >= cfg.max_nan_steps:
                    raise NanLossError(
                        f"{self.consecutive_nan} consecutive steps with a non-finite loss (max_nan_steps="
                        f"{cfg.max_nan_steps}); stopped at step {step}, "
                        f"last checkpoint: {self.run.latest_checkpoint()}"
                    )
                done_here += 1
                if interrupt_after is not None and done_here >= interrupt_after:
                    self._stop = True
                self._stop = self.dist.any(self._stop, self.device)
                if self._stop and step < cfg.steps:
                    self.checkpoint(step, wall)
                    self._print(
                        f"[ctpo_lab.train] interrupted: checkpoint at step {step} in {self.run.ckpt_dir}"
                    )
                    result.interrupted = True
                    break
                if not nan_step and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
                    self.checkpoint(step, wall)
            bar.close()
            if not result.interrupted:
                if result.history:
                    final = dict(result.history[-1])
                else:  # resumed at its last step: the final record is the logged one
                    logged = [r for r in self.run.read_metrics() if r.get("step", 0) <= self.start_step]
                    final = dict(logged[-1]) if logged else {}
                result.final = final
                self.run.mark_finished({"steps": cfg.steps, "wall_time": wall, "final": final})
        finally:
            restore()
            self.run.close()
            self.dist.close()
        return result

    def _install_sigint(self) -> Callable[[], None]:
        """SIGINT (Ctrl-C) and SIGTERM (what schedulers and a dying grid parent send): finish the current step,
        write a checkpoint, return ``interrupted``; a second signal stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self._stop:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop = True
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            self._print(
                f"\n[ctpo_lab.train] {name}: finishing the current step and writing a checkpoint "
                "(send it again to abort)"
            )

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, h in previous.items():
                signal.signal(sig, h)

        return restore


_RESUME_FREE = {
    "steps",
    "tensorboard",
    "track",
    "wandb_project",
    "threads",
    "device",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
    "dump_every",
    "max_nan_steps",
}


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, source: str = "config.yaml") -> None:
    new = cfg.to_dict()
    diff = sorted(k for k in new if k not in _RESUME_FREE and k in saved and saved[k] != new[k])
    if diff:
        raise ValueError(
            f"resume: the config differs from the run folder's {source} in {diff} "
            f"(saved {[saved[k] for k in diff]}, given {[new[k] for k in diff]}); "
            "use a new --out or --overwrite"
        )


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    loss: str | LossConfig | None = None,
) -> TrainResult:
    """Build a :class:`Trainer` and run it (the programmatic twin of ``python -m ctpo_lab.train``); ``loss``: a
    preset name or a :class:`~ctpo_lab.losses.LossConfig` replacing ``cfg.loss``."""
    return Trainer(cfg, out, resume=resume, overwrite=overwrite, progress=progress, loss=loss).train()
