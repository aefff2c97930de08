"""Prompt sources, the answer checker, and prompt rendering."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ctpo_lab.llm import prompts as P
from ctpo_lab.llm.models import char_tokenizer

MATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_benchmarks"


def test_arithmetic_prompts_are_deterministic_and_verifiable():
    a = P.arithmetic_prompts(20, seed=3)
    assert a == P.arithmetic_prompts(20, seed=3) and a != P.arithmetic_prompts(20, seed=4)
    assert all(p.answer is not None and int(p.answer) >= 0 for p in a)
    assert a[0].messages[0]["role"] == "system" and "boxed" in a[0].messages[0]["content"]
    with pytest.raises(ValueError, match="n"):
        P.arithmetic_prompts(0)


def test_answer_checker():
    assert P.extract_boxed(r"so \boxed{\frac{1}{2}} and \boxed{42}") == "42"
    assert P.extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert P.extract_boxed("no box") is None
    assert P.check_answer(r"The answer is \boxed{1,000}.", "1000")
    assert P.check_answer(r"\boxed{0.5}", r"\frac{1}{2}")
    assert P.check_answer(r"\boxed{ $12$ }", "12")
    assert not P.check_answer(r"\boxed{13}", "12")
    assert not P.check_answer("12", "12")
    assert P.reward(r"\boxed{12}", "12") == 1.0 and P.reward("12 apples", "12") == 0.0
    assert P.reward("12 apples", "12", "lenient") == pytest.approx(0.6)
    assert P.reward("112 apples", "12", "lenient", finished=False) == 0.0
    with pytest.raises(ValueError, match="mode"):
        P.reward("", "1", "fuzzy")
    with pytest.raises(TypeError, match="text"):
        P.extract_boxed(None)


def test_verl_parquet(tmp_path):
    rows = [{"id": str(i), "data_source": "toy", "prompt": [{"role": "user", "content": f"q{i}"}],
             "ability": "math", "reward_model": {"ground_truth": str(i), "style": "rule"},
             "extra_info": {"index": i, "split": "test"}} for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "toy.parquet")
    got = P.load_verl_parquet(tmp_path / "toy.parquet")
    assert [p.answer for p in got] == ["0", "1", "2"] and got[1].text == "q1"
    assert len(P.load_prompts(str(tmp_path), n=2, seed=0)) == 2
    pd.DataFrame({"prompt": []}).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="no rows"):
        P.load_verl_parquet(tmp_path / "empty.parquet")
    with pytest.raises(FileNotFoundError):
        P.load_verl_parquet(tmp_path / "missing.parquet")
    pd.DataFrame({"question": ["a"]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="prompt"):
        P.load_verl_parquet(tmp_path / "other.parquet")


@pytest.mark.skipif(not MATH.is_dir(), reason="shared math benchmarks not present")
def test_shared_math_benchmarks():
    got = P.load_verl_parquet(MATH / "aime25.parquet")
    assert len(got) == 30 and got[0].answer == "70"


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["what is 1+1?", "2+2?"], "answer": ["2", "4"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    got = P.load_prompts(f"hf:{tmp_path / 'ds'}", seed=0)
    assert sorted(p.answer for p in got) == ["2", "4"]
    with pytest.raises(ValueError, match="prompt_column"):
        P.load_hf_dataset(str(tmp_path / "ds"), prompt_column="question")


def test_render_prompts():
    tok = char_tokenizer()
    ps = P.arithmetic_prompts(2, seed=0)
    ids = P.render_prompts(tok, ps)
    assert tok.decode(ids[0]).startswith("<|im_start|>system") and tok.decode(ids[0]).endswith("assistant\n")
    plain = P.render_prompts(tok, ps, chat_template=False)
    assert "Question:" in tok.decode(plain[0])
    with pytest.raises(ValueError, match="tokens"):
        P.render_prompts(tok, ps, max_prompt_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        P.render_prompts(tok, [])
