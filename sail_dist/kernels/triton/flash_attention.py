"""Varlen flash attention, forward and backward, over packed sequences, in Triton.

    flash_attention(q[T,Hq,D], k[T,Hkv,D], v[T,Hkv,D], cu_seqlens[B+1] int32, max_seqlen, causal) -> [T,Hq,D]

Why written here: torch's own flash kernels (`aten_flash`, FlashAttention-2) use the Ampere tensor-core
instructions, which leave Hopper's (wgmma, asynchronous copies) unused: at the 2B shape they ran ~150 TFLOP/s
forward + backward on an H200 (BENCHMARKS.md). FlashAttention-3 is not part of torch and cuDNN's ragged attention
failed there; the Triton compiler emits Hopper's instructions for these plain tiled loops.

The algorithm is FlashAttention-2's (Dao, 2023), as in Triton's fused-attention tutorial, with the packing of
this trainer: one program per (query block, sequence, head) reads the sequence's bounds from cu_seqlens on the
device (no host sync), so no program ever reads across a packed sample's boundary. Grouped-query attention reads
kv head h // (Hq / Hkv); the backward's dk / dv program loops over the group's query heads itself, so dk / dv
need no atomics and the result is deterministic, and dq comes from a second kernel (one program per query block).
The causal loops run the blocks below the diagonal without masks and mask only the diagonal and the sequence's
last partial block; the forward and dq launch their longest causal query blocks first. Scores are scaled into log2 units once
(exp2); the forward saves the row log-sum-exp (log2 units, [Hq, T] fp32) for the backward.

q / k / v may be strided views (the model's q / k / v are slices of one projection): only the head dim must be
contiguous. Head dims: powers of 2 from 16 to 128. fp32 inputs take exact fp32 products (the tests, Triton's CPU
interpreter); bf16 / fp16 run on tensor cores with fp32 accumulation. Inside torch.compile the call goes through two
torch custom ops (forward, backward), which the compiled layer keeps whole; eager code calls the same launchers
through an autograd.Function (no dispatcher cost per call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sail_dist.kernels.triton import interpreting

INTERPRET = interpreting()


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch: block sizes, warps, pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Per kernel, the launch used (the first) and the candidates bench.attention's --sweep measures (BENCHMARKS.md).
# Causal loops need block_m % block_n == 0 (forward, dq) and block_n % block_m == 0 (dk / dv).
FWD_TILES = [Tiles(64, 64, 4, 3), Tiles(128, 64, 8, 3), Tiles(64, 64, 4, 4), Tiles(128, 32, 4, 3),
             Tiles(64, 32, 4, 3), Tiles(128, 64, 8, 4)]
DKDV_TILES = [Tiles(32, 64, 4, 3), Tiles(64, 128, 8, 2), Tiles(32, 64, 4, 4), Tiles(32, 64, 8, 3),
              Tiles(64, 64, 8, 3), Tiles(16, 64, 4, 3), Tiles(32, 128, 8, 3)]
DQ_TILES = [Tiles(64, 32, 4, 3), Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 4), Tiles(128, 32, 8, 3),
            Tiles(64, 64, 8, 3), Tiles(32, 32, 4, 3)]
# Triton's CPU interpreter (tests): small blocks, its cost grows with the tile.
_INTERPRET_TILES = {"fwd": Tiles(32, 16, 4, 1), "dkdv": Tiles(16, 32, 4, 1), "dq": Tiles(32, 16, 4, 1)}
_LOG2E = 1.4426950408889634


def supported_head_dim(d: int) -> bool:
    return 16 <= d <= 128 and not d & (d - 1)


@triton.jit
def _query_block(CU, BLOCK_M: tl.constexpr):
    """-> (sequence start, its length, this program's first query row): the longest causal rows launch first."""
    b = tl.program_id(1)
    start = tl.load(CU + b).to(tl.int64)
    n = (tl.load(CU + b + 1) - start).to(tl.int32)
    return start, n, (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M


@triton.jit
def _key_spans(m0, n, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """-> (end of the unmasked key blocks, end of the masked ones) for the query block at m0. Causal: every block
    left of the diagonal is whole (block_m % block_n == 0), the diagonal's are masked; full: the last partial one."""
    if CAUSAL:
        return m0, tl.minimum(m0 + BLOCK_M, n)
    return (n // BLOCK_N) * BLOCK_N, n


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, rows, cols0, n, qk_scale, skt, svt,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    for s in range(lo, hi, BLOCK_N):
        cols = s + cols0
        if MASKED:
            k = tl.load(k_ptrs + s * skt, mask=(cols < n)[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs + s * skt)
        x = tl.dot(q, k, input_precision=PREC) * qk_scale
        if MASKED:
            ok = (cols < n)[None, :]
            if CAUSAL:
                ok = ok & (rows[:, None] >= cols[None, :])
            x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        p = tl.math.exp2(x - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs + s * svt, mask=(cols < n)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + s * svt)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, qk_scale, T_total, sqt, sqh, skt, skh, svt, svh, sot, soh,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    h = tl.program_id(2)
    start, n, m0 = _query_block(CU, BLOCK_M)
    if m0 < n:
        kh = h // GROUP
        rows = m0 + tl.arange(0, BLOCK_M)
        cols0 = tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        row_ok = rows < n
        q = tl.load(Q + (start + rows)[:, None] * sqt + h * sqh + d[None, :], mask=row_ok[:, None], other=0.0)
        k_ptrs = K + start * skt + kh * skh + cols0[None, :] * skt + d[:, None]  # K^T tile [D, BLOCK_N]
        v_ptrs = V + start * svt + kh * svh + cols0[:, None] * svt + d[None, :]  # [BLOCK_N, D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full_end, end = _key_spans(m0, n, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_end, rows, cols0, n, qk_scale, skt,
                                    svt, CAUSAL, False, BLOCK_N, PREC)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_end, end, rows, cols0, n, qk_scale,
                                    skt, svt, CAUSAL, True, BLOCK_N, PREC)
        o = acc / l_i[:, None]
        tl.store(O + (start + rows)[:, None] * sot + h * soh + d[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(LSE + h * T_total + start + rows, m_i + tl.math.log2(l_i), mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(o * do), then dk / dv per kv block, then dq per query block
# --------------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, DELTA, T_total, sot, soh, sdot, sdoh, D: tl.constexpr, BLOCK: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    ok = (rows < T_total)[:, None]
    o = tl.load(O + rows[:, None] * sot + h * soh + d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * sdot + h * sdoh + d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + h * T_total + rows, tl.sum(o * do, 1), mask=rows < T_total)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lo, hi, rows0, cols, n, qk_scale, sqt, sdot,
                 CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    for s in range(lo, hi, BLOCK_M):
        rows = s + rows0
        if MASKED:
            ok = rows < n
            qT = tl.load(q_ptrs + s * sqt, mask=ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + rows, mask=ok, other=float("inf"))  # (p = 0 on rows past the sequence)
        else:
            qT = tl.load(q_ptrs + s * sqt)
            lse = tl.load(lse_ptr + rows)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - lse[None, :])
        if MASKED:
            if CAUSAL:
                pT = tl.where(rows[None, :] >= cols[:, None], pT, 0.0)
            do = tl.load(do_ptrs + s * sdot, mask=ok[:, None], other=0.0)
            delta = tl.load(delta_ptr + rows, mask=ok, other=0.0)
        else:
            do = tl.load(do_ptrs + s * sdot)
            delta = tl.load(delta_ptr + rows)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, qk_scale, sm_scale, T_total, sqt, sqh, skt, skh, svt, svh,
                 sdot, sdoh, sdkt, sdkh, sdvt, sdvh, GROUP: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(1)
    kh = tl.program_id(2)
    start = tl.load(CU + b).to(tl.int64)
    n = (tl.load(CU + b + 1) - start).to(tl.int32)
    n0 = tl.program_id(0) * BLOCK_N
    if n0 < n:
        cols = n0 + tl.arange(0, BLOCK_N)
        rows0 = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        col_ok = (cols < n)[:, None]
        k = tl.load(K + (start + cols)[:, None] * skt + kh * skh + d[None, :], mask=col_ok, other=0.0)
        v = tl.load(V + (start + cols)[:, None] * svt + kh * svh + d[None, :], mask=col_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        if CAUSAL:  # query rows from the diagonal on: the diagonal blocks masked, the ones below whole
            diag_end = tl.minimum(n0 + BLOCK_N, n)
            lo = diag_end
        else:
            diag_end = 0
            lo = 0
        full_end = lo + ((n - lo) // BLOCK_M) * BLOCK_M
        for g in range(GROUP):
            h = kh * GROUP + g
            q_ptrs = Q + start * sqt + h * sqh + rows0[None, :] * sqt + d[:, None]  # Q^T tile [D, BLOCK_M]
            do_ptrs = DO + start * sdot + h * sdoh + rows0[:, None] * sdot + d[None, :]
            lse_ptr = LSE + h * T_total + start
            delta_ptr = DELTA + h * T_total + start
            if CAUSAL:
                dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, n0, diag_end, rows0, cols,
                                      n, qk_scale, sqt, sdot, CAUSAL, True, BLOCK_M, PREC)
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lo, full_end, rows0, cols, n,
                                  qk_scale, sqt, sdot, CAUSAL, False, BLOCK_M, PREC)
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, full_end, n, rows0, cols, n,
                                  qk_scale, sqt, sdot, False, True, BLOCK_M, PREC)
        tl.store(DK + (start + cols)[:, None] * sdkt + kh * sdkh + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=col_ok)
        tl.store(DV + (start + cols)[:, None] * sdvt + kh * sdvh + d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, lo, hi, rows, cols0, n, qk_scale, skt, svt,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    for s in range(lo, hi, BLOCK_N):
        cols = s + cols0
        if MASKED:
            kT = tl.load(k_ptrs + s * skt, mask=(cols < n)[None, :], other=0.0)
            vT = tl.load(v_ptrs + s * svt, mask=(cols < n)[None, :], other=0.0)
        else:
            kT = tl.load(k_ptrs + s * skt)
            vT = tl.load(v_ptrs + s * svt)
        p = tl.math.exp2(tl.dot(q, kT, input_precision=PREC) * qk_scale - lse[:, None])
        if MASKED:
            ok = (cols < n)[None, :]
            if CAUSAL:
                ok = ok & (rows[:, None] >= cols[None, :])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, qk_scale, sm_scale, T_total, sqt, sqh, skt, skh, svt, svh, sdot,
               sdoh, sdqt, sdqh, GROUP: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    h = tl.program_id(2)
    start, n, m0 = _query_block(CU, BLOCK_M)
    if m0 < n:
        kh = h // GROUP
        rows = m0 + tl.arange(0, BLOCK_M)
        cols0 = tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        row_ok = rows < n
        q = tl.load(Q + (start + rows)[:, None] * sqt + h * sqh + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + (start + rows)[:, None] * sdot + h * sdoh + d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + h * T_total + start + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h * T_total + start + rows, mask=row_ok, other=0.0)
        k_ptrs = K + start * skt + kh * skh + cols0[None, :] * skt + d[:, None]  # K^T tile [D, BLOCK_N]
        v_ptrs = V + start * svt + kh * svh + cols0[None, :] * svt + d[:, None]
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        full_end, end = _key_spans(m0, n, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, 0, full_end, rows, cols0, n, qk_scale, skt, svt,
                        CAUSAL, False, BLOCK_N, PREC)
        dq = _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, full_end, end, rows, cols0, n, qk_scale, skt, svt,
                        CAUSAL, True, BLOCK_N, PREC)
        tl.store(DQ + (start + rows)[:, None] * sdqt + h * sdqh + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# Launchers, custom ops, autograd
# --------------------------------------------------------------------------------------------------
def _tiles(kernel: str, table: list[Tiles], tiles: Tiles | None) -> Tiles:
    return _INTERPRET_TILES[kernel] if INTERPRET else (tiles or table[0])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"flash_attention wants q [T, Hq, D], k / v [T, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if not supported_head_dim(q.shape[2]):
        raise ValueError(f"flash_attention takes head dims 16, 32, 64, 128; got {q.shape[2]}")


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prec(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None  # (exact fp32 products; bf16 / fp16 take the default)


def forward(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, tiles: Tiles | None = None):
    """-> (out [T, Hq, D] in q's dtype, lse [Hq, T] fp32 in log2 units of the scaled scores)."""
    _check(q, k, v)
    q, k, v = (_inner_contiguous(t) for t in (q, k, v))
    T, Hq, D = q.shape
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    t = _tiles("fwd", FWD_TILES, tiles)
    sm_scale = 1.0 / math.sqrt(D)
    grid = (triton.cdiv(max_seqlen, t.block_m), cu_seqlens.numel() - 1, Hq)
    _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens, sm_scale * _LOG2E, T, q.stride(0), q.stride(1), k.stride(0),
                      k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                      GROUP=Hq // k.shape[1], CAUSAL=causal, D=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                      PREC=_prec(q.dtype), num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool,
             dkdv_tiles: Tiles | None = None, dq_tiles: Tiles | None = None):
    """-> (dq, dk, dv), each contiguous in its input's shape and dtype."""
    q, k, v, out, dout = (_inner_contiguous(t) for t in (q, k, v, out, dout))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)
    if T == 0:
        return dq, dk, dv
    B = cu_seqlens.numel() - 1
    sm_scale = 1.0 / math.sqrt(D)
    prec = _prec(q.dtype)
    delta = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    block = 32 if INTERPRET else 64
    _delta_kernel[(triton.cdiv(T, block), Hq)](out, dout, delta, T, out.stride(0), out.stride(1), dout.stride(0),
                                               dout.stride(1), D=D, BLOCK=block)
    t = _tiles("dkdv", DKDV_TILES, dkdv_tiles)
    _dkdv_kernel[(triton.cdiv(max_seqlen, t.block_n), B, Hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, sm_scale * _LOG2E, sm_scale, T, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dk.stride(0),
        dk.stride(1), dv.stride(0), dv.stride(1), GROUP=Hq // Hkv, CAUSAL=causal, D=D, BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, PREC=prec, num_warps=t.num_warps, num_stages=t.num_stages)
    t = _tiles("dq", DQ_TILES, dq_tiles)
    _dq_kernel[(triton.cdiv(max_seqlen, t.block_m), B, Hq)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, sm_scale * _LOG2E, sm_scale, T, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dq.stride(0),
        dq.stride(1), GROUP=Hq // Hkv, CAUSAL=causal, D=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, PREC=prec,
        num_warps=t.num_warps, num_stages=t.num_stages)
    return dq, dk, dv


@torch.library.custom_op("sail_dist::flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, v, cu_seqlens, max_seqlen, causal)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("sail_dist::flash_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal = max_seqlen, causal


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same two ops for eager code without the custom-op dispatcher's host cost per call."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal):
        out, lse = forward(q, k, v, cu_seqlens, max_seqlen, causal)
        _setup_context(ctx, (q, k, v, cu_seqlens, max_seqlen, causal), (out, lse))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = backward(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                    causal: bool) -> torch.Tensor:
    """Attention of each packed sequence [cu_seqlens[i], cu_seqlens[i+1]) over itself (causal or full), softmax
    scale 1/sqrt(D); differentiable in q, k, v. cu_seqlens int32 on q's device; max_seqlen >= every length."""
    if torch.compiler.is_compiling():
        return _fwd_op(q, k, v, cu_seqlens, max_seqlen, causal)[0]
    return _Eager.apply(q, k, v, cu_seqlens, max_seqlen, causal)
