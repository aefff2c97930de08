"""Adapters that put ctpo_lab losses into other trainers (TRL's GRPOTrainer)."""
