"""ctpo_lab losses inside TRL's GRPOTrainer (skipped when trl is not installed)."""

from __future__ import annotations

import pytest
import torch

from ctpo_lab.losses import PRESETS, resolve_config

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-=*/ abcdefghijklmnopqrstuvwxyz?.,")
    vocab = {c: i + 3 for i, c in enumerate(chars)} | {"<pad>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def test_ctpo_loss_runs_inside_grpo_trainer(tmp_path):
    from trl import GRPOConfig

    from ctpo_lab.integrations.trl import ctpo_grpo_trainer_class

    tok = _char_tokenizer()
    model = _tiny_model(len(tok))
    before = [p.detach().clone() for p in model.parameters()]
    ds = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "9-2="] * 2})

    def reward_digits(completions, **kwargs):
        return [float(sum(ch.isdigit() for ch in c)) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        num_iterations=2, max_steps=3, learning_rate=5e-2, logging_steps=1, report_to="none", use_cpu=True,
        beta=0.0, seed=0, save_strategy="no", temperature=1.0,
    )
    Trainer = ctpo_grpo_trainer_class()
    trainer = Trainer(model=model, reward_funcs=reward_digits, args=args, train_dataset=ds,
                      processing_class=tok, loss_preset="ctpo")
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "pg_update/clip/total/rate" in entry]
    assert logs, "ctpo_lab metrics were not logged"
    # the second iteration over a generation batch is off-policy: some weight differs from 1
    assert any(abs(e["pg_update/is_ratio/max"] - 1.0) > 1e-6 or abs(e["pg_update/is_ratio/min"] - 1.0) > 1e-6
               for e in logs)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_unknown_preset_is_rejected_before_training():
    from ctpo_lab.integrations.trl import ctpo_grpo_trainer_class

    with pytest.raises(ValueError, match="preset"):
        ctpo_grpo_trainer_class()(model=None, loss_preset="nope")


@pytest.mark.parametrize("loss", [*PRESETS, "config"])
def test_every_preset_and_any_loss_config_is_accepted(loss, monkeypatch):
    """The subclass resolves any PRESETS key or LossConfig before TRL's constructor runs."""
    from ctpo_lab.integrations.trl import ctpo_grpo_trainer_class

    seen = {}

    def stop(self, *args, **kwargs):
        seen["config"] = self.ctpo_loss_config
        raise RuntimeError("stop before TRL's constructor")

    cls = ctpo_grpo_trainer_class()
    monkeypatch.setattr(trl.GRPOTrainer, "__init__", stop)
    chosen = resolve_config("ctpo", eps_high=0.07, aggregation="seq-mean-token-mean") if loss == "config" else loss
    with pytest.raises(RuntimeError, match="stop"):
        cls(model=None, loss=chosen, loss_overrides={"max_log_weight": 5.0})
    expected = resolve_config(chosen, max_log_weight=5.0)
    assert seen["config"] == expected
