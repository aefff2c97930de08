"""Retaining freed memory: it takes effect on glibc, cuts page faults, and changes no number."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ctpo_lab.allocator import RETAIN_ENV, retain_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# run in a fresh interpreter: the allocator's settings are process-wide and cannot be undone
_PROBE = textwrap.dedent("""
    import hashlib, json, resource, sys
    from ctpo_lab.allocator import retain_freed_memory, retaining_freed_memory
    import torch
    from ctpo_lab.losses import compute_policy_loss
    applied = retain_freed_memory()
    torch.set_num_threads(1)

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    # 40 MB blocks: above the largest mmap threshold glibc picks by itself (32 MiB), so without retention each one
    # is a fresh mapping whose pages are zero-filled on first touch
    x = torch.empty(10_000_000).fill_(1.0)
    del x
    f0 = faults()
    for _ in range(20):
        x = torch.empty(10_000_000).fill_(1.0)
        del x
    big_faults = faults() - f0

    # the arithmetic of a training step: matmuls, a policy loss and its gradient, on fresh tensors
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g, requires_grad=True)
    h = torch.randn(512, 64, generator=g)
    digest = hashlib.sha256()
    for step in range(3):
        logits = torch.tanh(h @ w) @ w.t()
        log_prob = torch.log_softmax(logits, -1)[:, :48].reshape(64, 384)
        old = log_prob.detach() + 0.01 * torch.randn(64, 384, generator=g)
        adv = torch.randn(64, generator=g)
        mask = torch.arange(384)[None, :] < torch.randint(100, 385, (64,), generator=g)[:, None]
        for preset in ("grpo", "ctpo"):
            w.grad = None
            out = compute_policy_loss(log_prob, old, adv, mask, preset=preset, diagnostics="basic")
            out.loss.backward(retain_graph=True)
            digest.update(out.loss.detach().numpy().tobytes())
            digest.update(w.grad.numpy().tobytes())
    print(json.dumps({"applied": applied, "retaining": retaining_freed_memory(), "big_faults": big_faults,
                      "digest": digest.hexdigest()}))
""")


def _probe(retain: bool) -> dict:
    env = dict(os.environ, **{RETAIN_ENV: "1" if retain else "0"}, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "1"])
def test_thresholds_are_validated(bad):
    with pytest.raises(ValueError, match="^mmap_threshold: expected a positive int"):
        retain_freed_memory(mmap_threshold=bad)
    with pytest.raises(ValueError, match="^trim_threshold: expected a positive int"):
        retain_freed_memory(trim_threshold=bad)


@pytest.mark.skipif(not GLIBC, reason="retaining freed memory acts on glibc only")
def test_retention_cuts_page_faults_and_changes_no_number():
    off, on = _probe(retain=False), _probe(retain=True)
    assert off["applied"] is False and off["retaining"] is False  # CTPO_LAB_RETAIN_FREED_MEMORY=0
    assert on["applied"] is True and on["retaining"] is True
    # 20 blocks of 40 MB: ≈ 9,800 faults each without retention (4 KiB pages, every block mapped afresh); retained,
    # the heap serves them again (seen: 0, or one block's worth when the heap grew once), so far fewer than 20 blocks
    assert off["big_faults"] > 20 * 5_000, off
    assert on["big_faults"] < off["big_faults"] / 4, (on, off)
    assert on["digest"] == off["digest"]  # the same arithmetic, bit for bit


def test_commands_retain_freed_memory():
    """Every command runs its body through ``cli.run``, which retains freed memory first (where glibc is)."""
    code = ("from ctpo_lab.cli import run\nfrom ctpo_lab.allocator import retaining_freed_memory\n"
            "print(retaining_freed_memory(), end=' ')\nrun(lambda: print(retaining_freed_memory()))")
    env = dict(os.environ)
    env.pop(RETAIN_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(GLIBC)]
