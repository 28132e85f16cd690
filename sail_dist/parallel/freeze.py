"""Freeze policy: which of vit / adapter / llm train. Frozen parameters get no gradient and no optimizer state."""
from __future__ import annotations

from torch import nn

PARTS = {"vit": "vision", "adapter": "adapter", "llm": "llm"}


def apply_freeze(model: nn.Module, train_modules: list[str]) -> dict[str, int]:
    """Set requires_grad per part; returns trainable parameter counts per part."""
    counts = {}
    for part, attr in PARTS.items():
        trains = part in train_modules
        n = 0
        for p in getattr(model, attr).parameters():
            p.requires_grad_(trains)
            n += p.numel() if trains else 0
        counts[part] = n
    return counts
