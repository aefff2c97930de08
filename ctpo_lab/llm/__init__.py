"""Real-LLM trajectories: per-token log-ratios of real models under named sources of off-policyness.

Modules: :mod:`~ctpo_lab.llm.models` (load SmolLM2 offline, a tiny random Llama, any local/hub model),
:mod:`~ctpo_lab.llm.prompts` (verl parquet, HF datasets, generated arithmetic; the answer checker),
:mod:`~ctpo_lab.llm.rollout` (batched KV-cache sampling with log-probs; teacher-forced scoring),
:mod:`~ctpo_lab.llm.offpolicy` (stale k-step updates, temperature, dtype, checkpoints),
:mod:`~ctpo_lab.llm.store` (parquet one row per response, sharded and resumable).
Command: ``python -m ctpo_lab.llm --model smollm2 --out DIR [--quick] [--seed S]``.
"""
