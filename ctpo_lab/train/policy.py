"""The policy: a small LlamaForCausalLM built from a config and given a cached supervised warm start on noisy
demonstrations, or any HF causal LM (via :func:`ctpo_lab.llm.models.load_model`).

The warm start trains on demonstrations whose elementary results are wrong with probability
``warmstart_noise`` (teacher forcing, cross-entropy on response tokens only).  The policy imitates the noise,
so its held-out accuracy at temperature 1 starts well below 100% (≈ (1−q)^steps for the ``chain`` task) and
RL has room to improve it.  The result is cached in ``$CTPO_LAB_CACHE/train/warmstart/<key>/`` (key = hash of
task, architecture and warm-start settings) and reused by every later run, whatever its run seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctpo_lab.train.device import pick_device
from ctpo_lab.train.rollout import autocast, response_log_probs, sample, score
from ctpo_lab.train.tasks import Task, make_task
from ctpo_lab.train.tokenizer import CharTokenizer

__all__ = [
    "TinyLlamaSpec",
    "Policy",
    "build_tiny_llama",
    "warm_start",
    "load_policy",
    "cache_dir",
    "evaluate",
    "prepare_warm_start",
    "sampler_copy",
]

WARMSTART_VERSION = 1


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Architecture of the built-in policy (``model_options`` in the trainer config)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 1024

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TinyLlamaSpec:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"model_options: unknown option(s) {unknown}; valid: {sorted(valid)}")
        spec = cls(**options)
        for f in dataclasses.fields(cls):
            v = getattr(spec, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model_options.{f.name}: expected a positive int, got {v!r}")
        if spec.hidden_size % spec.num_heads or (spec.hidden_size // spec.num_heads) % 2:
            raise ValueError(
                f"model_options.num_heads: hidden_size={spec.hidden_size} must split into an even head size"
            )
        return spec


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: Any  #: CharTokenizer or an HF tokenizer
    info: dict[str, Any]  #: provenance (warm-start cache key, initial held-out accuracy, ...)

    def encode_prompt(self, problem: Any) -> list[int]:
        """Token ids of a problem's prompt (``<bos>`` + characters, or the chat template for HF models)."""
        if isinstance(self.tokenizer, CharTokenizer):
            return self.tokenizer.encode(problem.prompt, add_bos=True)
        messages = (
            list(problem.messages) if problem.messages else [{"role": "user", "content": problem.prompt}]
        )
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)


def build_tiny_llama(spec: TinyLlamaSpec, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM (tied embeddings, sdpa attention), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_theta=10000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def cache_dir() -> Path:
    return Path(os.environ.get("CTPO_LAB_CACHE", Path.home() / ".cache" / "ctpo_lab")) / "train" / "warmstart"


def _demo_batch(
    task: Task, tok: CharTokenizer, rng: np.random.Generator, n: int, noise: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [n, L] ids, attention mask and loss mask (response tokens incl. <eos>)."""
    problems = task.sample(rng, n, "train")
    seqs, starts = [], []
    for p in problems:
        prompt = tok.encode(p.prompt, add_bos=True)
        resp = tok.encode(task.solution(p, rng, noise)) + [tok.eos_token_id]
        seqs.append(prompt + resp)
        starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.zeros((n, width), dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.bool)
    target = torch.zeros((n, width), dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = True
        target[i, st : len(s)] = True
    return ids, attn, target


@torch.no_grad()
def evaluate(
    policy: Policy,
    task: Task,
    problems: list[Any],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    generator: torch.Generator | None,
    batch_size: int = 256,
) -> dict[str, float]:
    """avg@k accuracy on ``problems`` (each sampled ``samples`` times) and the mean response length."""
    model, tok = policy.model, policy.tokenizer
    was_training = model.training
    model.eval()
    items = [p for p in problems for _ in range(samples)]
    rewards, lengths = [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        batch = sample(
            model,
            [policy.encode_prompt(p) for p in chunk],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=generator,
        )
        rewards.append(score(task, tok, chunk, batch).rewards)
        lengths.append(batch.lengths.float().cpu())
    model.train(was_training)
    return {
        "eval_accuracy": float(torch.cat(rewards).mean()),
        "eval/response_length": float(torch.cat(lengths).mean()),
    }


def warm_start(
    task: Task,
    spec: TinyLlamaSpec,
    *,
    steps: int,
    batch: int,
    lr: float,
    noise: float,
    seed: int,
    eval_prompts: int = 128,
    eval_temperature: float = 1.0,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
    progress: bool = True,
) -> Policy:
    """Build the tiny Llama and train it on noisy demonstrations, or load the cached result.

    Returns a :class:`Policy` on ``device`` whose ``info`` holds the cache key, the final supervised loss and
    the held-out accuracy (avg@1 at ``eval_temperature`` on ``task.test_set(eval_prompts)``).
    """
    device = torch.device(device)
    tok = CharTokenizer()
    key_data = {
        "version": WARMSTART_VERSION,
        "task": task.describe(),
        "spec": dataclasses.asdict(spec),
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "noise": noise,
        "seed": seed,
        "alphabet": tok.alphabet,
    }
    key = hashlib.sha1(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / key
    if not use_cache:
        return _train_warm_start(task, spec, tok, key, key_data, target, steps=steps, batch=batch, lr=lr,
                                 noise=noise, seed=seed, eval_prompts=eval_prompts,
                                 eval_temperature=eval_temperature, device=device, progress=progress,
                                 use_cache=False)
    if not (target / "meta.json").is_file():
        # one process trains, concurrent ones (parallel grid runs, data-parallel ranks) wait for its result
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.parent / f".{key}.lock"):
            if not (target / "meta.json").is_file():
                _train_warm_start(task, spec, tok, key, key_data, target, steps=steps, batch=batch, lr=lr,
                                  noise=noise, seed=seed, eval_prompts=eval_prompts,
                                  eval_temperature=eval_temperature, device=device, progress=progress,
                                  use_cache=True)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(target).to(device)
    model.generation_config.pad_token_id = 0
    return Policy(model, tok, json.loads((target / "meta.json").read_text()))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) held for the block; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train_warm_start(
    task: Task,
    spec: TinyLlamaSpec,
    tok: CharTokenizer,
    key: str,
    key_data: dict[str, Any],
    target: Path,
    *,
    steps: int,
    batch: int,
    lr: float,
    noise: float,
    seed: int,
    eval_prompts: int,
    eval_temperature: float,
    device: torch.device,
    progress: bool,
    use_cache: bool,
) -> Policy:
    t0 = time.perf_counter()
    model = build_tiny_llama(spec, tok.vocab_size, seed).to(device)
    rng = np.random.default_rng([seed, 7])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + np.cos(np.pi * s / max(1, steps)))
    )
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="warm start", disable=not progress, leave=False)
    loss_value = float("nan")
    model.train()
    for _ in bar:
        ids, attn, tgt = (x.to(device) for x in _demo_batch(task, tok, rng, batch, noise))
        with autocast(device):  # bf16 on CUDA, float32 on CPU
            logits = model(input_ids=ids, attention_mask=attn.long()).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * tgt[:, 1:]).sum() / tgt[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    gen = torch.Generator(device=device).manual_seed(seed)
    policy = Policy(model, tok, {})
    ev = evaluate(
        policy,
        task,
        task.test_set(eval_prompts),
        samples=1,
        temperature=eval_temperature,
        max_new_tokens=task.max_response_tokens,
        generator=gen,
    )
    policy.info = {
        "warmstart_key": key,
        "warmstart_loss": loss_value,
        "warmstart_seconds": time.perf_counter() - t0,
        "initial_eval_accuracy": ev["eval_accuracy"],
        "initial_eval_prompts": eval_prompts,
        "initial_eval_temperature": eval_temperature,
        **key_data,
    }
    if use_cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
        model.save_pretrained(tmp)
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(policy.info, indent=1))
        try:
            os.replace(tmp, target)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return policy


def load_policy(cfg: Any, task: Task, device: torch.device, progress: bool = True) -> Policy:
    """The policy a :class:`~ctpo_lab.train.config.TrainConfig` asks for, on ``device``."""
    if cfg.model == "tiny-llama":
        spec = TinyLlamaSpec.from_options(cfg.model_options)
        return warm_start(
            task,
            spec,
            steps=cfg.warmstart_steps,
            batch=cfg.warmstart_batch,
            lr=cfg.warmstart_lr,
            noise=cfg.warmstart_noise,
            seed=cfg.warmstart_seed,
            eval_prompts=cfg.eval_prompts,
            eval_temperature=cfg.eval_temperature,
            device=device,
            progress=progress,
        )
    try:
        from ctpo_lab.llm import models as llm_models
    except ImportError as e:  # pragma: no cover - depends on the llm module being present
        raise ValueError(f"model: loading {cfg.model!r} needs ctpo_lab.llm.models ({e})") from e
    loaded = llm_models.load_model(cfg.model, seed=cfg.warmstart_seed, pad_token="eos")
    model, tokenizer = loaded.model, loaded.tokenizer
    return Policy(model.to(device), tokenizer, {"model": cfg.model})


def prepare_warm_start(cfg: Any, *, threads: int | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Build (or find) the cached warm start of a config once, before parallel runs start; returns its info.

    Parallel runs would otherwise all start training the same warm start (the file lock in
    :func:`warm_start` makes them wait for one of them).
    ``None`` for HF models (no warm start). The model is released afterwards (CUDA memory included).
    """
    if cfg.model != "tiny-llama":
        return None

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = pick_device(cfg.device)
        policy = load_policy(cfg, make_task(cfg.task, **cfg.task_options), device, progress=progress)
        info = dict(policy.info)
        del policy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(previous)
    return info


def sampler_copy(model: torch.nn.Module, *, bf16: bool) -> torch.nn.Module:
    """A separate rollout engine: a deep copy of ``model`` in eval mode without gradients whose weights the
    trainer loads before each rollout (:meth:`~torch.nn.Module.load_state_dict` casts them).  ``bf16``: its
    parameters are bfloat16 (activations and the KV cache follow), its buffers (RoPE's ``inv_freq``) stay
    float32, as an inference engine that keeps a bf16 copy of the weights."""
    import copy

    engine = copy.deepcopy(model)
    engine.eval()
    for p in engine.parameters():
        p.requires_grad_(False)
        if bf16:
            p.data = p.data.to(torch.bfloat16)
    return engine


def teacher_forced_nll(policy: Policy, batch: Any) -> float:
    """Mean NLL of a rollout batch's response tokens (debug helper)."""
    logp, _ = response_log_probs(policy.model, batch, 1.0)
    return float(-(logp.sum() / batch.response_mask.sum()))
