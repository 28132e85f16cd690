"""Split-KV decode attention (flash-decoding) over the sampler's BSND KV cache, in Triton.

    decode_attention(q[B,Hq,D], k_cache[B,S,Hkv,D], v_cache[B,S,Hkv,D], lengths[B]) -> [B,Hq,D]

One program per (sequence, kv head, split of the cache rows): it reads only the rows [0, lengths[b]) of its
split, once for all Hq/Hkv query heads of that kv head (GQA), with an online softmax in fp32; a second kernel
merges the splits by their log-sum-exp. Lengths are read on the device, so the op is CUDA-graph capturable and
its traffic is the valid cache rows, not the allocated ones (what a masked SDPA over the whole cache reads).
Runs in Triton's interpreter on CPU tensors when TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sail_dist.kernels.triton import interpreting

INTERPRET = interpreting()
_BLOCK_N = 64


@triton.jit
def _split_kernel(Q, K, V, L, O, LSE, sqb, sqh, skb, sks, skh, svb, svs, svh, sob, soh, sos, slb, slh,
                  scale, split_len, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(L + b).to(tl.int32)
    start = s * split_len
    end = tl.minimum(start + split_len, length)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    n0 = tl.arange(0, BLOCK_N)
    for n in range(start, end, BLOCK_N):
        rows = n + n0
        ok = rows < end
        k = tl.load(K + b * skb + rows[:, None] * sks + h * skh + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + b * svb + rows[:, None] * svs + h * svh + d[None, :], mask=ok[:, None], other=0.0)
        if UPCAST:  # fp32 caches, and the interpreter (whose bf16 dot is wrong): fp32 operands, exact products
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            x = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:  # bf16/fp16 on tensor cores, fp32 accumulation (P rounded to the cache dtype, as flash attention)
            x = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        x = tl.where(ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.exp(x - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(O + b * sob + (h * G + g)[:, None] * soh + s * sos + d[None, :], out, mask=(g < G)[:, None])
    tl.store(LSE + b * slb + (h * G + g) * slh + s, lse, mask=g < G)


@triton.jit
def _merge_kernel(O, LSE, OUT, sob, soh, sos, slb, slh, sxb, sxh, NS: tl.constexpr, NSP: tl.constexpr,
                  D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NSP)
    d = tl.arange(0, D)
    lse = tl.load(LSE + b * slb + h * slh + s, mask=s < NS, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - mx), 0.0)
    o = tl.load(O + b * sob + h * soh + s[:, None] * sos + d[None, :], mask=(s < NS)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * sxb + h * sxh + d, out.to(OUT.dtype.element_ty))


def num_splits(batch: int, kv_heads: int, seq_len: int, sms: int = 132) -> int:
    """Enough splits for ~4 programs per multiprocessor, each at least one block of rows."""
    want = max(1, -(-4 * sms // (batch * kv_heads)))
    return max(1, min(want, -(-seq_len // _BLOCK_N), 64))


def decode_attention(q_BHD: torch.Tensor, k_cache_BSHD: torch.Tensor, v_cache_BSHD: torch.Tensor,
                     lengths_B: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    B, Hq, D = q_BHD.shape
    S, Hkv = k_cache_BSHD.shape[1], k_cache_BSHD.shape[2]
    if Hq % Hkv or D & (D - 1) or D < 16:
        raise ValueError(f"triton decode_attention: Hq={Hq} must be a multiple of Hkv={Hkv}, D={D} a power of 2 >= 16")
    G = Hq // Hkv
    ns = splits or num_splits(B, Hkv, S, torch.cuda.get_device_properties(q_BHD.device).multi_processor_count
                              if q_BHD.is_cuda else 8)
    split_len = -(-(-(-S // ns)) // _BLOCK_N) * _BLOCK_N
    o = torch.empty(B, Hq, ns, D, dtype=torch.float32, device=q_BHD.device)
    lse = torch.empty(B, Hq, ns, dtype=torch.float32, device=q_BHD.device)
    k, v = k_cache_BSHD, v_cache_BSHD
    _split_kernel[(B, Hkv, ns)](
        q_BHD, k, v, lengths_B, o, lse, q_BHD.stride(0), q_BHD.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        1.0 / math.sqrt(D), split_len, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=_BLOCK_N,
        UPCAST=INTERPRET or q_BHD.dtype == torch.float32)
    out = torch.empty_like(q_BHD)
    _merge_kernel[(B, Hq)](o, lse, out, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                           out.stride(0), out.stride(1), NS=ns, NSP=max(2, triton.next_power_of_2(ns)), D=D)
    return out
