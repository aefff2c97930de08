"""``python -m ctpo_lab.llm bias``: estimator bias and variance on real LLM trajectories.

For each source of off-policyness (stale π after k = 1, 4, 15 updates; μ sampled at a temperature ≠ 1;
π run in bf16; π_old sampled in bf16 while π is k updates ahead, three policies), responses are sampled
from μ *and* from π on the same held-out prompts; each estimator of :mod:`ctpo_lab.llm.bias` is evaluated
on μ's responses, the on-policy reference on π's, both projected on K random parameter directions by
forward-mode differentiation (:mod:`ctpo_lab.llm.directions`). The exact laboratory's prediction for a
Markov chain with the same per-token KL is computed side by side (two-policy sources).

The ``bf16_sampler`` source has three policies, as in RL systems whose sampler runs in bf16: μ = π_old's forward
in bfloat16 samples the responses (``rollout_log_prob`` = its log-probs), π_old's float32 scoring of them is
``old_log_prob``, and π = π_old after k stale updates (as in ``stale``). Every (estimator × rollout correction)
pair of ``--estimators`` × ``--rollout-corrections`` (names of ``ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS``;
``none`` = the loss against π_old, the mismatch ignored) is measured against the on-policy reference from π; its
rows carry a ``rollout_correction`` column, and sources.json / summary.json record the per-token KL(μ‖π_old)
and KL(π_old‖π). Its ``rel_bias_vs_seq`` pairs with the full-sequence IS weight π/μ on the sampler's ratios.

Outputs (DIR must be new or empty unless ``--overwrite``): ``table.csv`` / ``table.md`` (source × estimator),
``per_direction.csv``, ``ratio_profiles.csv``, ``prediction.csv`` / ``prediction_summary.csv``,
``projections.npz`` (the raw [P, K] matrices), ``estimator_info.csv``, ``sources.json``,
``bias_noise_variance.png|pdf`` (bias² in units of the reference's noise, measurable even where the gradient
is not resolved), ``bias_variance.png|pdf`` (relative bias), ``ratio_profiles.png|pdf``, ``summary.json``, and
with a three-policy source ``rollout_corrections.png|pdf`` (bias and variance per estimator × correction).
``--reanalyze`` recomputes the statistics and everything after them from the saved raw results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctpo_lab import advantages
from ctpo_lab.cli import MAX_COUNT, finite_float, folder_path, int_at_least
from ctpo_lab.llm import bias
from ctpo_lab.llm.limits import MAX_BOOT, MAX_CHAIN_SEEDS, MIN_BOOT, check_boot
from ctpo_lab.stats import format_ci

SOURCES: tuple[str, ...] = ("temperature", "dtype", "stale", "bf16_sampler")
#: The sources with three policies (a sampler μ ≠ the trainer's recompute π_old): rows per rollout correction.
THREE_POLICY_SOURCES: tuple[str, ...] = ("bf16_sampler",)
#: The raw results of a run that ``--reanalyze`` reads.
RAW_FILES: tuple[str, ...] = ("config.json", "projections.npz", "estimator_info.csv", "ratio_profiles.csv",
                              "sources.json")


@dataclass
class BiasConfig:
    """Resolved configuration of ``bias`` (written to DIR/config.json)."""

    model: str = "smollm2"
    out: str = ""
    seed: int = 0
    quick: bool = False
    prompts: str = "arithmetic"
    reward: str = "lenient"
    advantage: str = "grpo"
    train_prompts: int = 8
    eval_prompts: int = 16
    group_size: int = 4
    max_new_tokens: int = 128
    prompts_per_chunk: int = 16
    sources: list[str] = field(default_factory=lambda: ["stale", "temperature", "dtype"])
    k: list[int] = field(default_factory=lambda: [1, 4, 15])
    preset: str = "ctpo"
    estimators: list[str] = field(default_factory=lambda: list(bias.ESTIMATORS))
    rollout_corrections: list[str] = field(default_factory=lambda: list(bias.CORRECTIONS))
    lr: float = 1e-5
    minibatches: int = 16
    mu_temperature: float = 0.9
    directions: int = 16
    params: str = "last"
    directions_per_pass: int = 16
    rows_per_chunk: int = 8
    batch_size: int = 64
    n_boot: int = 1000
    chain_seeds: int = 5
    chain_max_horizon: int = 64
    threads: int = 2
    cache: str | None = None
    pad_token: str | None = None
    progress: bool = True


#: The estimator whose projections pair with every other one on the same μ samples (``rel_bias_vs_seq``): the
#: full-sequence IS weight ρ_{1:T}, whose expectation under μ is the on-policy gradient.
PAIRED_ESTIMATOR = "unclipped_sequence"
#: The projections.npz key suffix of a three-policy source's paired estimator (full-sequence IS π/μ on the
#: sampler's own log-probs), and the separator of an (estimator, correction) key: ``{source}/{estimator}@{corr}``.
PAIRED_KEY = "paired"
CORRECTION_SEP = "@"


def projection_key(source: str, estimator: str, correction: object = None) -> str:
    """The projections.npz key of one (source, estimator, rollout correction); no correction (None, ``""``,
    NaN or ``none``) is the two-policy key ``{source}/{estimator}``."""
    corr = correction_label(correction)
    if corr in ("", bias.NO_CORRECTION):
        return f"{source}/{estimator}"
    return f"{source}/{estimator}{CORRECTION_SEP}{corr}"


def correction_label(value: object) -> str:
    """A ``rollout_correction`` cell as a string (``""`` for a two-policy row: missing, None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)

#: Names in run folders written before the estimators were the presets of :mod:`ctpo_lab.losses` (old → new),
#: per column: the ``estimator`` column of estimator_info/table/prediction CSVs (and the ``{source}/{estimator}``
#: keys of projections.npz), and the ``weight`` column of ratio_profiles.csv. Used only when reading such a
#: folder (``--reanalyze``, the ``llm_bias`` figures); names not listed (grpo, ctpo, ctpo_fixed) are unchanged.
LEGACY_NAMES: dict[str, dict[str, str]] = {
    "estimator": {"token": "unclipped_token", "cumulative": "unclipped_cumulative", "sequence": "unclipped_sequence",
                  "gspo": "unclipped_sequence_geomean", "gspo_clip": "gspo"},
    "weight": {"gspo": "sequence_geomean"},
}


def _legacy_only(column: str) -> set[str]:
    """Old names of ``column`` that no current name equals (their presence marks an old folder)."""
    m = LEGACY_NAMES[column]
    return set(m) - set(m.values())


def is_legacy(frame: pd.DataFrame, column: str = "estimator") -> bool:
    """Whether ``frame[column]`` uses the old names of :data:`LEGACY_NAMES` (old ``gspo`` and new ``gspo`` are
    different estimators, so a folder is renamed as a whole, never name by name)."""
    return column in frame.columns and bool(set(frame[column].astype(str)) & _legacy_only(column))


def rename_legacy(frame: pd.DataFrame, legacy: bool | None = None) -> pd.DataFrame:
    """``frame`` with the old names of :data:`LEGACY_NAMES` replaced in each of its columns that uses them
    (``legacy`` forces the decision for the ``estimator`` column, e.g. a prediction read with its table)."""
    frame = frame.copy()
    for column, mapping in LEGACY_NAMES.items():
        old = is_legacy(frame, column) if legacy is None or column != "estimator" else legacy
        if old and column in frame.columns:
            frame[column] = frame[column].map(lambda v, m=mapping: m.get(v, v))
    return frame


def rename_legacy_key(key: str, legacy: bool) -> str:
    """A ``{source}/{estimator}`` key of projections.npz with its estimator renamed in a legacy folder."""
    if not legacy or "/" not in key:
        return key
    source, est = key.rsplit("/", 1)
    return f"{source}/{LEGACY_NAMES['estimator'].get(est, est)}"


QUICK: dict[str, Any] = dict(model="tiny-random", train_prompts=8, eval_prompts=16, group_size=4, max_new_tokens=48,
                             k=[1, 4, 8], lr=1e-3, minibatches=8, directions=16, params="last:2", n_boot=300,
                             chain_seeds=3, chain_max_horizon=16)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _params_type(text: str) -> str:
    """argparse ``type`` of ``--params``: well formed (:func:`ctpo_lab.llm.directions.check_params_spec`)."""
    from ctpo_lab.llm.directions import check_params_spec

    try:
        return check_params_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("params: ")) from None


_params_type.__name__ = "params"


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = BiasConfig()
    b = sub.add_parser("bias", help="estimator bias/variance against an on-policy reference",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--model", default=None, help="smollm2 | tiny-random | local folder | hub id")
    b.add_argument("--out", type=folder_path, required=True, help="output directory")
    b.add_argument("--seed", type=int_at_least(0), default=0)
    b.add_argument("--quick", action="store_true", help="small budget on tiny-random (≤ 3 min)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    b.add_argument("--prompts", default=None, help="arithmetic | verl parquet file/dir | hf:NAME[:split]")
    b.add_argument("--reward", choices=("binary", "lenient"), default=None, help=f"reward ({d.reward})")
    b.add_argument("--advantage", choices=advantages.SCHEMES, default=None,
                   help="grpo (group mean/std, as training; default) | rloo (leave-one-out) | reward")
    b.add_argument("--train-prompts", type=int, default=None, help=f"prompts of the stale updates ({d.train_prompts})")
    b.add_argument("--eval-prompts", type=int, default=None, help=f"held-out prompts measured ({d.eval_prompts})")
    b.add_argument("--group-size", type=int, default=None, help=f"responses per prompt G ({d.group_size})")
    b.add_argument("--max-new-tokens", type=int, default=None, help=f"response length limit ({d.max_new_tokens})")
    b.add_argument("--prompts-per-chunk", type=int, default=None, help=f"prompts per batched decode "
                   f"({d.prompts_per_chunk})")
    b.add_argument("--sources", default=None, help="comma list of stale,temperature,dtype,bf16_sampler "
                   "(default stale,temperature,dtype)")
    b.add_argument("--k", default=None, help="stale updates measured, e.g. 1,4,15")
    b.add_argument("--loss", "--preset", dest="preset", default=None,
                   help=f"loss preset of the stale update ({d.preset}; --preset is its former name)")
    b.add_argument("--estimators", default=None,
                   help="comma list of loss presets to measure (any key of ctpo_lab.losses.PRESETS; default "
                   f"{','.join(d.estimators)}; {PAIRED_ESTIMATOR} is always measured, the others pair with it)")
    b.add_argument("--rollout-corrections", default=None,
                   help="bf16_sampler source: comma list of rollout corrections (none or names of "
                   "ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS; default "
                   f"{','.join(d.rollout_corrections)}; none is always measured)")
    b.add_argument("--lr", type=finite_float(0.0, lo_open=True), default=None,
                   help=f"AdamW learning rate of the stale update ({d.lr})")
    b.add_argument("--minibatches", type=int, default=None, help=f"minibatches per rollout batch ({d.minibatches})")
    b.add_argument("--mu-temperature", type=finite_float(0.0, lo_open=True), default=None,
                   help=f"sampling temperature of μ for the temperature source ({d.mu_temperature})")
    b.add_argument("--directions", type=int, default=None, help=f"random parameter directions K ({d.directions})")
    b.add_argument("--params", type=_params_type, default=None,
                   help=f"parameters of the directions: all | last | last:N | name patterns ({d.params}; --quick: all)")
    b.add_argument("--directions-per-pass", type=int, default=None, help="tangents per forward pass (16)")
    b.add_argument("--batch-size", type=int, default=None, help=f"N prompt groups of the MSE ({d.batch_size})")
    b.add_argument("--n-boot", type=int_at_least(MIN_BOOT, MAX_BOOT), default=None,
                   help=f"bootstrap replicates ({d.n_boot}; {MIN_BOOT} to {MAX_BOOT:,})")
    b.add_argument("--chain-seeds", type=int_at_least(1, MAX_CHAIN_SEEDS), default=None,
                   help=f"Markov instances per prediction ({d.chain_seeds}; at most {MAX_CHAIN_SEEDS:,})")
    b.add_argument("--threads", type=int, default=None, help=f"torch CPU threads ({d.threads})")
    b.add_argument("--cache", default=None, help="model cache directory ($CTPO_LAB_CACHE)")
    b.add_argument("--pad-token", default=None, help="pad token for tokenizers without one ('eos')")
    b.add_argument("--reanalyze", action="store_true", help="recompute statistics, chain predictions, tables and "
                   "figures of the finished run in --out from its saved projections (no model; replaces only those "
                   "derived files)")
    b.add_argument("--no-progress", action="store_true")


def _int_list(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",")]  # an empty item ("1,,2") is a typo: int("") fails
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(not 1 <= v <= MAX_COUNT for v in vals):
        raise ValueError(f"--{name}: expected integers in [1, {MAX_COUNT}], got {text!r}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"--{name}: expected distinct integers, got {text!r}")
    return sorted(vals)


def resolve(ns: argparse.Namespace) -> BiasConfig:
    """Command-line namespace → validated :class:`BiasConfig` (``ValueError`` naming the flag on bad input)."""
    cfg = BiasConfig(out=ns.out, seed=ns.seed, quick=ns.quick)
    if ns.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
    for attr in ("model", "prompts", "reward", "advantage", "train_prompts", "eval_prompts", "group_size",
                 "max_new_tokens", "prompts_per_chunk", "preset", "lr", "minibatches", "mu_temperature",
                 "directions", "params", "directions_per_pass", "batch_size", "n_boot", "chain_seeds", "threads",
                 "cache", "pad_token"):
        v = getattr(ns, attr)
        if v is not None:
            setattr(cfg, attr, v)
    if ns.quick and ns.model not in (None, "tiny-random"):
        cfg.lr = BiasConfig.lr if ns.lr is None else ns.lr
        cfg.params = BiasConfig.params if ns.params is None else ns.params
    if ns.sources is not None:
        srcs = [s.strip() for s in ns.sources.split(",") if s.strip()]
        bad = [s for s in srcs if s not in SOURCES]
        if bad or not srcs or len(set(srcs)) != len(srcs):
            raise ValueError(f"--sources: expected a comma list of distinct names from {SOURCES}, got {ns.sources!r}")
        cfg.sources = srcs
    if ns.k is not None:
        cfg.k = _int_list(ns.k, "k")
    if ns.estimators is not None:
        from ctpo_lab.losses import PRESETS as _ALL

        names = list(dict.fromkeys(x.strip() for x in ns.estimators.split(",") if x.strip()))
        bad = [x for x in names if x not in _ALL]
        if bad or not names:
            raise ValueError(f"--estimators: expected a comma list of preset names of ctpo_lab.losses.PRESETS, "
                             f"got {ns.estimators!r}")
        cfg.estimators = names if PAIRED_ESTIMATOR in names else [PAIRED_ESTIMATOR, *names]
    if getattr(ns, "rollout_corrections", None) is not None:
        from ctpo_lab.rollout_correction import ROLLOUT_CORRECTIONS

        names = list(dict.fromkeys(x.strip() for x in ns.rollout_corrections.split(",") if x.strip()))
        bad = [x for x in names if x != bias.NO_CORRECTION and x not in ROLLOUT_CORRECTIONS]
        if bad or not names:
            raise ValueError(f"--rollout-corrections: expected a comma list of none and names of "
                             f"ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS, got {ns.rollout_corrections!r}")
        cfg.rollout_corrections = (names if bias.NO_CORRECTION in names else [bias.NO_CORRECTION, *names])
    cfg.progress = not ns.no_progress
    for name in ("train_prompts", "eval_prompts", "group_size", "max_new_tokens", "prompts_per_chunk", "minibatches",
                 "directions", "directions_per_pass", "batch_size", "chain_seeds", "threads"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_COUNT:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int in [1, {MAX_COUNT}], got {v!r}")
    if cfg.threads > 1024:
        raise ValueError(f"--threads: expected at most 1024 torch threads, got {cfg.threads}")
    if cfg.group_size < 2:
        raise ValueError("--group-size: group baselines need at least 2 responses per prompt")
    if cfg.eval_prompts < 2:
        raise ValueError("--eval-prompts: the bootstrap needs at least 2 prompt groups")
    check_boot(cfg.n_boot, "--n-boot")
    if cfg.chain_seeds > MAX_CHAIN_SEEDS:
        raise ValueError(f"--chain-seeds: expected an int in [1, {MAX_CHAIN_SEEDS}], got {cfg.chain_seeds}")
    from ctpo_lab.llm.directions import check_params_spec

    try:
        cfg.params = check_params_spec(cfg.params)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    from ctpo_lab.llm.models import check_load_options

    check_load_options(cfg.cache, cfg.pad_token)
    if not (math.isfinite(cfg.mu_temperature) and cfg.mu_temperature > 0 and cfg.mu_temperature != 1.0):
        raise ValueError(f"--mu-temperature: expected a finite number > 0 and ≠ 1, got {cfg.mu_temperature}")
    from ctpo_lab.losses import PRESETS

    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr: expected a finite number > 0, got {cfg.lr}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"--seed: expected an int ≥ 0, got {cfg.seed!r}")
    if cfg.preset not in PRESETS:
        raise ValueError(f"--loss: unknown preset {cfg.preset!r}; expected one of {sorted(PRESETS)}")
    return cfg


def _prepare_out(out: Path, cfg: BiasConfig, overwrite: bool, *, check_only: bool = False) -> None:
    """New or empty, or ``overwrite`` of a ctpo_lab folder nobody else holds; locked for this process."""
    from ctpo_lab.runsafety import atomic_write_text, prepare_output

    prepare_output(out, command="python -m ctpo_lab.llm bias", overwrite=overwrite, name="--out",
                   check_only=check_only, resumable=False)
    if not check_only:
        atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def display_table(table: pd.DataFrame, prediction: pd.DataFrame | None) -> pd.DataFrame:
    """One display row per (source, estimator): the measured statistics as ``value [95% CI]`` strings
    (bias in noise units, relative bias, IS-identity bias, variance ratio, cosine, relative MSE, dropped
    gradients) and the exact chain's prediction (median [min, max] over instances). A table with a
    ``rollout_correction`` column (three-policy sources) shows it after the estimator."""
    has_corr = "rollout_correction" in table.columns
    pred = None
    if prediction is not None and len(prediction):
        pred = prediction.set_index(["source", "estimator"])
    rows = []
    for _, r in table.iterrows():
        corr = correction_label(r["rollout_correction"]) if has_corr else ""
        vs_seq = "0 (itself)" if r["estimator"] == PAIRED_ESTIMATOR and not corr else format_ci(
            r.get("bias_vs_seq_to_noise", math.nan), r.get("bias_vs_seq_to_noise_lo", math.nan),
            r.get("bias_vs_seq_to_noise_hi", math.nan))
        row = {
            "source": r["source"], "KL/token": f"{r['mean_kl']:.2g}",
            "B (noise scale)": format_ci(r["noise_scale"], r["noise_scale_lo"], r["noise_scale_hi"], 3),
            "estimator": r["estimator"],
            **({"rollout correction": corr or "—"} if has_corr else {}),
            "bias² / tr Cov_ref": format_ci(r["bias_to_noise"], r["bias_to_noise_lo"], r["bias_to_noise_hi"]),
            "rel. bias vs π-samples": format_ci(r["rel_bias"], r["rel_bias_lo"], r["rel_bias_hi"]),
            "‖E(X − X_seq)‖² / tr Cov_ref (same μ samples)": vs_seq,
            "tr Cov / tr Cov_ref": format_ci(r["var_ratio"], r["var_ratio_lo"], r["var_ratio_hi"], 3),
            "cosine to reference": format_ci(r["cosine"], r["cosine_lo"], r["cosine_hi"]),
            "rel. MSE(N)": f"{r['rel_mse']:.3g}",
            "grad. dropped": f"{r['dropped_fraction']:.1%}",
        }
        if pred is not None and not corr and (r["source"], r["estimator"]) in pred.index:
            p = pred.loc[(r["source"], r["estimator"])]
            row["chain: rel. bias"] = (f"{p['relative_bias_median']:.2g} [{p['relative_bias_min']:.2g}, "
                                       f"{p['relative_bias_max']:.2g}]")
            row["chain: var ratio"] = f"{p['var_ratio_median']:.3g}"
            if "bias_to_noise_median" in p:
                row["chain: bias² / tr Cov_ref"] = f"{p['bias_to_noise_median']:.2g}"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, prediction: pd.DataFrame | None) -> str:
    """:func:`display_table` in markdown."""
    return display_table(table, prediction).to_markdown(index=False) + "\n"


def run_bias(cfg: BiasConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the study; returns the summary (also written to DIR/summary.json)."""
    from ctpo_lab.llm import offpolicy
    from ctpo_lab.llm.directions import ParameterDirections, select_parameter_names, token_directional_derivatives
    from ctpo_lab.llm.models import check_model, load_model, parameter_names
    from ctpo_lab.llm.prompts import load_prompts, render_prompts, reward
    from ctpo_lab.llm.rollout import plain_head, reference_cache, sample, score

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    _prepare_out(out, cfg, overwrite, check_only=True)  # a busy, foreign or unwritable folder: before any work
    for corr in cfg.rollout_corrections:  # unknown names before any work
        bias.correction_name(corr)

    # the model spec, the prompts and the parameter selection before loading the model (seconds to a minute)
    check_model(cfg.model, "model")
    n_train = cfg.train_prompts  # loaded even without the stale source: the held-out prompts stay the same
    prompts = load_prompts(cfg.prompts, n=n_train + cfg.eval_prompts, seed=cfg.seed)
    if len(prompts) < n_train + cfg.eval_prompts:
        raise ValueError(f"--prompts: {cfg.prompts} has {len(prompts)} prompts, "
                         f"{n_train + cfg.eval_prompts} needed")
    names = parameter_names(cfg.model, seed=cfg.seed, cache=cfg.cache)
    if names is not None:  # known from the config alone; else checked once the model is loaded
        select_parameter_names(names, cfg.params)

    lm = load_model(cfg.model, seed=cfg.seed, cache=cfg.cache, pad_token=cfg.pad_token)
    tok, mu_model = lm.tokenizer, lm.model
    max_prompt = lm.context_length - cfg.max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"--max-new-tokens: {cfg.max_new_tokens} ≥ the model context {lm.context_length}")
    prompt_ids = render_prompts(tok, prompts, max_prompt_tokens=max_prompt)
    train_ids, eval_ids = prompt_ids[:n_train], prompt_ids[n_train:]
    eval_prompts = prompts[n_train:]
    directions = ParameterDirections.for_model(mu_model, cfg.directions, params=cfg.params, seed=cfg.seed)
    _prepare_out(out, cfg, overwrite)
    n_dir_params = directions.num_parameters(mu_model)
    _log(f"[bias] model {cfg.model} ({sum(p.numel() for p in mu_model.parameters()) / 1e6:.1f}M parameters); "
         f"{cfg.eval_prompts} held-out prompts × G={cfg.group_size}, ≤{cfg.max_new_tokens} tokens; "
         f"K={cfg.directions} directions on {n_dir_params / 1e6:.2f}M parameters ({cfg.params}); "
         f"sources {cfg.sources}; advantage {cfg.advantage}")
    eos = [t for t in {tok.eos_token_id, getattr(getattr(mu_model, "generation_config", None), "eos_token_id", None)}
           if isinstance(t, int)]
    keep_hidden = plain_head(mu_model)

    def draw(model, ids, temperature: float, seed_offset: int, desc: str):
        t = time.perf_counter()
        b = sample(model, ids, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                   pad_token_id=tok.pad_token_id, temperature=temperature, prompts_per_chunk=cfg.prompts_per_chunk,
                   seed=cfg.seed * 1000 + seed_offset, keep_hidden=keep_hidden and model is mu_model,
                   progress=cfg.progress)
        timings["sample_s"] = timings.get("sample_s", 0.0) + time.perf_counter() - t
        _log(f"[bias] {desc}: {len(b)} responses, mean length {float(b.lengths.float().mean()):.1f}, "
             f"{float(b.finished.float().mean()):.0%} ended with EOS")
        return b

    def rewards_of(batch, plist) -> np.ndarray:
        texts = [tok.decode(batch.tokens[i][batch.mask[i]], skip_special_tokens=True) for i in range(len(batch))]
        return np.array([reward(t, plist[int(i)].answer, cfg.reward, finished=bool(f))
                         for t, i, f in zip(texts, batch.prompt_index, batch.finished)])

    def derivatives(model, batch, desc: str) -> torch.Tensor:
        t = time.perf_counter()
        d = token_directional_derivatives(model, batch.prompt_ids, batch.tokens, batch.mask, directions,
                                          pad_token_id=tok.pad_token_id, rows_per_chunk=cfg.rows_per_chunk,
                                          directions_per_pass=cfg.directions_per_pass, progress=cfg.progress,
                                          desc=desc)
        timings["jvp_s"] = timings.get("jvp_s", 0.0) + time.perf_counter() - t
        return d

    info: list[dict[str, Any]] = []
    profiles: list[pd.DataFrame] = []
    npz: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}

    def measure(name: str, logp_model, deriv_model, mu_batch, mu_cache, pi_batch, pi_rewards, mu_rewards,
                extra: dict[str, Any], *, three: dict[str, Any] | None = None,
                d_pi: torch.Tensor | None = None) -> torch.Tensor:
        """One source: ``three`` (the bf16_sampler source) holds π_old's float32 log-probs of μ's samples
        (``old_logp``), π_old's reference cache (``old_cache``) and the measured KL(μ‖π_old); returns the
        derivatives on π's samples (reusable by another source with the same π and π-samples)."""
        t = time.perf_counter()
        res = score(logp_model, mu_batch, temperature=1.0, reference=mu_cache, rows_per_chunk=cfg.rows_per_chunk,
                    progress=cfg.progress, desc=f"score π ({name})")
        kl_old_pi = kl_old_pi_k1 = math.nan
        mask = mu_batch.mask
        n_tok = int(mask.sum())
        if three is not None:
            kl_old_pi_k1 = float(torch.where(mask, three["old_logp"].double() - res.logp.double(), 0.0).sum()
                                 / n_tok)
            if three["old_cache"] is not None:
                r_old = score(logp_model, mu_batch, temperature=1.0, reference=three["old_cache"],
                              rows_per_chunk=cfg.rows_per_chunk, progress=cfg.progress,
                              desc=f"KL(π_old‖π) ({name})")
                kl_old_pi = float(r_old.kl.double().sum() / n_tok)
        timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t
        log_ratio = torch.where(mask, res.logp.double() - mu_batch.logp.double(), 0.0)
        kl_exact = float(res.kl.double().sum() / n_tok) if res.kl is not None else math.nan
        kl_k1 = float(-log_ratio.sum() / n_tok)
        prof = bias.ratio_position_profile(log_ratio, mask, mu_batch.group_id.numpy(), n_boot=min(cfg.n_boot, 500),
                                           seed=cfg.seed)
        prof.insert(0, "source", name)
        profiles.append(prof)
        mu_adv = advantages.group_advantages(mu_rewards, mu_batch.group_id.numpy(), cfg.advantage)
        pi_adv = advantages.group_advantages(pi_rewards, pi_batch.group_id.numpy(), cfg.advantage)
        d_mu = derivatives(deriv_model, mu_batch, f"jvp μ-samples ({name})")
        if d_pi is None:
            d_pi = derivatives(deriv_model, pi_batch, f"jvp π-samples ({name})")
        g_ref, ref_u = bias.group_means(
            bias.sequence_projections(torch.where(pi_batch.mask, torch.as_tensor(pi_adv)[:, None], 0.0), d_pi),
            pi_batch.group_id.numpy())
        npz[f"{name}/reference"] = ref_u
        units: dict[tuple[str, str], np.ndarray] = {}
        dropped: dict[tuple[str, str], float] = {}
        informative = mask & torch.as_tensor(mu_adv != 0)[:, None]
        behaviour = mu_batch.logp if three is None else three["old_logp"]
        corrections = [""] if three is None else list(cfg.rollout_corrections)

        def project(c: torch.Tensor) -> np.ndarray:
            g_mu, u = bias.group_means(bias.sequence_projections(c, d_mu), mu_batch.group_id.numpy())
            if not np.array_equal(g_mu, g_ref):
                raise RuntimeError("μ and π samples cover different prompt groups")
            return u

        names_seen: set[str] = set()
        for spec in cfg.estimators:
            est = bias.estimator_name(spec)
            if est in names_seen:
                raise ValueError(f"estimators: two estimators named {est!r}")
            names_seen.add(est)
            for corr in corrections:
                c, drop = bias.estimator_token_weights(
                    spec, res.logp, behaviour, mu_adv, mask,
                    rollout_log_prob=None if three is None else mu_batch.logp,
                    rollout_correction=None if three is None else corr)
                units[est, corr] = u = project(c)
                dropped[est, corr] = float(drop.sum() / max(int(informative.sum()), 1))
                npz[projection_key(name, est, corr)] = u
        if three is not None:  # the IS identity on the sampler's ratios: full-sequence π/μ, unbiased
            c, _ = bias.estimator_token_weights(PAIRED_ESTIMATOR, res.logp, mu_batch.logp, mu_adv, mask)
            npz[f"{name}/{PAIRED_KEY}"] = project(c)
        for est, corr in units:
            row = {"source": name, "estimator": est}
            if three is not None:
                row["rollout_correction"] = corr
            row.update({"dropped_fraction": dropped[est, corr],
                        "mean_kl": kl_exact if math.isfinite(kl_exact) else kl_k1, "kl_exact": kl_exact,
                        "kl_k1": kl_k1, "n_prompts": len(g_ref), "directions": cfg.directions,
                        "mean_len_mu": float(mu_batch.lengths.float().mean()),
                        "mean_len_pi": float(pi_batch.lengths.float().mean()),
                        "reward_mu": float(np.mean(mu_rewards)), "reward_pi": float(np.mean(pi_rewards))})
            if three is not None:
                row.update({"kl_rollout_old": three["kl_rollout_old"], "kl_old_pi": kl_old_pi
                            if math.isfinite(kl_old_pi) else kl_old_pi_k1})
            info.append(row)
        quick = ("unclipped_token", "unclipped_cumulative", "unclipped_sequence")
        base_corr = corrections[0]
        r = {est.removeprefix("unclipped_"): bias.compare_to_reference(units[est, base_corr], ref_u, n_boot=0).values
             for est in quick if (est, base_corr) in units}
        L_T = log_ratio.sum(-1)
        meta[name] = {**extra, "kl_per_token_exact": kl_exact, "kl_per_token_k1": kl_k1,
                      "sd_log_seq_ratio": float(L_T.std()), "max_abs_log_seq_ratio": float(L_T.abs().max()),
                      "mean_len_mu": float(mu_batch.lengths.float().mean())}
        if three is not None:
            meta[name].update({k: three[k] for k in ("kl_rollout_old", "kl_rollout_old_exact", "kl_rollout_old_k1",
                                                       "sd_log_seq_ratio_rollout_old")})
            meta[name].update({"kl_old_pi": kl_old_pi if math.isfinite(kl_old_pi) else kl_old_pi_k1,
                               "kl_old_pi_exact": kl_old_pi, "kl_old_pi_k1": kl_old_pi_k1,
                               "rollout_corrections": list(cfg.rollout_corrections)})
        look = "".join(f"; unclipped {k}: bias²/noise² {v['bias_to_noise']:.3g}, var ratio {v['var_ratio']:.3g}"
                       for k, v in r.items())
        noise = next(iter(r.values()))["noise_scale"] if r else math.nan
        three_txt = "" if three is None else (f" (KL(μ‖π_old) {three['kl_rollout_old']:.3g}, KL(π_old‖π) "
                                              f"{meta[name]['kl_old_pi']:.3g})")
        _log(f"[bias] {name}: KL/token {meta[name]['kl_per_token_exact']:.3g}{three_txt}, sd(log ρ_1:T) "
             f"{meta[name]['sd_log_seq_ratio']:.3f}; gradient noise scale B = {noise:.3g} prompt groups "
             f"(P = {len(g_ref)}){look}")
        return d_pi

    # --- μ's own held-out sample at τ = 1 (the behaviour of the stale and dtype sources, the on-policy
    # reference of the temperature source)
    base = base_rewards = base_cache = None
    if set(cfg.sources) - set(THREE_POLICY_SOURCES):
        base = draw(mu_model, eval_ids, 1.0, 1, "μ samples (τ = 1)")
        base_rewards = rewards_of(base, eval_prompts)
        base_cache = reference_cache(mu_model, base.hidden, 1.0) if base.hidden is not None else None

    if "temperature" in cfg.sources:
        tau = cfg.mu_temperature
        mu_tau = draw(mu_model, eval_ids, tau, 2, f"μ samples (τ = {tau:g})")
        cache_tau = reference_cache(mu_model, mu_tau.hidden, tau) if mu_tau.hidden is not None else None
        measure(f"temperature_{tau:g}", mu_model, mu_model, mu_tau, cache_tau, base, base_rewards,
                rewards_of(mu_tau, eval_prompts), {"source": "temperature", "mu_temperature": tau})
        del mu_tau, cache_tau
    if "dtype" in cfg.sources:
        pi_bf16 = offpolicy.bf16_copy(mu_model)
        pi_batch = draw(pi_bf16, eval_ids, 1.0, 3, "π samples (bf16)")
        # ∇log π is taken on the float32 weights: bf16 forward-mode derivatives are too coarse to use
        measure("dtype_bf16", pi_bf16, mu_model, base, base_cache, pi_batch, rewards_of(pi_batch, eval_prompts),
                base_rewards, {"source": "dtype"})
        del pi_bf16, pi_batch
    three: dict[str, Any] | None = None
    if "bf16_sampler" in cfg.sources:  # μ = π_old's bf16 forward; before the stale updates change π_old
        sampler = offpolicy.bf16_copy(mu_model)
        roll = draw(sampler, eval_ids, 1.0, 5, "μ samples (bf16 sampler of π_old)")
        t = time.perf_counter()
        roll_cache = None
        if keep_hidden:  # μ's full distributions: π_old's weights in bf16, from the sampler's final hidden states
            h_roll = score(sampler, roll, rows_per_chunk=cfg.rows_per_chunk, keep_hidden=True, progress=cfg.progress,
                           desc="rescore μ (bf16)").hidden
            roll_cache = reference_cache(sampler, h_roll, 1.0)
            del h_roll
        old = score(mu_model, roll, reference=roll_cache, rows_per_chunk=cfg.rows_per_chunk, keep_hidden=keep_hidden,
                    progress=cfg.progress, desc="score π_old (float32)")
        timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t
        n_tok = int(roll.mask.sum())
        lr_old = torch.where(roll.mask, old.logp.double() - roll.logp.double(), 0.0)
        kl_ro_exact = float(old.kl.double().sum() / n_tok) if old.kl is not None else math.nan
        kl_ro_k1 = float(-lr_old.sum() / n_tok)
        three = {"batch": roll, "cache": roll_cache, "old_logp": old.logp,
                 "old_cache": reference_cache(mu_model, old.hidden, 1.0) if old.hidden is not None else None,
                 "rewards": rewards_of(roll, eval_prompts),
                 "kl_rollout_old": kl_ro_exact if math.isfinite(kl_ro_exact) else kl_ro_k1,
                 "kl_rollout_old_exact": kl_ro_exact, "kl_rollout_old_k1": kl_ro_k1,
                 "sd_log_seq_ratio_rollout_old": float(lr_old.sum(-1).std())}
        _log(f"[bias] bf16 sampler: per-token KL(μ‖π_old) {three['kl_rollout_old']:.3g} (k1 {kl_ro_k1:.3g}), "
             f"max |log π_old − log μ| {float(lr_old.abs().max()):.3g}")
        del sampler, old
    if "stale" in cfg.sources or three is not None:
        train = draw(mu_model, train_ids, 1.0, 4, "μ samples (train split)")
        train_rewards = rewards_of(train, prompts[:n_train])
        adv = advantages.grpo_advantages(train_rewards, train.group_id.numpy())
        snapshots: dict[int, dict[str, torch.Tensor]] = {}
        ks = set(cfg.k)

        def on_update(k: int, model, rec) -> None:
            if k in ks:
                snapshots[k] = {n: p.detach().clone() for n, p in model.state_dict().items()}

        t = time.perf_counter()
        try:
            offpolicy.stale_updates(mu_model, train, adv, offpolicy.StaleConfig(
                preset=cfg.preset, lr=cfg.lr, num_minibatches=cfg.minibatches), num_updates=max(cfg.k),
                seed=cfg.seed, on_update=on_update, progress=cfg.progress)
        except ValueError as e:
            raise ValueError(f"lr: the stale updates failed ({e})") from e
        timings["update_s"] = time.perf_counter() - t
        model_k = copy.deepcopy(mu_model).eval()
        for k in sorted(ks):
            model_k.load_state_dict(snapshots.pop(k))
            pi_batch = draw(model_k, eval_ids, 1.0, 10 + k, f"π_{k} samples")
            pi_rewards = rewards_of(pi_batch, eval_prompts)
            d_pi = None
            if "stale" in cfg.sources:
                d_pi = measure(f"stale_k{k}", model_k, model_k, base, base_cache, pi_batch, pi_rewards,
                               base_rewards, {"source": "stale", "k": k, "preset": cfg.preset, "lr": cfg.lr})
            if three is not None:
                measure(f"bf16_sampler_k{k}", model_k, model_k, three["batch"], three["cache"], pi_batch, pi_rewards,
                        three["rewards"], {"source": "bf16_sampler", "k": k, "preset": cfg.preset, "lr": cfg.lr},
                        three=three, d_pi=d_pi)

    np.savez_compressed(out / "projections.npz", **npz)
    pd.DataFrame(info).to_csv(out / "estimator_info.csv", index=False)
    pd.concat(profiles, ignore_index=True).to_csv(out / "ratio_profiles.csv", index=False)
    (out / "sources.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    timings["measure_s"] = time.perf_counter() - t0
    summary = analyze_bias(out, n_boot=cfg.n_boot, seed=cfg.seed, batch_size=cfg.batch_size,
                           chain_seeds=cfg.chain_seeds, chain_max_horizon=cfg.chain_max_horizon,
                           progress=cfg.progress, timings=timings)
    summary["direction_parameters"] = n_dir_params
    timings["total_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    _log(f"[bias] done in {timings['total_s']:.0f} s; table: {out / 'table.md'}")
    return summary


def analyze_bias(out: Path, *, n_boot: int | None = None, seed: int | None = None, batch_size: int | None = None,
                 chain_seeds: int | None = None, chain_max_horizon: int | None = None, progress: bool = False,
                 timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Statistics, chain predictions, tables and figures from the raw results of a ``bias`` run in ``out``
    (``projections.npz``, ``estimator_info.csv``, ``ratio_profiles.csv``, ``sources.json``, ``config.json``):
    the second half of :func:`run_bias`, rerunnable without a model (``--reanalyze``). Unset arguments take
    the run's configuration."""
    from ctpo_lab.llm.bias_plots import plot_bias_variance, plot_ratio_profiles
    from ctpo_lab.markov.prediction import matched_chain_prediction, summarize_prediction

    out = Path(out)
    needed = RAW_FILES
    missing = [f for f in needed if not (out / f).is_file()]
    if missing:
        raise FileNotFoundError(f"out: {out} lacks {missing} (not a finished `python -m ctpo_lab.llm bias` folder)")
    cfg = json.loads((out / "config.json").read_text())
    n_boot = cfg["n_boot"] if n_boot is None else n_boot
    seed = cfg["seed"] if seed is None else seed
    batch_size = cfg["batch_size"] if batch_size is None else batch_size
    chain_seeds = cfg["chain_seeds"] if chain_seeds is None else chain_seeds
    chain_max_horizon = cfg["chain_max_horizon"] if chain_max_horizon is None else chain_max_horizon
    timings = {} if timings is None else timings
    info = pd.read_csv(out / "estimator_info.csv")
    legacy = is_legacy(info)
    info = rename_legacy(info, legacy)
    with np.load(out / "projections.npz") as z:
        proj = {rename_legacy_key(k, legacy): z[k] for k in z.files}
    meta = json.loads((out / "sources.json").read_text())
    prof_df = rename_legacy(pd.read_csv(out / "ratio_profiles.csv"))
    has_corr = "rollout_correction" in info.columns  # a three-policy source was measured
    t = time.perf_counter()
    rows, per_dir = [], []
    for _, inf in info.iterrows():
        name, est = inf["source"], inf["estimator"]
        corr = correction_label(inf["rollout_correction"]) if has_corr else ""
        units, ref_u = proj[projection_key(name, est, corr)], proj[f"{name}/reference"]
        if f"{name}/{PAIRED_KEY}" in proj:  # three policies: the sequence IS weight on the sampler's ratios
            paired = proj[f"{name}/{PAIRED_KEY}"]
        else:
            paired = None if est == PAIRED_ESTIMATOR else proj.get(f"{name}/{PAIRED_ESTIMATOR}")
        cmp = bias.compare_to_reference(units, ref_u, paired=paired, batch_size=batch_size, n_boot=n_boot, seed=seed)
        key_cols = {"source": name, "estimator": est, **({"rollout_correction": corr} if has_corr else {})}
        rows.append({**key_cols, **cmp.row(),
                     **{k: v for k, v in inf.items() if k not in key_cols}})
        pdir = cmp.per_direction.copy()
        for i, (k, v) in enumerate(key_cols.items()):
            pdir.insert(i, k, v)
        per_dir.append(pdir)
    table = pd.DataFrame(rows)
    timings["statistics_s"] = time.perf_counter() - t
    # --- the exact laboratory's prediction for chains with the same per-token KL
    t = time.perf_counter()
    preds = []
    estimators = tuple(dict.fromkeys(info["estimator"].astype(str)))  # preset names, as measured
    for name, m in meta.items():
        if m.get("source") in THREE_POLICY_SOURCES:  # the two-policy chain does not represent π_old ≠ μ
            continue
        kl = max(m["kl_per_token_exact"] if math.isfinite(m["kl_per_token_exact"]) else m["kl_per_token_k1"], 0.0)
        horizon = int(max(2, min(round(m["mean_len_mu"]), chain_max_horizon)))
        p = matched_chain_prediction(kl, horizon, estimators=estimators, seeds=tuple(range(chain_seeds)),
                                     batch_size=batch_size, group_size=int(cfg["group_size"]), progress=progress)
        p.insert(0, "source", name)
        preds.append(p)
    prediction = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    pred_summary = pd.concat([summarize_prediction(p.drop(columns="source")).assign(source=p["source"].iloc[0])
                              for p in preds], ignore_index=True) if preds else pd.DataFrame()
    timings["chain_s"] = time.perf_counter() - t

    table.to_csv(out / "table.csv", index=False)
    pd.concat(per_dir, ignore_index=True).to_csv(out / "per_direction.csv", index=False)
    prediction.to_csv(out / "prediction.csv", index=False)
    pred_summary.to_csv(out / "prediction_summary.csv", index=False)
    (out / "table.md").write_text(markdown_table(table, pred_summary))
    pred_arg = pred_summary if len(pred_summary) else None
    # the (variance, bias) planes: one point per estimator (three-policy sources: their uncorrected rows)
    plane = table
    if has_corr:
        plane = table[table["rollout_correction"].map(correction_label).isin(("", bias.NO_CORRECTION))]
    figures = [str(p) for p in plot_bias_variance(plane, pred_arg, out, name="bias_noise_variance",
                                                  y="bias_to_noise")]
    figures += [str(p) for p in plot_bias_variance(plane, pred_arg, out)]
    if has_corr:
        from ctpo_lab.llm.bias_plots import plot_rollout_corrections

        three_rows = table[table["rollout_correction"].map(correction_label) != ""]
        figures += [str(p) for p in plot_rollout_corrections(three_rows, out)]
    figures += [str(p) for p in plot_ratio_profiles(prof_df, out)]
    last = prof_df.sort_values("position").groupby(["source", "weight"]).tail(1)
    return {
        "model": cfg["model"], "advantage": cfg["advantage"], "directions": cfg["directions"],
        "params": cfg["params"], "eval_prompts": cfg["eval_prompts"], "group_size": cfg["group_size"],
        "n_boot": n_boot, "batch_size": batch_size, "sources": meta, "figures": figures, "timings": timings,
        "ratio_mean_at_last_position": {f"{r.source}/{r.weight}": [r.mean, r.mean_lo, r.mean_hi]
                                        for r in last.itertuples()},
        "three_policy": {name: {k: m[k] for k in ("kl_rollout_old", "kl_old_pi", "kl_per_token_exact")}
                         for name, m in meta.items() if m.get("source") in THREE_POLICY_SOURCES},
        "table": table[["source", "estimator", *(["rollout_correction"] if has_corr else []), "bias_to_noise",
                        "bias_to_noise_lo", "bias_to_noise_hi",
                        "rel_bias", "rel_bias_lo", "rel_bias_hi", "var_ratio", "var_ratio_lo", "var_ratio_hi",
                        "noise_scale"]].to_dict(orient="records"),
    }


def main_bias(ns: argparse.Namespace) -> int:
    if ns.reanalyze:
        out = Path(ns.out)
        if out.is_dir() and all((out / f).is_file() for f in RAW_FILES):  # derived files replaced: one writer
            from ctpo_lab.runsafety import prepare_output

            prepare_output(out, command="python -m ctpo_lab.llm bias --reanalyze", resume=True, name="--out",
                           owners=("python -m ctpo_lab.llm bias",))
        try:
            summary = analyze_bias(out, n_boot=ns.n_boot, seed=ns.seed if ns.seed != 0 else None,
                                   batch_size=ns.batch_size, chain_seeds=ns.chain_seeds, progress=not ns.no_progress)
        except FileNotFoundError as e:
            raise ValueError(str(e.args[0] if e.args else e)) from None
        old = out / "summary.json"
        if old.is_file():
            prev = json.loads(old.read_text())
            summary["timings"] = {**prev.get("timings", {}), **summary["timings"]}
            summary["direction_parameters"] = prev.get("direction_parameters")
        old.write_text(json.dumps(summary, indent=2, default=_json_default))
        print((out / "table.md").read_text())
        return 0
    cfg = resolve(ns)
    summary = run_bias(cfg, overwrite=ns.overwrite)
    print((Path(cfg.out) / "table.md").read_text())
    print(json.dumps({"timings": summary["timings"]}, indent=2, default=_json_default))
    return 0
