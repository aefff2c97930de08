"""Prompts with verifiable answers: verl parquet files, HF datasets, and built-in arithmetic word problems.

Every source yields :class:`Prompt` objects (chat messages + ground truth).  :func:`load_prompts` takes a
spec string:

* ``arithmetic`` — generated word problems with integer answers (no file needed; seeded);
* a ``.parquet`` file or a directory of them in verl's layout (``prompt`` = list of {role, content},
  ``reward_model`` = {ground_truth, style}, ``data_source``, ``extra_info``), e.g.
  ``path/to/math_benchmarks/``;
* ``hf:<name or path>[:split]`` — an HF dataset (``datasets.load_from_disk`` for a folder, else
  ``load_dataset``) with a ``prompt`` column (a string or a list of messages) and optionally an answer column.

The answer checker reads the last ``\\boxed{...}`` of a response (nested braces allowed) and compares it with
the ground truth after light normalisation (spaces, ``$``, trailing ``.``, ``\\text{}``, thousands
separators; numbers compared numerically).
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctpo_lab.cli import exception_summary

__all__ = [
    "SYSTEM_PROMPT",
    "Prompt",
    "arithmetic_prompts",
    "load_verl_parquet",
    "load_hf_dataset",
    "load_prompts",
    "extract_boxed",
    "normalize_answer",
    "check_answer",
    "reward",
    "REWARD_MODES",
    "render_prompts",
]

SYSTEM_PROMPT = "Solve the problem step by step, then give the final answer as \\boxed{answer}."


@dataclass(frozen=True)
class Prompt:
    """One prompt: chat messages (role/content dicts), its ground-truth answer and where it came from."""

    id: str
    messages: tuple[dict[str, str], ...]
    answer: str | None
    data_source: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        """The content of the last user message."""
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")


_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Liam")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "coins", "cookies", "stamps", "shells", "cards")


def _problem(rng: random.Random) -> tuple[str, int]:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(6)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 9)
    if kind == 0:
        return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = a + b
        return f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} are left?", a - b
    if kind == 2:
        return f"{name} buys {c} boxes with {b} {item} in each box. How many {item} is that in total?", b * c
    if kind == 3:
        return (f"{name} shares {b * c} {item} equally among {c} friends. How many {item} does each friend get?",
                b)
    if kind == 4:
        return (f"{name} has {a} {item}. {other} has {c} times as many. How many {item} do they have together?",
                a + a * c)
    return (f"{name} had {a + b} {item}, lost {b}, then found {c} more. How many {item} does {name} have?",
            a + c)


def arithmetic_prompts(n: int, *, seed: int = 0, system_prompt: str | None = SYSTEM_PROMPT) -> list[Prompt]:
    """``n`` generated one- or two-step arithmetic word problems with integer answers (deterministic in seed)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, ans = _problem(rng)
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": q}
        ]
        out.append(Prompt(f"arith-{seed}-{i}", tuple(msgs), str(ans), "arithmetic"))
    return out


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    try:
        msgs = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in value)
    except (TypeError, KeyError) as e:
        raise ValueError(f"prompt: {where}: expected a string or a list of {{role, content}}, got {value!r}") from e
    if not msgs:
        raise ValueError(f"prompt: {where}: empty message list")
    return msgs


def load_verl_parquet(path: str | os.PathLike[str], *, limit: int | None = None) -> list[Prompt]:
    """Prompts of a verl-layout parquet file, or of every ``*.parquet`` in a directory (sorted by name)."""
    import pandas as pd

    p = Path(path).expanduser()
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not p.exists():
        raise FileNotFoundError(f"prompts: no file or directory at {p}")
    if not files:
        raise ValueError(f"prompts: no .parquet file in {p}")
    out: list[Prompt] = []
    for f in files:
        try:
            df = pd.read_parquet(f)
        except Exception as e:  # noqa: BLE001  (not parquet, truncated, unreadable: all mean "cannot read it")
            raise ValueError(f"prompts: {f} is not a readable parquet file ({exception_summary(e)})") from None
        if "prompt" not in df.columns:
            raise ValueError(f"prompts: {f} has no 'prompt' column (columns: {list(df.columns)})")
        for i, row in enumerate(df.to_dict("records")):
            rm = row.get("reward_model")
            answer = rm.get("ground_truth") if isinstance(rm, dict) else row.get("answer")
            pid = str(row.get("id", i))
            out.append(Prompt(
                f"{f.stem}-{pid}", _messages(row["prompt"], f"{f.name} row {i}"),
                None if answer is None else str(answer), str(row.get("data_source", f.stem)),
            ))
    if not out:
        raise ValueError(f"prompts: {p} holds no rows")
    return out[:limit] if limit else out


def load_hf_dataset(
    name: str, *, split: str = "train", prompt_column: str = "prompt", answer_column: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts of an HF dataset (a saved folder or a hub/local name) with a prompt column."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise ImportError("prompts: reading an HF dataset needs the `datasets` package") from e
    p = Path(name).expanduser()
    if not p.exists():
        from ctpo_lab.llm.models import check_hub_repo

        check_hub_repo(name, repo_type="dataset", argument="prompts")
    try:
        ds = datasets.load_from_disk(str(p)) if p.is_dir() and (p / "dataset_info.json").exists() or (
            p.is_dir() and (p / "dataset_dict.json").exists()) else datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001  (not found, unreachable, unreadable, no such split: "cannot load it")
        raise ValueError(f"prompts: cannot load the dataset {name!r} ({exception_summary(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split: {name} has no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    if prompt_column not in ds.column_names:
        raise ValueError(f"prompt_column: {name} has no column {prompt_column!r} (columns: {ds.column_names})")
    if answer_column is None:
        answer_column = next((c for c in ("answer", "ground_truth", "solution") if c in ds.column_names), None)
    out = []
    for i, row in enumerate(ds):
        if limit and i >= limit:
            break
        ans = row.get(answer_column) if answer_column else None
        if ans is None and isinstance(row.get("reward_model"), dict):
            ans = row["reward_model"].get("ground_truth")
        out.append(Prompt(f"{Path(name).name}-{i}", _messages(row[prompt_column], f"{name} row {i}"),
                          None if ans is None else str(ans), name))
    if not out:
        raise ValueError(f"prompts: dataset {name} is empty")
    return out


def load_prompts(spec: str, *, n: int | None = None, seed: int = 0) -> list[Prompt]:
    """Prompts from a spec (see the module docstring); ``n`` limits (or, for ``arithmetic``, sets) the count.

    File and dataset prompts are shuffled with ``seed`` before the limit is applied.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"prompts: expected a non-empty spec string, got {spec!r}")
    if spec == "arithmetic":
        return arithmetic_prompts(n or 64, seed=seed)
    if spec.startswith("hf:"):
        rest = spec[3:]
        if not rest.strip() or rest.startswith(":"):
            raise ValueError(f"prompts: expected hf:NAME[:split] with a dataset name or folder, got {spec!r}")
        name, _, split = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
        prompts = load_hf_dataset(name, split=split or "train")
    else:
        prompts = load_verl_parquet(spec)
    rng = random.Random(seed)
    prompts = list(prompts)
    rng.shuffle(prompts)
    return prompts[:n] if n else prompts


_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1]
    return None


def normalize_answer(ans: str) -> str:
    """Strip spaces, ``$``, ``\\text{}``, ``\\left/\\right``, trailing ``.``, thousands separators."""
    s = str(ans).strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> float | None:
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)", s) or re.fullmatch(r"\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if m is None:
        m2 = re.fullmatch(r"(-?\d+)/(\d+)", s)
        if m2 is None:
            return None
        return float(m2.group(1)) / float(m2.group(2)) if float(m2.group(2)) else None
    if m.re.pattern.startswith("\\\\frac"):
        return float(m.group(1)) / float(m.group(2)) if float(m.group(2)) else None
    return float(m.group(1))


def check_answer(response: str, ground_truth: str | None) -> bool:
    """Whether the last ``\\boxed{}`` of ``response`` equals ``ground_truth`` (numerically when both parse)."""
    if ground_truth is None:
        return False
    got = extract_boxed(response)
    if got is None:
        return False
    a, b = normalize_answer(got), normalize_answer(ground_truth)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


REWARD_MODES: tuple[str, ...] = ("binary", "lenient")


def reward(response: str, ground_truth: str | None, mode: str = "binary", *, finished: bool = True) -> float:
    """Verifiable reward of a response.

    ``binary`` (the paper's): 1.0 if :func:`check_answer`, else 0.0.
    ``lenient`` (for small models that rarely box an answer, so that GRPO groups are not all-zero):
    1.0 if :func:`check_answer`; else 0.5 if the ground truth appears as a standalone number in the response;
    else 0.0; plus 0.1 when the response ended with EOS (``finished``).
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"mode: expected one of {REWARD_MODES}, got {mode!r}")
    if check_answer(response, ground_truth):
        return 1.0 + (0.1 if mode == "lenient" and finished else 0.0)
    if mode == "binary":
        return 0.0
    r = 0.1 if finished else 0.0
    if ground_truth is not None:
        gt = normalize_answer(ground_truth)
        if re.fullmatch(r"-?\d+(\.\d+)?", gt) and re.search(rf"(?<![\d.]){re.escape(gt)}(?![\d]|\.\d)", response):
            r += 0.5
    return r


def render_prompts(
    tokenizer: Any, prompts: list[Prompt], *, chat_template: bool | None = None, max_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Token ids of each prompt: the chat template with the generation prompt where the tokenizer has one
    (``chat_template=None``: auto), else ``"Question: ...\\nAnswer:"``.

    Raises
    ------
    ValueError
        No prompts, an empty prompt, or a prompt longer than ``max_prompt_tokens`` (checked before any work).
    """
    if not prompts:
        raise ValueError("prompts: empty prompt list")
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    out = []
    for p in prompts:
        if use_chat:
            text = tokenizer.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True)
        else:
            sys_msgs = [m["content"] for m in p.messages if m["role"] == "system"]
            text = "\n".join(sys_msgs + [f"Question: {p.text}", "Answer:"])
        ids = list(tokenizer(text, add_special_tokens=not use_chat)["input_ids"])
        if not ids:
            raise ValueError(f"prompts: prompt {p.id} is empty after tokenisation")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise ValueError(
                f"prompts: prompt {p.id} has {len(ids)} tokens, more than the {max_prompt_tokens} the model context "
                "leaves for the prompt (shorten it, or lower max_new_tokens)"
            )
        out.append(ids)
    return out
