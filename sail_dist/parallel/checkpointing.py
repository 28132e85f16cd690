"""Activation checkpointing applied from outside the model, per module family (ViT blocks, LLM layers).

The instance's forward is replaced by a checkpointed call, so parameter names (and thus checkpoints
and HF export) are unchanged.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(module: nn.Module) -> None:
    if getattr(module, "_sail_checkpointed", False):
        return
    inner = module.forward
    module.forward = functools.partial(checkpoint, inner, use_reentrant=False)
    module._sail_checkpointed = True


def apply_activation_checkpointing(model: nn.Module, vit: bool, llm: bool) -> int:
    """Checkpoint every ViT block and/or every LLM decoder layer; returns how many modules were wrapped."""
    mods = (list(model.vision.blocks) if vit else []) + (list(model.llm.layers) if llm else [])
    for m in mods:
        _checkpointed(m)
    return len(mods)
