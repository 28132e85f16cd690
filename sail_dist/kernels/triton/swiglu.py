"""SwiGLU forward and backward in Triton (the GPU OpSet's `swiglu` outside compiled code).

    out = silu(a) * b,  x = [a | b] along the last dim (first half gate, second half up)
    da  = g * b * s * (1 + a * (1 - s)),  db = g * silu(a),  s = sigmoid(a)

One pass each way with fp32 math; only x is kept for backward (eager torch keeps silu(a) as well, runs 3 kernels
forward and 5 backward, and writes da / db into a zero-filled [.., 2F] gradient through two slices). Liger-Kernel's
SwiGLU is the model (there a and b are separate tensors). Runs in Triton's interpreter under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sail_dist.kernels.triton import interpreting

INTERPRET = interpreting()
_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(x_ptr, out_ptr, F, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(out_ptr + row * F + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(x_ptr, g_ptr, dx_ptr, F, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = g * b * s * (1.0 + a * (1.0 - s))
    db = g * a * s
    tl.store(dx_ptr + row * 2 * F + cols, da.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + row * 2 * F + F + cols, db.to(dx_ptr.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # rows of [a | b] (a view for the usual contiguous projection output)
        R, F = x2.shape[0], x2.shape[1] // 2
        out = torch.empty(*x.shape[:-1], F, dtype=x.dtype, device=x.device)
        if R:
            _swiglu_fwd_kernel[(R, triton.cdiv(F, _BLOCK))](x2, out, F, x2.stride(0), BLOCK=min(_BLOCK, triton.next_power_of_2(F)))
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x2,) = ctx.saved_tensors
        R, F = x2.shape[0], x2.shape[1] // 2
        g = g.contiguous()
        dx = torch.empty(ctx.x_shape, dtype=x2.dtype, device=x2.device)
        if R:
            _swiglu_bwd_kernel[(R, triton.cdiv(F, _BLOCK))](x2, g, dx, F, x2.stride(0), BLOCK=min(_BLOCK, triton.next_power_of_2(F)))
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """The OpSet's swiglu(x[..., 2F]) -> silu(x[..., :F]) * x[..., F:], with autograd."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim ({x.shape[-1]}) must be even ([gate | up])")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _SwiGLU.apply(x)
