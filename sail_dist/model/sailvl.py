"""SAIL-VL: SAIL-ViT -> adapter -> Qwen3, on one packed micro-batch (PackedBatch).

Vision tokens replace the `<IMG_CONTEXT>` embeddings in order; a count mismatch raises with both counts.
The model is single-device code: backends apply data / pipeline / expert parallelism, activation
checkpointing and freezing from outside, and pick kernels by handing it an OpSet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sail_dist.config import ModelConfig
from sail_dist.data.batch import PackedBatch
from sail_dist.kernels.opset import OpSet
from sail_dist.model.adapter import Adapter
from sail_dist.model.moe import MoE
from sail_dist.model.qwen3 import Qwen3
from sail_dist.model.vit import SailViT


@dataclass
class ModelOutput:
    loss_T: torch.Tensor  # per-token cross entropy, fp32, 0 where labels == -100
    aux_loss: torch.Tensor | None  # mean MoE load-balancing loss over MoE layers (detached), None if dense


class SailVL(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: OpSet) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = SailViT(cfg.vit, ops)
        self.adapter = Adapter(cfg.adapter, cfg.vit.hidden_size, cfg.llm.hidden_size)
        self.llm = Qwen3(cfg.llm, ops)
        moe = self.moe_layers()
        for m in moe:
            m.aux_grad_scale = cfg.llm.aux_loss_coeff / len(moe)

    # ---------------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) matrices, zero biases, unit norms), reproducible with `generator`."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".norm_" in name or name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    # ---------------------------------------------------------------------------------------------
    def vision_tokens(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Patches + grids -> LLM-space vision tokens [N_vis, D_llm]."""
        dtype = self.vision.patch_embed.proj.weight.dtype
        return self.adapter(self.vision(pixel_values.to(dtype), grid_hw), grid_hw)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings [T, D] with the vision tokens scattered into the <IMG_CONTEXT> slots."""
        h_TD = self.llm.embed_tokens(batch.input_ids)
        # The slots' positions, read here (the forward's one host sync for them): index_copy's backward needs no
        # sync, where masked_scatter's runs a nonzero that holds the host mid-backward until the device's queue has
        # drained (the 2B step time measured the same either way: BENCHMARKS.md, second round session 3).
        slot_N = (batch.input_ids == self.cfg.tokens.img_context).nonzero().squeeze(1)
        n_slots = slot_N.numel()
        if batch.num_images:
            vis = self.vision_tokens(batch.pixel_values, batch.image_grid_hw)
            if vis.shape[0] != n_slots:
                raise ValueError(f"the batch has {n_slots} <IMG_CONTEXT> tokens but its {batch.num_images} images "
                                 f"give {vis.shape[0]} vision tokens (sample ids {batch.sample_ids})")
            h_TD = h_TD.index_copy(0, slot_N, vis.to(h_TD.dtype))
        elif n_slots:
            raise ValueError(f"the batch has {n_slots} <IMG_CONTEXT> tokens but no images (sample ids {batch.sample_ids})")
        elif self.training and any(p.requires_grad for p in self.vision.parameters()):
            # Text-only micro-batch: run a 1-token dummy image through the vision tower with weight 0 so every
            # rank produces (zero) gradients for every vision parameter: data-parallel reductions stay in step.
            s = self.cfg.adapter.downsample
            dummy = torch.zeros(s * s, 3 * self.cfg.vit.patch_size ** 2, device=h_TD.device)
            grid = torch.tensor([[s, s]])
            h_TD = h_TD + 0.0 * self.vision_tokens(dummy, grid).sum().to(h_TD.dtype)
        return h_TD

    def decode(self, h_TD: torch.Tensor, batch: PackedBatch, layers: range | None = None) -> torch.Tensor:
        """Run LLM layers (all, or a range of them for a pipeline stage) over the packed stream."""
        cos, sin = self.llm.rope(batch.position_ids, h_TD.dtype)
        for i in layers if layers is not None else range(len(self.llm.layers)):
            h_TD = self.llm.layers[i](h_TD, cos, sin, batch.cu_seqlens, batch.max_seqlen)
        return h_TD

    def aux_loss(self) -> torch.Tensor | None:
        moe = self.moe_layers()
        if not moe or moe[0].last_aux is None:
            return None
        return torch.stack([m.last_aux for m in moe]).mean()

    def forward(self, batch: PackedBatch) -> ModelOutput:
        h_TD = self.decode(self.embed(batch), batch)
        return ModelOutput(loss_T=self.llm.loss(h_TD, batch.labels), aux_loss=self.aux_loss())

    @torch.no_grad()
    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """[T, V] logits (evaluation, generation and tests)."""
        return self.llm.logits(self.decode(self.embed(batch), batch))

    # ---------------------------------------------------------------------------------------------
    # Generation with a KV cache (sail_dist/rollout/sampler.py). `cache` holds per-layer k[i] / v[i] of shape
    # [B, S, Hkv, Hd] (sail_dist/rollout/kv_cache.py); the math is the training forward's, layer by layer.
    @torch.no_grad()
    def prefill(self, batch: PackedBatch, cache, slot_S: torch.Tensor) -> torch.Tensor:
        """Run packed prompts (the ViT once over their images), writing sample s's K/V into cache slot
        slot_S[s] at its positions; -> [S, V] logits of each sample's last token."""
        h_TD = self.embed(batch)
        cos, sin = self.llm.rope(batch.position_ids, h_TD.dtype)
        lens_S = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        slot_T = torch.repeat_interleave(slot_S.to(h_TD.device), lens_S)
        for layer in self.llm.layers:
            h_TD = layer.prefill(h_TD, cos, sin, batch.cu_seqlens, batch.max_seqlen, cache, slot_T,
                                 batch.position_ids)
        return self.llm.logits(h_TD[batch.cu_seqlens[1:].long() - 1])

    @torch.no_grad()
    def decode_step(self, input_ids_B: torch.Tensor, pos_B: torch.Tensor, cache) -> torch.Tensor:
        """One token per cache slot (input_ids_B[b] at position pos_B[b] of slot b) -> [B, V] next-token logits.
        No host synchronisation on the GPU OpSet, so the step can be captured in a CUDA graph."""
        h_BD = self.llm.embed_tokens(input_ids_B)
        cos, sin = self.llm.rope(pos_B, h_BD.dtype)
        lengths_B = pos_B + 1  # one tensor for every layer: an OpSet that reads it on the host (npu) reads it once
        for layer in self.llm.layers:
            h_BD = layer.decode(h_BD, cos, sin, cache, pos_B, lengths_B)
        return self.llm.logits(h_BD)
