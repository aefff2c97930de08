"""Exact laboratory: synthetic autoregressive Markov chains with exact bias and variance of every estimator.

Quick start::

    from ctpo_lab import markov
    mdp = markov.random_instance(vocab_size=3, horizon=5, order=1, seed=0, kl=0.05)
    g = markov.true_gradient(mdp)
    m = markov.exact_moments(mdp, estimator="unclipped_cumulative", signal="reward", baseline=0.0)
    m.mean, m.second_moment_diag, m.trace_cov, m.bias, m.mse(64), m.cosine
    e = markov.enumerate_moments(mdp, estimator="ctpo", signal="reward")   # same fields, by enumeration
    mc = markov.monte_carlo_moments(mdp, estimator=PRESETS["ctpo"], n=100_000, seed=0, clip_exponent=0.0)
    # three policies: sampler π_roll, trainer's recompute π_old, current π; (preset × rollout correction)
    ch = markov.three_policy_instance(3, 5, 1, seed=0, kl_roll_old=1e-3, kl_old_pi=1e-2)
    m3 = markov.rollout_exact_moments(ch, "grpo", "decoupled_token_is", "reward", baseline=0.0)

An estimator is a loss configuration: a preset name of :data:`ctpo_lab.losses.PRESETS` or any
:class:`ctpo_lab.losses.LossConfig` (keyword overrides apply), exactly what ``policy_loss`` trains with.
"""

from .augmented import FIGURE1_WINDOWS, log_ratio_distribution_profile
from .enumerate import (
    enumerate_gradient,
    enumerate_moments,
    enumerate_performance,
    enumerate_trajectories,
)
from .estimator import LAB_METHODS, ChainEstimator, chain_estimator, lab_method, loss_token_coefficients
from .exact import (
    SIGNALS,
    STUDY_ESTIMATORS,
    Moments,
    bias_decomposition,
    check_dp_support,
    exact_moments,
    performance,
    policy_values,
    position_moments,
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
from .prediction import PREDICTION_ESTIMATORS, matched_chain_prediction, summarize_prediction
from .sample import MonteCarloMoments, monte_carlo_moments, sample_trajectories
from .three_policy import (
    ThreePolicyChain,
    check_rollout_dp_support,
    framework_target,
    rollout_dp_unsupported_reason,
    rollout_exact_moments,
    rollout_lab_method,
    rollout_moments,
    three_policy_instance,
)

__all__ = [
    "Automaton",
    "ChainEstimator",
    "FIGURE1_WINDOWS",
    "LAB_METHODS",
    "PREDICTION_ESTIMATORS",
    "STUDY_ESTIMATORS",
    "MarkovMDP",
    "Moments",
    "MonteCarloMoments",
    "SIGNALS",
    "ThreePolicyChain",
    "check_rollout_dp_support",
    "framework_target",
    "rollout_dp_unsupported_reason",
    "rollout_exact_moments",
    "rollout_lab_method",
    "rollout_moments",
    "three_policy_instance",
    "chain_estimator",
    "loss_token_coefficients",
    "bias_decomposition",
    "check_dp_support",
    "contains_pattern",
    "count_fraction",
    "count_mod",
    "enumerate_gradient",
    "enumerate_moments",
    "enumerate_performance",
    "enumerate_trajectories",
    "exact_moments",
    "lab_method",
    "latent_mode_instance",
    "log_ratio_distribution_profile",
    "make_automaton",
    "matched_chain_prediction",
    "monte_carlo_moments",
    "parity",
    "performance",
    "policy_values",
    "position_moments",
    "random_instance",
    "sample_trajectories",
    "sum_mod",
    "summarize_prediction",
    "surrogate_value",
    "true_gradient",
]
