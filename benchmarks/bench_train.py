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

``--cpu-preset`` (part 2) measures the ``cpu`` preset (the comparison grid's run: 16 prompts × 8 responses,
16 updates per rollout batch) per step, split into generation / old-log-prob forward / updates / final-KL
forward, for the trainer as it runs (``recompute_old_log_prob=true``) and for the variants that skip work
(``reuse-μ``: the sampler's log-probs as log μ; ``reuse-μ, no final KL``: also ``measure_final_kl=false``),
interleaved in the same run, with the ratio of the per-run time (80 steps + 9 evaluations) to the default's.
``--batching-ceiling`` (part 3) measures what batching several seeds into one process could gain at most:
the same model on 4× the rows (generation of 512 vs 128 responses, a teacher-forced forward, an update's
forward + backward on 32 vs 8 responses); a batched-weights model does the same arithmetic with the same
total rows, so it cannot be faster per row than this.
``--allocator`` (part 4) measures the ``cpu`` preset with freed memory kept in the heap (what every
``python -m ctpo_lab...`` command does, :mod:`ctpo_lab.allocator`) against glibc's default, each run in a fresh
process (the allocator's settings are process-wide), alternating, with page faults per step, the maximum resident
memory, and whether every logged number came out bit-identical. This process itself retains freed memory as the
commands do (TRL's trainer in part 1 runs under the same allocator) unless ``--system-allocator`` is given.
``--against REV`` (part 5) measures the ``cpu`` preset of this checkout, as its commands run it, against the
trainer of an earlier git revision (its ``ctpo_lab`` package extracted with ``git archive``; its warm start in a
cache folder of its own), each run in a fresh process, alternating, with the per-run ratio and how far the two
runs' logged numbers lie apart at the last step. Parts 4 and 5 run ``train_run_child.py``; ``--parallel N`` runs
N of them at once per arm (seeds seed … seed + N − 1), as a comparison grid with ``--jobs N`` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ctpo_lab, not an installed one

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_run_child import STEP_KEYS, run_overrides  # this folder: the fresh-process child of parts 4 and 5

from ctpo_lab.allocator import RETAIN_ENV, retain_freed_memory, retaining_freed_memory
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


CPU_VARIANTS = {
    "default": [],
    "reuse-μ": ["recompute_old_log_prob=false"],
    "reuse-μ, no final KL": ["recompute_old_log_prob=false", "measure_final_kl=false"],
}


def _cpu_preset_config(steps: int, seed: int, threads: int, extra: tuple[str, ...] | list[str] = ()):
    """The ``cpu`` preset with nothing written but the metrics and no evaluations during the run."""
    return resolve_train_config("cpu", seed=seed, steps=steps, overrides=[*run_overrides(threads), *extra])


def bench_cpu_preset(steps: int, rounds: int, seed: int, threads: int) -> None:
    """Part 2: the ``cpu`` preset per step and per run, its variants interleaved (see the module docstring)."""
    cfgs = {name: _cpu_preset_config(steps, seed, threads, extra) for name, extra in CPU_VARIANTS.items()}
    keys = STEP_KEYS
    per: dict[str, list[dict[str, float]]] = {n: [] for n in cfgs}
    evals: list[float] = []
    diff: list[float] = []
    for r in range(rounds):
        for name, cfg in cfgs.items():
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(cfg, Path(tmp) / "run", progress=False, log=lambda s: None)
                hist = trainer.train().history
                if name == "default":
                    evals.append(trainer.evaluate(steps)["time/eval"])
            recs = [h for h in hist if h["step"] >= 2]  # step 1 is the warm-up
            per[name].append({k: float(np.median([h[k] for h in recs])) for k in keys})
            if name == "default":
                diff += [h["rollout/log_prob_abs_diff"] for h in recs]
        print(f"[bench_train] cpu preset round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {per[n][-1]['time/step']:.3f} s/step" for n in cfgs), flush=True)
    full = resolve_train_config("cpu")
    n_evals = full.steps // full.eval_every + 1
    t_eval = float(np.median(evals))
    print(
        f"\ncpu preset: {full.batch_prompts} prompts x {full.group_size} responses, {full.updates_per_step} updates "
        f"per step, {threads} thread(s); medians over {rounds} interleaved round(s) of {steps - 1} timed steps; "
        f"per run = {full.steps} steps + {n_evals} evaluations ({t_eval:.2f} s each)"
    )
    print(f"{'variant':<24}{'s/step':>8}{'gen':>7}{'old_lp':>8}{'update':>8}{'kl':>7}{'s/run':>8}{'new/old':>9}")
    default_run = None
    for name in cfgs:
        m = {k: float(np.median([x[k] for x in per[name]])) for k in keys}
        run = full.steps * m["time/step"] + n_evals * t_eval
        default_run = default_run or run
        print(
            f"{name:<24}{m['time/step']:8.3f}{m['time/gen']:7.3f}{m['time/old_log_prob']:8.3f}"
            f"{m['time/update']:8.3f}{m['time/kl']:7.3f}{run:8.1f}{default_run / run:8.2f}x"
        )
    split = {k: float(np.median([x[k] for x in per["default"]])) for k in keys}
    print("default step split: " + ", ".join(
        f"{k.split('/')[1]} {100 * split[k] / split['time/step']:.0f}%" for k in keys[:-1]
    ) + f"; sampler vs recomputed log μ: mean |Δ| {np.mean(diff):.1e} per token (reuse-μ changes the numbers by this)")


#: the fresh-process child of parts 4 and 5 (one cpu-preset run of a given ctpo_lab tree, one JSON line)
RUN_CHILD = Path(__file__).resolve().parent / "train_run_child.py"
ROOT = Path(__file__).resolve().parents[1]


def _run_children(root: Path, steps: int, seed: int, threads: int, env: dict[str, str], name: str,
                  parallel: int) -> list[dict]:
    """``parallel`` concurrent ``cpu``-preset runs (seeds ``seed``, ``seed`` + 1, …) of the ``ctpo_lab`` under
    ``root``, each in a fresh process (see ``train_run_child.py``), as a grid with ``--jobs parallel`` runs them."""
    procs = [subprocess.Popen([sys.executable, str(RUN_CHILD), str(root), str(steps), str(seed + i), str(threads)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(parallel)]
    outs = []
    for i, proc in enumerate(procs):
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"error: {name} run (seed {seed + i}) failed:\n{stderr[-2000:]}")
        outs.append(dict(json.loads(stdout.strip().splitlines()[-1]), seed=seed + i))
    return outs


def _child_table(per: dict[str, list[dict]], label: str) -> dict[str, float]:
    """Print the medians of each arm's child runs; returns each arm's time per run (80 steps + 9 evaluations)."""
    full = resolve_train_config("cpu")
    n_evals = full.steps // full.eval_every + 1
    print(f"{label:<18}{'s/step':>8}{'gen':>7}{'old_lp':>8}{'update':>8}{'kl':>7}{'eval':>7}{'s/run':>8}"
          f"{'faults/step':>13}{'max RSS MB':>12}")
    runs = {}
    for name, rows in per.items():
        m = {k: float(np.median([x[k] for x in rows])) for k in (*STEP_KEYS, "time/eval", "faults/step",
                                                                   "max_rss_mb")}
        runs[name] = full.steps * m["time/step"] + n_evals * m["time/eval"]
        print(f"{name:<18}{m['time/step']:8.3f}{m['time/gen']:7.3f}{m['time/old_log_prob']:8.3f}"
              f"{m['time/update']:8.3f}{m['time/kl']:7.3f}{m['time/eval']:7.2f}{runs[name]:8.1f}"
              f"{m['faults/step']:13.0f}{m['max_rss_mb']:12.0f}")
    return runs


def _child_setup(threads: int, rounds: int, parallel: int, steps: int) -> str:
    full = resolve_train_config("cpu")
    return (f"{threads} thread(s), {rounds} alternating pair(s) of {parallel} concurrent fresh process(es), "
            f"{steps - 1} timed steps each; per run = {full.steps} steps + {full.steps // full.eval_every + 1} "
            "evaluations")


def bench_allocator(steps: int, rounds: int, seed: int, threads: int, parallel: int) -> None:
    """Part 4: the ``cpu`` preset with freed memory kept in the heap (what every ``python -m ctpo_lab...``
    command does) vs glibc's default, each run in a fresh process, alternating, ``rounds`` pairs of ``parallel``
    concurrent runs each."""
    per: dict[str, list[dict]] = {"retained": [], "glibc default": []}
    for r in range(rounds):
        for name in (list(per) if r % 2 == 0 else list(per)[::-1]):
            env = dict(os.environ, **{RETAIN_ENV: "1" if name == "retained" else "0"})
            per[name] += _run_children(ROOT, steps, seed, threads, env, name, parallel)
        print(f"[bench_train] allocator round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {per[n][-1]['time/step']:.3f} s/step" for n in per), flush=True)
    print(f"\ncpu preset, {_child_setup(threads, rounds, parallel, steps)}")
    runs = _child_table(per, "allocator")
    digests: dict[int, set[str]] = {}  # one seed's runs: the same digest under either allocator, in every round
    for rows in per.values():
        for x in rows:
            digests.setdefault(x["seed"], set()).add(x["digest"])
    split = sum(len(d) > 1 for d in digests.values())
    print(f"per run: glibc default / retained = {runs['glibc default'] / runs['retained']:.2f}x; logged numbers "
          f"{'bit-identical in every run' if not split else f'DIFFER ({split} of {len(digests)} seeds)'}; "
          f"retention in effect: {all(x['retaining'] for x in per['retained'])}")


def _largest_relative_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, str, int]:
    """max over the numeric fields both logged of |a − b| / max(|a|, |b|, 1e-12), the field, the fields compared."""
    shared = sorted(set(a) & set(b))
    worst, where = 0.0, ""
    for k in shared:
        x, y = float(a[k]), float(b[k])
        if x != y:
            d = abs(x - y) / max(abs(x), abs(y), 1e-12) if np.isfinite(x) and np.isfinite(y) else float("inf")
            if d > worst:
                worst, where = d, k
    return worst, where, len(shared)


def bench_against(rev: str, steps: int, rounds: int, seed: int, threads: int, parallel: int) -> None:
    """Part 5: the ``cpu`` preset of this checkout (as its commands run it) vs the trainer of revision ``rev``
    (its ``ctpo_lab`` package extracted with ``git archive``), each run in a fresh process, alternating,
    ``rounds`` pairs of ``parallel`` concurrent runs each."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=False).stdout.strip()
    if not sha:
        raise SystemExit(f"error: --against: expected a revision of this repository, got {rev!r}")
    cache = Path(os.environ.get("CTPO_LAB_CACHE", Path.home() / ".cache" / "ctpo_lab"))
    # the old tree's warm start in a cache of its own: an older cache layout never meets this checkout's
    old_env = dict(os.environ, CTPO_LAB_CACHE=str(cache / "bench" / f"against-{sha[:12]}"))
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "ctpo_lab"], capture_output=True,
                                 check=False)
        if archive.returncode != 0:
            raise SystemExit(f"error: --against: git archive {sha[:12]} failed: {archive.stderr.decode()[-300:]}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        label = f"at {sha[:10]}"
        per: dict[str, list[dict]] = {"this checkout": [], label: []}
        print(f"[bench_train] against {sha[:12]}: the first run of the old tree may build its warm start "
              f"({old_env['CTPO_LAB_CACHE']}), outside the timed steps", flush=True)
        for r in range(rounds):
            for name in (list(per) if r % 2 == 0 else list(per)[::-1]):
                if name == label:
                    per[name] += _run_children(Path(tmp), steps, seed, threads, old_env, name, parallel)
                else:
                    per[name] += _run_children(ROOT, steps, seed, threads, dict(os.environ), name, parallel)
            print(f"[bench_train] against round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {per[n][-1]['time/step']:.3f} s/step" for n in per), flush=True)
    print(f"\ncpu preset, {_child_setup(threads, rounds, parallel, steps)}; freed memory retained: "
          f"this checkout {per['this checkout'][0]['retaining']}, "
          f"{label} {per[label][0]['retaining']}")
    runs = _child_table(per, "trainer")
    diff, field, n = _largest_relative_difference(per["this checkout"][0]["last"], per[label][0]["last"])
    same = per["this checkout"][0]["digest"] == per[label][0]["digest"]
    print(f"per run: {label} / this checkout = {runs[label] / runs['this checkout']:.2f}x (target ≥ 2x); "
          f"logged numbers {'bit-identical' if same else 'not bit-identical'}; at step {steps} the largest "
          f"relative difference over the {n} numeric fields both log is {diff:.1e}"
          + (f" ({field})" if field else ""))


def bench_batching_ceiling(seed: int, threads: int, repeats: int = 3) -> None:
    """Part 3: per-row cost of the same model on 4× the rows (see the module docstring)."""
    from ctpo_lab.train.rollout import response_log_probs, sample

    cfg = resolve_train_config("cpu", seed=seed, overrides=[f"threads={threads}"])
    task = make_task(cfg.task, **cfg.task_options)
    policy = load_policy(cfg, task, torch.device("cpu"), progress=True)
    model = policy.model.eval()
    prompts = [policy.encode_prompt(p) for p in task.sample(np.random.default_rng(seed), 512, "train")]
    kw = dict(max_new_tokens=task.max_response_tokens, temperature=1.0, eos_token_id=2, pad_token_id=0)
    small, big = cfg.rollout_batch_size, 4 * cfg.rollout_batch_size
    mb = cfg.mini_batch_prompts * cfg.group_size

    def update(b, rows: int) -> None:
        model.train()
        lp, _ = response_log_probs(model, b.select(torch.arange(rows)), cfg.temperature)
        lp.sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    times: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved
        for n in (small, big):
            t0 = time.perf_counter()
            batch = sample(model, prompts[:n], generator=torch.Generator().manual_seed(seed), **kw)
            t1 = time.perf_counter()
            with torch.no_grad():
                response_log_probs(model, batch, 1.0)
            t2 = time.perf_counter()
            rows = mb * n // small
            update(batch, rows)
            t3 = time.perf_counter()
            for key, t in ((f"gen {n}", t1 - t0), (f"fwd {n}", t2 - t1), (f"upd {rows}", t3 - t2)):
                times.setdefault(key, []).append(t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"\nbatching ceiling (same model, 4x the rows, {threads} thread(s), median of {repeats}): per-row gain")
    for part, a, b in (("generation", f"gen {small}", f"gen {big}"), ("teacher-forced forward", f"fwd {small}",
                       f"fwd {big}"), ("update fwd+bwd", f"upd {mb}", f"upd {4 * mb}")):
        print(f"  {part:<24}{med[a]:8.3f} s -> {med[b]:8.3f} s for 4x: x{4 * med[a] / med[b]:.2f} per row")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=6, help="rollout batches per trainer (first is warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ctpo_lab, reuse-μ, TRL) per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-preset", action="store_true", help="part 2: the cpu preset per step and per run")
    ap.add_argument("--cpu-steps", type=int, default=5, help="steps per cpu-preset run (first is warm-up)")
    ap.add_argument("--batching-ceiling", action="store_true", help="part 3: what batching seeds could gain")
    ap.add_argument("--skip-trl", action="store_true", help="skip part 1 (ctpo_lab vs TRL on cpu-smoke)")
    ap.add_argument("--allocator", action="store_true",
                    help="part 4: freed memory retained vs glibc's default, in fresh processes")
    ap.add_argument("--system-allocator", action="store_true",
                    help="this process keeps glibc's default (the commands retain freed memory)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="parts 4 and 5: concurrent runs per arm (seeds seed, seed+1, ...), as a grid's --jobs")
    ap.add_argument("--against", metavar="REV", default=None,
                    help="part 5: the cpu preset of this checkout vs the trainer of git revision REV")
    args = ap.parse_args(argv)
    if args.batches < 2:
        raise SystemExit("error: --batches must be ≥ 2 (the first is a warm-up)")
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be ≥ 1")
    if not 1 <= args.parallel <= 64:
        raise SystemExit("error: --parallel must be in [1, 64]")
    if not args.system_allocator:
        retain_freed_memory()  # as every python -m ctpo_lab... command does
    print(f"[bench_train] freed memory retained: {retaining_freed_memory()}", flush=True)
    torch.set_num_threads(args.threads)
    if args.allocator:
        bench_allocator(args.cpu_steps, args.rounds, args.seed, args.threads, args.parallel)
    if args.against is not None:
        bench_against(args.against, args.cpu_steps, args.rounds, args.seed, args.threads, args.parallel)
    if args.cpu_preset:
        bench_cpu_preset(args.cpu_steps, args.rounds, args.seed, args.threads)
    if args.batching_ceiling:
        bench_batching_ceiling(args.seed, args.threads)
    if args.skip_trl:
        return
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
