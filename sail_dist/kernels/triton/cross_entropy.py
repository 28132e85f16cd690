"""Row kernels of the vocab-chunked linear cross-entropy (sail_dist/kernels/gpu.py, `LinearCrossEntropy`).

The lm-head GEMMs stay on cuBLAS; these two kernels do the memory-bound work on each [T, C] block of logits
(C vocabulary columns) in one pass, reading the logits in their own dtype (bf16) and doing the math in fp32:

  lse_target_(x, labels, v0, lse, tgt): lse[t] <- logaddexp(lse[t], logsumexp(x[t])); tgt[t] <- x[t, labels[t]-v0]
      when that column is in this block (the running log-sum-exp and target logit over vocabulary blocks).
  softmax_grad_(x, labels, v0, lse, g):  x[t] <- (exp(x[t] - lse[t]) - onehot(labels[t]-v0)) * g[t], in place.

Eager torch spends ~6 passes over fp32 copies of the block on the same work. Like sail_dist/kernels/triton/moe.py, the
kernels run in Triton's CPU interpreter when TRITON_INTERPRET=1 is set before triton is imported (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sail_dist.kernels.triton import interpreting

INTERPRET = interpreting()  # whether these kernels were defined for the interpreter
_BLOCK = 2048


@triton.jit
def _lse_target_kernel(x_ptr, stride_x, labels_ptr, v0, lse_ptr, tgt_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    # Per-lane running max and sum of exp(x - max); the max starts at a finite "minus infinity" so that
    # exp(m_old - m_new) never meets inf - inf on lanes that only saw masked columns.
    m = tl.full([BLOCK], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=0)
    block_lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    old = tl.load(lse_ptr + row)
    top = tl.maximum(old, block_lse)
    tl.store(lse_ptr + row, top + tl.log(tl.exp(old - top) + tl.exp(block_lse - top)))
    lab = tl.load(labels_ptr + row) - v0
    inside = (lab >= 0) & (lab < N)
    t = tl.load(x_row + lab, mask=inside, other=0.0).to(tl.float32)
    tl.store(tgt_ptr + row, t, mask=inside)


@triton.jit
def _softmax_grad_kernel(x_ptr, stride_x, labels_ptr, v0, lse_ptr, g_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    lab = tl.load(labels_ptr + row) - v0
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        d = (tl.exp(x - lse) - tl.where(cols == lab, 1.0, 0.0)) * g
        tl.store(x_row + cols, d.to(x_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, *rows: torch.Tensor) -> None:
    if x.stride(1) != 1:
        raise ValueError("logit block must be row-major (stride 1 along the vocabulary)")
    if any(r.dtype != torch.float32 for r in rows):
        raise TypeError("lse / tgt / g must be float32")


def lse_target_(x_TC: torch.Tensor, labels_T: torch.Tensor, v0: int, lse_T: torch.Tensor, tgt_T: torch.Tensor) -> None:
    """Fold block x_TC (vocabulary columns v0..v0+C) into the running lse_T; write tgt_T for labels inside it."""
    _check(x_TC, lse_T, tgt_T)
    T, C = x_TC.shape
    if T:
        _lse_target_kernel[(T,)](x_TC, x_TC.stride(0), labels_T, v0, lse_T, tgt_T, C, BLOCK=min(_BLOCK, triton.next_power_of_2(C)))


def softmax_grad_(x_TC: torch.Tensor, labels_T: torch.Tensor, v0: int, lse_T: torch.Tensor, g_T: torch.Tensor) -> None:
    """In place: x_TC <- (softmax over the full vocabulary - onehot(label)) * g, for columns v0..v0+C."""
    _check(x_TC, lse_T, g_T)
    T, C = x_TC.shape
    if T:
        _softmax_grad_kernel[(T,)](x_TC, x_TC.stride(0), labels_T, v0, lse_T, g_T, C, BLOCK=min(_BLOCK, triton.next_power_of_2(C)))
