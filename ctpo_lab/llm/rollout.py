"""Batched sampling with a KV cache (recording the behaviour log-probs) and teacher-forced scoring.

Shapes: N responses, P prompt tokens (left-padded within a chunk), T response tokens (right-padded), V vocab.

* :func:`sample` draws G responses per prompt from μ = softmax(logits/τ) and records
  logp_μ(y_t|s_t) = log_softmax(logits_t/τ)[y_t] for every response token (the EOS token included, as verl).
* :func:`score` runs one teacher-forced forward per chunk and returns log π(y_t|s_t) at temperature τ; with a
  :class:`ReferenceCache` of μ it also returns the exact per-token KL(μ‖π)(s_t) = Σ_y μ (log μ − log π).
  Sampling-time and scoring-time log-probs at the same weights agree to ≤ 1e-4 (float32).

Log-probs are computed in float32 from the final hidden states, the LM head applied in slices of
``head_chunk`` positions so that [N, T, V] logits are never materialised.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RolloutBatch",
    "ReferenceCache",
    "ScoreResult",
    "chunk_seed",
    "sample",
    "score",
    "token_log_probs",
    "left_pad",
    "plain_head",
    "iter_slices",
]

#: model types whose ``get_decoder()`` output feeds the LM head directly (no logit scaling or soft-capping).
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite_moe_shared", "smollm3"}


@dataclass
class RolloutBatch:
    """Sampled responses with their behaviour log-probs.

    prompt_ids : list of N token-id lists (one per response; the prompt of its group)
    prompt_index : int64 [N]  index of the prompt in the prompt list
    group_id : int64 [N]      one id per prompt group (= prompt_index for a single collection)
    tokens : int64 [N, T]     response tokens, ``pad_token_id`` after the end
    mask : bool [N, T]        valid response tokens (EOS included)
    logp : float32 [N, T]     behaviour log-probs log μ(y_t|s_t) (0 on padding)
    finished : bool [N]       the response ended with EOS (else it hit max_new_tokens)
    temperature : float       τ of μ
    pad_token_id : int
    hidden : float32 [N, T, H] or None  μ's final hidden states predicting each token (``keep_hidden``)
    """

    prompt_ids: list[list[int]]
    prompt_index: Tensor
    group_id: Tensor
    tokens: Tensor
    mask: Tensor
    logp: Tensor
    finished: Tensor
    temperature: float
    pad_token_id: int
    hidden: Tensor | None = None  #: float32 [N, T, H] μ's final hidden states (optional, see :func:`sample`)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(-1)

    def subset(self, index: Tensor | np.ndarray | list[int]) -> RolloutBatch:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        t_max = max(1, int(self.mask[idx].sum(-1).max())) if len(idx) else 1
        return replace(
            self, prompt_ids=[self.prompt_ids[i] for i in idx.tolist()], prompt_index=self.prompt_index[idx],
            group_id=self.group_id[idx], tokens=self.tokens[idx, :t_max], mask=self.mask[idx, :t_max],
            logp=self.logp[idx, :t_max], finished=self.finished[idx],
            hidden=None if self.hidden is None else self.hidden[idx, :t_max],
        )

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        if not batches:
            raise ValueError("batches: nothing to concatenate")
        t_max = max(b.tokens.shape[1] for b in batches)
        pad = batches[0].pad_token_id

        def cat(name: str, fill: float | bool | int) -> Tensor:
            return torch.cat([F.pad(getattr(b, name), (0, t_max - b.tokens.shape[1]), value=fill) for b in batches])

        hidden = None
        if all(b.hidden is not None for b in batches):
            hidden = torch.cat([F.pad(b.hidden, (0, 0, 0, t_max - b.hidden.shape[1])) for b in batches])  # type: ignore
        return RolloutBatch(
            [p for b in batches for p in b.prompt_ids], torch.cat([b.prompt_index for b in batches]),
            torch.cat([b.group_id for b in batches]), cat("tokens", pad), cat("mask", False), cat("logp", 0.0),
            torch.cat([b.finished for b in batches]), batches[0].temperature, pad, hidden,
        )


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed for sampling chunk ``chunk`` of a collection seeded ``seed`` (independent of chunking
    order, so an interrupted collection resumes with the same numbers)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}".encode()).digest()[:8], "little") >> 1


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _get_cache(out: object) -> object:
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def left_pad(prompts: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into a batch: (ids int64 [B, P], attention mask int64 [B, P]).

    ``P = max len``; row i holds ``pad`` in its first ``P − len(prompts[i])`` positions, then the prompt, and the
    attention mask is 1 exactly on the prompt tokens.
    """
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):] = 1
    return ids, attn


def _check_temperature(temperature: float) -> float:
    if not isinstance(temperature, (int, float)) or not temperature > 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return float(temperature)


@torch.no_grad()
def _sample_chunk(
    model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos: set[int],
    pad: int, generator: torch.Generator, use_cache: bool, keep_hidden: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Decode one chunk; finished rows leave the batch (their KV-cache rows are dropped)."""
    ids, attn = left_pad(prompts, pad)  # [B, P]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    want_h = keep_hidden and plain_head(model)
    captured: list[Tensor] = []
    hook = None
    if want_h:  # the LM head's input is exactly the state that produced the logits
        hook = model.get_output_embeddings().register_forward_pre_hook(
            lambda _m, args: captured.append(args[0][:, -1].detach().float()))
    try:
        return _decode(model, ids, attn, pos, eos_t=torch.tensor(sorted(eos), dtype=torch.long),
                       max_new_tokens=max_new_tokens, temperature=temperature, pad=pad, generator=generator,
                       use_cache=use_cache, captured=captured if want_h else None)
    finally:
        if hook is not None:
            hook.remove()


def _decode(
    model: torch.nn.Module, ids: Tensor, attn: Tensor, pos: Tensor, *, eos_t: Tensor, max_new_tokens: int,
    temperature: float, pad: int, generator: torch.Generator, use_cache: bool, captured: list[Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    B = ids.shape[0]
    kw = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=use_cache, logits_to_keep=1)
    cache = _get_cache(out) if use_cache else None
    logits = out.logits[:, -1].float()
    want_h = captured is not None
    h_last = captured.pop() if captured else None
    next_pos = pos[:, -1] + 1
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long)
    logp = torch.zeros((B, max_new_tokens), dtype=torch.float32)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.bool)
    hidden = None
    if want_h:
        assert h_last is not None
        hidden = torch.zeros((B, max_new_tokens, h_last.shape[-1]), dtype=torch.float32)
    finished = torch.zeros(B, dtype=torch.bool)
    active = torch.arange(B)  # original rows still decoding
    seq = ids
    steps = 0
    for t in range(max_new_tokens):
        lp = torch.log_softmax(logits / temperature, dim=-1)  # [b, V]
        tok = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)
        tokens[active, t] = tok
        logp[active, t] = lp.gather(-1, tok[:, None]).squeeze(-1)
        mask[active, t] = True
        if hidden is not None and h_last is not None:
            hidden[active, t] = h_last
        steps = t + 1
        ended = torch.isin(tok, eos_t)
        finished[active[ended]] = True
        if bool(ended.all()) or t + 1 == max_new_tokens:
            break
        keep = torch.nonzero(~ended).squeeze(-1)
        if bool(ended.any()):
            active, tok, next_pos, attn = active[keep], tok[keep], next_pos[keep], attn[keep]
            if use_cache:
                cache.batch_select_indices(keep)  # type: ignore[union-attr]
            else:
                seq = seq[keep]
        attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=attn.dtype)], dim=1)
        if use_cache:
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        use_cache=True, **{kw: cache})
            cache = _get_cache(out)
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            full_pos = (attn.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=seq, attention_mask=attn, position_ids=full_pos, use_cache=False,
                        logits_to_keep=1)
        logits = out.logits[:, -1].float()
        if want_h and captured:
            h_last = captured.pop()
        next_pos = next_pos + 1
    hidden = None if hidden is None else hidden[:, :steps]
    return tokens[:, :steps], mask[:, :steps], logp[:, :steps], finished, hidden


def sample(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    prompts_per_chunk: int = 4,
    seed: int = 0,
    use_cache: bool = True,
    chunks: list[int] | None = None,
    on_chunk: Callable[[int, RolloutBatch], None] | None = None,
    keep_hidden: bool = False,
    progress: bool = False,
) -> RolloutBatch:
    """Sample ``group_size`` responses per prompt from μ = softmax(logits/τ), recording log μ per token.

    Prompts are processed in chunks of ``prompts_per_chunk`` prompts (× group_size rows each, one batched
    decode with a KV cache); chunk c uses the RNG seed :func:`chunk_seed(seed, c) <chunk_seed>`, so results do
    not depend on which chunks were already done.

    Parameters
    ----------
    model : causal LM (eval mode)
    prompt_ids : list of prompt token-id lists (see :func:`ctpo_lab.llm.prompts.render_prompts`)
    group_size : G ≥ 1
    max_new_tokens : response length limit
    eos_token_id, pad_token_id : ends of responses; padding
    temperature : τ > 0
    prompts_per_chunk : prompts per batched decode
    seed : collection seed
    use_cache : KV cache (False recomputes the whole prefix every step: for benchmarks)
    chunks : only these chunk indices (default all); ``on_chunk(c, batch)`` is called after each one
    keep_hidden : also keep μ's final hidden states per response token (``batch.hidden``, [N, T, H]), the
        input of a :class:`ReferenceCache` without a second forward pass (plain-head models only)
    progress : tqdm bar

    Returns
    -------
    RolloutBatch of the sampled chunks, rows ordered by prompt then sample (group_id = prompt index).
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: expected a non-empty list of non-empty prompts")
    for name, v in (("group_size", group_size), ("max_new_tokens", max_new_tokens),
                    ("prompts_per_chunk", prompts_per_chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    temperature = _check_temperature(temperature)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    n_chunks = -(-len(prompt_ids) // prompts_per_chunk)
    todo = list(range(n_chunks)) if chunks is None else list(chunks)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="sample", unit="chunk")
    parts = []
    for c in todo:
        lo, hi = c * prompts_per_chunk, min(len(prompt_ids), (c + 1) * prompts_per_chunk)
        idx = [i for i in range(lo, hi) for _ in range(group_size)]
        gen = torch.Generator().manual_seed(chunk_seed(seed, c))
        tokens, mask, logp, finished, hidden = _sample_chunk(
            model, [prompt_ids[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature, eos=eos,
            pad=pad_token_id, generator=gen, use_cache=use_cache, keep_hidden=keep_hidden,
        )
        pi = torch.tensor(idx, dtype=torch.long)
        part = RolloutBatch([prompt_ids[i] for i in idx], pi, pi.clone(), tokens, mask, logp, finished,
                            temperature, pad_token_id, hidden)
        parts.append(part)
        if on_chunk is not None:
            on_chunk(c, part)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tokens=int(mask.sum()))
    if bar is not None:
        bar.close()
    return RolloutBatch.concat(parts)


@dataclass
class ReferenceCache:
    """μ's final hidden states on a batch and its LM head, for exact per-token KL(μ‖π) at scoring time.

    hidden : float32 [N, T, H] (the states that predict response token t)
    head_weight : [V, H], head_bias : [V] or None, temperature : τ of μ
    """

    hidden: Tensor
    head_weight: Tensor
    head_bias: Tensor | None
    temperature: float


@dataclass
class ScoreResult:
    """logp : float32 [N, T] log π(y_t|s_t) (0 on padding); kl : float32 [N, T] KL(μ‖π)(s_t) or None;
    hidden : float32 [N, T, H] or None (to build a :class:`ReferenceCache`)."""

    logp: Tensor
    kl: Tensor | None = None
    hidden: Tensor | None = None


def plain_head(model: torch.nn.Module) -> bool:
    """Whether the model's ``get_decoder()`` output feeds a plain ``nn.Linear`` LM head (no logit scaling or
    soft-capping; model types of ``_PLAIN_HEAD_TYPES``), so that log-probs can be computed from the final
    hidden states with the head applied in slices, and μ's hidden states can be kept while sampling."""
    mtype = getattr(getattr(model, "config", None), "model_type", "")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return mtype in _PLAIN_HEAD_TYPES and isinstance(head, torch.nn.Linear) and hasattr(model, "get_decoder")


def iter_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices ``[s, min(n, s + size))`` for ``s = 0, size, 2·size, …`` covering ``range(n)``."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def token_log_probs(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    tokens: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    reference: ReferenceCache | None = None,
    keep_hidden: bool = False,
    head_chunk: int = 256,
) -> ScoreResult:
    """Teacher-forced log π(y_t|s_t) of one chunk (differentiable when grad is enabled).

    Shapes: prompt_ids list of b lists, tokens/mask [b, T] → logp [b, T] (float32, 0 where ``mask`` is 0).
    """
    temperature = _check_temperature(temperature)
    ids_p, attn_p = left_pad(prompt_ids, pad_token_id)
    P = ids_p.shape[1]
    T = tokens.shape[1]
    ids = torch.cat([ids_p, torch.where(mask, tokens, pad_token_id)], 1)
    attn = torch.cat([attn_p, mask.long()], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    kl = None
    hidden_out = None
    if plain_head(model):
        hid = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        h = hid.last_hidden_state[:, P - 1:P + T - 1]  # [b, T, H]: the state that predicts token t
        head = model.get_output_embeddings()
        lps, kls = [], []
        for sl in iter_slices(T, head_chunk):
            logits = F.linear(h[:, sl].float(), head.weight.float(),
                              None if head.bias is None else head.bias.float())
            lp_all = torch.log_softmax(logits / temperature, -1)
            lps.append(lp_all.gather(-1, tokens[:, sl, None]).squeeze(-1))
            if reference is not None:
                with torch.no_grad():
                    r = reference
                    rl = F.linear(r.hidden[:, sl].to(r.head_weight.dtype), r.head_weight, r.head_bias).float()
                    rlp = torch.log_softmax(rl / r.temperature, -1)
                    kls.append((rlp.exp() * (rlp - lp_all.detach())).sum(-1))
        logp = torch.cat(lps, 1)
        if reference is not None:
            kl = torch.where(mask, torch.cat(kls, 1), 0.0)
        if keep_hidden:
            hidden_out = (h.detach().float() * mask[..., None]).contiguous()
    else:
        if reference is not None or keep_hidden:
            raise ValueError(f"reference: exact KL needs a plain LM head (model types {sorted(_PLAIN_HEAD_TYPES)})")
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        lp_all = torch.log_softmax(out.logits[:, P - 1:P + T - 1].float() / temperature, -1)
        logp = lp_all.gather(-1, tokens[..., None]).squeeze(-1)
    return ScoreResult(torch.where(mask, logp, 0.0), kl, hidden_out)


def score(
    model: torch.nn.Module,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    rows_per_chunk: int = 8,
    reference: ReferenceCache | None = None,
    keep_hidden: bool = False,
    progress: bool = False,
    desc: str = "score",
) -> ScoreResult:
    """Teacher-forced log π of every response token of ``batch`` (no grad), in chunks of rows.

    Parameters
    ----------
    model : the target π (its dtype is used as is: bf16 weights give bf16 scoring, the dtype-mismatch source)
    batch : RolloutBatch
    temperature : τ of π
    reference : μ's cache for the exact per-token KL(μ‖π) (its hidden states must cover ``batch``)
    keep_hidden : also return the final hidden states (to build a :class:`ReferenceCache` of this model)

    Returns
    -------
    ScoreResult with logp [N, T] (and kl [N, T], hidden [N, T, H] when asked).
    """
    N, T = batch.tokens.shape
    logp = torch.zeros((N, T), dtype=torch.float32)
    kl = torch.zeros((N, T), dtype=torch.float32) if reference is not None else None
    hidden = None
    order = torch.argsort(batch.lengths, descending=True)  # similar lengths together: less padding
    slices = list(iter_slices(N, rows_per_chunk))
    it = slices
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(slices, desc=desc, unit="chunk")
    with torch.no_grad():
        for sl in it:
            rows = order[sl]
            t_max = max(1, int(batch.lengths[rows].max()))
            ref = None
            if reference is not None:
                ref = replace(reference, hidden=reference.hidden[rows, :t_max])
            res = token_log_probs(
                model, [batch.prompt_ids[i] for i in rows.tolist()], batch.tokens[rows, :t_max],
                batch.mask[rows, :t_max], temperature=temperature, pad_token_id=batch.pad_token_id, reference=ref,
                keep_hidden=keep_hidden,
            )
            logp[rows, :t_max] = res.logp.float()
            if kl is not None and res.kl is not None:
                kl[rows, :t_max] = res.kl.float()
            if keep_hidden and res.hidden is not None:
                if hidden is None:
                    hidden = torch.zeros((N, T, res.hidden.shape[-1]), dtype=torch.float32)
                hidden[rows, :t_max] = res.hidden
    return ScoreResult(logp, kl, hidden)


def reference_cache(model: torch.nn.Module, hidden: Tensor, temperature: float = 1.0) -> ReferenceCache:
    """A :class:`ReferenceCache` of ``model`` (a frozen copy of its LM head) from hidden states of :func:`score`."""
    head = model.get_output_embeddings()
    return ReferenceCache(
        hidden, head.weight.detach().float().clone(),
        None if head.bias is None else head.bias.detach().float().clone(), _check_temperature(temperature),
    )


__all__.append("reference_cache")
