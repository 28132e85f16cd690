"""torch.compile applied from outside the model, per block (torchtitan's per-TransformerBlock compile).

Compiling each ViT block and each dense LLM layer whole fuses their elementwise work (RMSNorm's fp32 round
trips, QK-norm, RoPE, SwiGLU, residual adds and their backward accumulations), which eager mode runs as
dozens of memory-bound kernels. MoE layers are compiled by parts (norms and attention) and their MoE block
stays eager (data-dependent routing, all-reduces, custom kernels). The ViT's post-norm, the adapter and the
LLM's final norm are compiled too. Instances of one class share their compiled graphs (dynamo inlines
nn.Modules), so a 28-layer model compiles a handful of graphs. The instance's forward is replaced, so parameter
names are unchanged; `dynamic=True` because packed micro-batches change length every step.
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
    """Compile the ViT's blocks, post-norm and the adapter, and the LLM's layers (MoE layers by parts) and
    final norm; returns how many modules were compiled."""
    mods: list[nn.Module] = [*model.vision.blocks, model.vision.post_norm, model.adapter] if vit else []
    if llm:
        for layer in model.llm.layers:
            if isinstance(layer.mlp, MoE):
                mods += [layer.input_norm, layer.attn, layer.post_attn_norm]
            else:
                mods.append(layer)
        mods.append(model.llm.norm)
    for m in mods:
        _compile(m)
    return len(mods)
