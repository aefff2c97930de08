"""The real-LLM trajectory pipeline behind ``python -m ctpo_lab.llm`` (Figure 1 of the paper on any model).

:func:`run_trajectories` collects responses from μ (sharded, resumable), perturbs the policy to π by the chosen
source of off-policyness, scores π on the held-out responses, and hands every target to :func:`analyze_run`
(statistics, Figure-1-style plots, ``DIR/summary.json``); :func:`fit_dumps` is the √t fit of a trajectory
parquet or of a directory of the CTPO authors' npz dumps.

Sources (``RunConfig.source``): ``stale`` (π = μ after k = ``RunConfig.k`` optimizer steps of a GRPO-style
update with the loss preset ``RunConfig.loss`` on minibatches of a training split; ratios measured on held-out
responses), ``temperature`` (μ sampled at ``temperature`` ≠ 1, π = the same weights at 1), ``dtype`` (π = the
weights in bf16), ``checkpoints`` (π = ``target_model``).  The output folder must be new or empty unless
``overwrite`` (start again) or ``resume`` (continue an interrupted collection with the same config).

Bad input raises ``ValueError`` (``FileNotFoundError`` for a missing model or file) whose message starts with
the name of the offending :class:`RunConfig` field or argument, before any work starts; the command line
(:mod:`ctpo_lab.llm.__main__`) turns it into ``error: --flag: ...`` and exit status 2.
"""

from __future__ import annotations

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

from ctpo_lab.cli import MAX_COUNT
from ctpo_lab.llm.limits import check_bin_width, check_boot, finite_json, longest_response
from ctpo_lab.runsafety import atomic_write_text

__all__ = [
    "QUICK",
    "RunConfig",
    "resolve_run_config",
    "run_trajectories",
    "run",
    "analyze_run",
    "analyze",
    "analyze_target",
    "fit_dumps",
    "json_default",
]

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
    loss: str = "ctpo"  #: loss preset of the stale update (a key of ctpo_lab.losses.PRESETS)
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

    def validate(self) -> RunConfig:
        """Check the fields that need no model; returns ``self``. Raises ``ValueError`` naming the field."""
        for name in ("train_prompts", "eval_prompts", "group_size", "max_new_tokens", "prompts_per_chunk",
                     "minibatches", "bin_width", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_COUNT:
                raise ValueError(f"{name}: expected an int in [1, {MAX_COUNT}], got {v!r}")
        check_boot(self.n_boot)
        if self.bin_width > self.max_new_tokens:  # no response is longer than max_new_tokens
            raise ValueError(f"bin_width: expected at most --max-new-tokens ({self.max_new_tokens}), the longest "
                             f"possible response, got {self.bin_width}")
        if self.group_size < 2:
            raise ValueError("group_size: GRPO advantages need at least 2 responses per prompt")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0
                and math.isfinite(self.temperature)):
            raise ValueError(f"temperature: expected a finite number > 0, got {self.temperature}")
        if self.source not in SOURCES:
            raise ValueError(f"source: expected one of {SOURCES}, got {self.source!r}")
        if not self.k or any(not isinstance(v, int) or v < 1 for v in self.k):
            raise ValueError(f"k: expected positive ints, got {self.k!r}")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and math.isfinite(self.lr)
                and self.lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= 2**63 - 1:
            raise ValueError(f"seed: expected an int in [0, 2**63 - 1], got {self.seed!r}")
        if any(v > MAX_COUNT for v in self.k):
            raise ValueError(f"k: expected ints ≤ {MAX_COUNT}, got {self.k!r}")
        if not self.out:
            raise ValueError("out: an output directory is required")
        from ctpo_lab.runsafety import check_writable

        check_writable(self.out)
        from ctpo_lab.llm.models import check_load_options

        check_load_options(self.cache, self.pad_token)
        if self.source == "checkpoints" and not self.target_model:
            raise ValueError("target_model: --source checkpoints needs a target model")
        if self.source == "temperature" and self.temperature == 1.0:
            raise ValueError("temperature: --source temperature needs a sampling temperature ≠ 1")
        if self.source == "stale":
            from ctpo_lab.losses import PRESETS

            if self.loss not in PRESETS:
                raise ValueError(f"loss: unknown preset {self.loss!r}; expected one of {sorted(PRESETS)}")
        return self


#: The sources of off-policyness of ``run``.
SOURCES: tuple[str, ...] = ("stale", "temperature", "dtype", "checkpoints")

#: ``--quick``: a small budget (the tiny random model unless another model is named).
QUICK = dict(model="tiny-random", train_prompts=8, eval_prompts=24, group_size=4, max_new_tokens=160,
             prompts_per_chunk=8, k=[1, 4, 8], minibatches=8, lr=1e-3, bin_width=16, min_count=10,
             min_sequences=8, n_boot=300)


#: The :class:`RunConfig` fields that ``resolve_run_config`` takes as options (``None``: keep the default or the
#: ``quick`` value).
OPTIONS: tuple[str, ...] = ("model", "prompts", "reward", "train_prompts", "eval_prompts", "group_size",
                            "max_new_tokens", "temperature", "prompts_per_chunk", "k", "loss", "lr", "minibatches",
                            "target_model", "bin_width", "n_boot", "cache", "pad_token")


def resolve_run_config(*, out: str, seed: int = 0, quick: bool = False, source: str = "stale", threads: int = 1,
                       progress: bool = True, **options: Any) -> RunConfig:
    """The validated :class:`RunConfig`: defaults < :data:`QUICK` (when ``quick``) < the non-``None``
    ``options`` (keys of :data:`OPTIONS`).  ``quick`` with a model other than ``tiny-random`` keeps the default
    learning rate unless ``lr`` is given."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"options: unknown option(s) {unknown}; expected names from {list(OPTIONS)}")
    cfg = RunConfig(out=str(out), seed=seed, quick=quick, source=source)
    if quick:
        for k, v in QUICK.items():
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
    for name, v in options.items():
        if v is not None:
            setattr(cfg, name, v)
    cfg.threads, cfg.progress = threads, progress
    model, lr = options.get("model"), options.get("lr")
    if quick and model is not None and model != "tiny-random":
        cfg.lr = RunConfig.lr if lr is None else lr
    return cfg.validate()


def _prepare_out(out: Path, cfg: RunConfig, overwrite: bool, resume: bool, *, check_only: bool = False) -> None:
    """The output folder: new or empty, ``overwrite`` of a ctpo_lab folder (emptied), or ``resume`` of a
    collection with the same config; locked for this process (:mod:`ctpo_lab.runsafety`)."""
    from ctpo_lab.runsafety import atomic_write_text, prepare_output, read_json

    nonempty = prepare_output(out, command="python -m ctpo_lab.llm", resume=resume, overwrite=overwrite,
                              check_only=True)
    if nonempty and resume:
        cfg_file = out / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"resume: {out} has no config.json")
        old = read_json(cfg_file, name="resume")
        new = cfg.collection_key()
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"resume: the collection config differs from {cfg_file}: {diff}")
    if check_only:
        return
    prepare_output(out, command="python -m ctpo_lab.llm", resume=resume, overwrite=overwrite)
    if nonempty and resume:
        shutil.rmtree(out / "targets", ignore_errors=True)
        shutil.rmtree(out / "dumps", ignore_errors=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------------------


def run_trajectories(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Collect, perturb, analyse and plot into ``cfg.out``; returns the summary (also ``DIR/summary.json``).

    Every check of the input (the config, the model, the prompts, the output folder) runs before any sampling.
    """
    cfg.validate()
    from ctpo_lab.advantages import grpo_advantages
    from ctpo_lab.llm import offpolicy, store
    from ctpo_lab.llm.models import check_model, load_model, relabel_model_error
    from ctpo_lab.llm.prompts import load_prompts, render_prompts, reward
    from ctpo_lab.llm.rollout import reference_cache, sample

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # --- everything that can fail on bad input, before any work
    _prepare_out(out, cfg, overwrite, resume, check_only=True)
    # the model specs and the prompts before loading any model (seconds to a minute)
    check_model(cfg.model, "model")
    if cfg.source == "checkpoints":
        check_model(cfg.target_model, "target_model")  # type: ignore[arg-type]
    n_prompts = cfg.train_prompts + cfg.eval_prompts
    prompts = load_prompts(cfg.prompts, n=n_prompts, seed=cfg.seed)
    if len(prompts) < n_prompts:
        raise ValueError(f"prompts: {cfg.prompts} has {len(prompts)} prompts, {n_prompts} needed")
    lm = load_model(cfg.model, seed=cfg.seed, cache=cfg.cache, pad_token=cfg.pad_token)
    tok = lm.tokenizer
    max_prompt = lm.context_length - cfg.max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"max_new_tokens: {cfg.max_new_tokens} ≥ the model context {lm.context_length}")
    prompt_ids = render_prompts(tok, prompts, max_prompt_tokens=max_prompt)
    target_lm = None
    if cfg.source == "checkpoints":
        try:
            target_lm = load_model(cfg.target_model, cache=cfg.cache,  # type: ignore[arg-type]
                                   pad_token=cfg.pad_token)
        except (OSError, ValueError) as e:  # its errors name "model": this one is --target-model
            raise relabel_model_error(e, "target_model") from None
        if len(target_lm.tokenizer) != len(tok):
            raise ValueError("target_model: its tokenizer differs from the behaviour model's")
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
        _log(f"[llm] stale updates: loss {cfg.loss}, lr {cfg.lr}, up to {cfg.minibatches} minibatches of the "
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
                record_target(f"stale_k{k}", res, {"source": "stale", "k": k, "loss": cfg.loss, "lr": cfg.lr})

        offpolicy.stale_updates(
            lm.model, train, adv, offpolicy.StaleConfig(preset=cfg.loss, lr=cfg.lr, num_minibatches=cfg.minibatches),
            num_updates=max(cfg.k), seed=cfg.seed, on_update=on_update, progress=cfg.progress,
        )
        atomic_write_text(out / "updates.json", json.dumps(update_metrics, indent=1))
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
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=json_default))
    return summary


#: The historical name of :func:`run_trajectories`.
run = run_trajectories


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays as plain numbers and lists."""
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
    st = trajectory_statistics(m["log_ratio"], m["mask"], m["advantage"], m["group"], m.get("kl"),
                               bin_width=bin_width, min_count=min_count, min_sequences=min_sequences,
                               n_boot=n_boot, seed=seed)
    if not _finite(st["sigma_hat"]):
        raise ValueError(_undefined_sigma(bin_width, min_count))
    return st


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(float(x))


def _undefined_sigma(bin_width: int, min_count: int) -> str:
    return (f"bin_width: σ̂ is undefined with bins of {bin_width} positions (no bin holds {min_count} or more "
            "tokens with its centre at a position ≤ 5000); use a smaller --bin-width (or --min-count)")


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with every non-finite number as null and the paths of those listed under ``undefined``
    (never a NaN in a JSON file, never one dropped silently)."""
    clean, undefined = finite_json(result)
    clean["undefined"] = undefined
    return clean


def analyze(
    out: Path, *, bin_width: int = 50, min_count: int = 30, min_sequences: int = 10, n_boot: int = 1000,
    seed: int = 0, overwrite: bool = False, meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Statistics of every ``out/targets/*.parquet``, Figure-1-style plots, and ``out/summary.json``."""
    from ctpo_lab.llm import store

    files = sorted((out / "targets").glob("*.parquet"), key=lambda p: _target_order(p.stem))
    if not files:
        raise ValueError(f"dir: {out}/targets holds no target parquet (run `python -m ctpo_lab.llm run` first)")
    plots = [out / "figure1.png", out / "figure1.pdf"]
    if not overwrite and any(p.exists() for p in plots + [out / "summary.json"]):
        raise ValueError(f"overwrite: {out} already has plots/summary (use --overwrite)")
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
    summary = _json_ready(summary)
    text = json.dumps(summary, indent=2, allow_nan=False)
    _plot(out, results, bin_width)
    atomic_write_text(out / "summary.json", text)
    return summary


def analyze_run(out: str | Path, *, bin_width: int | None = None, n_boot: int | None = None, seed: int = 0,
                overwrite: bool = False) -> dict[str, Any]:
    """Redo the statistics and plots of an existing run folder from ``out/targets``, with the settings of its
    ``config.json`` unless ``bin_width`` / ``n_boot`` are given."""
    from ctpo_lab.runsafety import prepare_output, read_json

    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"dir: {out} is not a directory")
    if bin_width is not None and (isinstance(bin_width, bool) or not isinstance(bin_width, int) or bin_width < 1):
        raise ValueError(f"bin_width: expected a positive int, got {bin_width!r}")
    if n_boot is not None:
        check_boot(n_boot)
    cfg_file = out / "config.json"
    saved = read_json(cfg_file, name="dir") if cfg_file.is_file() else {}
    files = sorted((out / "targets").glob("*.parquet"))
    if not files:
        raise ValueError(f"dir: {out}/targets holds no target parquet (run `python -m ctpo_lab.llm run` first)")
    if bin_width is not None:  # the responses are known: a bin wider than all of them is refused before writing
        from ctpo_lab.llm import store

        longest = max(longest_response(store.padded(store.read_parquet(f)["mask"], 0, np.int8)) for f in files)
        check_bin_width(bin_width, longest)
    if not overwrite and any((out / f).exists() for f in ("figure1.png", "figure1.pdf", "summary.json")):
        raise ValueError(f"overwrite: {out} already has plots/summary (use --overwrite)")
    prepare_output(out, command="python -m ctpo_lab.llm analyze", resume=True, name="dir",  # one writer
                   owners=("python -m ctpo_lab.llm",))
    return analyze(out, bin_width=bin_width or saved.get("bin_width", 50), min_count=saved.get("min_count", 30),
                   min_sequences=saved.get("min_sequences", 10), n_boot=n_boot or saved.get("n_boot", 1000),
                   seed=seed, overwrite=overwrite)


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
    from ctpo_lab.stats import format_ci

    exponent = format_ci(r["exponent"], *r["exponent_ci"], 3, style="f")
    return (f"[llm] {name}: σ̂ = {r['sigma_hat']:.4f}, exponent = {exponent}, "
            f"drift/token = {r['drift_per_token']:.2e}, "
            f"clip fixed {cr['fixed_window']['overall']:.2%} vs √t {cr['sqrt_t_window']['overall']:.2%}")


def _plot(out: Path, results: dict[str, dict[str, Any]], bin_width: int) -> None:
    """figure1.{png,pdf} and drift.{png,pdf} (shared with ``python -m ctpo_lab.figures``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctpo_lab.figures.position import drift_figure, figure1
    from ctpo_lab.runsafety import atomic_path

    if not any("error" not in v for v in results.values()):
        return
    for name, fig in (("figure1", figure1(results, bin_width)), ("drift", drift_figure(results))):
        fig.tight_layout()
        for suffix in ("png", "pdf"):
            with atomic_path(out / f"{name}.{suffix}") as tmp:
                fig.savefig(tmp, dpi=150, format=suffix)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------


def fit_dumps(path: str | Path, *, step: int | None = None, bin_width: int = 50, min_count: int = 30,
              n_boot: int = 1000, seed: int = 0, center: bool = False) -> dict[str, Any]:
    """√t fit of a trajectory parquet (``logp_target`` present) or of a directory of npz dumps (``step``: the
    dump step, default the last one); ``center``: centre L_t within prompt groups."""
    from ctpo_lab import dumps, stats
    from ctpo_lab.llm import store

    check_boot(n_boot)
    p = Path(path)
    if p.is_dir() and dumps.list_steps(p):
        steps = dumps.list_steps(p)
        step = steps[-1] if step is None else step
        d = dumps.read_step(p, step)
        L, mask, groups = d.cum_log_ratio, d.mask, d.group_ids
        source = f"{p} step {step}"
    else:
        df = store.read_parquet(p)
        if df["logp_target"].isna().any():
            raise ValueError(f"path: {p} has no logp_target (a behaviour-only shard?)")
        m = _matrices(df)
        L, mask, groups = m["cum"], m["mask"], m["group"]
        source = str(p)
    check_bin_width(bin_width, longest_response(mask))
    fit = stats.sqrt_t_fit(L, mask, groups, center=center and groups is not None, bin_width=bin_width,
                           min_count=min_count, min_sequences=min(min_count, 10), n_boot=n_boot, seed=seed)
    res = {"source": source, "sigma_hat": fit.sigma_hat, "sigma_hat_ci": list(fit.sigma_hat_ci),
           "exponent": fit.exponent, "exponent_ci": list(fit.exponent_ci), "n_sequences": fit.n_sequences,
           "cluster": fit.cluster, "centered": fit.centered}
    if not _finite(fit.sigma_hat):
        raise ValueError(_undefined_sigma(bin_width, min_count))
    return _json_ready(res)
