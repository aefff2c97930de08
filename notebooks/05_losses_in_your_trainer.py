# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Using the ctpo_lab losses in your own trainer
#
# `ctpo_lab.losses.policy_loss` is a drop-in policy loss: give it the per-token log-probs of the policy being
# optimised, those of the behaviour policy that sampled the tokens, the advantages and the response mask, and
# name a preset. It returns a scalar loss and a dict of diagnostics named like verl / TRL / the CTPO code.
#
# This notebook (1) lists the presets, (2) trains a tiny policy with a plain PyTorch GRPO loop under `grpo`
# and `ctpo`, with several optimizer steps per rollout batch so that later steps are genuinely off-policy, and
# (3) plugs a preset into TRL's `GRPOTrainer` when `trl` is installed.

# %%
import dataclasses
import os

import matplotlib.pyplot as plt
import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctpo_lab.losses import PRESETS, policy_loss
from ctpo_lab.style import estimator_color, estimator_label

SMALL = os.environ.get("CI") == "true" or os.environ.get("CTPO_LAB_SMALL") == "1"
torch.set_num_threads(2)
pd.DataFrame([dataclasses.asdict(c) for c in PRESETS.values()]).set_index("name")

# %% [markdown]
# ## A plain PyTorch GRPO loop
# Task: emit 24 tokens from a vocabulary of 8; the reward is the fraction of tokens equal to 3. Each step
# samples `B × G` responses from the current policy μ (recording log μ), computes group-relative advantages
# (R − mean)/(std + 1e-6), then takes `UPDATES` optimizer steps on mini-batches of the same rollout: the first
# is on-policy, the later ones are off-policy, which is what the importance ratios correct.

# %%
VOCAB, LENGTH, B, G, UPDATES = 8, 24, 4, 8, 4
STEPS = 8 if SMALL else 40


def make_policy(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=VOCAB, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg)


def token_log_probs(model, seqs: torch.Tensor) -> torch.Tensor:
    """log π(y_t | y_<t) of every response token; seqs [N, 1 + LENGTH] (BOS first) → [N, LENGTH]."""
    logits = model(seqs[:, :-1]).logits.float()
    return torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def sample(model, n: int, gen: torch.Generator) -> torch.Tensor:
    seqs = torch.full((n, 1), VOCAB)
    for _ in range(LENGTH):
        probs = torch.softmax(model(seqs).logits[:, -1].float(), -1)
        seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=gen)], 1)
    return seqs


def train(preset: str, seed: int = 0) -> pd.DataFrame:
    model = make_policy(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(STEPS):
        seqs = sample(model, B * G, gen)  # [B·G, 1+LENGTH]
        reward = (seqs[:, 1:] == 3).float().mean(1)  # [B·G]
        grouped = reward.view(B, G)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
        with torch.no_grad():
            old_logp = token_log_probs(model, seqs)  # log μ, [B·G, LENGTH]
        mask = torch.ones_like(old_logp, dtype=torch.bool)
        perm = torch.randperm(B * G, generator=gen)
        for idx in perm.chunk(UPDATES):
            loss, metrics = policy_loss(token_log_probs(model, seqs[idx]), old_logp[idx], adv[idx], mask[idx],
                                        preset=preset)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows.append({"step": step, "reward": reward.mean().item(), "kl_last_update": metrics["actor/ppo_kl"],
                     "clip_rate_last_update": metrics["pg_update/clip/total/rate"]})
    return pd.DataFrame(rows)


curves = {name: train(name) for name in ("grpo", "ctpo")}
pd.concat({k: v.tail(3) for k, v in curves.items()})

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
for name, df in curves.items():
    kw = {"color": estimator_color(name), "label": estimator_label(name)}
    axes[0].plot(df.step, df.reward, **kw)
    axes[1].plot(df.step, df.kl_last_update, **kw)
    axes[2].plot(df.step, df.clip_rate_last_update, **kw)
axes[0].set(xlabel="step", ylabel="mean reward")
axes[1].set(xlabel="step", ylabel="ppo_kl at the last update (nats/token)")
axes[2].set(xlabel="step", ylabel="clip rate at the last update")
axes[0].legend()
fig.tight_layout()

# %% [markdown]
# The left panel shows whether each loss learns this toy task; the middle one shows that the last mini-batch of
# each rollout is off-policy (`ppo_kl` ≠ 0 after the earlier updates); the right one shows how many tokens each
# loss's window clips at that point.
# One seed on a toy task is not a comparison: `python -m ctpo_lab.train` runs the multi-seed study.
#
# ## TRL's GRPOTrainer
# `ctpo_grpo_trainer_class()` returns a `GRPOTrainer` subclass whose policy loss is any ctpo_lab preset. TRL
# reuses the current log-probs as behaviour log-probs when `num_iterations == 1`, so every ratio would be 1:
# set `num_iterations > 1` to make the later passes off-policy.

# %%
try:
    import datasets
    import trl  # noqa: F401
except ImportError:
    trl = None
    print("trl is not installed: pip install 'ctpo_lab[trl]' to run this cell")

if trl is not None:
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig

    from ctpo_lab.integrations.trl import ctpo_grpo_trainer_class

    chars = list("0123456789+-= ")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    prompts = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "9-2="] * 4})

    def count_sevens(completions, **kwargs):
        return [float(c.count("7")) for c in completions]

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                          num_iterations=2, max_steps=2 if SMALL else 10, learning_rate=3e-2, logging_steps=1,
                          report_to="none", use_cpu=True, beta=0.0, seed=0, save_strategy="no")
        trainer = ctpo_grpo_trainer_class()(model=lm, reward_funcs=count_sevens, args=args, train_dataset=prompts,
                                            processing_class=tok, loss_preset="ctpo")
        trainer.train()
    logged = pd.DataFrame([e for e in trainer.state.log_history if "pg_update/clip/total/rate" in e])
    display(logged[["step", "reward", "actor/ppo_kl", "pg_update/clip/total/rate", "pg_update/is_ratio/max"]])  # noqa: F821
