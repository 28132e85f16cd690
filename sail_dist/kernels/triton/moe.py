"""Fused MoE experts in Triton: grouped GEMMs over expert-sorted tokens, forward and backward.

Computes the OpSet's `moe_experts` (see sail_dist/kernels/opset.py):

    y[t] = sum_j topk_weight[t, j] * swiglu(x[t] @ w_gate_up[e]) @ w_down[e],   e = topk_idx[t, j]

Every launcher takes the `KernelConfig` (`backend.kernels`; its table is in docs/gpu.md) as `opts`: its
defaults are the measured-fastest paths (figures in BENCHMARKS.md, "MoE experts"), each switch turned off
keeps the slower path beside it for comparison and tests.

Layout. The M = T*K (token, slot) pairs are sorted by expert ("rows"); expert e owns the contiguous rows
offsets[e]:offsets[e+1]. After the torch sort, one kernel (`route_weights`, `moe_fused_route`) writes the
rest of the routing, the routing weight of each row and the sort's inverse, in place of ~8 torch launches
(at these sizes their cost is launch time). The Triton kernels read x / dy through the row -> token index
(`tok_M`) inside their A-operand loads (the permute's gather). Where torch._grouped_mm (CUTLASS on Hopper)
runs a GEMM faster than our Triton kernel, that GEMM goes to it (`moe_grouped_mm`): it needs its operands in
sorted rows, so x / dy are gathered once (`gather_rows`, a Triton row copy that keeps the source rows in L2,
`moe_gather_kernel`), and its per-row outputs are combined back into tokens by a gather-sum through the
sort's inverse (`inverse_rows`; fixed slot order: deterministic, no atomics).

Forward:
  1. gate_up (Triton):  h_M2F = x[tok] @ w_gate_up[e]   epilogue: act_MF = silu(gate) * up  (h kept for bwd)
  2. down (grouped_mm): y_MH = act @ w_down[e]; y[t] = sum_k w[t, k] * y_MH[inv[t*K + k]]
Backward (dy_MH = dy[tok] gathered once):
  3. down dgrad:  g_MF = dy_MH @ w_down[e]^T (grouped_mm), then the SwiGLU backward (one elementwise Triton
                  pass): d_weight[r] = sum_f g * act, dh = swiglu'(h) * (w_r * g), and act_s = w_r * act
                  (act recomputed from h) for step 6. (Folded into the GEMM's epilogue it spilled
                  registers and lost: BENCHMARKS.md.)
  4. gate_up dgrad (grouped_mm): dx_MH = dh @ w_gate_up[e]^T, then dx[t] = sum_k dx_MH[inv[t*K + k]]
  5. dW_gate_up[e] = x[tok_e]^T @ dh_e      (grouped_mm, the 2-D x 2-D form: reduction over e's rows)
  6. dW_down[e]    = act_s_e^T @ dy_MH_e    (likewise)
grouped_mm beat our Triton kernel on each of 2-6 alone. Without grouped_mm (operand strides it rejects: a
dimension that is not a multiple of 16 bytes), or with `moe_grouped_mm` off, every step runs in Triton: 2 and
4 then scatter their rows straight into the [T*K, H] (token, slot) layout through `pos_M` and the combine is a
contiguous `view(T, K, H).sum(1)`, and 5-6 run in `_grouped_wgrad_kernel` on the gathered rows.

The gate_up kernel loads its weight tiles through a TMA descriptor on Hopper and newer (`moe_weight_tma`; the
gathered x rows stay on pointer loads: Hopper's TMA has no row gather).

Scheduling. The row-tiled Triton kernels (1-4) find their expert inside the kernel from the offsets (a
cumsum of ceil(count / BLOCK_M) over experts), so the schedule needs no host sync and follows the autotuned BLOCK_M;
the grid is the static bound cdiv(M, BLOCK_M) + E tiles and surplus programs return at once. Tiles are
visited GROUP_M row tiles at a time across all column tiles (the L2 swizzle of Triton's matmul tutorial):
with the few-experts shape a weight matrix is far larger than L2, and visiting row tiles one by one
re-read it from HBM per row tile. Empty experts cost nothing in 1-4 and get zero weight gradients in 5-6
(torch._grouped_mm writes zeros for an empty group on Hopper: the CUDA test checks it). All accumulation is
fp32; inputs may be bf16/fp16 (production) or fp32 (tests: the dots then run in IEEE fp32, not tf32). Every
kernel writes each element of its output exactly once, so autotuning (which reruns kernels) cannot leave
stale values behind. Each autotuned kernel exists twice, autotuned and fixed at its first config
(`moe_autotune`), and each launch picks one.

Under TRITON_INTERPRET=1 (CPU CI) every kernel uses one small fixed tile config and pointer loads (the TMA
path is checked on the GPU: tests/test_triton_moe.py's bf16 and weight-TMA tests and the benchmark's poisoned
checks).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from sail_dist.config import KernelConfig
from sail_dist.kernels.triton import interpreting
from sail_dist.kernels.triton.moe_routing import Routing, route, sort_by_expert

__all__ = ["MoEExpertsFunction", "Routing", "moe_experts", "poison_outputs", "route"]

# Whether this module's kernels were defined for Triton's CPU interpreter (fixed when they are defined;
# the interpreter also needs TRITON_INTERPRET=1 while they run).
INTERPRET = interpreting()


# --------------------------------------------------------------------------------------------------
# Tile configs. Kept small on purpose: every config is a compile (seconds) plus a benchmark per key;
# candidates that never won a benchmark were dropped (BENCHMARKS.md, "MoE experts").
# --------------------------------------------------------------------------------------------------
def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


@dataclass(frozen=True)
class _Tuned:
    """One kernel twice: autotuned over its candidate configs, and fixed at the first of them (no benchmark
    runs, one compile per kernel: quick GPU tests). `KernelConfig.moe_autotune` picks one per launch."""

    autotuned: Autotuner
    fixed: Autotuner

    def select(self, opts: KernelConfig) -> Autotuner:
        return self.autotuned if opts.moe_autotune else self.fixed


def _tuned(configs: list[triton.Config], key: list[str]) -> Callable[[Callable], _Tuned]:
    if INTERPRET:
        configs = [_cfg(16, 16, 16, 1, 1)]
    return lambda fn: _Tuned(triton.autotune(configs=configs, key=key)(fn),
                             triton.autotune(configs=configs[:1], key=key)(fn))


# The first config of each list is the `moe_autotune: false` one and is also the fp32 (test) workhorse on
# a GPU: keep it at most 128x128 (a 128x256 fp32 IEEE tile takes minutes to compile).
# Row-tiled GEMMs: BLOCK_M rows x BLOCK_N output columns; K = the hidden (or FFN) dim.
_ROW_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
]
# The gate_up kernel carries two accumulators (gate and up columns), so BLOCK_N is per half. 64-row tiles
# (less padding in each expert's last tile) lost to 128 rows.
_GATE_UP_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 32, 8, 5),
]
# Weight gradients: BLOCK_M x BLOCK_N of one expert's [MO, NO] gradient; K = that expert's rows.
_WGRAD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
]
GROUP_M = 8  # row tiles visited together (L2 reuse of the weight tiles)

_EVEN = {
    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
}


# --------------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """acc += a @ b. DOT_PREC "upcast" (interpreter only) feeds fp32 copies: Triton's CPU interpreter
    multiplies bf16 operands as their raw 16-bit integers; bf16 -> fp32 is exact, so results match."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP tile rows at a time across all tile columns."""
    width = GROUP * num_n
    group = pid // width
    first_m = group * GROUP
    size_m = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _row_tile_schedule(M, N, offsets_ptr, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """This program's (expert, first row, end row, column tile) with row tiles laid out expert after
    expert: tiles_e = ceil(count_e / BLOCK_M); a tile belongs to the first expert whose inclusive
    cumulative tile count exceeds its index (empty experts own none). Surplus tiles get no rows."""
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M) + E
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP)
    e_idx = tl.arange(0, E_PAD)
    starts = tl.load(offsets_ptr + e_idx, mask=e_idx < E, other=0)
    ends = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < E, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    tiles_before = tl.sum(tl.where(e_idx < expert, tiles, 0), 0)
    valid = expert < E
    expert = tl.minimum(expert, E - 1)
    row_start = tl.load(offsets_ptr + expert) + (pid_m - tiles_before) * BLOCK_M
    row_end = tl.load(offsets_ptr + expert + 1)
    row_end = tl.where(valid, row_end, row_start)
    return expert, row_start, row_end, pid_n


@triton.jit
def _gathered_tile_matmul(a_ptr, src, stride_am, w_ptr, expert, stride_we, stride_wk, stride_wn, offs_n_ld, K,
                          DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of A[src] @ W[expert] (rows of A gathered by `src`, W addressed through its
    strides so a transposed view needs no copy); the K loop shared by the grouped GEMM kernels."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + offs_k[None, :]
    b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n_ld[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _dot(a, b, acc, DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    return acc


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@_tuned(_GATE_UP_CONFIGS, key=["N", "K", "W_TMA"])
@triton.heuristics(_EVEN)
@triton.jit
def _gate_up_swiglu_fwd_kernel(
    x_ptr, w_ptr, h_ptr, act_ptr, tok_ptr, offsets_ptr,
    M, N, K,  # N = F (columns per half), K = hidden
    stride_xm, stride_we, stride_wk, stride_wn, stride_hm, stride_am,
    E: tl.constexpr, E_PAD: tl.constexpr, GROUP: tl.constexpr, DOT_PREC: tl.constexpr, W_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """h[r] = x[tok[r]] @ w[e] (gate columns n and up columns N + n in one program) and
    act[r, n] = silu(gate) * up, both from the rounded h so backward recomputes exactly this act.
    W_TMA: the weight tiles come through a TMA descriptor over w viewed as [E*K, 2N] (contiguous w, and
    K, N multiples of the tile: a box never crosses into the next expert or the other half)."""
    expert, row_start, row_end, pid_n = _row_tile_schedule(M, N, offsets_ptr, E, E_PAD, BLOCK_M, BLOCK_N, GROUP)
    if row_start >= row_end:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    # Clamp instead of masking: surplus rows re-read a valid row, are computed and never stored, which
    # keeps masks out of the inner loop.
    src = tl.load(tok_ptr + tl.minimum(rows, row_end - 1)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if EVEN_N:
        offs_n_ld = offs_n
    else:  # (a where() loses the contiguity the vectorised loads need: only on ragged shapes)
        offs_n_ld = tl.where(n_mask, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + src[:, None] * stride_xm + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    bg_ptrs = w_base + offs_k[:, None] * stride_wk + offs_n_ld[None, :] * stride_wn
    bu_ptrs = bg_ptrs + N * stride_wn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * K, 2 * N], strides=[2 * N, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
        w_row = expert * K
        n0 = pid_n * BLOCK_N
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if W_TMA:
            a = tl.load(a_ptrs)
            bg = w_desc.load([w_row + k * BLOCK_K, n0])
            bu = w_desc.load([w_row + k * BLOCK_K, N + n0])
        elif EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(bg_ptrs)
            bu = tl.load(bu_ptrs)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            bg = tl.load(bg_ptrs, mask=k_mask[:, None], other=0.0)
            bu = tl.load(bu_ptrs, mask=k_mask[:, None], other=0.0)
        acc_g = _dot(a, bg, acc_g, DOT_PREC)
        acc_u = _dot(a, bu, acc_u, DOT_PREC)
        a_ptrs += BLOCK_K
        bg_ptrs += BLOCK_K * stride_wk
        bu_ptrs += BLOCK_K * stride_wk

    g = acc_g.to(h_ptr.dtype.element_ty)
    u = acc_u.to(h_ptr.dtype.element_ty)
    mask = row_mask[:, None] & n_mask[None, :]
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, g, mask=mask)
    tl.store(h_ptrs + N, u, mask=mask)
    gf = g.to(tl.float32)
    act = gf * tl.sigmoid(gf) * u.to(tl.float32)
    tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :],
             act.to(act_ptr.dtype.element_ty), mask=mask)


@_tuned(_ROW_CONFIGS, key=["N", "K"])
@triton.heuristics(_EVEN)
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, scale_ptr, a_idx_ptr, out_idx_ptr, offsets_ptr,
    M, N, K,
    stride_am, stride_we, stride_wk, stride_wn, stride_om,
    E: tl.constexpr, E_PAD: tl.constexpr, GROUP: tl.constexpr, GATHER_A: tl.constexpr,
    SCATTER_OUT: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out[o(r)] = scale[r] * (a[i(r)] @ W[e]) for the expert-sorted rows r, where i(r) = a_idx[r] when
    GATHER_A (else r) and o(r) = out_idx[r] when SCATTER_OUT (else r).

    W[e] is addressed through (stride_wk, stride_wn), so one kernel runs the forward down GEMM
    (W = w_down[e]), the backward gate_up dgrad (W = w_gate_up[e]^T) and the down dgrad
    (W = w_down[e]^T, A = dy gathered)."""
    expert, row_start, row_end, pid_n = _row_tile_schedule(M, N, offsets_ptr, E, E_PAD, BLOCK_M, BLOCK_N, GROUP)
    if row_start >= row_end:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows_ld = tl.minimum(rows, row_end - 1).to(tl.int64)
    if GATHER_A:
        src = tl.load(a_idx_ptr + rows_ld).to(tl.int64)
    else:
        src = rows_ld
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if EVEN_N:
        offs_n_ld = offs_n
    else:
        offs_n_ld = tl.where(n_mask, offs_n, 0)

    acc = _gathered_tile_matmul(a_ptr, src, stride_am, w_ptr, expert, stride_we, stride_wk, stride_wn, offs_n_ld,
                                K, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)

    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows_ld).to(tl.float32)
        acc = acc * scale[:, None]
    if SCATTER_OUT:
        dst = tl.load(out_idx_ptr + rows_ld).to(tl.int64)
    else:
        dst = rows.to(tl.int64)
    tl.store(out_ptr + dst[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _swiglu_bwd_kernel(
    g_ptr, h_ptr, scale_ptr, dh_ptr, act_ptr, dscale_ptr,
    M, F, stride_gm, stride_hm, stride_dhm, stride_am,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """The elementwise half of step 3, one pass over rows: from g = dy[tok] @ w_down^T and
    h, write act_s = scale * act, dh and the full-row d_scale (no partials)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    scale = tl.load(scale_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    d_scale = tl.zeros((BLOCK_R,), tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_mask[:, None] & (cols < F)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act_lp = (silu * up).to(act_ptr.dtype.element_ty).to(tl.float32)
        tl.store(act_ptr + rows64[:, None] * stride_am + cols[None, :],
                 (act_lp * scale[:, None]).to(act_ptr.dtype.element_ty), mask=mask)
        d_scale += tl.sum(g * act_lp, 1)
        d_act = g * scale[:, None]
        dh_ptrs = dh_ptr + rows64[:, None] * stride_dhm + cols[None, :]
        tl.store(dh_ptrs + F, (d_act * silu).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptrs, (d_act * up * sig * (1.0 + gate * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dscale_ptr + rows64, d_scale, mask=row_mask)


@_tuned(_WGRAD_CONFIGS, key=["MO", "NO"])
@triton.heuristics({"EVEN_MO": lambda a: a["MO"] % a["BLOCK_M"] == 0,
                    "EVEN_NO": lambda a: a["NO"] % a["BLOCK_N"] == 0})
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, dw_ptr, a_idx_ptr, b_idx_ptr, offsets_ptr,
    MO, NO,  # dW[e] is [MO, NO]: MO = columns of a, NO = columns of b
    stride_am, stride_bm, stride_we, stride_wk,
    GROUP: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_MO: tl.constexpr,
    EVEN_NO: tl.constexpr,
):
    """dW[e] = A[rows_e]^T @ B[rows_e], the reduction running over expert e's rows.

    A (and/or B) rows may be read through an index (x[tok], dy[tok]). One program per (expert, output
    tile), experts outermost so one expert's rows stay in L2; an empty expert writes its zero gradient."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(MO, BLOCK_M)
    tiles_n = tl.cdiv(NO, BLOCK_N)
    expert = pid // (tiles_m * tiles_n)
    pid_m, pid_n = _swizzle(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP)
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < MO
    n_mask = offs_n < NO
    # (a where() loses the contiguity the vectorised loads need: only ragged shapes pay for it)
    if EVEN_MO:
        offs_m_ld = offs_m
    else:
        offs_m_ld = tl.where(m_mask, offs_m, 0)
    if EVEN_NO:
        offs_n_ld = offs_n
    else:
        offs_n_ld = tl.where(n_mask, offs_n, 0)
    offs_r = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + offs_r
        r_mask = rows < row_end
        rows_ld = tl.minimum(rows, row_end - 1)
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + rows_ld).to(tl.int64)
        else:
            a_rows = rows_ld.to(tl.int64)
        if GATHER_B:
            b_rows = tl.load(b_idx_ptr + rows_ld).to(tl.int64)
        else:
            b_rows = rows_ld.to(tl.int64)
        # A^T tile [BLOCK_M, BLOCK_K]: contiguous along the output's M dim.
        a = tl.load(a_ptr + a_rows[None, :] * stride_am + offs_m_ld[:, None], mask=r_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + offs_n_ld[None, :], mask=r_mask[:, None], other=0.0)
        acc = _dot(a, b, acc, DOT_PREC)

    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_we + offs_m.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gather_sum_kernel(src_ptr, row_ptr, scale_ptr, out_ptr, N, stride_sm, stride_om,
                       K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum_k scale[t*K + k] * src[row[t*K + k]] (fp32, slots in order: deterministic): the
    combine when the per-row results are in expert-sorted order (row = the sort's inverse)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k in tl.static_range(K):
        row = tl.load(row_ptr + t * K + k).to(tl.int64)
        v = tl.load(src_ptr + row * stride_sm + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + t * K + k).to(tl.float32)
        acc += v
    tl.store(out_ptr + t * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, M, N, stride_sm, stride_om,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r] = src[idx[r]]: the permute's row gather. Source rows are read K times each, so they are
    kept in L2 (evict_last) and the once-written output streams past it (.cs)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        m = rmask[:, None] & (cols < N)[None, :]
        v = tl.load(src_ptr + src[:, None] * stride_sm + cols[None, :], mask=m, eviction_policy="evict_last")
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], v, mask=m, cache_modifier=".cs")


@triton.jit
def _route_rows_kernel(expert_ptr, perm_ptr, weight_ptr, expert_out, pos_out, tok_out, scale_out, inv_out,
                       offsets_out, M, E, log_m, K: tl.constexpr, BLOCK: tl.constexpr):
    """Everything the kernels need from the expert sort, in one launch. Programs below cdiv(M, BLOCK) map
    sorted rows: expert (int32), pos = perm, tok = perm // K, scale = weight[perm], inv[perm] = row; the
    last program finds offsets[e] = lower_bound(sorted experts, e) for e in [0, E] (binary search,
    log_m = bit length of M steps)."""
    pid = tl.program_id(0)
    if pid < tl.cdiv(M, BLOCK):
        i = pid * BLOCK + tl.arange(0, BLOCK)
        m = i < M
        p = tl.load(perm_ptr + i, mask=m, other=0)
        tl.store(expert_out + i, tl.load(expert_ptr + i, mask=m, other=0).to(tl.int32), mask=m)
        tl.store(pos_out + i, p.to(tl.int32), mask=m)
        tl.store(tok_out + i, (p // K).to(tl.int32), mask=m)
        tl.store(scale_out + i, tl.load(weight_ptr + p, mask=m), mask=m)
        tl.store(inv_out + p, i.to(tl.int32), mask=m)
    else:
        for e0 in range(0, E + 1, BLOCK):
            e = e0 + tl.arange(0, BLOCK)
            lo = tl.zeros([BLOCK], tl.int32)
            hi = tl.zeros([BLOCK], tl.int32) + M
            for _ in range(log_m):
                active = lo < hi
                mid = (lo + hi) // 2
                v = tl.load(expert_ptr + mid, mask=active, other=0).to(tl.int32)
                right = active & (v < e)
                lo = tl.where(right, mid + 1, lo)
                hi = tl.where(active & (v >= e), mid, hi)
            tl.store(offsets_out + e, lo, mask=e <= E)


# --------------------------------------------------------------------------------------------------
# Output poisoning (tests, benchmark): buffers the kernels must fully write start as NaN.
# --------------------------------------------------------------------------------------------------
_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within this context every buffer a kernel must fully overwrite is NaN-filled before the launch,
    so an element a kernel forgot to write shows up as NaN in the result instead of stale memory."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def _out(shape, dtype, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# Launchers (each returns what its kernel writes; public for the benchmark's per-stage breakdown)
# --------------------------------------------------------------------------------------------------
def _dot_prec(dtype: torch.dtype) -> str:
    if INTERPRET:
        return "upcast"
    # fp32 inputs are the test path: keep them exact rather than tf32 (ignored for 16-bit inputs).
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_grid(M: int, E: int, N: int):
    return lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)


def _common(r: Routing, dtype) -> dict:
    E = r.num_experts
    return dict(E=E, E_PAD=triton.next_power_of_2(E), GROUP=GROUP_M, DOT_PREC=_dot_prec(dtype))


_TMA_TILES = (128, 64)  # every gate_up config's BLOCK_N and BLOCK_K divide these


def _w_tma_ok(w_EHF2: torch.Tensor, opts: KernelConfig) -> bool:
    """TMA for the gate_up weights: switched on, a device that has it, contiguous bf16/fp16 w with
    tile-aligned H and F."""
    if not (opts.moe_weight_tma and w_EHF2.is_cuda and not INTERPRET and w_EHF2.is_contiguous()
            and w_EHF2.dtype in (torch.bfloat16, torch.float16)):
        return False
    E, H, F2 = w_EHF2.shape
    if (F2 // 2) % _TMA_TILES[0] or H % _TMA_TILES[1]:
        return False
    return _tma_device(w_EHF2.device.index if w_EHF2.device.index is not None else torch.cuda.current_device())


@functools.cache
def _tma_device(index: int) -> bool:
    """Whether device `index` runs in-kernel TMA descriptors (Hopper or newer, a Triton that has them); the
    first yes also sets the global scratch allocator those descriptors need. Asked once per device."""
    if torch.cuda.get_device_capability(index)[0] < 9 or not hasattr(tl, "make_tensor_descriptor"):
        return False
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    return True


def gate_up_fwd(x_TH, w_EHF2, r: Routing, opts: KernelConfig):
    """-> (h_M2F pre-activation, act_MF = swiglu(h)); rows in expert-sorted order."""
    E, H, F2 = w_EHF2.shape
    F, M = F2 // 2, r.num_rows
    h_MF2 = _out((M, F2), x_TH.dtype, x_TH.device)
    act_MF = _out((M, F), x_TH.dtype, x_TH.device)
    if M:
        _gate_up_swiglu_fwd_kernel.select(opts)[_row_grid(M, E, F)](
            x_TH, w_EHF2, h_MF2, act_MF, r.tok_M, r.offsets_E1, M, F, H,
            x_TH.stride(0), w_EHF2.stride(0), w_EHF2.stride(1), w_EHF2.stride(2), h_MF2.stride(0),
            act_MF.stride(0), W_TMA=_w_tma_ok(w_EHF2, opts), **_common(r, x_TH.dtype))
    return h_MF2, act_MF


def grouped_gemm(a, w_EKN, r: Routing, out_rows: int, opts: KernelConfig, scale_M=None, transpose_w=False,
                 gather_a=False, scatter_out=False):
    """out[o(r)] = scale[r] * a[i(r)] @ W[e], W = w_EKN[e] ([K, N]) or w_EKN[e]^T when transpose_w (then
    w_EKN is [E, N, K]); i(r) = tok[r] if gather_a else r; o(r) = pos[r] if scatter_out else r."""
    K = a.shape[1]
    E, M = w_EKN.shape[0], r.num_rows
    if transpose_w:
        N, s_wk, s_wn = w_EKN.shape[1], w_EKN.stride(2), w_EKN.stride(1)
    else:
        N, s_wk, s_wn = w_EKN.shape[2], w_EKN.stride(1), w_EKN.stride(2)
    out = _out((out_rows, N), a.dtype, a.device)
    if M:
        _grouped_gemm_kernel.select(opts)[_row_grid(M, E, N)](
            a, w_EKN, out, scale_M if scale_M is not None else a, r.tok_M, r.pos_M, r.offsets_E1,
            M, N, K, a.stride(0), w_EKN.stride(0), s_wk, s_wn, out.stride(0),
            GATHER_A=gather_a, SCATTER_OUT=scatter_out, HAS_SCALE=scale_M is not None, **_common(r, a.dtype))
    return out


def down_dgrad(dy_TH, w_EFH, h_MF2, scale_M, r: Routing, opts: KernelConfig, dy_MH=None):
    """Step 3: the grouped GEMM g = dy[tok] @ w_down^T (torch._grouped_mm on dy_MH = dy[tok] when given and
    it applies, else our Triton kernel) plus one elementwise SwiGLU-backward pass
    -> (dh_M2F, act_s_MF = scale * act, d_scale_M fp32)."""
    F, M = w_EFH.shape[1], r.num_rows
    if dy_MH is not None and opts.moe_grouped_mm and _gmm_ok(dy_MH, w_EFH.transpose(1, 2)):
        g_MF = _gmm(dy_MH, w_EFH.transpose(1, 2), r)
    else:
        g_MF = grouped_gemm(dy_TH, w_EFH, r, M, opts, transpose_w=True, gather_a=True)
    dh_MF2 = _out((M, 2 * F), dy_TH.dtype, dy_TH.device)
    act_MF = _out((M, F), dy_TH.dtype, dy_TH.device)
    dscale_M = _out((M,), torch.float32, dy_TH.device)
    if M:
        block_r = 16
        _swiglu_bwd_kernel[(triton.cdiv(M, block_r),)](
            g_MF, h_MF2, scale_M, dh_MF2, act_MF, dscale_M, M, F, g_MF.stride(0), h_MF2.stride(0),
            dh_MF2.stride(0), act_MF.stride(0), BLOCK_R=block_r, BLOCK_F=16 if INTERPRET else 256,
            num_warps=4)
    return dh_MF2, act_MF, dscale_M


# --------------------------------------------------------------------------------------------------
# torch._grouped_mm (CUTLASS on Hopper) for the GEMMs where it beats ours
# --------------------------------------------------------------------------------------------------
def _gmm_ok(*mats) -> bool:
    """Whether torch._grouped_mm takes these operands on its fast path: bf16 on CUDA (other dtypes there go
    to a per-group loop with a host sync; on CPU, under the interpreter tests, every dtype is taken), a
    16-byte-aligned base, one unit stride and the other a multiple of 16 bytes."""
    for m in mats:
        if m.is_cuda and m.dtype != torch.bfloat16:
            return False
        es, (s0, s1) = m.element_size(), m.stride()[-2:]
        if m.data_ptr() % 16 or not ((s1 == 1 and s0 * es % 16 == 0) or (s0 == 1 and s1 * es % 16 == 0)):
            return False
    return True


def _gmm(a, b, r: Routing):
    """torch._grouped_mm over the expert groups of the sorted rows (a 2-D: rows = the groups' M; a and b
    2-D: a = X^T, the groups run along the reduction). Group sizes need no alignment here: rows are
    row-major operands or the reduction of a transposed one, which CUTLASS addresses without TMA
    realignment (torch checks only the other layouts)."""
    return torch._grouped_mm(a, b, offs=r.offsets_E1[1:])


def wgrad(a_MA, b_MB, r: Routing, dtype, opts: KernelConfig, a_rows=None, b_rows=None):
    """dW[e] = A[rows_e]^T @ B[rows_e] -> [E, A cols, B cols]; A = a[a_rows] (rows gathered) when a_rows is
    given, else a; likewise B."""
    if opts.moe_grouped_mm and r.num_rows and _gmm_ok(a_MA, b_MB):
        a = a_MA if a_rows is None else gather_rows(a_MA, a_rows, opts)
        b = b_MB if b_rows is None else gather_rows(b_MB, b_rows, opts)
        return _gmm(a.t(), b, r)
    return grouped_wgrad(a_MA, b_MB, r, dtype, opts, a_idx=a_rows, b_idx=b_rows)


def grouped_wgrad(a, b, r: Routing, dtype, opts: KernelConfig, a_idx=None, b_idx=None):
    """dW[e] = a[rows_e]^T @ b[rows_e] -> [E, a.shape[1], b.shape[1]] in the Triton kernel; rows read
    through a_idx / b_idx when given (a[a_idx[row]])."""
    E = r.num_experts
    MO, NO = a.shape[1], b.shape[1]
    dw = _out((E, MO, NO), dtype, a.device)
    grid = lambda meta: (E * triton.cdiv(MO, meta["BLOCK_M"]) * triton.cdiv(NO, meta["BLOCK_N"]),)
    _grouped_wgrad_kernel.select(opts)[grid](
        a, b, dw, a_idx if a_idx is not None else r.tok_M, b_idx if b_idx is not None else r.tok_M,
        r.offsets_E1, MO, NO, a.stride(0), b.stride(0), dw.stride(0), dw.stride(1),
        GROUP=GROUP_M, GATHER_A=a_idx is not None, GATHER_B=b_idx is not None, DOT_PREC=_dot_prec(a.dtype))
    return dw


def route_weights(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, num_experts: int,
                  opts: KernelConfig) -> tuple[Routing, torch.Tensor, torch.Tensor]:
    """The routing plus what the forward needs from it -> (Routing, scale_M = the routing weight of each
    sorted row, inv_M = inverse_rows). One torch sort, then one kernel for the rest (`moe_fused_route`;
    off: route_weights_torch)."""
    if not opts.moe_fused_route:
        return route_weights_torch(topk_idx_TK, topk_weight_TK, num_experts)
    T, K = topk_idx_TK.shape
    keys_M, perm_M = sort_by_expert(topk_idx_TK, num_experts)
    M, dev = T * K, topk_idx_TK.device
    i32 = dict(dtype=torch.int32, device=dev)
    r = Routing(offsets_E1=torch.empty(num_experts + 1, **i32), pos_M=torch.empty(M, **i32),
                tok_M=torch.empty(M, **i32), expert_M=torch.empty(M, **i32), perm_M=perm_M)
    scale_M = torch.empty(M, dtype=topk_weight_TK.dtype, device=dev)
    inv_M = torch.empty(M, **i32)
    block = 1024
    _route_rows_kernel[(triton.cdiv(M, block) + 1,)](
        keys_M, perm_M, topk_weight_TK.contiguous(), r.expert_M, r.pos_M, r.tok_M, scale_M, inv_M, r.offsets_E1,
        M, num_experts, M.bit_length(), K=K, BLOCK=block, num_warps=4)
    return r, scale_M, inv_M


def route_weights_torch(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                        num_experts: int) -> tuple[Routing, torch.Tensor, torch.Tensor]:
    """route_weights in torch ops (route(), the scale gather, inverse_rows): its reference."""
    r = route(topk_idx_TK, num_experts)
    return r, topk_weight_TK.reshape(-1).index_select(0, r.perm_M), inverse_rows(r)


# Rows, columns, warps per program: the best of a sweep (BENCHMARKS.md, MoE experts fourth run).
GATHER_BLOCK = (2, 1024, 4)


def gather_rows(src_TN: torch.Tensor, idx_M: torch.Tensor, opts: KernelConfig) -> torch.Tensor:
    """src[idx] -> [M, N] (the permute's row gather; `moe_gather_kernel` off, CPU outside the interpreter and
    rows that are not contiguous: index_select)."""
    M, N = idx_M.numel(), src_TN.shape[1]
    if not (opts.moe_gather_kernel and (src_TN.is_cuda or INTERPRET) and src_TN.stride(1) == 1):
        return src_TN.index_select(0, idx_M)
    out = _out((M, N), src_TN.dtype, src_TN.device)
    rows, cols, warps = (4, 16, 1) if INTERPRET else GATHER_BLOCK
    if M:
        _gather_rows_kernel[(triton.cdiv(M, rows),)](
            src_TN, idx_M, out, M, N, src_TN.stride(0), out.stride(0), BLOCK_R=rows, BLOCK_N=cols,
            num_warps=warps)
    return out


def inverse_rows(r: Routing) -> torch.Tensor:
    """int32 [M]: flat slot t*K + k -> its sorted row."""
    inv = torch.empty_like(r.pos_M)
    inv[r.perm_M] = torch.arange(r.num_rows, dtype=inv.dtype, device=inv.device)
    return inv


def gather_sum(src_MN, inv_M, T: int, K: int, scale_TK=None):
    """out[t] = sum_k scale[t, k] * src[inv[t*K + k]] -> [T, N]: the combine from expert-sorted rows."""
    N = src_MN.shape[1]
    out = _out((T, N), src_MN.dtype, src_MN.device)
    block_n = 16 if INTERPRET else 1024
    if T:
        _gather_sum_kernel[(T, triton.cdiv(N, block_n))](
            src_MN, inv_M, scale_TK if scale_TK is not None else src_MN, out, N, src_MN.stride(0), out.stride(0),
            K=K, HAS_SCALE=scale_TK is not None, BLOCK_N=block_n, num_warps=4)
    return out


def combine(y_MH: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """[T*K, H] in (token, slot) order -> [T, H]: the unpermute is a contiguous sum over the slots."""
    H = y_MH.shape[1]
    return y_MH.view(T, K, H).sum(1) if K > 1 else y_MH.view(T, H)


def down_fwd(act_MF, w_EFH, r: Routing, scale_M, weight_TK, T: int, K: int, opts: KernelConfig,
             inv_M=None) -> torch.Tensor:
    """Step 2 and the combine -> y_TH (inv_M: inverse_rows(r), when already at hand)."""
    if opts.moe_grouped_mm and r.num_rows and _gmm_ok(act_MF, w_EFH):
        inv_M = inverse_rows(r) if inv_M is None else inv_M
        return gather_sum(_gmm(act_MF, w_EFH, r), inv_M, T, K, weight_TK.reshape(-1))
    return combine(grouped_gemm(act_MF, w_EFH, r, T * K, opts, scale_M=scale_M, scatter_out=True), T, K)


def gate_up_dgrad(dh_MF2, w_EHF2, r: Routing, T: int, K: int, opts: KernelConfig, inv_M=None) -> torch.Tensor:
    """Step 4 and its combine -> dx_TH."""
    if opts.moe_grouped_mm and r.num_rows and _gmm_ok(dh_MF2, w_EHF2.transpose(1, 2)):
        inv_M = inverse_rows(r) if inv_M is None else inv_M
        return gather_sum(_gmm(dh_MF2, w_EHF2.transpose(1, 2), r), inv_M, T, K)
    return combine(grouped_gemm(dh_MF2, w_EHF2, r, T * K, opts, transpose_w=True, scatter_out=True), T, K)


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
class MoEExpertsFunction(torch.autograd.Function):
    """Fused experts with a hand-written backward. Saves x, the weights, the routing (and the sort's
    inverse) and h (the [T*K, 2F] pre-activation); act is recomputed by the backward's first kernel."""

    @staticmethod
    def forward(ctx, x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH, opts: KernelConfig):
        T, K = topk_idx_TK.shape
        E = w_gate_up_EHF2.shape[0]
        x_TH = x_TH.contiguous()
        w_gate_up_EHF2 = w_gate_up_EHF2.contiguous()
        w_down_EFH = w_down_EFH.contiguous()
        r, scale_M, inv_M = route_weights(topk_idx_TK, topk_weight_TK, E, opts)

        h_MF2, act_MF = gate_up_fwd(x_TH, w_gate_up_EHF2, r, opts)
        y_TH = down_fwd(act_MF, w_down_EFH, r, scale_M, topk_weight_TK, T, K, opts, inv_M)

        ctx.save_for_backward(x_TH, w_gate_up_EHF2, w_down_EFH, h_MF2, scale_M, r.offsets_E1, r.pos_M,
                              r.tok_M, r.expert_M, r.perm_M, inv_M)
        ctx.shape = (T, K)
        ctx.weight_dtype = topk_weight_TK.dtype
        ctx.opts = opts
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):
        x_TH, w_gu, w_dn, h_MF2, scale_M, offsets_E1, pos_M, tok_M, expert_M, perm_M, inv_M = ctx.saved_tensors
        T, K = ctx.shape
        opts = ctx.opts
        r = Routing(offsets_E1, pos_M, tok_M, expert_M, perm_M)
        need_x, _, need_w, need_gu, need_dn, _ = ctx.needs_input_grad
        dy_TH = dy_TH.contiguous().to(x_TH.dtype)
        dy_MH = None
        if r.num_rows and opts.moe_grouped_mm and _gmm_ok(dy_TH):
            dy_MH = gather_rows(dy_TH, tok_M, opts)

        dh_MF2, act_s_MF, dscale_M = down_dgrad(dy_TH, w_dn, h_MF2, scale_M, r, opts, dy_MH)
        dx = d_weight = d_gu = d_dn = None
        if need_x:
            dx = gate_up_dgrad(dh_MF2, w_gu, r, T, K, opts, inv_M)
        if need_w:
            d_weight = torch.empty(T * K, dtype=torch.float32, device=dy_TH.device)
            d_weight[perm_M] = dscale_M
            d_weight = d_weight.view(T, K).to(ctx.weight_dtype)
        if need_gu:
            d_gu = wgrad(x_TH, dh_MF2, r, w_gu.dtype, opts, a_rows=tok_M)
        if need_dn:
            if dy_MH is not None:
                d_dn = wgrad(act_s_MF, dy_MH, r, w_dn.dtype, opts)
            else:
                d_dn = wgrad(act_s_MF, dy_TH, r, w_dn.dtype, opts, b_rows=tok_M)
        return dx, None, d_weight, d_gu, d_dn, None


def moe_experts(x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                w_gate_up_EHF2: torch.Tensor, w_down_EFH: torch.Tensor,
                opts: KernelConfig = KernelConfig()) -> torch.Tensor:
    """The OpSet's moe_experts on the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1), on the
    paths `opts` selects."""
    return MoEExpertsFunction.apply(x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH, opts)
