"""Device selection of the trainer (a leaf module: imports nothing from :mod:`ctpo_lab`)."""

from __future__ import annotations

import torch

__all__ = ["pick_device"]


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; any other name (``"cpu"``, ``"cuda:1"``) as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
