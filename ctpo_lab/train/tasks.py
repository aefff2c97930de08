"""Tasks with verifiable rewards: prompts, exact checkers, seeded train/test generators, noisy demonstrations.

Built-in (no download):

``chain``  multi-step arithmetic. The prompt ``"38:M"`` gives two seeds x₀=3, x₁=8 and the label of the last
           step (``M`` → steps ``a``..``m``). Each step writes the Fibonacci recurrence mod 10,
           x_{i+2} = (x_i + x_{i+1}) mod 10, as ``"a:3+8=1,"`` (8 tokens) and the answer follows ``>``::

               38:M  →  a:3+8=1,b:8+1=9,c:1+9=0, … ,m:…=d,>d<eos>

           With ≥ 13 steps a correct response has ≥ 107 tokens, so positions reach the range where the √t
           growth of the cumulative log-ratio matters.  Every step is local (copies at fixed offsets plus one
           addition mod 10), so a small transformer learns the rule; a demonstration with per-step noise q
           has a wrong digit at each step with probability q (the chain continues from the written digit).
``add``    short answer: ``"37+45="`` → ``"82"``.

``parquet`` verl-parquet prompt sets (or ``hf:NAME``, ``arithmetic``) loaded by :mod:`ctpo_lab.llm.prompts`,
           scored by its ``\\boxed{}`` answer checker (for HF models: ``model=smollm2 task=parquet
           task_options.path=../shared/data/math_benchmarks``).

Train/test split: a prompt belongs to the test split iff crc32(prompt) % 5 == 0 (stable across processes and
machines), so the two generators never share a prompt.  The held-out evaluation set
:meth:`Task.test_set` depends only on the task parameters, never on the run seed: every seed of a comparison
is evaluated on the same prompts.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Problem", "Task", "ChainTask", "AddTask", "ParquetTask", "TASKS", "make_task", "is_test_prompt"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One prompt with its ground truth. ``messages`` is set for chat-formatted (parquet) prompts."""

    prompt: str
    answer: str
    params: tuple[int, ...] = ()
    messages: tuple[dict[str, str], ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def is_test_prompt(prompt: str) -> bool:
    """Stable split rule: the test split holds the prompts with crc32 % 5 == 0 (≈ 20%)."""
    return zlib.crc32(prompt.encode()) % 5 == 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")


class Task:
    """Base class: subclasses implement ``_random_params``, ``make_problem``, ``solution`` and ``check``."""

    name: str = "task"
    #: generation budget (tokens) that covers every correct response with slack
    max_response_tokens: int = 16

    def _random_params(self, rng: np.random.Generator) -> tuple[int, ...]:
        raise NotImplementedError

    def make_problem(self, params: tuple[int, ...]) -> Problem:
        raise NotImplementedError

    def solution(self, problem: Problem, rng: np.random.Generator | None = None, noise: float = 0.0) -> str:
        """A demonstration response; with ``noise`` > 0 each elementary result is wrong with that chance."""
        raise NotImplementedError

    def check(self, problem: Problem, response: str) -> float:
        """Exact reward in {0.0, 1.0} of a decoded response (text before ``<eos>``); malformed → 0."""
        raise NotImplementedError

    def num_params(self) -> int:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int, split: str = "train") -> list[Problem]:
        """``n`` i.i.d. problems of ``split`` (rejection sampling on the split rule)."""
        _check_split(split)
        _check_n(n)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")
        out: list[Problem] = []
        want_test = split == "test"
        while len(out) < n:
            p = self.make_problem(self._random_params(rng))
            if is_test_prompt(p.prompt) == want_test:
                out.append(p)
        return out

    def test_set(self, n: int) -> list[Problem]:
        """A fixed held-out set of ``n`` distinct test problems (independent of any run seed)."""
        _check_n(n)
        rng = np.random.default_rng(20260507)
        seen: dict[str, Problem] = {}
        tries = last_new = 0
        while len(seen) < n:
            tries += 1
            # a split that has produced no new prompt in 20,000 draws is exhausted: an impossible n fails in
            # well under a second instead of after 200·n draws (the set drawn for a possible n is unchanged)
            if tries > 200 * n + 10_000 or tries - last_new > 20_000:
                raise ValueError(
                    f"n: the test split of task {self.name!r} has fewer than {n} distinct prompts"
                    f" (found {len(seen)})"
                )
            p = self.make_problem(self._random_params(rng))
            if is_test_prompt(p.prompt) and p.prompt not in seen:
                seen[p.prompt] = p
                last_new = tries
        return list(seen.values())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _labels(width: int) -> list[str]:
    import itertools
    import string

    return ["".join(t) for t in itertools.product(string.ascii_lowercase, repeat=width)]


class ChainTask(Task):
    """Multi-step arithmetic: the recurrence x_{i+2} = (x_i + x_{i+1} + k) mod 10 for a prompt-given length.

    Parameters
    ----------
    min_steps, max_steps : number of written steps N (inclusive range); a correct response has 8·N + 3 tokens
        (8 per step, ``>d``, ``<eos>``) with single-letter labels (N ≤ 26), 9·N + 3 with two-letter labels.
    """

    name = "chain"

    def __init__(self, min_steps: int = 13, max_steps: int = 16) -> None:
        for arg, v in (("min_steps", min_steps), ("max_steps", max_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg}: expected a positive int, got {v!r}")
        if max_steps < min_steps:
            raise ValueError(f"max_steps: must be ≥ min_steps={min_steps}, got {max_steps}")
        if max_steps > 26 * 26:
            raise ValueError(f"max_steps: at most {26 * 26}, got {max_steps}")
        self.min_steps, self.max_steps = min_steps, max_steps
        self.label_width = 1 if max_steps <= 26 else 2
        self._labels = _labels(self.label_width)[:max_steps]
        step_len = 7 + self.label_width
        self.max_response_tokens = step_len * max_steps + 3 + 8
        self._pattern = re.compile(
            rf"((?:[a-z]{{{self.label_width}}}:\d\+\d=\d,){{{min_steps},{max_steps}}})>(\d)"
        )

    def num_params(self) -> int:
        return 100 * (self.max_steps - self.min_steps + 1)

    def _random_params(self, rng: np.random.Generator) -> tuple[int, ...]:
        x0, x1 = (int(v) for v in rng.integers(0, 10, size=2))
        return x0, x1, int(rng.integers(self.min_steps, self.max_steps + 1))

    def make_problem(self, params: tuple[int, ...]) -> Problem:
        x0, x1, n = params
        a, b = x0, x1
        for _ in range(n):
            a, b = b, (a + b) % 10
        prompt = f"{x0}{x1}:{self._labels[n - 1].upper()}"
        return Problem(prompt=prompt, answer=str(b), params=tuple(params))

    def solution(self, problem: Problem, rng: np.random.Generator | None = None, noise: float = 0.0) -> str:
        x0, x1, n = problem.params
        if noise > 0 and rng is None:
            raise ValueError("rng: a generator is required when noise > 0")
        a, b = x0, x1
        parts = []
        for i in range(n):
            c = (a + b) % 10
            if noise > 0 and rng.random() < noise:  # type: ignore[union-attr]
                c = (c + int(rng.integers(1, 10))) % 10  # type: ignore[union-attr]
            parts.append(f"{self._labels[i]}:{a}+{b}={c},")
            a, b = b, c
        return "".join(parts) + f">{b}"

    def check(self, problem: Problem, response: str) -> float:
        if not isinstance(response, str):
            raise TypeError(f"response: expected str, got {type(response).__name__}")
        return float(self._pattern.fullmatch(response) is not None and response == self.solution(problem))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rule": "fib10", "min_steps": self.min_steps, "max_steps": self.max_steps}


class AddTask(Task):
    """Short answer: ``"a+b="`` → the decimal sum, with a, b < 10**digits."""

    name = "add"

    def __init__(self, digits: int = 2) -> None:
        if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= 6:
            raise ValueError(f"digits: expected an int in [1, 6], got {digits!r}")
        self.digits = digits
        self.max_response_tokens = digits + 1 + 4

    def num_params(self) -> int:
        return 100**self.digits

    def _random_params(self, rng: np.random.Generator) -> tuple[int, ...]:
        a, b = (int(v) for v in rng.integers(0, 10**self.digits, size=2))
        return a, b

    def make_problem(self, params: tuple[int, ...]) -> Problem:
        a, b = params
        return Problem(prompt=f"{a}+{b}=", answer=str(a + b), params=(a, b))

    def solution(self, problem: Problem, rng: np.random.Generator | None = None, noise: float = 0.0) -> str:
        if noise > 0 and rng is None:
            raise ValueError("rng: a generator is required when noise > 0")
        s = sum(problem.params)
        if noise > 0 and rng.random() < noise:  # type: ignore[union-attr]
            s = max(0, s + int(rng.choice([-10, -2, -1, 1, 2, 10])))  # type: ignore[union-attr]
        return str(s)

    def check(self, problem: Problem, response: str) -> float:
        if not isinstance(response, str):
            raise TypeError(f"response: expected str, got {type(response).__name__}")
        return float(re.fullmatch(r"\d{1,7}", response) is not None and int(response) == int(problem.answer))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "digits": self.digits}


class ParquetTask(Task):
    """Chat prompts from :func:`ctpo_lab.llm.prompts.load_prompts` (verl parquet file or folder, ``hf:NAME``,
    or ``arithmetic``) scored by its ``\\boxed{}`` answer checker; for HF models.

    The split rule applies to the prompt ids; ``test_path`` (optional) gives a separate held-out source.
    """

    name = "parquet"

    def __init__(
        self,
        path: str,
        test_path: str | None = None,
        max_response_tokens: int = 512,
        limit: int | None = None,
    ) -> None:
        from ctpo_lab.llm import prompts as llm_prompts

        if not isinstance(path, str) or not path:
            raise ValueError(f"task_options.path: expected a prompt source, got {path!r}")
        if not isinstance(max_response_tokens, int) or max_response_tokens < 1:
            raise ValueError(
                f"task_options.max_response_tokens: expected a positive int, got {max_response_tokens!r}"
            )
        if path != "arithmetic" and not path.startswith("hf:") and not Path(path).exists():
            raise ValueError(f"task_options.path: {path!r} does not exist")
        self._reward = llm_prompts.reward
        self.path, self.test_path, self.max_response_tokens = path, test_path, max_response_tokens

        def convert(items: list[Any]) -> list[Problem]:
            return [
                Problem(
                    prompt=q.text,
                    answer=q.answer or "",
                    messages=tuple(q.messages),
                    meta={"id": q.id, "data_source": q.data_source},
                )
                for q in items
            ]

        every = convert(llm_prompts.load_prompts(path, n=limit))
        if test_path is None:
            self._train = [p for p in every if not is_test_prompt(p.meta["id"])]
            self._test = [p for p in every if is_test_prompt(p.meta["id"])]
        else:
            self._train, self._test = every, convert(llm_prompts.load_prompts(test_path))
        if not self._train or not self._test:
            raise ValueError(f"task_options.path: {path!r} gives an empty train or test split")

    def num_params(self) -> int:
        return len(self._train) + len(self._test)

    def sample(self, rng: np.random.Generator, n: int, split: str = "train") -> list[Problem]:
        _check_split(split)
        _check_n(n)
        pool = self._train if split == "train" else self._test
        return [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]

    def test_set(self, n: int) -> list[Problem]:
        _check_n(n)
        return self._test[:n]

    def solution(self, problem: Problem, rng: np.random.Generator | None = None, noise: float = 0.0) -> str:
        raise ValueError("task: parquet prompts have no demonstrations (no warm start for HF models)")

    def check(self, problem: Problem, response: str) -> float:
        if not isinstance(response, str):
            raise TypeError(f"response: expected str, got {type(response).__name__}")
        return float(self._reward(response, problem.answer))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "test_path": self.test_path}


TASKS: dict[str, type[Task]] = {"chain": ChainTask, "add": AddTask, "parquet": ParquetTask}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a task by name (``chain``, ``add``, ``parquet``); unknown names/options raise ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"task: expected a task name, got {type(name).__name__}")
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; expected one of {sorted([*TASKS, 'parquet'])}")
    import inspect

    valid = set(inspect.signature(TASKS[name].__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f"task_options: unknown option(s) {unknown} for task {name!r}; valid: {sorted(valid)}"
        )
    return TASKS[name](**kwargs)
