"""The command-line contract for absurd values of ``python -m ctpo_lab.train``: numbers too large for a float,
unbounded model sizes and thread counts, an empty cell name of the main job.

Each bad input ends with exit status 2 and one line ``error: <argument>: <what was expected>`` on stderr, no
traceback, and nothing written, before any work starts. In-process and fast: no case trains.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from cli_contract_checks import usage_error

from ctpo_lab import losses
from ctpo_lab.train import config as train_config
from ctpo_lab.train.config import TRAIN_PRESETS, resolve_train_config

BIG = "9" * 401  # a YAML int no float can hold
HUGE = "9" * 5000  # beyond Python's 4300-digit limit for int(str)
RUN = ["--preset", "cpu-tiny", "--no-progress", "--out"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _usage_error(capsys, argv, names, root: Path) -> str:
    """Exit 2, one line ``error: <name>...`` naming the argument, no traceback, nothing written under ``root``."""
    from ctpo_lab.train.__main__ import main

    return usage_error(capsys, main, argv, names, [root])


def _ok(capsys, argv) -> None:
    from ctpo_lab.train.__main__ import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 0, (argv, err[-800:])


# ------------------------------------------------------------------------------------ numbers too large for a float
@pytest.mark.parametrize("key", ["lr", "temperature", "warmstart_lr", "weight_decay"])
def test_int_too_large_for_a_float_names_the_key(key, capsys, tmp_path):
    line = _usage_error(capsys, ["--print-config", f"{key}={BIG}"], key, tmp_path)
    assert "too large for a float" in line and BIG not in line
    _usage_error(capsys, [*RUN, tmp_path / "r", f"{key}={BIG}"], key, tmp_path)


def test_compare_int_too_large_for_a_float(capsys, tmp_path):
    _usage_error(capsys, ["compare", "--preset", "cpu-tiny", "--out", tmp_path / "g", f"lr={BIG}"], "lr", tmp_path)


def test_int_beyond_the_digit_limit_names_the_key(capsys, tmp_path):
    line = _usage_error(capsys, ["--print-config", f"lr={HUGE}"], "lr", tmp_path)
    assert len(line) < 400, line


LOSS_FLOAT_FIELDS = [f.name for f in dataclasses.fields(losses.LossConfig) if str(f.type).startswith("float")]


@pytest.mark.parametrize("field", LOSS_FLOAT_FIELDS)
def test_loss_float_field_too_large_for_a_float(field, capsys, tmp_path):
    line = _usage_error(capsys, ["--print-config", f"loss_overrides.{field}={BIG}"], "loss_overrides", tmp_path)
    assert f"{field}: expected a finite number" in line and "too large for a float" in line, line
    with pytest.raises(ValueError, match=rf"^{field}: expected a finite number"):
        losses.LossConfig(**{field: int(BIG)})
    with pytest.raises(ValueError, match=rf"^{field}: expected a finite number"):
        losses.LossConfig(**{field: True})
    with pytest.raises(ValueError, match=rf"^{field}: expected a finite number"):
        losses.LossConfig(**{field: "abc"})


def test_loss_int_field_too_large(capsys, tmp_path):
    _usage_error(capsys, ["--print-config", f"loss_overrides.dp_size={BIG}"], "loss_overrides", tmp_path)
    with pytest.raises(ValueError, match=r"^batch_num_tokens: expected an int"):
        losses.LossConfig(batch_num_tokens=int(BIG))


# ------------------------------------------------------------------------------------ model sizes and threads
@pytest.mark.parametrize("option,value", [
    ("hidden_size", str(10**40)),
    ("hidden_size", BIG),
    ("intermediate_size", "2147483648"),
    ("num_layers", "9999999999"),
    ("max_position_embeddings", "99999999999999"),
    ("num_heads", "2147483648"),
])
def test_model_size_beyond_max_count(option, value, capsys, tmp_path):
    name = f"model_options.{option}"
    line = _usage_error(capsys, ["--print-config", f"{name}={value}"], name, tmp_path)
    assert "2147483647" in line and len(line) < 300, line
    _usage_error(capsys, [*RUN, tmp_path / "n1", f"{name}={value}"], name, tmp_path)


@pytest.mark.parametrize("option,value", [("intermediate_size", 2147483647), ("num_layers", 2147483647),
                                          ("hidden_size", 2**30)])
def test_model_larger_than_physical_memory(option, value, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(train_config, "physical_memory_bytes", lambda: 16 * 2**30)
    line = _usage_error(capsys, [*RUN, tmp_path / "n1", f"model_options.{option}={value}"], "model_options",
                        tmp_path)
    assert "16.0 GiB" in line and "parameters" in line, line


def test_model_memory_uses_this_machine(capsys, tmp_path):
    # without the monkeypatch: a 2**31 - 1-wide MLP (≈ 2e11 parameters, ≈ 770 GiB) exceeds this machine
    memory = train_config.physical_memory_bytes()
    if memory is None or memory > 700 * 2**30:
        pytest.skip("physical memory unknown or above 700 GiB")
    _usage_error(capsys, [*RUN, tmp_path / "n2", "model_options.intermediate_size=2147483647"], "model_options",
                 tmp_path)


def test_parameter_estimate_is_an_upper_bound():
    from ctpo_lab.train.policy import TinyLlamaSpec, build_tiny_llama
    from ctpo_lab.train.tokenizer import CharTokenizer

    vocab = CharTokenizer().vocab_size
    for options in ({}, TRAIN_PRESETS["cpu-tiny"]["model_options"], {"num_layers": 3, "intermediate_size": 96}):
        spec = TinyLlamaSpec.from_options(options)
        actual = sum(p.numel() for p in build_tiny_llama(spec, vocab).parameters())
        estimate = train_config.tiny_llama_parameters(spec)
        assert actual <= estimate <= 2 * actual, (options, actual, estimate)


@pytest.mark.parametrize("value", ["2147483647", str(10**40)])
def test_threads_capped(value, capsys, tmp_path):
    line = _usage_error(capsys, [*RUN, tmp_path / "t", f"threads={value}"], "threads", tmp_path)
    assert f"[1, {train_config.max_threads()}]" in line and "CPU cores" in line, line


def test_threads_cap_is_four_per_core(capsys, tmp_path):
    cap = train_config.max_threads()
    assert cap == 4 * (os.cpu_count() or 1)
    _usage_error(capsys, ["--print-config", f"threads={cap + 1}"], "threads", tmp_path)
    assert resolve_train_config("cpu-tiny", overrides=[f"threads={cap}"]).threads == cap


# ------------------------------------------------------------------------------------ what must still be accepted
@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_presets_still_resolve(preset, capsys):
    _ok(capsys, ["--print-config", "--preset", preset])


@pytest.mark.parametrize("sizes", [
    # SmolLM2-135M and SmolLM2-1.7B shapes (hidden, layers, heads, MLP, context)
    (576, 30, 9, 1536, 8192),
    (2048, 24, 32, 8192, 8192),
])
def test_smollm2_sized_models_resolve(sizes, capsys, monkeypatch):
    monkeypatch.setattr(train_config, "physical_memory_bytes", lambda: 16 * 2**30)
    names = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings")
    _ok(capsys, ["--print-config", "--preset", "cpu", *(f"model_options.{n}={v}" for n, v in zip(names, sizes))])


# ------------------------------------------------------------------------------------ the main job's cell
@pytest.mark.parametrize("cell", ["", "nope"])
def test_main_job_cell_must_name_a_cell(cell, capsys, tmp_path):
    line = _usage_error(capsys, ["main", "--cell", cell, "--out", tmp_path / "m"], "--cell", tmp_path)
    assert "short-u16-k0-same" in line, line  # the valid cells are listed
    from ctpo_lab.train import main_job

    with pytest.raises(ValueError, match="cells"):
        main_job.main_job_spec(cell=cell)
