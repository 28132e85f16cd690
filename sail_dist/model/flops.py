"""Exact matmul FLOPs of one sample: forward and training (forward + backward).

Counts 2*m*n*k for every matrix product the model performs (the convention of torch.utils.flop_counter);
norms, activations, embeddings lookups and softmax are not counted. Backward per group: weight
gradients when the group trains, input gradients when anything before it trains (so a frozen ViT
costs only its forward; a frozen LLM under a trainable adapter costs forward + input grads).

Causal attention: `causal_half=True` counts the n(n+1)/2 query-key pairs a causal kernel computes (the
useful work, used for MFU and balancing); `causal_half=False` counts the full n^2 a dense kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sail_dist.config import LLMConfig, ModelConfig, ViTConfig


@dataclass
class Flops:
    forward: float
    train: float  # forward + backward

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.forward + other.forward, self.train + other.train)


def _group(linear: float, attn: float, trains: bool, grad_input: bool, first_input_grad: float = 0.0) -> Flops:
    """linear: weight matmul FLOPs; attn: weightless score/value matmuls (backward is 2x, both inputs).
    `first_input_grad` = FLOPs of an input-gradient matmul that is never needed (the group's very first
    projection when nothing before it trains)."""
    bwd = 0.0
    if trains:
        bwd += linear  # weight grads
    if trains or grad_input:
        bwd += linear - (0.0 if grad_input else first_input_grad) + 2 * attn  # input grads
    return Flops(linear + attn, linear + attn + bwd)


def vit_linear_attn(cfg: ViTConfig, patches: int) -> tuple[float, float, float]:
    """(weight matmuls, attention matmuls, patch-embed matmul) forward FLOPs for one image of `patches` patches."""
    D, F, P = cfg.hidden_size, cfg.ffn_size, patches
    embed = 2.0 * P * 3 * cfg.patch_size ** 2 * D
    per_layer = 2.0 * P * D * 3 * D + 2.0 * P * D * D + 2.0 * P * D * 2 * F + 2.0 * P * F * D
    attn = cfg.num_layers * 2 * (2.0 * P * P * D)
    return embed + cfg.num_layers * per_layer, attn, embed


def adapter_linear(cfg: ModelConfig, patches: int) -> float:
    s = cfg.adapter.downsample
    n = patches / s ** 2
    merged = cfg.vit.hidden_size * s ** 2
    hidden = cfg.adapter.hidden_size or cfg.llm.hidden_size
    return 2.0 * n * merged * hidden + 2.0 * n * hidden * cfg.llm.hidden_size


def llm_linear_per_token(cfg: LLMConfig, active: bool = True) -> float:
    """Weight-matmul FLOPs per token over all layers plus the lm head (MoE: the top-k active experts)."""
    D, hd = cfg.hidden_size, cfg.head_dim
    attn_proj = 2.0 * D * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + 2.0 * cfg.num_heads * hd * D
    total = 0.0
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            experts = cfg.top_k if active else cfg.num_experts
            mlp = 2.0 * D * cfg.num_experts + experts * 6.0 * D * cfg.moe_ffn_size
        else:
            mlp = 6.0 * D * cfg.ffn_size
        total += attn_proj + mlp
    return total + 2.0 * D * cfg.vocab_size


def llm_attention(cfg: LLMConfig, seqlen: int, causal_half: bool = True) -> float:
    pairs = seqlen * (seqlen + 1) / 2 if causal_half else float(seqlen) ** 2
    return cfg.num_layers * 2 * 2.0 * cfg.num_heads * cfg.head_dim * pairs


def sample_flops(cfg: ModelConfig, seqlen: int, image_patches: Iterable[int] = (),
                 trainable: Iterable[str] = ("vit", "adapter", "llm"), causal_half: bool = True) -> Flops:
    """FLOPs of one sample: `seqlen` LLM tokens and images of the given patch counts (e.g. 1024 per 448 tile)."""
    trainable = set(trainable)
    image_patches = list(image_patches)
    total = Flops(0.0, 0.0)
    if image_patches:
        lin = attn = first = 0.0
        for p in image_patches:
            lp, ap, ep = vit_linear_attn(cfg.vit, p)
            lin, attn, first = lin + lp, attn + ap, first + ep
        total += _group(lin, attn, "vit" in trainable, grad_input=False, first_input_grad=first)
        total += _group(sum(adapter_linear(cfg, p) for p in image_patches), 0.0, "adapter" in trainable,
                        grad_input="vit" in trainable)
    total += _group(seqlen * llm_linear_per_token(cfg.llm), llm_attention(cfg.llm, seqlen, causal_half),
                    "llm" in trainable, grad_input=bool(image_patches) and bool({"vit", "adapter"} & trainable))
    return total


def param_counts(cfg: ModelConfig) -> dict[str, float]:
    """Parameter counts by part, from the config alone (no model built)."""
    v, l = cfg.vit, cfg.llm
    D = v.hidden_size
    vit = (3 * v.patch_size ** 2 * D + D) + D + v.grid ** 2 * D + D + v.num_layers * (
        3 * D * D + D * D + 3 * D * v.ffn_size + 2 * D)
    merged = D * cfg.adapter.downsample ** 2
    hidden = cfg.adapter.hidden_size or l.hidden_size
    adapter = 2 * merged + merged * hidden + hidden + hidden * l.hidden_size + l.hidden_size
    hd = l.head_dim
    attn = l.hidden_size * (l.num_heads + 2 * l.num_kv_heads) * hd + l.num_heads * hd * l.hidden_size + 2 * hd
    llm = active = 0.0
    for i in range(l.num_layers):
        base = attn + 2 * l.hidden_size
        if l.is_moe_layer(i):
            router = l.hidden_size * l.num_experts
            expert = 3 * l.hidden_size * l.moe_ffn_size
            llm += base + router + l.num_experts * expert
            active += base + router + l.top_k * expert
        else:
            llm += base + 3 * l.hidden_size * l.ffn_size
            active += base + 3 * l.hidden_size * l.ffn_size
    emb = l.vocab_size * l.hidden_size
    head = 0 if l.tie_embeddings else emb
    llm += emb + head + l.hidden_size
    active += emb + head + l.hidden_size
    return {"vit": float(vit), "adapter": float(adapter), "llm": llm, "llm_active": active,
            "total": vit + adapter + llm}



def batch_flops(cfg: ModelConfig, batch, trainable: Iterable[str] = ("vit", "adapter", "llm"),
                causal_half: bool = True) -> Flops:
    """FLOPs of one PackedBatch: the LLM per sample (attention by length), the vision side per image grid."""
    trainable = set(trainable)
    patches = (batch.image_grid_hw[:, 0] * batch.image_grid_hw[:, 1]).tolist() if batch.num_images else []
    total = sample_flops(cfg, 0, patches, trainable, causal_half) if patches else Flops(0.0, 0.0)
    llm_grad_input = bool(patches) and bool({"vit", "adapter"} & trainable)
    per_token = llm_linear_per_token(cfg.llm)
    for n in batch.seqlens():
        total += _group(n * per_token, llm_attention(cfg.llm, n, causal_half), "llm" in trainable, llm_grad_input)
    return total
