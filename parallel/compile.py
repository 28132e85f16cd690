"""torch.compile applied from outside the model, per block (torchtitan's per-TransformerBlock compile).

Compiling each ViT block and each LLM layer's attention, norms and dense MLP fuses their elementwise work
(RMSNorm's fp32 round trips, QK-norm, RoPE, SwiGLU, residual adds), which eager mode runs as dozens of
memory-bound kernels. MoE blocks stay eager (data-dependent routing, all-reduces, custom kernels). The
instance's forward is replaced, so parameter names are unchanged; `dynamic=True` because packed
micro-batches change length every step.
"""
from __future__ import annotations

import torch
from torch import nn

from sail_dist.model.moe import MoE


def _compile(module: nn.Module) -> None:
    if not getattr(module, "_sail_compiled", False):
        module.forward = torch.compile(module.forward, dynamic=True)
        module._sail_compiled = True


def apply_compile(model: nn.Module, vit: bool = True, llm: bool = True) -> int:
    """Compile ViT blocks and the LLM layers' dense parts; returns how many modules were compiled."""
    mods: list[nn.Module] = list(model.vision.blocks) if vit else []
    if llm:
        for layer in model.llm.layers:
            mods += [layer.input_norm, layer.attn, layer.post_attn_norm]
            if not isinstance(layer.mlp, MoE):
                mods.append(layer.mlp)
    for m in mods:
        _compile(m)
    return len(mods)
