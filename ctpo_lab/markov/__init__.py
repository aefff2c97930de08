"""Exact laboratory: synthetic autoregressive Markov chains with exact bias and variance of every estimator.

Quick start::

    from ctpo_lab import markov
    mdp = markov.random_instance(vocab_size=3, horizon=5, order=1, seed=0, kl=0.05)
    g = markov.true_gradient(mdp)
    m = markov.exact_moments(mdp, estimator="cumulative", signal="reward", baseline=0.0)
    m.mean, m.second_moment_diag, m.trace_cov, m.bias, m.mse(64), m.cosine
    e = markov.enumerate_moments(mdp, estimator="cumulative", signal="reward")   # same fields
    mc = markov.monte_carlo_moments(mdp, estimator="cumulative", n=100_000, seed=0)
"""

from .augmented import default_windows, log_ratio_distribution_profile
from .enumerate import (
    enumerate_gradient,
    enumerate_moments,
    enumerate_performance,
    enumerate_trajectories,
)
from .exact import (
    CLIPPED_ESTIMATORS,
    ESTIMATORS,
    SIGNALS,
    UNCLIPPED_ESTIMATORS,
    EstimatorParams,
    Moments,
    bias_decomposition,
    exact_moments,
    performance,
    policy_values,
    position_profile,
    surrogate_value,
    true_gradient,
)
from .model import (
    Automaton,
    MarkovMDP,
    contains_pattern,
    count_fraction,
    count_mod,
    latent_mode_instance,
    make_automaton,
    parity,
    random_instance,
    sum_mod,
)
from .prediction import LLM_TO_CHAIN, matched_chain_prediction, summarize_prediction
from .sample import MonteCarloMoments, monte_carlo_moments, sample_trajectories

__all__ = [
    "Automaton",
    "CLIPPED_ESTIMATORS",
    "ESTIMATORS",
    "EstimatorParams",
    "LLM_TO_CHAIN",
    "MarkovMDP",
    "Moments",
    "MonteCarloMoments",
    "SIGNALS",
    "UNCLIPPED_ESTIMATORS",
    "bias_decomposition",
    "contains_pattern",
    "count_fraction",
    "count_mod",
    "default_windows",
    "enumerate_gradient",
    "enumerate_moments",
    "enumerate_performance",
    "enumerate_trajectories",
    "exact_moments",
    "latent_mode_instance",
    "log_ratio_distribution_profile",
    "make_automaton",
    "matched_chain_prediction",
    "monte_carlo_moments",
    "parity",
    "performance",
    "policy_values",
    "position_profile",
    "random_instance",
    "sample_trajectories",
    "sum_mod",
    "summarize_prediction",
    "surrogate_value",
    "true_gradient",
]
