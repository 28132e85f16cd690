"""Reference OpSet: plain PyTorch, dtype-preserving (float64 in, float64 math), the ground truth every
other implementation is tested against. Clear over fast: it loops over sequences and experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sail_dist.kernels.opset import OpSet


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              causal: bool) -> torch.Tensor:
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if Hq != Hkv:
            ks = ks.repeat_interleave(Hq // Hkv, dim=0)
            vs = vs.repeat_interleave(Hq // Hkv, dim=0)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Qwen3 / AIMv2 order: normalise in fp32, cast back, then scale by the weight.
    xf = x.to(_compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [T,1,D] over heads
    return x * cos + rotate_half(x) * sin


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor) -> torch.Tensor:
    T, K = topk_idx.shape
    out = torch.zeros_like(x)
    flat_idx = topk_idx.reshape(-1)
    for e in torch.unique(flat_idx).tolist():
        pos = (flat_idx == e).nonzero(as_tuple=True)[0]
        tok, slot = pos // K, pos % K
        y = swiglu(x[tok] @ w_gate_up[e]) @ w_down[e]
        out.index_add_(0, tok, (y * topk_weight[tok, slot, None]).to(x.dtype))
    return out


def cross_entropy(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.t()).to(_compute_dtype(h.dtype))
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")


def decode_attention(q_BHD: torch.Tensor, k_cache_BSHD: torch.Tensor, v_cache_BSHD: torch.Tensor,
                     lengths_B: torch.Tensor) -> torch.Tensor:
    """One query per sequence against its first lengths[b] cache rows (one host read of the lengths)."""
    B, Hq, D = q_BHD.shape
    Hkv = k_cache_BSHD.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    out = torch.empty_like(q_BHD)
    for b, n in enumerate(lengths_B.tolist()):
        if not 1 <= n <= k_cache_BSHD.shape[1]:
            raise ValueError(f"decode_attention: lengths[{b}] = {n} outside [1, cache length {k_cache_BSHD.shape[1]}]")
        # The Hq/Hkv query heads of one kv head act as that head's query rows (GQA without repeating the cache).
        q_HGD = q_BHD[b].view(Hkv, Hq // Hkv, D)
        k_HnD, v_HnD = k_cache_BSHD[b, :n].transpose(0, 1), v_cache_BSHD[b, :n].transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q_HGD, k_HnD.to(q_HGD.dtype), v_HnD.to(q_HGD.dtype)).reshape(Hq, D)
    return out


def opset() -> OpSet:
    return OpSet("reference", attention=attention, rms_norm=rms_norm, rope=rope, swiglu=swiglu,
                 moe_experts=moe_experts, cross_entropy=cross_entropy, decode_attention=decode_attention)
