"""Rotary position embedding (half-split rotation) forward and backward in Triton (the GPU OpSet's `rope` outside
compiled code).

    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x2, x1)       (x1, x2: the two halves of D)
    dx  = g * cos + rotate_half^T(g * sin),  rotate_half^T(z) = cat(z2, -z1)

x is [T, H, D] with any strides over T and H (q / k straight from the QK-norm or the qkv slice), cos / sin
[T, D] shared by all heads; math in fp32 with one rounding (eager torch rounds after each of its 5 ops and runs 5
kernels each way). One program takes one token's heads, so cos / sin are read once per token. cos / sin take no
gradient (they come from positions). Runs in Triton's interpreter under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sail_dist.kernels.triton import interpreting

INTERPRET = interpreting()


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, HALF, stride_xt, stride_xh, stride_ct, stride_st,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    mask = (heads < H)[:, None] & col_mask[None, :]
    c1 = tl.load(cos_ptr + t * stride_ct + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_st + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_st + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    x1_ptrs = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # x is the output gradient
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    o_ptrs = out_ptr + (t * H + heads[:, None]) * (2 * HALF) + cols[None, :]
    tl.store(o_ptrs, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, backward: bool) -> None:
    T, H, D = x.shape
    if not T:
        return
    block_h = min(triton.next_power_of_2(H), 16)
    _rope_kernel[(T, triton.cdiv(H, block_h))](x, cos, sin, out, H, D // 2, x.stride(0), x.stride(1), cos.stride(0),
                                              sin.stride(0), BACKWARD=backward, BLOCK_H=block_h,
                                              BLOCK_HALF=triton.next_power_of_2(D // 2))


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        _launch(x, cos, sin, out, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dx = torch.empty(g.shape, dtype=ctx.x_dtype, device=g.device)
        _launch(g if g.stride(-1) == 1 else g.contiguous(), cos, sin, dx, backward=True)
        return dx, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The OpSet's rope(x[T, H, D], cos[T, D], sin[T, D]) with autograd (cos / sin take no gradient)."""
    if x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape or x.shape[2] % 2:
        raise ValueError(f"rope: x {tuple(x.shape)} must be [T, H, D] with D even and cos / sin [T, D], got cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos / sin take no gradient here (they come from positions); use the reference OpSet")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _Rope.apply(x, cos, sin)
