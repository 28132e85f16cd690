"""Exact matmul FLOPs of the model, forward and training (forward + backward), whole or by part.

The trainer's one cost model: MFU (`batch_flops`), the data scheduler's per-sample cost (data/balance.py),
the pipeline split (parallel/pipeline.py) and each pipeline rank's FLOPs (`batch_flops_by_part`) all read it
from here, so they cannot disagree.

Counts 2*m*n*k for every matrix product the model performs (the convention of torch.utils.flop_counter);
norms, activations, embeddings lookups and softmax are not counted. Backward per group: weight
gradients when the group trains, input gradients when anything before it trains (so a frozen ViT
costs only its forward; a frozen LLM under a trainable adapter costs forward + input grads).

Causal attention: `causal_half=True` counts the n(n+1)/2 query-key pairs a causal kernel computes (the
useful work, used for MFU and balancing); `causal_half=False` counts the full n^2 a dense kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from sail_dist.config import LLMConfig, ModelConfig, ViTConfig

if TYPE_CHECKING:
    from sail_dist.data.batch import PackedBatch

ALL_MODULES = ("vit", "adapter", "llm")


@dataclass
class Flops:
    forward: float
    train: float  # forward + backward

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.forward + other.forward, self.train + other.train)


@dataclass(frozen=True)
class PartFlops:
    """One kind of FLOPs (forward, or training) by the parts a pipeline stage can hold."""

    vision: float  # ViT + adapter (first stage)
    layers: tuple[float, ...]  # LLM decoder layer i: projections, attention, MLP (MoE: router + top-k experts)
    head: float  # lm head (last stage)

    @property
    def total(self) -> float:
        return self.vision + sum(self.layers) + self.head

    def select(self, layers: Iterable[int] = (), vision: bool = False, head: bool = False) -> float:
        """The FLOPs of the parts one pipeline stage (or rank) holds."""
        return sum(self.layers[i] for i in layers) + (self.vision if vision else 0.0) + (self.head if head else 0.0)


@dataclass(frozen=True)
class FlopsByPart:
    """Forward and training FLOPs by part: what `flops_by_part` and `batch_flops_by_part` return."""

    forward: PartFlops
    train: PartFlops  # forward + backward

    @property
    def total(self) -> Flops:
        return Flops(self.forward.total, self.train.total)


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


def llm_layer_attn_proj_per_token(cfg: LLMConfig) -> float:
    """Weight-matmul FLOPs per token of a decoder layer's attention block (qkv and output projections)."""
    D, hd = cfg.hidden_size, cfg.head_dim
    return 2.0 * D * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + 2.0 * cfg.num_heads * hd * D


def moe_experts_per_token(cfg: LLMConfig) -> float:
    """Weight-matmul FLOPs per token of an MoE layer's top-k active experts (SwiGLU: gate, up, down)."""
    return cfg.top_k * 6.0 * cfg.hidden_size * cfg.moe_ffn_size


def llm_layer_linear_per_token(cfg: LLMConfig, i: int) -> float:
    """Weight-matmul FLOPs per token of decoder layer i (MoE: the router and the top-k active experts)."""
    if cfg.is_moe_layer(i):
        return llm_layer_attn_proj_per_token(cfg) + 2.0 * cfg.hidden_size * cfg.num_experts + moe_experts_per_token(cfg)
    return llm_layer_attn_proj_per_token(cfg) + 6.0 * cfg.hidden_size * cfg.ffn_size


def llm_layer_attention(cfg: LLMConfig, seqlen: int, causal_half: bool = True) -> float:
    """Score and value matmul FLOPs of one decoder layer over one sample of `seqlen` tokens."""
    pairs = seqlen * (seqlen + 1) / 2 if causal_half else float(seqlen) ** 2
    return 2 * 2.0 * cfg.num_heads * cfg.head_dim * pairs


def flops_by_part(cfg: ModelConfig, seqlens: Iterable[int], image_patches: Iterable[int] = (),
                  trainable: Iterable[str] = ALL_MODULES, causal_half: bool = True) -> FlopsByPart:
    """FLOPs of one packed micro-batch by part: LLM samples of `seqlens` tokens (attention within each sample)
    and ViT inputs (tiles or images) of `image_patches` patches each.

    The freeze rules apply to the micro-batch as a whole: the LLM computes input gradients when it holds an
    image and the ViT or adapter trains. Each part's count is that of its own matmuls, so the parts add up to
    the whole model's."""
    trainable = set(trainable)
    seqlens, image_patches = list(seqlens), list(image_patches)
    vision = Flops(0.0, 0.0)
    if image_patches:
        lin = attn = first = 0.0
        for p in image_patches:
            lp, ap, ep = vit_linear_attn(cfg.vit, p)
            lin, attn, first = lin + lp, attn + ap, first + ep
        vision = _group(lin, attn, "vit" in trainable, grad_input=False, first_input_grad=first)
        vision += _group(sum(adapter_linear(cfg, p) for p in image_patches), 0.0, "adapter" in trainable,
                         grad_input="vit" in trainable)
    llm = cfg.llm
    tokens = sum(seqlens)
    attn = sum(llm_layer_attention(llm, n, causal_half) for n in seqlens)
    trains = "llm" in trainable
    grad_input = bool(image_patches) and bool({"vit", "adapter"} & trainable)
    layers = [_group(tokens * llm_layer_linear_per_token(llm, i), attn, trains, grad_input)
              for i in range(llm.num_layers)]
    head = _group(tokens * 2.0 * llm.hidden_size * llm.vocab_size, 0.0, trains, grad_input)
    return FlopsByPart(forward=PartFlops(vision.forward, tuple(f.forward for f in layers), head.forward),
                       train=PartFlops(vision.train, tuple(f.train for f in layers), head.train))


def batch_flops_by_part(cfg: ModelConfig, batch: PackedBatch, trainable: Iterable[str] = ALL_MODULES,
                        causal_half: bool = True) -> FlopsByPart:
    """FLOPs of one PackedBatch by part: what each pipeline stage performs for it (`.train.select(...)`)."""
    patches = (batch.image_grid_hw[:, 0] * batch.image_grid_hw[:, 1]).tolist() if batch.num_images else []
    return flops_by_part(cfg, batch.seqlens(), patches, trainable, causal_half)


def batch_flops(cfg: ModelConfig, batch: PackedBatch, trainable: Iterable[str] = ALL_MODULES,
                causal_half: bool = True) -> Flops:
    """FLOPs of one PackedBatch: the LLM per sample (attention by length), the vision side per image grid."""
    return batch_flops_by_part(cfg, batch, trainable, causal_half).total


def sample_flops(cfg: ModelConfig, seqlen: int, image_patches: Iterable[int] = (),
                 trainable: Iterable[str] = ALL_MODULES, causal_half: bool = True) -> Flops:
    """FLOPs of one sample: `seqlen` LLM tokens and images of the given patch counts (e.g. 1024 per 448 tile)."""
    return flops_by_part(cfg, [seqlen], image_patches, trainable, causal_half).total


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
