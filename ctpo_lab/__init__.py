"""ctpo_lab: measure importance-sampling ratio estimators in LLM reinforcement learning.

Token (PPO/GRPO), sequence, GSPO and cumulative (CTPO) ratios: exact bias and variance on synthetic Markov
chains, per-position statistics on real model trajectories, and training curves with every estimator.
"""

__version__ = "0.1.0"
