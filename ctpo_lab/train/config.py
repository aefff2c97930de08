"""The trainer's configuration: one dataclass, named presets, YAML recipes and ``key=value`` overrides.

Precedence (later wins): dataclass defaults < preset < YAML recipe (``--config``) < ``key=value`` overrides <
explicit flags (``--loss``, ``--seed``, ``--steps``).  Dotted keys reach into the dict-valued fields:
``loss_overrides.eps_high=0.28``, ``task_options.max_steps=20``, ``model_options.hidden_size=128``.
The loss is ``loss`` (a key of :data:`ctpo_lab.losses.PRESETS` or a :class:`~ctpo_lab.losses.LossConfig`; in YAML
a mapping of LossConfig fields) with ``loss_overrides`` applied by :func:`ctpo_lab.losses.resolve_config`
(:meth:`TrainConfig.loss_config`); a LossConfig is stored in ``config.yaml`` as its field dict, and
:meth:`TrainConfig.from_dict` rebuilds the identical LossConfig from it.
Every key is checked: an unknown key, loss, task, model or a mini-batch size that does not divide the rollout
batch raises ``ValueError`` naming it, before any work starts (:meth:`TrainConfig.validate`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctpo_lab.cli import MAX_COUNT
from ctpo_lab.losses import LossConfig, resolve_config

__all__ = [
    "TrainConfig",
    "TRAIN_PRESETS",
    "BUILTIN_MODELS",
    "resolve_train_config",
    "parse_overrides",
    "load_recipe",
    "loss_from_dict",
    "SAMPLER_MODES",
    "parse_sampler",
    "THREADS_PER_CORE",
    "max_threads",
    "physical_memory_bytes",
    "tiny_llama_parameters",
]

#: Model names the trainer builds itself (LlamaForCausalLM from a config + cached supervised warm start).
BUILTIN_MODELS: tuple[str, ...] = ("tiny-llama",)
#: Model names resolved by :func:`ctpo_lab.llm.models.load_model`.
LLM_MODELS: tuple[str, ...] = ("smollm2", "tiny-random")
#: Values of ``TrainConfig.sampler``: the kinds of rollout policy (``temperature`` is written ``temperature:<τ>``).
SAMPLER_MODES: tuple[str, ...] = ("same", "bf16", "temperature")


def parse_sampler(spec: object) -> tuple[str, float | None]:
    """``"same"`` → ``("same", None)``, ``"bf16"`` → ``("bf16", None)``, ``"temperature:0.8"`` →
    ``("temperature", 0.8)``.  Raises ``ValueError`` naming ``sampler``."""
    expected = "expected 'same', 'bf16' or 'temperature:<τ>' with a finite τ > 0"
    if not isinstance(spec, str):
        raise ValueError(f"sampler: {expected}, got {spec!r}")
    kind, sep, value = spec.partition(":")
    if kind in ("same", "bf16") and not sep:
        return kind, None
    if kind == "temperature" and sep:
        try:
            tau = float(value)
        except ValueError:
            raise ValueError(f"sampler: {expected}, got {spec!r}") from None
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"sampler: {expected}, got {spec!r}")
        return "temperature", tau
    raise ValueError(f"sampler: {expected}, got {spec!r}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (written to ``config.yaml`` in the run folder).

    Batch structure: each step samples ``batch_prompts`` prompts × ``group_size`` responses; the rollout batch
    is split into ``batch_prompts / mini_batch_prompts`` mini-batches (whole groups) and the policy takes one
    optimizer step per mini-batch, ``ppo_epochs`` times: ``updates_per_step`` updates, the first on-policy.

    Three policies (``sampler``, ``staleness``, ``rollout_correction``): the rollout policy μ that samples the
    responses and records ``rollout_log_prob`` = log μ(y_t|s_t), the PPO anchor π_old whose log-probs
    ``old_log_prob`` the trainer recomputes (teacher-forced, with the current pre-update weights, at the
    training ``temperature``, before the step's first update) and the policy π_θ being trained.

    * ``sampler="same"`` (default, the behaviour before these fields existed): μ is the trainer's own forward
      (on CPU both in float32, so log μ = log π_old to ~1e-6; on CUDA both under bf16 autocast).
    * ``sampler="bf16"``: μ runs a bfloat16 copy of the weights (parameters cast to bf16, buffers such as RoPE's
      ``inv_freq`` kept in float32; activations and KV cache in bf16, logits cast to float32 before the
      softmax), as an inference engine does; the trainer's recompute and updates run in float32 (no autocast,
      on CUDA too).
    * ``sampler="temperature:<τ>"``: μ samples at temperature τ ≠ ``temperature``; ``rollout_log_prob`` are
      μ's log-probs log softmax(z/τ); π_old and the loss use the training ``temperature`` (float32 trainer).
    * ``staleness=k`` (asynchronous RL): the sampler's weights are those of k optimizer updates (steps of the
      optimizer, not rollout steps) before the current ones: the trainer keeps the last k state dicts, taken
      before each optimizer update; before k updates have happened the oldest available one is used (the
      initial weights).  With one update per rollout batch (``mini_batch_prompts = batch_prompts``,
      ``ppo_epochs = 1``) k updates = k rollout steps, the policy-version lag of async RL systems.  Combines
      with any ``sampler`` (a bf16 copy of the stale weights, or the stale weights at τ).
    * ``rollout_correction``: a key of :data:`ctpo_lab.rollout_correction.ROLLOUT_CORRECTIONS` (verl's
      ``decoupled_*`` / ``bypass_*``, TRL's, AReaL's, the cumulative level) or ``None``; given, the loss is
      ``compute_policy_loss(..., rollout_log_prob=log μ, rollout_correction=name)`` and its ``rollout_corr/*``
      and ``sampling/*`` metrics are logged (averaged over the step's updates).

    ``sampler != "same"`` and ``staleness > 0`` need ``recompute_old_log_prob=true`` (otherwise π_old would be μ).
    Whenever μ ≠ π_old is possible (either of them, or a correction) the trainer logs the mismatch on the whole
    rollout batch with ℓ_t = log π_old − log μ on valid tokens, the names and definitions of
    :func:`ctpo_lab.rollout_correction.offpolicy_metrics`: ``rollout_corr/kl`` = mean(log μ − log π_old) = mean(−ℓ)
    (k1 estimate of KL(μ‖π_old) per token, samples from μ) and ``rollout_corr/k3_kl`` = mean(e^ℓ − 1 − ℓ);
    these whole-batch values replace the loss's per-mini-batch averages of the same names.
    """

    preset: str = "custom"
    seed: int = 0
    steps: int = 20
    # loss: a preset name or a LossConfig (a mapping of its fields is converted)
    loss: str | LossConfig = "ctpo"
    loss_overrides: dict[str, Any] = field(default_factory=dict)
    # task
    task: str = "chain"
    task_options: dict[str, Any] = field(default_factory=dict)
    # policy
    model: str = "tiny-llama"
    model_options: dict[str, Any] = field(default_factory=dict)
    warmstart_steps: int = 1000
    warmstart_batch: int = 16
    warmstart_lr: float = 5e-3
    warmstart_noise: float = 0.05
    warmstart_seed: int = 0
    # rollout and updates
    batch_prompts: int = 8
    group_size: int = 8
    mini_batch_prompts: int = 2
    ppo_epochs: int = 1
    shuffle_mini_batches: bool = True
    temperature: float = 1.0
    max_new_tokens: int | None = None
    recompute_old_log_prob: bool = True
    measure_final_kl: bool = True
    # the rollout policy μ vs the trainer's recompute π_old (see the class docstring)
    sampler: str = "same"
    staleness: int = 0
    rollout_correction: str | None = None
    # optimizer
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    # evaluation and logging
    eval_every: int = 10
    eval_prompts: int = 64
    eval_samples: int = 1
    eval_temperature: float = 1.0
    dump_every: int = 0
    ckpt_every: int = 10
    keep_checkpoints: int = 2
    tensorboard: bool = True
    track: bool = False
    wandb_project: str = "ctpo_lab"
    max_nan_steps: int = 3
    # hardware
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = loss_from_dict(self.loss)

    # ------------------------------------------------------------------ derived
    @property
    def loss_name(self) -> str:
        """The preset name, or the LossConfig's ``name`` (for folder names, logs and progress bars)."""
        return self.loss if isinstance(self.loss, str) else self.loss.name

    def loss_config(self) -> LossConfig:
        """The loss of the run: ``losses.resolve_config(loss, **loss_overrides)`` (validated; errors name
        ``loss`` or ``loss_overrides``)."""
        try:
            return resolve_config(self.loss, **self.loss_overrides)
        except (ValueError, TypeError) as e:
            arg, _, msg = str(e).partition(": ")
            name = {"preset": "loss", "overrides": "loss_overrides"}.get(arg)
            if name is None:  # a LossConfig field (eps_low, …): an override's value
                name, msg = "loss_overrides", str(e)
            raise type(e)(f"{name}: {msg}") from None

    @property
    def num_mini_batches(self) -> int:
        return self.batch_prompts // self.mini_batch_prompts

    @property
    def updates_per_step(self) -> int:
        return self.num_mini_batches * self.ppo_epochs

    @property
    def rollout_batch_size(self) -> int:
        return self.batch_prompts * self.group_size

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a LossConfig ``loss`` becomes its field dict), as written to ``config.yaml``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config of :meth:`to_dict` or of a run folder's ``config.yaml`` (keys that are not fields, such as
        ``resolved_loss`` or ``policy``, are ignored); not validated."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Check every field (types, ranges, names, model path); return ``self``. Raises ``ValueError``."""
        from ctpo_lab.train.tasks import make_task

        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name in (
            "steps",
            "batch_prompts",
            "group_size",
            "mini_batch_prompts",
            "ppo_epochs",
            "eval_prompts",
            "eval_samples",
            "warmstart_batch",
            "max_nan_steps",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected ≥ 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "dump_every", "ckpt_every", "warmstart_steps", "seed", "warmstart_seed",
                     "staleness"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected ≥ 0, got {getattr(self, name)!r}")
        # seeds reach torch and numpy as signed 64-bit ints; a count beyond 2**31 - 1 is a typo, not a run
        for name in ("seed", "warmstart_seed"):
            if getattr(self, name) > 2**63 - 1:
                raise ValueError(f"{name}: expected an int in [0, 2**63 - 1], got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name not in ("seed", "warmstart_seed", "threads") and isinstance(v, int) \
                    and not isinstance(v, bool) and v > MAX_COUNT:  # threads: its own cap below
                raise ValueError(f"{f.name}: expected an int ≤ {MAX_COUNT}, got {v!r}")
        if self.preset != "custom" and self.preset not in TRAIN_PRESETS:
            raise ValueError(f"preset: unknown trainer preset {self.preset!r}; expected one of "
                             f"{sorted(TRAIN_PRESETS)}")
        for name in ("lr", "temperature", "eval_temperature", "max_grad_norm", "warmstart_lr"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name, 0.9)
            if not 0 <= v < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay: expected a finite number ≥ 0, got {self.weight_decay!r}")
        if not 0 <= self.warmstart_noise < 1:
            raise ValueError(f"warmstart_noise: expected in [0, 1), got {self.warmstart_noise!r}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size: GRPO advantages need ≥ 2 responses per prompt, got {self.group_size}"
            )
        if self.batch_prompts % self.mini_batch_prompts:
            raise ValueError(
                f"mini_batch_prompts: {self.mini_batch_prompts} does not divide "
                f"batch_prompts={self.batch_prompts}"
            )
        kind, tau = parse_sampler(self.sampler)
        if kind == "temperature" and tau == self.temperature:
            raise ValueError(
                f"sampler: {self.sampler!r} samples at the training temperature={self.temperature}; use "
                "sampler=same or another τ"
            )
        if (kind != "same" or self.staleness > 0) and not self.recompute_old_log_prob:
            raise ValueError(
                f"recompute_old_log_prob: sampler={self.sampler!r} staleness={self.staleness} need the trainer's "
                "recompute of old_log_prob (recompute_old_log_prob=true)"
            )
        if self.rollout_correction is not None:
            from ctpo_lab.rollout_correction import ROLLOUT_CORRECTIONS

            if self.rollout_correction not in ROLLOUT_CORRECTIONS:
                raise ValueError(
                    f"rollout_correction: unknown correction {self.rollout_correction!r}; expected one of "
                    f"{sorted(ROLLOUT_CORRECTIONS)} or null"
                )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected ≥ 1 or None, got {self.max_new_tokens!r}")
        if self.threads is not None and not 1 <= self.threads <= max_threads():
            shown = f"≈ 10^{int(math.log10(self.threads))}" if self.threads > 10**12 else repr(self.threads)
            raise ValueError(f"threads: expected None or an int in [1, {max_threads()}] (at most "
                             f"{THREADS_PER_CORE} × the {os.cpu_count() or 1} CPU cores of this machine), "
                             f"got {shown}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            index = self.device.partition(":")[2]
            if index and not index.isdigit():
                raise ValueError(f"device: expected 'cuda' or 'cuda:N', got {self.device!r}")
            if not torch.cuda.is_available():
                raise ValueError(f"device: {self.device!r} requested but this machine has no CUDA device; use "
                                 "device=cpu or device=auto")
            if index and int(index) >= torch.cuda.device_count():
                raise ValueError(f"device: {self.device!r} requested but only {torch.cuda.device_count()} CUDA "
                                 "device(s) are available")
        self.loss_config()  # unknown loss / option → ValueError
        if self.task == "parquet" and "path" not in self.task_options:
            raise ValueError(
                "task_options.path: task=parquet needs task_options.path=<parquet file or folder>"
            )
        task = make_task(self.task, **self.task_options)
        if self.task != "parquet":
            try:
                task.test_set(self.eval_prompts)
            except ValueError as e:
                raise ValueError(f"eval_prompts: {self.eval_prompts} held-out prompts requested ({e})") from None
        if self.model not in BUILTIN_MODELS + LLM_MODELS and not Path(self.model).exists():
            raise ValueError(
                f"model: {self.model!r} is neither a built-in model {BUILTIN_MODELS + LLM_MODELS} "
                "nor an existing path"
            )
        if self.model in BUILTIN_MODELS and self.task == "parquet":
            raise ValueError("model: the built-in character-level model cannot read parquet (chat) prompts")
        if self.model not in BUILTIN_MODELS and self.task != "parquet":
            raise ValueError(f"task: HF model {self.model!r} needs task=parquet, got {self.task!r}")
        from ctpo_lab.train.policy import TinyLlamaSpec

        _check_model_sizes(self.model_options)  # before from_options' own checks (an even head size, ...)
        spec = TinyLlamaSpec.from_options(self.model_options)
        if self.model in BUILTIN_MODELS:
            _check_model_memory(spec)
        return self


#: ``threads`` takes at most this many torch threads per CPU core (more only oversubscribes the cores, and
#: billions of them make libgomp abort mid-run).
THREADS_PER_CORE = 4


def max_threads() -> int:
    """The largest ``threads`` a config takes on this machine: :data:`THREADS_PER_CORE` × ``os.cpu_count()``."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (``SC_PAGE_SIZE`` × ``SC_PHYS_PAGES``), or ``None`` where unknown."""
    try:
        n = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return n if n > 0 else None


def tiny_llama_parameters(spec: Any, vocab_size: int | None = None) -> int:
    """An upper estimate of the built-in policy's parameter count (:func:`ctpo_lab.train.policy.build_tiny_llama`):
    embedding and an untied lm_head (the model ties them: an over-count), per layer the q/k/v/o projections
    (as many key/value heads as heads: 4·h²), the gated MLP (3·h·I) and two RMSNorms, the final norm.  RoPE has
    no parameters and ``max_position_embeddings`` no buffer of its size.  ``vocab_size`` defaults to the
    character tokenizer's."""
    if vocab_size is None:
        from ctpo_lab.train.tokenizer import CharTokenizer

        vocab_size = CharTokenizer().vocab_size
    h, inter = spec.hidden_size, spec.intermediate_size
    return 2 * vocab_size * h + spec.num_layers * (4 * h * h + 3 * h * inter + 2 * h) + h


def _check_model_sizes(options: dict[str, Any]) -> None:
    """Every int size of ``model_options`` (the fields of :class:`~ctpo_lab.train.policy.TinyLlamaSpec`) is
    ≤ :data:`~ctpo_lab.cli.MAX_COUNT`; unknown keys and other types are left to ``TinyLlamaSpec.from_options``.
    Raises ``ValueError`` naming the option."""
    from ctpo_lab.train.policy import TinyLlamaSpec

    sizes = {f.name for f in dataclasses.fields(TinyLlamaSpec)}
    for k, v in options.items():
        if k in sizes and isinstance(v, int) and not isinstance(v, bool) and v > MAX_COUNT:
            shown = f"≈ 10^{int(math.log10(v))}" if v > 10**12 else repr(v)
            raise ValueError(f"model_options.{k}: expected an int in [1, {MAX_COUNT}], got {shown}")


def _check_model_memory(spec: Any) -> None:
    """The built-in policy's float32 weights alone (:func:`tiny_llama_parameters` × 4 bytes) fit in this machine's
    physical memory (:func:`physical_memory_bytes`; not checked where unknown).  Raises ``ValueError`` naming
    ``model_options``."""
    memory = physical_memory_bytes()
    if memory is None:
        return
    n = tiny_llama_parameters(spec)
    if 4 * n > memory:
        raise ValueError(
            f"model_options: expected a model whose float32 weights fit in this machine's {memory / 2**30:.1f} GiB "
            f"of physical memory, got ≈ {n:.3g} parameters (≈ {4 * n / 2**30:.3g} GiB of weights; hidden_size="
            f"{spec.hidden_size}, num_layers={spec.num_layers}, intermediate_size={spec.intermediate_size})")


def _check_type(name: str, value: Any, annotation: Any) -> None:
    ann = str(annotation)
    ok = True
    if ann == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif ann == "bool":
        ok = isinstance(value, bool)
    elif ann == "str":
        ok = isinstance(value, str)
    elif ann == "str | LossConfig":
        ok = isinstance(value, (str, LossConfig))
    elif ann.startswith("dict"):
        ok = isinstance(value, dict)
    elif ann == "str | None":
        ok = value is None or isinstance(value, str)
    elif ann == "int | None":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise TypeError(f"{name}: expected {ann}, got {value!r} ({type(value).__name__})")


def loss_from_dict(data: dict[str, Any]) -> LossConfig:
    """A :class:`~ctpo_lab.losses.LossConfig` from its field dict (``config.yaml``, a YAML recipe)."""
    names = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"loss: unknown LossConfig field(s) {unknown}; valid fields are {sorted(names)}")
    try:
        return LossConfig(**data)
    except (ValueError, TypeError) as e:
        raise type(e)(f"loss: {e}") from None


#: Named trainer presets (``--preset``): overrides of the dataclass defaults (the loss presets are
#: :data:`ctpo_lab.losses.PRESETS`, chosen with ``--loss``). ``cpu-smoke`` (40 steps, 4 updates per rollout batch)
#: runs in ≈ 30–60 s on one core once the warm start is cached (the warm start itself, shared by every later
#: run, seed and loss, takes ≈ 2 minutes once per machine);
#: ``cpu-tiny`` is the test configuration; ``cpu`` is the run of the comparison grid ``python -m ctpo_lab.train``
#: (12 runs, 2 in parallel, ≤ 30 minutes on 2 cores with the warm start); ``cpu-long`` the ≥ 400-token variant
#: of ``cpu`` (``task_options.min_steps/max_steps`` of the chain task set the length: 8·N + 3 tokens up to 26
#: steps, 9·N + 3 with two-letter labels beyond); ``gpu`` the run of
#: ``scripts/gpu_compare.sh`` (one H200, bf16).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": dict(
        task="add",
        task_options={"digits": 1},
        model_options={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        warmstart_steps=60,
        warmstart_batch=32,
        warmstart_lr=1e-2,
        warmstart_noise=0.3,
        batch_prompts=4,
        group_size=4,
        mini_batch_prompts=2,
        steps=2,
        lr=3e-3,
        eval_every=1,
        eval_prompts=8,
        ckpt_every=1,
        dump_every=1,
        threads=1,
        tensorboard=False,
    ),
    "cpu-smoke": dict(
        steps=40,
        batch_prompts=8,
        group_size=8,
        mini_batch_prompts=2,
        lr=2e-4,
        eval_every=10,
        eval_prompts=64,
        eval_samples=2,
        ckpt_every=10,
        dump_every=10,
        threads=1,
    ),
    # the README's main job (the comparison grid, `python -m ctpo_lab.train`): 16 updates per rollout batch as in
    # the paper (16 prompt groups, one per mini-batch), a noisier warm start (per-step error 0.10 → held-out
    # accuracy ≈ 0.15–0.2 at temperature 1), lr 2e-4 (3e-4 destabilises grpo). Measured (2 runs in parallel on
    # 2 cores): ≈ 1.4 s per step, ≈ 2–2.3 min per run, warm start ≈ 95 s once per machine, the whole grid 15 min;
    # KL(μ‖π) after the last update ≈ 3–4.5e-3 nats/token and held-out accuracy 0.15 → ≈ 0.8 for every loss.
    "cpu": dict(
        warmstart_noise=0.1,
        steps=80,
        batch_prompts=16,
        group_size=8,
        mini_batch_prompts=1,
        lr=2e-4,
        eval_every=10,
        eval_prompts=64,  # the chain task's test split holds ≈ 80 distinct prompts
        eval_samples=8,
        ckpt_every=10,
        dump_every=20,
        threads=1,
        tensorboard=False,
    ),
    # long responses on CPU (the √t axis): chains of 45–50 steps, two-letter labels, so a correct response has
    # 9·N + 3 = 408–453 tokens (measured: 422–431 tokens per sampled response), the default 64-wide 2-layer model,
    # 8 prompt groups × 8, 8 updates per rollout batch. Measured on a loaded 2-core machine (1 thread): warm start
    # ≈ 17 min once per machine (1000 steps), ≈ 12–21 s per step (≈ 60% generation). CAVEAT, measured: this
    # warm start does NOT learn the task yet (supervised loss 0.77, held-out accuracy 0.0 at temperature 1 and
    # greedy; it writes the format and the length, not the digits): use it for length and mismatch measurements
    # (KL, clip rates by position), not for learning curves, until a warm start that learns is found.
    "cpu-long": dict(
        task="chain",
        task_options={"min_steps": 45, "max_steps": 50},
        warmstart_noise=0.03,
        steps=40,
        batch_prompts=8,
        group_size=8,
        mini_batch_prompts=1,
        lr=2e-4,
        eval_every=10,
        eval_prompts=64,
        eval_samples=2,
        ckpt_every=10,
        dump_every=10,
        threads=1,
        tensorboard=False,
    ),
    # one H200 (bf16 autocast), run by scripts/gpu_compare.sh: 4 losses × 2 seeds, 8 processes sharing the GPU.
    # ≈ 25M-parameter Llama, chains of 40–60 steps (two-letter labels: 363–543-token responses), 16 updates per
    # rollout batch. NOT yet measured on a GPU: the timing (≈ 1.5 min warm start, ≈ 4–5 s per step with 8
    # processes sharing the GPU, ≤ 10 minutes in all) and the learning rate are estimates.
    "gpu": dict(
        task="chain",
        task_options={"min_steps": 40, "max_steps": 60},
        model_options={"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048},
        warmstart_steps=800,
        warmstart_batch=128,
        warmstart_lr=1e-3,
        warmstart_noise=0.02,
        steps=50,
        batch_prompts=32,
        group_size=8,
        mini_batch_prompts=2,
        lr=5e-5,
        eval_every=10,
        eval_prompts=256,
        eval_samples=2,
        ckpt_every=10,
        dump_every=25,
        tensorboard=False,
    ),
}


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML recipe (a mapping of config keys; may name a ``preset``)."""
    from ctpo_lab.runsafety import read_yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: recipe file {str(p)!r} does not exist")
    return read_yaml(p, name="config")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "loss_overrides.eps_high=0.28"]``
    → ``{"lr": 0.001, "loss_overrides": {"eps_high": 0.28}}``.

    Values are parsed as YAML scalars (numbers, booleans, ``null``, lists, mappings).
    """
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"overrides: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ValueError(f"overrides: expected key=value with a config key, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"overrides: {key.strip()}: cannot parse the value {raw!r}") from None
        except ValueError as e:  # a well-formed scalar YAML cannot build: an int of > 4300 digits, a bad date
            shown = raw if len(raw) <= 40 else f"{raw[:20]}...({len(raw)} characters)"
            raise ValueError(f"{key}: expected a value of the key's type, got {shown!r} "
                             f"({' '.join(str(e).split()).split(';')[0]})") from None
        if isinstance(value, str) and raw.strip():
            value = _number(raw.strip(), value)
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"overrides: {key!r} conflicts with a scalar override")
        node[parts[-1]] = value
    return out


def _number(raw: str, default: Any) -> Any:
    try:  # YAML 1.1 reads "1e-3" as a string
        return float(raw)
    except ValueError:
        return default


_DICT_FIELDS = ("loss_overrides", "task_options", "model_options")


def _merge(base: dict[str, Any], update: dict[str, Any], source: str) -> None:
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    # a source that changes the task (model) drops the task (model) options of the earlier sources
    for key, options in (("task", "task_options"), ("model", "model_options")):
        if key in update and update[key] != base.get(key, getattr(TrainConfig, key)):
            base.pop(options, None)
    for key, value in update.items():
        if key not in valid:
            raise ValueError(f"{source}: unknown config key {key!r}; valid keys: {sorted(valid)}")
        if key in _DICT_FIELDS:
            if not isinstance(value, dict):
                raise ValueError(f"{key}: expected a mapping, got {value!r}")
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Ints of float fields become floats, integral floats of int fields ints; an int too large for a float
    (``lr=<400 digits>``) raises ``ValueError`` naming the key."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    for k, v in values.items():
        if types.get(k) == "float" and isinstance(v, int) and not isinstance(v, bool):
            try:
                values[k] = float(v)
            except OverflowError:
                raise ValueError(f"{k}: expected a finite number, got an int too large for a float "
                                 f"(≈ 10^{int(math.log10(abs(v)))})") from None
        if types.get(k) == "int" and isinstance(v, float) and v.is_integer():
            values[k] = int(v)
    return values


def resolve_train_config(
    preset: str | None = None,
    recipe: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    **explicit: Any,
) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` (see the module docstring for the precedence).

    ``explicit`` holds the CLI flags (``loss``, ``seed``, ``steps``); ``None`` values are ignored.
    """
    values: dict[str, Any] = {}
    recipe_values = load_recipe(recipe) if recipe is not None else {}
    name = preset if preset is not None else recipe_values.pop("preset", None)
    recipe_values.pop("preset", None)
    if name is not None:
        if name not in TRAIN_PRESETS:
            raise ValueError(f"preset: unknown trainer preset {name!r}; expected one of {sorted(TRAIN_PRESETS)}")
        _merge(values, TRAIN_PRESETS[name], f"preset {name!r}")
        values["preset"] = name
    _merge(values, recipe_values, f"config {str(recipe)!r}")
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        if "preset" in ov:  # the preset's values were merged already: a renamed preset would misdescribe the run
            raise ValueError("preset: choose the trainer preset with --preset (or a recipe's preset key), not with "
                             "a key=value override")
        _merge(values, ov, "overrides")
    _merge(values, {k: v for k, v in explicit.items() if v is not None}, "arguments")
    cfg = TrainConfig(**_coerce(values))
    return cfg.validate()
