"""RMSNorm forward and backward in Triton (the GPU OpSet's `rms_norm` outside compiled code).

Computes the reference's numerics (sail_dist/kernels/reference.py): normalise in fp32, round to x's dtype, then
scale by the weight, output in promote(x, weight):

    y = round_x(x * rsqrt(mean(x^2) + eps));  out = weight * y

Eager torch runs this as ~8 kernels forward and ~12 backward, each a pass over fp32 copies of x (BENCHMARKS.md,
the eager profile); here it is one pass each way. Liger-Kernel's RMSNorm is the model: rows in registers,
the weight gradient as per-program partial sums reduced by one torch sum (deterministic, no atomics).

Rows may be strided over two leading dims ([A, B, N] with any strides and a unit last stride), so the QK-norm
reads q / k straight from their slice of the fused qkv projection; outputs are contiguous. Runs in Triton's CPU
interpreter when TRITON_INTERPRET=1 is set before triton is imported (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sail_dist.kernels.triton import interpreting

INTERPRET = interpreting()


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, R, B, N, stride_a, stride_b, eps,
                         ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < R, cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x_off = (rows // B) * stride_a + (rows % B) * stride_b
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    y = (xf * rstd[:, None]).to(x.dtype)  # the reference's round to x's dtype before the weight
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    out = w.to(tl.float32)[None, :] * y.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, g_ptr, rstd_ptr, dx_ptr, dw_ptr, R, B, N, stride_a, stride_b,
                         blocks_per_program, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DX: tl.constexpr):
    """dx = rstd * (dy - xhat * mean(dy * xhat)), dy = g * w (fp32); this program's partial dw = sum g * y over the
    row blocks pid, pid + G, ... into dw_ptr[pid]."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, blocks_per_program):
        rows = (pid + i * G).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < R
        mask = row_mask[:, None] & col_mask[None, :]
        x_off = (rows // B) * stride_a + (rows % B) * stride_b
        x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = xf * rstd[:, None]
        dw += tl.sum(g * xhat.to(x.dtype).to(tl.float32), axis=0)
        if HAS_DX:
            dy = g * w[None, :]
            c = tl.sum(dy * xhat, axis=1) / N
            dx = rstd[:, None] * (dy - xhat * c[:, None])
            tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=col_mask)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """x as [A, B, N], without a copy where its strides allow (the last two leading dims may have any strides)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() <= 2:
        return x.reshape(-1, 1, x.shape[-1])
    return x.reshape(-1, x.shape[-2], x.shape[-1])  # (a view unless dims before the last two need merging)


def _tiles(N: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(N)
    return max(1, min(64, 8192 // block_n)), block_n  # ~8k elements in flight per program


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x3 = _as_3d(x)
        A, B, N = x3.shape
        R = A * B
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        rows, block_n = _tiles(N)
        if R:
            _rms_norm_fwd_kernel[(triton.cdiv(R, rows),)](x3, weight, out, rstd, R, B, N, x3.stride(0), x3.stride(1),
                                                          eps, ROWS=rows, BLOCK_N=block_n)
        ctx.save_for_backward(x3, weight, rstd)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x3, weight, rstd = ctx.saved_tensors
        A, B, N = x3.shape
        R = A * B
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = g.contiguous()
        rows, block_n = _tiles(N)
        n_blocks = triton.cdiv(R, rows)
        programs = max(1, min(n_blocks, 4 if INTERPRET else 4 * _sm_count(x3.device)))
        dx = torch.empty(ctx.x_shape, dtype=x3.dtype, device=x3.device) if need_dx else None
        dw_part = torch.empty(programs, N, dtype=torch.float32, device=x3.device)
        if R:
            _rms_norm_bwd_kernel[(programs,)](x3, weight, g, rstd, dx if need_dx else g, dw_part, R, B, N,
                                              x3.stride(0), x3.stride(1), triton.cdiv(n_blocks, programs),
                                              ROWS=rows, BLOCK_N=block_n, HAS_DX=need_dx)
        else:
            dw_part.zero_()
        dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
        return dx, dw, None


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The OpSet's rms_norm(x[..., N], weight[N], eps) with autograd, in one kernel each way."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return _RMSNorm.apply(x, weight, eps)
