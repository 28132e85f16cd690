"""Qwen3 decoder (dense or MoE per layer) on one packed token stream [T, D].

RMSNorm, per-head QK-norm, GQA, RoPE (half rotation, theta from the config), SwiGLU MLP or a Qwen3-MoE
block. Attention is variable-length over cu_seqlens, so packed samples never see each other. Weights
are stored fused where that saves a GEMM (qkv, gate|up); model/hf.py maps them to and from the
transformers layout.
"""
from __future__ import annotations

import torch
from torch import nn

from sail_dist.config import LLMConfig
from sail_dist.kernels.opset import OpSet
from sail_dist.model.moe import MoE
from sail_dist.model.norm import RMSNorm


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for the half-split rotation, computed in fp32 as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                                / head_dim))
    freqs_TF = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs_TF, freqs_TF), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: OpSet) -> None:
        super().__init__()
        self.hq, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.hq * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, ops)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, ops)
        self.ops = ops

    def forward(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        T = x_TD.shape[0]
        q, k, v = self.qkv_proj(x_TD).split([self.hq * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
        q_THd = self.ops.rope(self.q_norm(q.view(T, self.hq, self.hd)), cos, sin)
        k_THd = self.ops.rope(self.k_norm(k.view(T, self.hkv, self.hd)), cos, sin)
        o = self.ops.attention(q_THd, k_THd, v.view(T, self.hkv, self.hd), cu_seqlens, max_seqlen, causal=True)
        return self.o_proj(o.reshape(T, self.hq * self.hd))


class DenseMLP(nn.Module):
    def __init__(self, dim: int, ffn: int, ops: OpSet) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * ffn, bias=False)  # [gate; up]
        self.down_proj = nn.Linear(ffn, dim, bias=False)
        self.ops = ops

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_up_proj(x_TD)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int, ops: OpSet) -> None:
        super().__init__()
        self.index = index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.attn = Attention(cfg, ops)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MoE(cfg, ops) if cfg.is_moe_layer(index) else DenseMLP(cfg.hidden_size, cfg.ffn_size, ops)

    def forward(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        x_TD = x_TD + self.attn(self.input_norm(x_TD), cos, sin, cu_seqlens, max_seqlen)
        return x_TD + self.mlp(self.post_attn_norm(x_TD))


class Qwen3(nn.Module):
    """Embeddings, decoder layers, final norm and lm head; the loss goes through `ops.cross_entropy`."""

    def __init__(self, cfg: LLMConfig, ops: OpSet) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ops) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.ops = ops

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def loss(self, h_TD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        """Final norm + lm head + cross entropy -> per-token loss [T] fp32 (0 where label == -100)."""
        return self.ops.cross_entropy(self.norm(h_TD), self.lm_head.weight, labels_T)

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_TD))
