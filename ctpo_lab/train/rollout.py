"""Batched sampling with a KV cache and recorded log-probs; teacher-forced log-probs; scoring.

Shapes: N responses, P (left-padded) prompt length, R response length (right-padded), V vocabulary.
Log-probs are of the *tempered* policy softmax(logits / temperature), the distribution the tokens were
sampled from (as verl does), always in float32.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ctpo_lab.train.tasks import Problem, Task

__all__ = [
    "RolloutBatch",
    "PRECISIONS",
    "autocast",
    "left_pad",
    "sample",
    "response_log_probs",
    "score",
    "ScoreResult",
]


@dataclass
class RolloutBatch:
    """Prompts and sampled responses of one rollout (all tensors on the model's device)."""

    prompt_ids: Tensor  #: [N, P] int64, left-padded with the pad id
    prompt_mask: Tensor  #: [N, P] bool
    response_ids: Tensor  #: [N, R] int64, right-padded after <eos>
    response_mask: Tensor  #: [N, R] bool, valid response tokens (including the <eos>)
    log_probs: Tensor  #: [N, R] float32 log μ(y_t|s_t) recorded while sampling (0 on padding)
    finished: Tensor  #: [N] bool, the response ended with <eos> (else truncated at max_new_tokens)
    entropy: Tensor | None = None  #: [N, R] float32 entropy of the sampling distribution (0 on padding)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: Tensor) -> RolloutBatch:
        """The sub-batch of the given row indices ([n] int64)."""
        return RolloutBatch(
            *(None if getattr(self, f) is None else getattr(self, f)[rows] for f in self.__dataclass_fields__)
        )

    @property
    def lengths(self) -> Tensor:
        """[N] number of valid response tokens."""
        return self.response_mask.sum(-1)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, a no-op elsewhere (CPU runs in float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token-id lists → ([N, P] ids, [N, P] bool mask), left-padded."""
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt")
    width = max(len(p) for p in prompts)
    if width == 0:
        raise ValueError("prompts: every prompt is empty")
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = True
    return ids.to(device), mask.to(device)


def _cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` (transformers ≥ 5.2x) or ``past_key_values`` (older releases)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def lean_decoding_supported(model: torch.nn.Module) -> bool:
    """Whether :class:`_LeanLlama` can run ``model``: a Llama (SmolLM2 too), static RoPE, eval mode."""
    cfg, inner = getattr(model, "config", None), getattr(model, "model", None)
    rope = getattr(inner, "rotary_emb", None)
    return (
        getattr(cfg, "model_type", None) == "llama"
        and rope is not None
        and hasattr(rope, "inv_freq")
        and getattr(rope, "rope_type", "default") in ("default", "linear", "llama3")
        and hasattr(model, "lm_head")
        and not model.training
    )


class _LeanLlama:
    """Prefill and one-token decode steps for a LlamaForCausalLM with preallocated KV buffers.

    The same modules and arithmetic as transformers' Llama forward (RMSNorm, RoPE from the model's own
    ``inv_freq`` and ``attention_scaling``, SDPA, SwiGLU MLP), without its per-call cache and mask objects,
    which dominate the cost of decoding with a small model.  Buffers: K, V [N, H_kv, T_max, D] per layer.
    """

    def __init__(self, model: torch.nn.Module, n: int, max_len: int, device: torch.device) -> None:
        self.model, self.inner = model, model.model
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
        shape = (n, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.inner.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.inner.layers]
        self.key_mask = torch.zeros((n, max_len), dtype=torch.bool, device=device)
        rope = self.inner.rotary_emb
        self.inv_freq = rope.inv_freq.float()
        self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self.length = 0

    @staticmethod
    def _rotate(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def __call__(self, ids: Tensor, position: Tensor, valid: Tensor) -> Tensor:
        """ids, position [N, L], valid [N, L] bool → logits of the last position [N, V]."""
        n, length = ids.shape
        s, e = self.length, self.length + length
        self.key_mask[:, s:e] = valid
        x = self.inner.embed_tokens(ids)  # [N, L, E]
        freqs = position[..., None].float() * self.inv_freq  # [N, L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype)[:, None]  # [N, 1, L, D]
        sin = (emb.sin() * self.rope_scale).to(x.dtype)[:, None]
        q_idx = torch.arange(s, e, device=ids.device)[:, None]
        k_idx = torch.arange(e, device=ids.device)[None, :]
        # causal ∧ valid key; every query also sees itself, so left-padding rows never get an empty softmax
        mask = ((k_idx <= q_idx)[None] & self.key_mask[:, None, :e]) | (k_idx == q_idx)[None]  # [N, L, e]
        mask = mask[:, None]
        rep = self.heads // self.kv_heads
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, length, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(n, length, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(n, length, -1, self.head_dim).transpose(1, 2)
            q = q * cos + self._rotate(q) * sin
            k = k * cos + self._rotate(k) * sin
            self.k[i][:, :, s:e] = k
            self.v[i][:, :, s:e] = v
            kk, vv = self.k[i][:, :, :e], self.v[i][:, :, :e]
            if rep > 1:
                kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask, scale=attn.scaling
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(n, length, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.length = e
        return self.model.lm_head(self.inner.norm(x[:, -1]))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    lean: bool | None = None,
) -> RolloutBatch:
    """Sample one response per prompt with a KV cache, recording log μ of every sampled token.

    ``temperature`` 0 means greedy decoding (log-probs are then those of the untempered policy).
    Sampling stops early once every row has produced ``<eos>``.  ``lean`` (default: when supported) decodes
    Llama models with :class:`_LeanLlama` instead of transformers' generic cached forward (≈ 3× faster for
    small models); other architectures use the generic path.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number ≥ 0, got {temperature!r}")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_token_id, device)  # [N, P]
    n = ids.shape[0]
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [N, P]
    use_lean = lean_decoding_supported(model) if lean is None else lean
    ones = torch.ones((n, 1), dtype=torch.bool, device=device)
    if use_lean:
        decoder = _LeanLlama(model, n, ids.shape[1] + max_new_tokens, device)
        with autocast(device):
            logits = decoder(ids, position, mask).float()  # [N, V]
    else:
        cache_kw = _cache_keyword(model)
        with autocast(device):
            out = model(
                input_ids=ids,
                attention_mask=mask.long(),
                position_ids=position,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out.get("cache", out.get("past_key_values"))
        logits = out.logits[:, -1].float()  # [N, V]
        attn = mask.long()
    next_pos = position[:, -1] + 1  # [N]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps, valid, entropies = [], [], [], []
    for step in range(max_new_tokens):
        # x / 1 == x exactly: no division at temperature 1; one exp for the entropy and the sampler
        logp = torch.log_softmax(logits / temperature if temperature not in (0, 1) else logits, dim=-1)  # [N, V]
        probs = logp.exp()
        entropies.append(torch.where(done, 0.0, -(probs * logp).sum(-1)))
        if temperature > 0:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]
        else:
            tok = logp.argmax(-1)
        lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        valid.append(~done)
        tok = torch.where(done, pad_token_id, tok)
        tokens.append(tok)
        logps.append(torch.where(done, 0.0, lp))
        done = done | (tok == eos_token_id)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        with autocast(device):
            if use_lean:
                logits = decoder(tok[:, None], next_pos[:, None], ones).float()
            else:
                attn = torch.cat([attn, ones.long()], dim=1)
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=attn,
                    position_ids=next_pos[:, None],
                    use_cache=True,
                    **{cache_kw: cache},
                )
                cache = out.get("cache", out.get("past_key_values"))
                logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=torch.stack(tokens, 1),
        response_mask=torch.stack(valid, 1),
        log_probs=torch.stack(logps, 1),
        finished=done,
        entropy=torch.stack(entropies, 1),
    )


PRECISIONS = ("auto", "float32")


def response_log_probs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    temperature: float,
    with_entropy: bool = False,
    precision: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced log π(y_t|s_t) of the response tokens (float32, [N, R]) and optionally the entropy
    of the tempered next-token distribution ([N, R]). Differentiable unless called under ``no_grad``.

    ``precision="auto"``: the model's forward under :func:`autocast` (bf16 on CUDA, float32 on CPU);
    ``"float32"``: no autocast anywhere (the trainer's recompute when the sampler is a separate bf16 engine)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    device = batch.prompt_ids.device
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)  # [N, P+R]
    attn = torch.cat([batch.prompt_mask, torch.ones_like(batch.response_mask)], 1)
    position = (attn.long().cumsum(-1) - 1).clamp(min=0)
    r = batch.response_ids.shape[1]
    ctx = autocast(device) if precision == "auto" else contextlib.nullcontext()
    with ctx:  # logits of the last R + 1 positions only (the prompt's are never needed)
        logits = model(
            input_ids=ids, attention_mask=attn.long(), position_ids=position, logits_to_keep=r + 1
        ).logits
    logits = logits[:, -(r + 1) : -1].float()  # [N, R, V]: position P−1+t predicts response token t
    if temperature > 0 and temperature != 1:  # x / 1 == x exactly
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, batch.response_ids[..., None]).squeeze(-1)  # [N, R]
    logp = torch.where(batch.response_mask, logp, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@dataclass
class ScoreResult:
    rewards: Tensor  #: [N] float32 in {0, 1}
    texts: list[str]
    seconds: float


def decode_responses(tokenizer: object, batch: RolloutBatch) -> Iterator[str]:
    ids = batch.response_ids.cpu().tolist()
    lens = batch.lengths.cpu().tolist()
    for row, n in zip(ids, lens):
        yield tokenizer.decode(row[:n], skip_special_tokens=True)  # type: ignore[attr-defined]


def score(task: Task, tokenizer: object, problems: Sequence[Problem], batch: RolloutBatch) -> ScoreResult:
    """Decode every response and apply the task's exact checker; truncated responses (no ``<eos>``) get 0."""
    t0 = time.perf_counter()
    finished = batch.finished.cpu().tolist()
    texts = list(decode_responses(tokenizer, batch))
    rewards = [task.check(p, t) if f else 0.0 for p, t, f in zip(problems, texts, finished)]
    return ScoreResult(torch.tensor(rewards, dtype=torch.float32), texts, time.perf_counter() - t0)
