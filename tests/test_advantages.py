"""ctpo_lab.advantages: the one definition of group advantages, against hand-computed values and its call sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo_lab import advantages
from ctpo_lab.advantages import SCHEMES, group_advantages, grpo_advantages, rloo_advantages


def test_grpo_hand_computed():
    # group [1, 0, 0, 0]: mean 1/4, unbiased std sqrt((0.75² + 3 · 0.25²) / 3) = 1/2; group [2, 2]: std 0
    r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    g = np.array([0, 0, 0, 0, 1, 1])
    a = grpo_advantages(r, g)
    d = 0.5 + 1e-6
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    np.testing.assert_allclose(a, [0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d, 0.0, 0.0], rtol=1e-15, atol=0)
    # ε is the argument's
    np.testing.assert_allclose(grpo_advantages(r[:4], 4, eps=0.5), [0.75, -0.25, -0.25, -0.25], rtol=1e-15)


def test_rloo_and_reward_hand_computed():
    r = np.array([1.0, 0.0, 0.0, 2.0, 4.0, 5.0])
    g = np.array([0, 0, 0, 1, 1, 2])
    # group 0: 1 − 0, 0 − 1/2, 0 − 1/2; group 1: 2 − 4, 4 − 2; group 2 alone: 0
    np.testing.assert_allclose(rloo_advantages(r, g), [1.0, -0.5, -0.5, -2.0, 2.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(group_advantages(r, g, "reward"), r)
    assert group_advantages(r, g, "reward") is not r


def test_groups_of_one_get_zero_and_ids_need_not_be_contiguous():
    r = np.array([3.0, 1.0, 7.0, 2.0, 5.0])
    g = np.array([9, 4, 9, 4, 1])  # group 1 has one response
    for scheme in ("grpo", "rloo"):
        a = group_advantages(r, g, scheme)
        assert a[4] == 0.0
        # the same as the sorted layout with a fixed group size
        order = np.argsort(g[:4], kind="stable")
        b = group_advantages(r[:4][order], 2, scheme)
        np.testing.assert_allclose(a[:4][order], b, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(grpo_advantages(np.array([2.0]), 1), [0.0])


def test_group_size_and_group_ids_agree():
    rng = np.random.default_rng(0)
    r = rng.normal(size=24)
    for scheme in SCHEMES:
        np.testing.assert_allclose(group_advantages(r, 4, scheme), group_advantages(r, np.arange(24) // 4, scheme),
                                   rtol=1e-14, atol=1e-15)


def test_input_kinds_dtypes_and_devices():
    r32 = torch.tensor([1.0, 0.0, 0.5, 0.5])
    a = grpo_advantages(r32, 2)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.device == r32.device
    a64 = grpo_advantages(r32.double(), torch.tensor([0, 0, 1, 1]))
    assert a64.dtype == torch.float64
    assert grpo_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float64  # integer rewards
    lst = grpo_advantages([1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1])
    assert isinstance(lst, np.ndarray) and lst.dtype == np.float64
    np.testing.assert_allclose(lst, a64.numpy(), rtol=1e-15)
    np.testing.assert_allclose(a.numpy(), a64.numpy(), rtol=1e-6)


def test_bad_input():
    r = np.array([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="advantage"):
        group_advantages(r, 3, "ppo")
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(np.array([1.0, np.nan]), [0, 0])
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError, match="shapes"):
        grpo_advantages(r, [0, 0])
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(np.ones((2, 2)), 2)
    with pytest.raises(TypeError, match="groups"):
        grpo_advantages(r, np.array([0.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="groups"):
        grpo_advantages(r, True)
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(r, 3, eps=0.0)


# --------------------------------------------------------------------------- the call sites agree with it
def test_trainer_uses_it_and_keeps_its_float32_numbers():
    import ctpo_lab.train as train_pkg
    from ctpo_lab.train import loop

    assert train_pkg.grpo_advantages is advantages.grpo_advantages
    assert loop.grpo_advantages is advantages.grpo_advantages
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(32, generator=g) > 0.5).float()  # the trainer's float32 {0, 1} rewards
    r = rewards.view(-1, 8)
    previous = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)).view(-1)  # the trainer's formula
    assert torch.equal(loop.grpo_advantages(rewards, 8), previous)


def test_llm_call_sites_keep_their_numbers():
    rng = np.random.default_rng(1)
    rewards = rng.integers(0, 3, size=30) / 2.0
    gid = np.repeat(np.arange(10), 3)
    gid[-1] = 99  # a group of one
    # the stale update's advantages: per-group torch float64, then float32
    r = torch.as_tensor(rewards, dtype=torch.float64)
    g = torch.as_tensor(gid)
    old = torch.zeros_like(r)
    for k in torch.unique(g):
        sel = g == k
        if int(sel.sum()) > 1:
            old[sel] = (r[sel] - r[sel].mean()) / (r[sel].std() + 1e-6)
    new = grpo_advantages(rewards, gid)
    assert torch.equal(torch.as_tensor(new).float(), old.float())
    # the bias study's numpy schemes (ddof=1 std, leave-one-out mean)
    for scheme in ("grpo", "rloo"):
        want = np.zeros_like(rewards)
        for k in np.unique(gid):
            sel = gid == k
            x = rewards[sel]
            if x.size > 1:
                want[sel] = ((x - x.mean()) / (x.std(ddof=1) + 1e-6) if scheme == "grpo"
                             else x - (x.sum() - x) / (x.size - 1))
        np.testing.assert_allclose(group_advantages(rewards, gid, scheme), want, rtol=1e-13, atol=1e-15)


def test_bias_cli_offers_the_schemes():
    import argparse

    from ctpo_lab.llm import bias_run

    parser = argparse.ArgumentParser()
    bias_run.add_parser(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["bias"]._actions
                  if a.dest == "advantage")
    assert tuple(action.choices) == SCHEMES
