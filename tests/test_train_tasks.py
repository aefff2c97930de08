"""Tasks, exact checkers, split generators and the character tokenizer of ctpo_lab.train."""

import numpy as np
import pytest

from ctpo_lab.train.tasks import AddTask, ChainTask, is_test_prompt, make_task
from ctpo_lab.train.tokenizer import CharTokenizer


def test_chain_solution_is_correct_and_long():
    task = ChainTask()
    for p in task.sample(np.random.default_rng(0), 50):
        sol = task.solution(p)
        assert task.check(p, sol) == 1.0
        assert len(sol) + 1 >= 100  # + <eos>
        assert sol.endswith(">" + p.answer)
        assert len(sol) + 1 <= task.max_response_tokens


def test_chain_recurrence_by_hand():
    task = ChainTask(min_steps=3, max_steps=3)
    p = task.make_problem((3, 8, 3))
    assert p.prompt == "38:C"
    # 3+8=11→1, 8+1=9, 1+9=10→0
    assert task.solution(p) == "a:3+8=1,b:8+1=9,c:1+9=0,>0"
    assert p.answer == "0"


@pytest.mark.parametrize(
    "response",
    [
        "a:3+8=1,b:8+1=9,c:1+9=1,>1",  # wrong last step, consistent answer
        "a:3+8=2,b:8+2=1,c:2+1=0,>0",  # wrong steps, right final digit (no guessing reward)
        "a:3+8=1,b:8+1=9,>9",  # too few steps
        "a:3+8=1,b:8+1=9,c:1+9=0,d:9+0=9,>9",  # too many steps
        "a:3+8=1,b:8+1=9,c:1+9=0,",  # no answer
        "a:3+8=1,b:8+1=9,c:1+9=0,>0,",  # trailing junk
        "",
        "0",
        "a:3+8=1 b:8+1=9 c:1+9=0 >0",  # malformed separators
    ],
)
def test_chain_checker_rejects_wrong_and_malformed(response):
    task = ChainTask(min_steps=3, max_steps=3)
    assert task.check(task.make_problem((3, 8, 3)), response) == 0.0


def test_chain_noisy_demonstrations_have_expected_error_rate():
    task = ChainTask()
    rng = np.random.default_rng(1)
    probs = task.sample(rng, 400)
    acc = np.mean([task.check(p, task.solution(p, rng, noise=0.05)) for p in probs])
    # ≈ 0.95^14.5 ≈ 0.48 (errors that cancel are rare)
    assert 0.38 < acc < 0.58


def test_add_task_checker():
    task = AddTask(digits=2)
    p = task.make_problem((37, 45))
    assert p.prompt == "37+45=" and task.check(p, "82") == 1.0
    for bad in ("81", "082x", "", "8 2", "+82", "82.0"):
        assert task.check(p, bad) == 0.0
    with pytest.raises(TypeError, match="response"):
        task.check(p, 82)


def test_split_generators_are_disjoint_seeded_and_fixed_test_set():
    for task in (ChainTask(), AddTask()):
        train = task.sample(np.random.default_rng(0), 300, "train")
        test = task.sample(np.random.default_rng(0), 100, "test")
        assert not {p.prompt for p in train} & {p.prompt for p in test}
        assert all(not is_test_prompt(p.prompt) for p in train)
        assert [p.prompt for p in task.sample(np.random.default_rng(5), 20)] == [
            p.prompt for p in task.sample(np.random.default_rng(5), 20)
        ]
        ts = task.test_set(64)
        assert len({p.prompt for p in ts}) == 64 and all(is_test_prompt(p.prompt) for p in ts)
        assert [p.prompt for p in ts] == [p.prompt for p in task.test_set(64)]
        # the split is finite: asking for more prompts than it holds names how many exist
        with pytest.raises(ValueError, match=r"fewer than 5000 distinct prompts \(found \d+\)"):
            task.test_set(5000)


def test_bad_task_input():
    with pytest.raises(ValueError, match="task"):
        make_task("sudoku")
    with pytest.raises(ValueError, match="task_options"):
        make_task("chain", lenght=3)
    with pytest.raises(ValueError, match="max_steps"):
        ChainTask(min_steps=5, max_steps=4)
    with pytest.raises(ValueError, match="split"):
        ChainTask().sample(np.random.default_rng(0), 3, "dev")
    with pytest.raises(ValueError, match="n"):
        ChainTask().sample(np.random.default_rng(0), 0)
    with pytest.raises(TypeError, match="rng"):
        ChainTask().sample(0, 3)
    with pytest.raises(ValueError, match="rng"):
        ChainTask().solution(ChainTask().make_problem((1, 2, 13)), None, noise=0.1)


def test_long_chains_use_two_letter_labels():
    task = ChainTask(min_steps=30, max_steps=30)
    p = task.sample(np.random.default_rng(0), 1)[0]
    sol = task.solution(p)
    assert sol.startswith("aa:") and task.check(p, sol) == 1.0 and len(sol) == 30 * 9 + 2


def test_char_tokenizer_roundtrip_and_errors():
    tok = CharTokenizer()
    text = "38:K a:3+8=1,>0"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == text
    assert tok.decode([*tok.encode("12"), tok.eos_token_id, *tok.encode("34")]) == "12"
    assert tok.vocab_size == len(tok.alphabet) + 3
    with pytest.raises(ValueError, match="text"):
        tok.encode("é")
    with pytest.raises(TypeError, match="text"):
        tok.encode(5)


def test_parquet_task_with_boxed_checker():
    from pathlib import Path

    data = Path("/work/shared/data/math_benchmarks")
    if not data.is_dir():
        pytest.skip("shared math benchmarks not available")
    task = make_task("parquet", path=str(data))
    test = task.test_set(5)
    train = task.sample(np.random.default_rng(0), 5)
    assert not {p.meta["id"] for p in test} & {p.meta["id"] for p in train}
    p = test[0]
    assert p.messages and p.answer
    assert task.check(p, f"so the answer is \\boxed{{{p.answer}}}") == 1.0
    assert task.check(p, "no box here") == 0.0
    with pytest.raises(ValueError, match="path"):
        make_task("parquet", path="/no/such.parquet")
