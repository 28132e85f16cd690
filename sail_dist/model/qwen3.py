"""Qwen3 decoder (dense or MoE per layer) on one packed token stream [T, D].

RMSNorm, per-head QK-norm, GQA, RoPE (half rotation; theta and the linear scaling factor from the config),
SwiGLU MLP or a Qwen3-MoE block. Attention is variable-length over cu_seqlens, so packed samples never see each
other. Weights are stored fused where that saves a GEMM (qkv, gate|up); model/hf.py maps them to and from the
transformers layout.
"""
from __future__ import annotations

import torch
from torch import nn

from sail_dist.config import LLMConfig
from sail_dist.kernels.opset import OpSet
from sail_dist.model.moe import MoE
from sail_dist.model.norm import RMSNorm


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, factor: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for the half-split rotation, computed in fp32 as transformers does.

    factor: linear RoPE scaling (transformers rope_type "linear"), position p rotated as p / factor; done, as
    transformers does it, by dividing the inverse frequencies (the same fp32 rounding)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                                / head_dim))
    if factor != 1.0:
        inv_freq = inv_freq / factor
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

    def qkv(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected, QK-normed, rotated q [T,Hq,Hd], k [T,Hkv,Hd] and v [T,Hkv,Hd]."""
        T = x_TD.shape[0]
        q, k, v = self.qkv_proj(x_TD).split([self.hq * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
        q_THd = self.ops.rope(self.q_norm(q.view(T, self.hq, self.hd)), cos, sin)
        k_THd = self.ops.rope(self.k_norm(k.view(T, self.hkv, self.hd)), cos, sin)
        return q_THd, k_THd, v.view(T, self.hkv, self.hd)

    def forward(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        T = x_TD.shape[0]
        q_THd, k_THd, v_THd = self.qkv(x_TD, cos, sin)
        o = self.ops.attention(q_THd, k_THd, v_THd, cu_seqlens, max_seqlen, causal=True)
        return self.o_proj(o.reshape(T, self.hq * self.hd))

    def prefill_attend(self, q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_T: torch.Tensor,
                       pos_T: torch.Tensor) -> torch.Tensor:
        """Packed prompts: write each token's K/V into cache[slot_T, pos_T] (cache [B, S, Hkv, Hd]), then the
        training attention over cu_seqlens -> o [T, Hq, Hd]."""
        k_cache[slot_T, pos_T] = k_THd.to(k_cache.dtype)
        v_cache[slot_T, pos_T] = v_THd.to(v_cache.dtype)
        return self.ops.attention(q_THd, k_THd, v_THd, cu_seqlens, max_seqlen, causal=True)

    def decode_attend(self, q_BHd: torch.Tensor, k_BHd: torch.Tensor, v_BHd: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, pos_B: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """One new token per cache slot (row b = slot b, at position pos_B[b]): write its K/V, then attend to
        the slot's rows [0, pos_B[b]] (lengths_B = pos_B + 1, one tensor for every layer of the step) through the
        OpSet's decode_attention -> o [B, Hq, Hd]."""
        slot_B = torch.arange(q_BHd.shape[0], device=q_BHd.device)
        k_cache[slot_B, pos_B] = k_BHd.to(k_cache.dtype)
        v_cache[slot_B, pos_B] = v_BHd.to(v_cache.dtype)
        return self.ops.decode_attention(q_BHd, k_cache, v_cache, lengths_B)


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

    # Generation (sail_dist/rollout): the same math with a KV cache; `cache` has per-layer k[i] / v[i] [B, S, Hkv, Hd].
    def infer_mlp(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The MLP without training bookkeeping: an MoE block routes and runs its experts but records no
        load-balancing statistics (whose host-built tensors would also break CUDA-graph capture)."""
        if isinstance(self.mlp, MoE):
            _, topk_idx, topk_w = self.mlp.route(x_TD)
            return self.mlp.experts(x_TD, topk_idx, topk_w)
        return self.mlp(x_TD)

    # Prefill and decode are split around the cache write + attention, so that the pieces before and after it are
    # pure functions of their inputs, which parallel/compile.py's compile_generation compiles (vLLM's piecewise
    # graphs); the same two pieces serve packed prompts [T, D] and one token per slot [B, D].
    def pre_attention(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attn.qkv(self.input_norm(x_TD), cos, sin)

    def post_attention(self, x_TD: torch.Tensor, o_THd: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD + self.attn.o_proj(o_THd.reshape(x_TD.shape[0], -1))
        return x_TD + self.infer_mlp(self.post_attn_norm(x_TD))

    def prefill(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, cache, slot_T: torch.Tensor, pos_T: torch.Tensor) -> torch.Tensor:
        q_THd, k_THd, v_THd = self.pre_attention(x_TD, cos, sin)
        o_THd = self.attn.prefill_attend(q_THd, k_THd, v_THd, cu_seqlens, max_seqlen, cache.k[self.index],
                                         cache.v[self.index], slot_T, pos_T)
        return self.post_attention(x_TD, o_THd)

    def decode(self, x_BD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, pos_B: torch.Tensor,
               lengths_B: torch.Tensor) -> torch.Tensor:
        q_BHd, k_BHd, v_BHd = self.pre_attention(x_BD, cos, sin)
        o_BHd = self.attn.decode_attend(q_BHd, k_BHd, v_BHd, cache.k[self.index], cache.v[self.index], pos_B,
                                        lengths_B)
        return self.post_attention(x_BD, o_BHd)


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
        """cos/sin for these positions (the one RoPE of training, prefill and KV-cache decode)."""
        return rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype, self.cfg.rope_linear_factor)

    def loss(self, h_TD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        """Final norm + lm head + cross entropy -> per-token loss [T] fp32 (0 where label == -100)."""
        return self.ops.cross_entropy(self.norm(h_TD), self.lm_head.weight, labels_T)

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_TD))
