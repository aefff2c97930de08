"""Benchmark of ctpo_lab.llm: scoring throughput against a bare forward pass, generation with/without KV cache.

    python benchmarks/bench_llm.py [--model smollm2|tiny-random|PATH] [--rows 8] [--new-tokens 128] [--seed 0]

Prints tokens/s and ratios measured in the same run:
* scoring: :func:`ctpo_lab.llm.rollout.score` (teacher-forced log-probs of every response token) against a bare
  batched forward pass of the same model on the same padded batch (``model(input_ids, attention_mask)``, full
  logits, no log-softmax) — target ratio ≥ 0.8;
* generation: :func:`ctpo_lab.llm.rollout.sample` with the KV cache against the same sampler recomputing the
  whole prefix at every step (identical tokens, checked).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ctpo_lab.llm import rollout
from ctpo_lab.llm.models import load_model
from ctpo_lab.llm.prompts import arithmetic_prompts, render_prompts


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--rows", type=int, default=8, help="responses in the batch")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, seed=args.seed)
    tok = lm.tokenizer
    ids = render_prompts(tok, arithmetic_prompts(max(1, args.rows // 2), seed=args.seed))
    kw = dict(group_size=2, max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=tok.pad_token_id,
              seed=args.seed, prompts_per_chunk=len(ids))  # eos −1: every response runs to the limit

    # generation, with and without the KV cache (same tokens)
    t = time.perf_counter()
    batch = rollout.sample(lm.model, ids, **kw)
    gen_cache = time.perf_counter() - t
    n_tok = int(batch.mask.sum())
    gen_nocache = _best(lambda: rollout.sample(lm.model, ids, use_cache=False, **kw), 1)
    same = torch.equal(rollout.sample(lm.model, ids, **kw).tokens, batch.tokens)

    # scoring vs a bare forward of the same padded batch
    P = max(len(q) for q in batch.prompt_ids)
    ids_p = torch.full((len(batch), P), tok.pad_token_id, dtype=torch.long)
    attn_p = torch.zeros_like(ids_p)
    for i, q in enumerate(batch.prompt_ids):
        ids_p[i, P - len(q):] = torch.tensor(q)
        attn_p[i, P - len(q):] = 1
    full_ids = torch.cat([ids_p, batch.tokens], 1)
    full_attn = torch.cat([attn_p, batch.mask.long()], 1)

    def bare() -> None:
        with torch.no_grad():
            lm.model(input_ids=full_ids, attention_mask=full_attn, use_cache=False)

    bare()  # warm-up
    t_bare = _best(bare, args.repeats)
    t_score = _best(lambda: rollout.score(lm.model, batch, rows_per_chunk=len(batch)), args.repeats)
    res = {
        "model": args.model,
        "tokens": n_tok,
        "score_tok_per_s": n_tok / t_score,
        "bare_forward_tok_per_s": n_tok / t_bare,
        "score_vs_bare_ratio": t_bare / t_score,
        "generate_kv_cache_tok_per_s": n_tok / gen_cache,
        "generate_no_cache_tok_per_s": n_tok / gen_nocache,
        "kv_cache_speedup": gen_nocache / gen_cache,
        "kv_cache_same_tokens": float(same),
    }
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
