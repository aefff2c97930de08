"""Throughput of ``ctpo_lab.train`` vs TRL's ``GRPOTrainer`` on the identical model, task, batch and length.

    python benchmarks/bench_train.py [--batches 6] [--rounds 3] [--seed 0] [--threads 1]

Both trainers start from the same warm-started tiny Llama of the ``cpu-smoke`` preset (cached; trained on
first use), on the ``chain`` task (responses ≈ 120 tokens), with 8 prompts × 8 responses per rollout batch,
mini-batches of 16 responses (4 optimizer updates per rollout batch), temperature 1, no KL term, on CPU.
Per rollout batch it reports wall time split into generation / scoring / update (the update includes the
old-log-prob forward and, for ctpo_lab, the measured-KL forward), steps/s and generated tokens/s, and the
ratio ctpo_lab / TRL measured in the same run. The first rollout batch of each trainer is a warm-up and
excluded; times are medians over the remaining batches (robust to bursts of load on a shared machine).
``ctpo_lab reuse-μ`` is the same trainer with ``recompute_old_log_prob=false`` (the sampler's
log-probs serve as log μ: no old-log-prob forward; it still does the measured-KL forward TRL does not).
TRL is optional (``pip install -e .[trl]``); without it only ctpo_lab is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ctpo_lab, not an installed one

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctpo_lab.train.config import resolve_train_config
from ctpo_lab.train.loop import Trainer
from ctpo_lab.train.policy import load_policy
from ctpo_lab.train.tasks import make_task
from ctpo_lab.train.tokenizer import SPECIAL_TOKENS, CharTokenizer


def _timing_row(total: float, gen: float, score: float, tokens: float, reward: float) -> dict[str, float]:
    """Seconds per rollout batch split into generation / scoring / update, and throughputs."""
    return {"s/batch": total, "gen": gen, "score": score, "update": total - gen - score,
            "batches/s": 1 / total, "tokens/s": tokens / total, "reward": reward}


def hf_char_tokenizer(tok: CharTokenizer):
    """A PreTrainedTokenizerFast with exactly the ids of :class:`CharTokenizer` (for TRL)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)} | {c: i + 3 for i, c in enumerate(tok.alphabet)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    hf.padding_side = "left"
    return hf


def bench_ours(cfg, n_batches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False, log=lambda s: None)
        hist = trainer.train().history
    recs = [r for r in hist if r["step"] >= 2]  # step 1 is the warm-up
    gen = float(np.median([r["time/gen"] for r in recs]))
    score = float(np.median([r["time/score"] for r in recs]))
    total = float(np.median([r["time/step"] for r in recs]))
    tokens = float(np.mean([r["response_length/mean"] for r in recs])) * cfg.rollout_batch_size
    reward = float(np.mean([r["reward_mean"] for r in recs]))
    return _timing_row(total, gen, score, tokens, reward)


def bench_trl(cfg, model, task, tok: CharTokenizer, n_batches: int, seed: int) -> dict[str, float] | None:
    try:
        import datasets
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        print(f"[bench_train] TRL not measured ({e}); pip install -e .[trl]")
        return None
    hf = hf_char_tokenizer(tok)
    problems = task.sample(np.random.default_rng(seed), 512, "train")
    by_prompt = {"<bos>" + p.prompt: p for p in problems}
    assert hf("<bos>" + problems[0].prompt, add_special_tokens=False)["input_ids"] == tok.encode(
        problems[0].prompt, add_bos=True
    )
    ds = datasets.Dataset.from_dict({"prompt": list(by_prompt)})
    timing = {"gen": [], "score": [], "tokens": []}

    def reward_chain(prompts, completions, **kwargs):
        t0 = time.perf_counter()
        out = [task.check(by_prompt[p], c) for p, c in zip(prompts, completions)]
        timing["score"].append(time.perf_counter() - t0)
        timing["tokens"].append(sum(len(c) + 1 for c in completions))
        return out

    raw_generate = model.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        out = raw_generate(*args, **kwargs)
        timing["gen"].append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % cfg.num_mini_batches == 0:
                marks.append(time.perf_counter())

    mb = cfg.mini_batch_prompts * cfg.group_size
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=mb,
            num_generations=cfg.group_size,
            steps_per_generation=cfg.num_mini_batches,
            num_iterations=1,
            max_completion_length=task.max_response_tokens,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            learning_rate=cfg.lr,
            beta=0.0,
            max_steps=n_batches * cfg.num_mini_batches,
            logging_steps=10**6,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            seed=seed,
            disable_tqdm=True,
            max_grad_norm=cfg.max_grad_norm,
            shuffle_dataset=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_chain,
            args=args,
            train_dataset=ds,
            processing_class=hf,
            callbacks=[Clock()],
        )
        trainer.train()
    per_batch = np.diff(marks)[1:]  # drop the warm-up batch
    total = float(np.median(per_batch))
    gen = float(np.median(timing["gen"][1:]))
    score = float(np.median(timing["score"][1:]))
    tokens = float(np.mean(timing["tokens"][1:]))
    return _timing_row(total, gen, score, tokens, float("nan"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=6, help="rollout batches per trainer (first is warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ctpo_lab, reuse-μ, TRL) per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.batches < 2:
        raise SystemExit("error: --batches must be ≥ 2 (the first is a warm-up)")
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be ≥ 1")
    torch.set_num_threads(args.threads)
    cfg = resolve_train_config(
        "cpu-smoke",
        seed=args.seed,
        steps=args.batches,
        overrides=[
            "eval_every=0",
            "dump_every=0",
            "ckpt_every=0",
            "tensorboard=false",
            f"threads={args.threads}",
        ],
    )
    task = make_task(cfg.task, **cfg.task_options)
    policy = load_policy(cfg, task, torch.device("cpu"), progress=True)
    # the sampler's log-probs as log μ (no old-log-prob forward; the policy has not changed since sampling)
    reuse = dataclasses.replace(cfg, recompute_old_log_prob=False)
    names = ("ctpo_lab", "ctpo_lab reuse-μ", "trl GRPOTrainer")
    per_round: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):  # interleaved: a slow spell of a shared machine hits every trainer alike
        per_round["ctpo_lab"].append(bench_ours(cfg, args.batches))
        per_round["ctpo_lab reuse-μ"].append(bench_ours(reuse, args.batches))
        trl_model = copy.deepcopy(policy.model)  # the identical initial weights
        trl_row = bench_trl(cfg, trl_model, task, CharTokenizer(), args.batches, args.seed)
        if trl_row is None:
            per_round.pop("trl GRPOTrainer")
            names = names[:2]
        else:
            per_round["trl GRPOTrainer"].append(trl_row)
        print(f"[bench_train] round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {per_round[n][-1]['s/batch']:.3f} s/batch" for n in names), flush=True)
    rows = {n: {k: float(np.median([x[k] for x in per_round[n]])) for k in per_round[n][0]} for n in names}
    print(
        f"\n{cfg.batch_prompts} prompts x {cfg.group_size} responses, {cfg.updates_per_step} updates per "
        f"rollout batch, max {task.max_response_tokens} new tokens, {args.threads} thread(s), CPU; medians over "
        f"{args.rounds} interleaved round(s) of {args.batches - 1} timed batches"
    )
    print(
        f"{'trainer':<18}{'s/batch':>9}{'gen':>8}{'score':>8}{'update':>8}{'batches/s':>11}{'tokens/s':>10}"
    )
    for name, r in rows.items():
        print(
            f"{name:<18}{r['s/batch']:9.3f}{r['gen']:8.3f}{r['score']:8.4f}{r['update']:8.3f}"
            f"{r['batches/s']:11.3f}{r['tokens/s']:10.0f}"
        )
    if "trl GRPOTrainer" in rows:
        trl = per_round["trl GRPOTrainer"]
        for name in ("ctpo_lab", "ctpo_lab reuse-μ"):
            ratios = [o["batches/s"] / t["batches/s"] for o, t in zip(per_round[name], trl)]
            tok = [o["tokens/s"] / t["tokens/s"] for o, t in zip(per_round[name], trl)]
            gen = [t["gen"] / o["gen"] for o, t in zip(per_round[name], trl)]
            upd = [t["update"] / o["update"] for o, t in zip(per_round[name], trl)]
            print(
                f"ratio {name} / TRL (median over rounds): steps/s x{np.median(ratios):.2f} "
                f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}), tokens/s x{np.median(tok):.2f}, "
                f"generation x{np.median(gen):.2f}, update x{np.median(upd):.2f} (target ≥ 2x)"
            )

if __name__ == "__main__":
    main()
