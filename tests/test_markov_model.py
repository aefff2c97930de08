"""Markov lab: model API, automata, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ctpo_lab import markov
from ctpo_lab.markov.model import MarkovMDP, contains_pattern, count_fraction, count_mod, sum_mod


def test_public_api_shapes():
    mdp = markov.random_instance(vocab_size=3, horizon=5, order=1, seed=0, kl=0.05)
    assert mdp.target.shape == mdp.behaviour.shape == (4, 3)
    assert mdp.target.dtype == np.float64
    assert mdp.context_index(()) == 0
    assert mdp.context_index((2,)) == mdp.context_index((0, 1, 2))
    assert mdp.context_index((2,)) != mdp.context_index((1,))
    s = mdp.score(1, 2)
    assert s.shape == (12,)
    np.testing.assert_allclose(s[3:6], np.eye(3)[2] - mdp.target[1])
    assert np.count_nonzero(s[:3]) == 0 and np.count_nonzero(s[6:]) == 0
    assert isinstance(mdp.reward((0, 0, 1, 2, 0)), float)
    g = markov.true_gradient(mdp)
    assert g.shape == (12,) and g.dtype == np.float64


def test_contexts_count_and_padding():
    mdp = markov.random_instance(4, 6, 2, seed=1, kl=0.01)
    assert mdp.num_contexts == 1 + 4 + 16
    seen = {mdp.context_index(p) for n in range(4) for p in itertools.product(range(4), repeat=n)}
    assert seen == set(range(mdp.num_contexts))
    # after k tokens the context is the last k tokens
    assert mdp.context_index((3, 1, 2)) == mdp.context_index((1, 2))
    assert mdp.context_index((1,)) != mdp.context_index((0, 1))  # (BOS,1) vs (0,1)
    iid = markov.random_instance(3, 4, 0, seed=0)
    assert iid.num_contexts == 1 and iid.context_index((0, 1, 2)) == 0


def test_v32_k2_has_1057_contexts():
    mdp = markov.random_instance(32, 4, 2, seed=0, kl=0.01)
    assert mdp.num_contexts == 1057


@pytest.mark.parametrize("kl", [0.001, 0.05, 0.3])
def test_random_instance_hits_requested_kl(kl):
    mdp = markov.random_instance(3, 4, 1, seed=2, kl=kl)
    np.testing.assert_allclose(mdp.per_token_kl(), kl, rtol=1e-8)
    chi = markov.random_instance(3, 4, 1, seed=2, chi2=0.1)
    np.testing.assert_allclose(chi.per_token_chi2(), 0.1, rtol=1e-8)


def test_random_instance_is_seeded():
    a = markov.random_instance(3, 4, 1, seed=5)
    b = markov.random_instance(3, 4, 1, seed=5)
    c = markov.random_instance(3, 4, 1, seed=6)
    np.testing.assert_array_equal(a.behaviour, b.behaviour)
    assert not np.allclose(a.target, c.target)


def _brute_contains(seq, pat):
    return any(tuple(seq[i : i + len(pat)]) == pat for i in range(len(seq) - len(pat) + 1))


@pytest.mark.parametrize("pat", [(0, 1), (0, 0, 1), (1, 0, 1, 0), (2,)])
def test_kmp_automaton_matches_substring_search(pat):
    auto = contains_pattern(3, pat)
    seqs = np.array(list(itertools.product(range(3), repeat=6)))
    got = auto.values[auto.run(seqs)]
    want = np.array([_brute_contains(tuple(s), pat) for s in seqs], dtype=float)
    np.testing.assert_array_equal(got, want)


def test_count_and_sum_automata():
    seqs = np.array(list(itertools.product(range(3), repeat=5)))
    a = count_mod(3, token=1, modulus=3)
    np.testing.assert_array_equal(a.values[a.run(seqs)], ((seqs == 1).sum(1) % 3 == 0).astype(float))
    b = sum_mod(3, modulus=4)
    np.testing.assert_array_equal(b.values[b.run(seqs)], (seqs.sum(1) % 4 == 0).astype(float))
    c = count_fraction(3, token=2, max_count=5)
    np.testing.assert_allclose(c.values[c.run(seqs)], (seqs == 2).sum(1) / 5)


def test_reward_and_reward_batch_agree():
    mdp = markov.random_instance(2, 6, 1, seed=0, automaton="contains:1-0-1")
    seqs = np.array(list(itertools.product(range(2), repeat=6)))
    np.testing.assert_array_equal(mdp.reward_batch(seqs), [mdp.reward(tuple(s)) for s in seqs])


# ---------------------------------------------------------------------------------------- bad input
def _tables(C=4, V=3, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.random((C, V))
    return p / p.sum(1, keepdims=True)


def test_support_violation_names_contexts():
    pi = _tables()
    mu = _tables(seed=1)
    mu[2] = [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"support violation.*\(1\)"):
        MarkovMDP(3, 4, 1, count_mod(3), pi, mu)


def test_rows_must_sum_to_one():
    pi = _tables()
    pi[1] *= 1.1
    with pytest.raises(ValueError, match="sum to 1"):
        MarkovMDP(3, 4, 1, count_mod(3), pi, _tables(seed=1))


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match="shape"):
        MarkovMDP(3, 4, 1, count_mod(3), _tables(C=3), _tables())
    with pytest.raises(TypeError):
        MarkovMDP(3, 4, 1, count_mod(3), _tables().tolist(), _tables())
    with pytest.raises(TypeError):
        markov.random_instance(3.0, 4, 1)
    with pytest.raises(ValueError):
        markov.random_instance(3, 0, 1)
    nan = _tables()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MarkovMDP(3, 4, 1, count_mod(3), nan, _tables())
    with pytest.raises(ValueError, match="unknown automaton"):
        markov.random_instance(3, 4, 1, automaton="nope")


def test_enumeration_too_large_points_to_dp():
    mdp = markov.random_instance(8, 12, 1, seed=0)
    with pytest.raises(ValueError, match="too large to enumerate.*exact_moments"):
        markov.enumerate_moments(mdp, "unclipped_cumulative", "reward")


def test_unknown_estimator_and_signal():
    mdp = markov.random_instance(2, 3, 1, seed=0)
    with pytest.raises(ValueError, match="estimator: unknown preset .bogus."):
        markov.exact_moments(mdp, "bogus")
    with pytest.raises(ValueError, match="unknown signal"):
        markov.exact_moments(mdp, "unclipped_token", "bogus")
    with pytest.raises(ValueError, match="1-based"):
        markov.exact_moments(mdp, "unclipped_token", positions=[0])
    with pytest.raises(TypeError):
        markov.exact_moments("not an mdp")


def test_augmented_guard_suggests_binning():
    mdp = markov.random_instance(3, 8, 1, seed=0, kl=0.05)
    with pytest.raises(ValueError, match="bin_width"):
        markov.exact_moments(mdp, "ctpo", "reward", max_atoms=50)


# ---------------------------------------------------------------------------------------- variable length
def test_done_token_contexts_reward_and_tables():
    mdp = markov.random_instance(3, 5, 1, seed=0, kl=0.05, done_token=2, automaton="count:0:2")
    done = mdp.num_contexts - 1
    assert mdp.context_name(done) == "DONE"
    assert mdp.context_index((0, 2)) == done and mdp.context_index((2, 0, 1)) == done
    np.testing.assert_array_equal(mdp.target[done], [0, 0, 1])
    assert np.count_nonzero(mdp.score(done, 2)) == 0
    # the automaton reads the tokens before DONE: count(0) = 1 -> odd -> reward 0; count(0) = 2 -> 1
    assert mdp.reward((0, 2, 2, 2, 2)) == 0.0
    assert mdp.reward((0, 0, 2, 2, 2)) == 1.0
    seqs = np.array(list(itertools.product(range(3), repeat=5)))
    np.testing.assert_array_equal(mdp.reward_batch(seqs), [mdp.reward(tuple(s)) for s in seqs])
    from ctpo_lab.markov.enumerate import prefix_contexts

    ctx = prefix_contexts(mdp, seqs[::7])
    want = np.array([[mdp.context_index(tuple(s[:t])) for t in range(5)] for s in seqs[::7]])
    np.testing.assert_array_equal(ctx, want)
    bad = mdp.target.copy()
    bad[done] = [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="DONE"):
        mdp.with_policies(target=bad)
