"""Real-LLM trajectories: collect, perturb, analyse, plot (Figure 1 of the paper on a model of your choice).

One-shot form (collect → perturb → analyse → plots + ``DIR/summary.json``)::

    python -m ctpo_lab.llm --model smollm2 --out DIR [--quick] [--seed S]

Subcommands::

    python -m ctpo_lab.llm run     --model M --out DIR [...]   # the one-shot form (the default)
    python -m ctpo_lab.llm analyze DIR [--bin-width 50]       # redo statistics/plots from DIR/targets
    python -m ctpo_lab.llm fit     PATH [--step S]            # √t fit of a trajectory parquet or the authors'
                                                              # npz dumps (a directory of step_*_rank_*.npz)
    python -m ctpo_lab.llm bias    --model M --out DIR [--quick] # estimator bias/variance against an on-policy
                                                              # reference (ctpo_lab.llm.bias_run)

``run`` options choose the source of off-policyness (``--source``): ``stale`` (k = ``--k`` optimizer steps
of a GRPO-style update with ``--preset`` on minibatches of a training split; ratios measured on held-out
responses), ``temperature`` (μ sampled at ``--temperature`` ≠ 1, π = the same weights at 1), ``dtype`` (π =
the weights in bf16), ``checkpoints`` (π = ``--target-model``). DIR must be new or empty unless
``--overwrite`` (start again) or ``--resume`` (continue an interrupted collection with the same config).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUBCOMMANDS = ("run", "analyze", "fit", "bias")


@dataclass
class RunConfig:
    """Resolved configuration of ``run`` (written to DIR/config.json)."""

    model: str = "smollm2"
    out: str = ""
    seed: int = 0
    quick: bool = False
    prompts: str = "arithmetic"
    reward: str = "lenient"
    train_prompts: int = 8
    eval_prompts: int = 8
    group_size: int = 4
    max_new_tokens: int = 512
    temperature: float = 1.0
    prompts_per_chunk: int = 8
    source: str = "stale"
    k: list[int] = field(default_factory=lambda: [1, 4, 15])
    preset: str = "ctpo"
    lr: float = 1e-5
    minibatches: int = 16
    target_model: str | None = None
    bin_width: int = 32
    min_count: int = 30
    min_sequences: int = 10
    n_boot: int = 1000
    threads: int = 1
    cache: str | None = None
    pad_token: str | None = None
    progress: bool = True

    def collection_key(self) -> dict[str, Any]:
        """The fields that must match for ``--resume``."""
        keys = ("model", "seed", "prompts", "reward", "train_prompts", "eval_prompts", "group_size",
                "max_new_tokens", "temperature", "prompts_per_chunk")
        return {k: getattr(self, k) for k in keys}


QUICK = dict(model="tiny-random", train_prompts=8, eval_prompts=24, group_size=4, max_new_tokens=160,
             prompts_per_chunk=8, k=[1, 4, 8], minibatches=8, lr=1e-3, bin_width=16, min_count=10,
             min_sequences=8, n_boot=300)


def _parse_k(text: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--k: expected comma-separated ints, got {text!r}") from e
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k: expected positive ints, got {text!r}")
    return ks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctpo_lab.llm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="collect, perturb, analyse and plot (default)")
    d = RunConfig()
    r.add_argument("--model", default=None, help="smollm2 | tiny-random | local folder | hub id")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quick", action="store_true", help="small budget (tiny-random unless --model is given)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r.add_argument("--resume", action="store_true", help="continue an interrupted collection in --out")
    r.add_argument("--prompts", default=None, help="arithmetic | verl parquet file/dir | hf:NAME[:split]")
    r.add_argument("--reward", choices=("binary", "lenient"), default=None,
                   help="binary (the paper's) or lenient (partial credit; default, for small models)")
    r.add_argument("--train-prompts", type=int, default=None, help=f"prompts for the stale updates ({d.train_prompts})")
    r.add_argument("--eval-prompts", type=int, default=None, help=f"held-out prompts measured ({d.eval_prompts})")
    r.add_argument("--group-size", type=int, default=None, help=f"responses per prompt G ({d.group_size})")
    r.add_argument("--max-new-tokens", type=int, default=None, help=f"response length limit ({d.max_new_tokens})")
    r.add_argument("--temperature", type=float, default=None, help="sampling temperature of μ (1.0)")
    r.add_argument("--prompts-per-chunk", type=int, default=None, help="prompts per batched decode / shard (8)")
    r.add_argument("--source", choices=("stale", "temperature", "dtype", "checkpoints"), default="stale")
    r.add_argument("--k", type=_parse_k, default=None, help="stale updates to measure, e.g. 1,4,15")
    r.add_argument("--preset", default=None, help="loss preset of the stale update (ctpo)")
    r.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate of the stale update ({d.lr})")
    r.add_argument("--minibatches", type=int, default=None, help="minibatches per rollout batch (16)")
    r.add_argument("--target-model", default=None, help="π for --source checkpoints")
    r.add_argument("--bin-width", type=int, default=None, help=f"positions per bin ({d.bin_width}; the paper: 50)")
    r.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (1000)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: best on a shared CPU)")
    r.add_argument("--cache", default=None, help="model cache directory ($CTPO_LAB_CACHE)")
    r.add_argument("--pad-token", default=None, help="pad token for tokenizers without one ('eos')")
    r.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("analyze", help="statistics and plots from an existing run directory")
    a.add_argument("dir")
    a.add_argument("--bin-width", type=int, default=None)
    a.add_argument("--n-boot", type=int, default=None)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--overwrite", action="store_true", help="replace existing plots/summary")
    f = sub.add_parser("fit", help="√t fit of a trajectory parquet or a directory of authors' npz dumps")
    f.add_argument("path")
    f.add_argument("--step", type=int, default=None, help="dump step (default: the last one)")
    f.add_argument("--bin-width", type=int, default=50)
    f.add_argument("--min-count", type=int, default=30)
    f.add_argument("--n-boot", type=int, default=1000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--center", action="store_true", help="centre L_t within prompt groups")
    from ctpo_lab.llm.bias_run import add_parser

    add_parser(sub)
    return p


def _resolve(ns: argparse.Namespace) -> RunConfig:
    cfg = RunConfig(out=ns.out, seed=ns.seed, quick=ns.quick, source=ns.source)
    if ns.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
    mapping = {"model": "model", "prompts": "prompts", "reward": "reward", "train_prompts": "train_prompts",
               "eval_prompts": "eval_prompts", "group_size": "group_size", "max_new_tokens": "max_new_tokens",
               "temperature": "temperature", "prompts_per_chunk": "prompts_per_chunk", "k": "k", "preset": "preset",
               "lr": "lr", "minibatches": "minibatches", "target_model": "target_model", "bin_width": "bin_width",
               "n_boot": "n_boot", "cache": "cache", "pad_token": "pad_token"}
    for arg, attr in mapping.items():
        v = getattr(ns, arg)
        if v is not None:
            setattr(cfg, attr, v)
    cfg.threads, cfg.progress = ns.threads, not ns.no_progress
    if ns.quick and ns.model is not None and ns.model != "tiny-random":
        cfg.lr = RunConfig.lr if ns.lr is None else ns.lr
    for name in ("train_prompts", "eval_prompts", "group_size", "max_new_tokens", "prompts_per_chunk",
                 "minibatches", "bin_width", "n_boot", "threads"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}: expected a positive int, got {v!r}")
    if cfg.group_size < 2:
        raise SystemExit("error: --group-size: GRPO advantages need at least 2 responses per prompt")
    if not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        raise SystemExit(f"error: --temperature: expected a finite number > 0, got {cfg.temperature}")
    if cfg.source == "checkpoints" and not cfg.target_model:
        raise SystemExit("error: --target-model: --source checkpoints needs a target model")
    if cfg.source == "temperature" and cfg.temperature == 1.0:
        raise SystemExit("error: --temperature: --source temperature needs a sampling temperature ≠ 1")
    if cfg.source == "stale":
        from ctpo_lab.losses import PRESETS

        if cfg.preset not in PRESETS:
            raise SystemExit(f"error: --preset: unknown preset {cfg.preset!r}; expected one of {sorted(PRESETS)}")
    return cfg


def _prepare_out(out: Path, cfg: RunConfig, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise SystemExit("error: --overwrite and --resume exclude each other")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif resume:
            cfg_file = out / "config.json"
            if not cfg_file.is_file():
                raise SystemExit(f"error: --resume: {out} has no config.json")
            old = json.loads(cfg_file.read_text())
            new = cfg.collection_key()
            diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
            if diff:
                raise SystemExit(f"error: --resume: the collection config differs from {cfg_file}: {diff}")
            shutil.rmtree(out / "targets", ignore_errors=True)
            shutil.rmtree(out / "dumps", ignore_errors=True)
        else:
            raise SystemExit(f"error: --out: {out} exists and is not empty (use --overwrite or --resume)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------------------


def run(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Collect, perturb, analyse and plot; returns the summary (also written to DIR/summary.json)."""
    from ctpo_lab.advantages import grpo_advantages
    from ctpo_lab.llm import offpolicy, store
    from ctpo_lab.llm.models import load_model
    from ctpo_lab.llm.prompts import load_prompts, render_prompts, reward
    from ctpo_lab.llm.rollout import reference_cache, sample

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # --- everything that can fail on bad input, before any work
    lm = load_model(cfg.model, seed=cfg.seed, cache=cfg.cache, pad_token=cfg.pad_token)
    tok = lm.tokenizer
    n_prompts = cfg.train_prompts + cfg.eval_prompts
    prompts = load_prompts(cfg.prompts, n=n_prompts, seed=cfg.seed)
    if len(prompts) < n_prompts:
        raise SystemExit(f"error: --prompts: {cfg.prompts} has {len(prompts)} prompts, {n_prompts} needed")
    max_prompt = lm.context_length - cfg.max_new_tokens
    if max_prompt < 1:
        raise SystemExit(f"error: --max-new-tokens: {cfg.max_new_tokens} ≥ the model context {lm.context_length}")
    prompt_ids = render_prompts(tok, prompts, max_prompt_tokens=max_prompt)
    target_lm = None
    if cfg.source == "checkpoints":
        target_lm = load_model(cfg.target_model, cache=cfg.cache, pad_token=cfg.pad_token)  # type: ignore[arg-type]
        if len(target_lm.tokenizer) != len(tok):
            raise SystemExit("error: --target-model: its tokenizer differs from the behaviour model's")
    _prepare_out(out, cfg, overwrite, resume)
    timings["load_s"] = time.perf_counter() - t0
    _log(f"[llm] model {cfg.model}: {sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters; "
         f"{cfg.train_prompts} train + {cfg.eval_prompts} eval prompts × G={cfg.group_size}, "
         f"≤{cfg.max_new_tokens} new tokens, source={cfg.source}")

    # --- collection (sharded, resumable)
    t1 = time.perf_counter()
    shard_dir = out / "rollouts"
    done = store.done_chunks(shard_dir)
    n_chunks = -(-n_prompts // cfg.prompts_per_chunk)
    todo = [c for c in range(n_chunks) if c not in done]
    if done:
        _log(f"[llm] resuming: {len(done)} of {n_chunks} sampling chunks already on disk")
    pid_list = [p.id for p in prompts]

    def texts_of(batch) -> list[str]:
        return [tok.decode(batch.tokens[i][batch.mask[i]], skip_special_tokens=True) for i in range(len(batch))]

    def on_chunk(c: int, part) -> None:
        texts = texts_of(part)
        rewards = np.array([reward(t, prompts[int(i)].answer, cfg.reward, finished=bool(f))
                            for t, i, f in zip(texts, part.prompt_index, part.finished)])
        adv = grpo_advantages(rewards, part.group_id.numpy()).astype(np.float32)
        split = ["train" if int(i) < cfg.train_prompts else "eval" for i in part.prompt_index]
        df = store.batch_to_frame(part, prompt_ids=pid_list, rewards=rewards, advantages=adv, texts=texts,
                                  split=split, chunk=c)
        store.write_shard(shard_dir, c, df)

    eos = [t for t in {tok.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)}
           if isinstance(t, int)]
    hidden_parts: dict[int, torch.Tensor] = {}

    def on_chunk_keep(c: int, part) -> None:
        on_chunk(c, part)
        if part.hidden is not None:
            hidden_parts[c] = part.hidden

    if todo:
        sample(lm.model, prompt_ids, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
               eos_token_id=eos, pad_token_id=tok.pad_token_id, temperature=cfg.temperature,
               prompts_per_chunk=cfg.prompts_per_chunk, seed=cfg.seed, chunks=todo, on_chunk=on_chunk_keep,
               keep_hidden=True, progress=cfg.progress)
    frame = store.read_shards(shard_dir)
    timings["sample_s"] = time.perf_counter() - t1
    full = store.frame_to_batch(frame, pad_token_id=tok.pad_token_id, temperature=cfg.temperature)
    is_eval = (frame["split"] == "eval").to_numpy()
    eval_rows, train_rows = np.nonzero(is_eval)[0], np.nonzero(~is_eval)[0]
    ev = full.subset(eval_rows)
    eval_frame = frame.iloc[eval_rows].reset_index(drop=True)
    _log(f"[llm] sampled {len(full)} responses, {int(full.mask.sum())} tokens, mean length "
         f"{float(full.lengths.float().mean()):.0f}, {float(full.finished.float().mean()):.0%} ended with EOS, "
         f"mean reward {frame['reward'].mean():.3f}")

    # --- μ's reference (hidden states + LM head) on the eval split for the exact KL(μ‖π): kept from sampling
    # when every chunk was sampled in this process, else one teacher-forced pass; and the sampling-vs-scoring
    # log-prob agreement on a few eval responses
    t2 = time.perf_counter()
    if set(hidden_parts) == set(range(n_chunks)):
        chunk_col = frame["chunk"].to_numpy()
        pos_in_chunk = frame.groupby("chunk").cumcount().to_numpy()
        H = next(iter(hidden_parts.values())).shape[-1]
        hid = torch.zeros((len(ev), ev.tokens.shape[1], H))
        for j, row in enumerate(eval_rows):
            h = hidden_parts[int(chunk_col[row])][int(pos_in_chunk[row])]
            n = min(h.shape[0], hid.shape[1])
            hid[j, :n] = h[:n]
        hid = hid * ev.mask[..., None]
        check_rows = list(range(min(4, len(ev))))
        check = ev.subset(check_rows)
        mu_check = offpolicy.score(lm.model, check, temperature=cfg.temperature)
    else:
        mu_all = offpolicy.score(lm.model, ev, temperature=cfg.temperature, keep_hidden=True,
                                 progress=cfg.progress, desc="score μ")
        hid, check, mu_check = mu_all.hidden, ev, mu_all
    hidden_parts.clear()
    ref = reference_cache(lm.model, hid, cfg.temperature)
    agreement = float(((mu_check.logp - check.logp).abs() * check.mask).max())
    timings["score_mu_s"] = time.perf_counter() - t2
    _log(f"[llm] sampling vs teacher-forced log-prob agreement: max |Δ| = {agreement:.2e}")

    targets: dict[str, dict[str, Any]] = {}
    target_dir = out / "targets"

    def record_target(name: str, res, extra: dict[str, Any]) -> None:
        df = eval_frame.copy()
        lengths = ev.lengths.tolist()
        lp = res.logp.numpy()
        df["logp_target"] = [lp[i, :n].astype(np.float32).tolist() for i, n in enumerate(lengths)]
        if res.kl is not None:
            kl = res.kl.numpy()
            df["kl"] = [kl[i, :n].astype(np.float32).tolist() for i, n in enumerate(lengths)]
        df["target"] = name
        store.write_parquet(target_dir / f"{name}.parquet", df)
        from ctpo_lab import dumps, ratios

        mask = ev.mask
        ell = ratios.token_log_ratio(res.logp.double(), ev.logp.double(), mask)
        L = ratios.cumulative_log_ratio(ell, mask)
        dumps.write_ratio_dump(out / "dumps" / name, L, mask, step=int(extra.get("k", 0)), rank=0,
                               advantages=torch.as_tensor(df["advantage"].to_numpy()),
                               group_ids=ev.group_id, overwrite=True)
        targets[name] = extra

    t3 = time.perf_counter()
    if cfg.source == "stale":
        train = full.subset(train_rows)
        adv = torch.as_tensor(frame["advantage"].to_numpy()[train_rows], dtype=torch.float32)
        zero_adv = float((adv == 0).float().mean())
        informative = int(np.unique(train.group_id.numpy()[(adv != 0).numpy()]).size)
        _log(f"[llm] stale updates: preset {cfg.preset}, lr {cfg.lr}, up to {cfg.minibatches} minibatches of the "
             f"{int((adv != 0).sum())} responses with A ≠ 0 ({informative} of {cfg.train_prompts} train groups; "
             f"{zero_adv:.0%} of train responses have A = 0 and are skipped)")
        targets_meta_stale = {"informative_train_groups": informative, "zero_advantage_fraction": zero_adv}
        ks = set(cfg.k)
        update_metrics: list[dict[str, float]] = []

        def on_update(k: int, model, rec) -> None:
            from ctpo_lab import dumps, ratios

            update_metrics.append({"update": rec.update, **rec.metrics})
            L = ratios.cumulative_log_ratio(rec.log_ratio.double(), rec.mask)
            dumps.write_ratio_dump(out / "dumps" / "updates", L, rec.mask, step=rec.update, rank=0,
                                   advantages=rec.advantages, overwrite=True)
            if k in ks:
                res = offpolicy.score_target(model, ev, temperature=1.0, reference=ref, progress=cfg.progress,
                                             desc=f"score π_{k}")
                record_target(f"stale_k{k}", res, {"source": "stale", "k": k, "preset": cfg.preset, "lr": cfg.lr})

        offpolicy.stale_updates(
            lm.model, train, adv, offpolicy.StaleConfig(preset=cfg.preset, lr=cfg.lr, num_minibatches=cfg.minibatches),
            num_updates=max(cfg.k), seed=cfg.seed, on_update=on_update, progress=cfg.progress,
        )
        (out / "updates.json").write_text(json.dumps(update_metrics, indent=1))
        for v in targets.values():
            v.update(targets_meta_stale)
    else:
        if cfg.source == "temperature":
            target_model, name = lm.model, f"temperature_{cfg.temperature:g}"
        elif cfg.source == "dtype":
            target_model, name = offpolicy.bf16_copy(lm.model), "dtype_bf16"
        else:
            assert target_lm is not None
            target_model, name = target_lm.model, "checkpoint"
        tau = 1.0 if cfg.source == "temperature" else cfg.temperature
        res = offpolicy.score_target(target_model, ev, temperature=tau, reference=ref, progress=cfg.progress,
                                     desc=f"score {name}")
        record_target(name, res, {"source": cfg.source, "k": 0})
    timings["perturb_s"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    summary = analyze(out, bin_width=cfg.bin_width, min_count=cfg.min_count, min_sequences=cfg.min_sequences,
                      n_boot=cfg.n_boot, seed=cfg.seed, overwrite=True, meta={
                          "model": cfg.model, "source": cfg.source, "agreement_max_abs_diff": agreement,
                          "responses": len(full), "eval_responses": len(ev), "tokens": int(full.mask.sum()),
                          "mean_length": float(full.lengths.float().mean()),
                          "eos_fraction": float(full.finished.float().mean()),
                          "mean_reward": float(frame["reward"].mean()), "reward_mode": cfg.reward,
                          "targets_meta": targets,
                      })
    timings["analyze_s"] = time.perf_counter() - t4
    timings["total_s"] = time.perf_counter() - t0
    summary["timings"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _matrices(df) -> dict[str, np.ndarray]:
    from ctpo_lab.llm import store

    mask = store.padded(df["mask"], 0, np.int8).astype(bool)
    lb = store.padded(df["logp_behaviour"], 0.0, np.float64)
    lt = store.padded(df["logp_target"], 0.0, np.float64)
    ell = np.where(mask, np.clip(lt - lb, -20, 20), 0.0)
    out = {"mask": mask, "log_ratio": ell, "cum": np.cumsum(ell, axis=1),
           "advantage": df["advantage"].to_numpy(np.float64), "group": df["group_id"].to_numpy()}
    if df["kl"].notna().all():
        out["kl"] = store.padded(df["kl"], 0.0, np.float64)
    return out


def analyze_target(
    df, *, bin_width: int, min_count: int, min_sequences: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """All statistics of one target's trajectory frame (:func:`ctpo_lab.analysis.trajectory_statistics`)."""
    from ctpo_lab.analysis import trajectory_statistics

    m = _matrices(df)
    return trajectory_statistics(m["log_ratio"], m["mask"], m["advantage"], m["group"], m.get("kl"),
                                 bin_width=bin_width, min_count=min_count, min_sequences=min_sequences,
                                 n_boot=n_boot, seed=seed)


def analyze(
    out: Path, *, bin_width: int = 50, min_count: int = 30, min_sequences: int = 10, n_boot: int = 1000,
    seed: int = 0, overwrite: bool = False, meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Statistics of every ``out/targets/*.parquet``, Figure-1-style plots, and ``out/summary.json``."""
    from ctpo_lab.llm import store

    files = sorted((out / "targets").glob("*.parquet"), key=lambda p: _target_order(p.stem))
    if not files:
        raise SystemExit(f"error: {out}/targets holds no target parquet (run `python -m ctpo_lab.llm run` first)")
    plots = [out / "figure1.png", out / "figure1.pdf"]
    if not overwrite and any(p.exists() for p in plots + [out / "summary.json"]):
        raise SystemExit(f"error: {out} already has plots/summary (use --overwrite)")
    results: dict[str, dict[str, Any]] = {}
    for f in files:
        df = store.read_parquet(f)
        try:
            results[f.stem] = analyze_target(df, bin_width=bin_width, min_count=min_count,
                                             min_sequences=min_sequences, n_boot=n_boot, seed=seed)
        except ValueError as e:
            results[f.stem] = {"error": str(e)}
        _log(_one_line(f.stem, results[f.stem]))
    primary = files[-1].stem
    p = results[primary]
    summary: dict[str, Any] = {
        "primary_target": primary,
        "sigma_hat": p.get("sigma_hat"), "exponent": p.get("exponent"), "exponent_ci": p.get("exponent_ci"),
        "drift_per_token": p.get("drift_per_token"),
        "clip_rate_fixed_window": p.get("clip_rates", {}).get("fixed_window", {}).get("overall"),
        "clip_rate_sqrt_t_window": p.get("clip_rates", {}).get("sqrt_t_window", {}).get("overall"),
        "settings": {"bin_width": bin_width, "min_count": min_count, "min_sequences": min_sequences,
                     "n_boot": n_boot, "seed": seed},
        **(meta or {}),
        "targets": results,
    }
    _plot(out, results, bin_width)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _target_order(name: str) -> tuple[int, str]:
    if name.startswith("stale_k"):
        try:
            return int(name[len("stale_k"):]), name
        except ValueError:
            pass
    return 10**9, name


def _one_line(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"[llm] {name}: {r['error']}"
    cr = r["clip_rates"]
    return (f"[llm] {name}: σ̂ = {r['sigma_hat']:.4f}, exponent = {r['exponent']:.3f} "
            f"[{r['exponent_ci'][0]:.3f}, {r['exponent_ci'][1]:.3f}], drift/token = {r['drift_per_token']:.2e}, "
            f"clip fixed {cr['fixed_window']['overall']:.2%} vs √t {cr['sqrt_t_window']['overall']:.2%}")


def _plot(out: Path, results: dict[str, dict[str, Any]], bin_width: int) -> None:
    """figure1.{png,pdf} and drift.{png,pdf} (shared with ``python -m ctpo_lab.figures``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctpo_lab.figures.position import drift_figure, figure1

    if not any("error" not in v for v in results.values()):
        return
    for name, fig in (("figure1", figure1(results, bin_width)), ("drift", drift_figure(results))):
        fig.tight_layout()
        for suffix in ("png", "pdf"):
            fig.savefig(out / f"{name}.{suffix}", dpi=150)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------


def fit_command(ns: argparse.Namespace) -> dict[str, Any]:
    """√t fit of a trajectory parquet (``logp_target`` present) or of a directory of npz dumps."""
    from ctpo_lab import dumps, stats
    from ctpo_lab.llm import store

    p = Path(ns.path)
    if p.is_dir() and dumps.list_steps(p):
        steps = dumps.list_steps(p)
        step = steps[-1] if ns.step is None else ns.step
        d = dumps.read_step(p, step)
        L, mask, groups = d.cum_log_ratio, d.mask, d.group_ids
        source = f"{p} step {step}"
    else:
        df = store.read_parquet(p)
        if df["logp_target"].isna().any():
            raise SystemExit(f"error: {p} has no logp_target (a behaviour-only shard?)")
        m = _matrices(df)
        L, mask, groups = m["cum"], m["mask"], m["group"]
        source = str(p)
    fit = stats.sqrt_t_fit(L, mask, groups, center=ns.center and groups is not None, bin_width=ns.bin_width,
                           min_count=ns.min_count, min_sequences=min(ns.min_count, 10), n_boot=ns.n_boot,
                           seed=ns.seed)
    res = {"source": source, "sigma_hat": fit.sigma_hat, "sigma_hat_ci": list(fit.sigma_hat_ci),
           "exponent": fit.exponent, "exponent_ci": list(fit.exponent_ci), "n_sequences": fit.n_sequences,
           "cluster": fit.cluster, "centered": fit.centered}
    print(json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    ns = _parser().parse_args(argv)
    if ns.command is None:
        _parser().print_help()
        return 2
    if ns.command == "run":
        cfg = _resolve(ns)
        try:
            summary = run(cfg, overwrite=ns.overwrite, resume=ns.resume)
        except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
            raise SystemExit(f"error: {e}") from e
        print(json.dumps({k: summary[k] for k in ("primary_target", "sigma_hat", "exponent", "exponent_ci",
                                                  "drift_per_token", "clip_rate_fixed_window",
                                                  "clip_rate_sqrt_t_window", "timings")},
                         indent=2, default=_json_default))
        return 0
    if ns.command == "bias":
        from ctpo_lab.llm.bias_run import main_bias

        return main_bias(ns)
    if ns.command == "analyze":
        out = Path(ns.dir)
        cfg_file = out / "config.json"
        saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        analyze(out, bin_width=ns.bin_width or saved.get("bin_width", 50),
                min_count=saved.get("min_count", 30), min_sequences=saved.get("min_sequences", 10),
                n_boot=ns.n_boot or saved.get("n_boot", 1000), seed=ns.seed, overwrite=ns.overwrite)
        return 0
    try:
        fit_command(ns)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
