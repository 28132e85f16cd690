"""Linear cross-entropy: the lm-head projection and the per-token loss in tiles, never the [T, V] logits.

    loss[t] = logsumexp(h[t] @ w^T) - (h[t] @ w^T)[labels[t]],  0 where labels[t] == -100

One autograd Function for every OpSet: the GPU OpSet passes its Triton row kernels (kernels/triton/cross_entropy.py,
one pass over each logit block), the NPU OpSet (real and emulated alike) and CPU runs the torch row ops below. At
8192 tokens x 151,936 words the full fp32 logits are 5 GB, and F.cross_entropy saves as much again for backward.

Why hand written: the OpSet's `cross_entropy` takes the hidden states and the lm-head weight, and no library
op does that on both backends. Liger-Kernel's fused linear cross-entropy is Triton-only (no Ascend); torch_npu's
`npu_cross_entropy_loss` takes the logits (so [T, V] exists) and reads a negative `ignore_index` as "nothing
ignored"; Megatron's and MindSpeed's vocab-parallel cross entropies take logits too; CANN's fused linear
cross-entropy ops (op-plugin PR #3110) are bf16/fp16 only, without autograd, and not verifiable here.

Design:
  * vocabulary outer, tokens inner: with all tokens in one tile (the default up to 64k bf16 / 32k fp32 tokens)
    each weight-gradient block dw[v0:v0+C] is one GEMM written in place, never a running sum over the
    311M-element lm-head gradient; only dh [T, D] is summed over vocabulary blocks, in fp32;
  * tiles hold at most `TILE_BYTES` of logits, counted in the dtype the row ops materialise (the input dtype for
    the Triton kernels, which keep fp32 in registers; fp32 for the torch ops, which make fp32 copies);
  * `skip_ignored`: tokens labelled -100 are dropped before any GEMM (VLM SFT masks vision tokens and prompts,
    often most of a packed stream); it costs one device->host sync per call, so the GPU OpSet leaves it off;
  * the forward keeps the per-token logsumexp; the backward recomputes each tile's logits (one extra lm-head
    GEMM, Liger-Kernel / Megatron style) and turns them in place into (softmax - onehot) * dloss. GEMMs take the
    input dtype; the row math is fp32 (fp64 for fp64 inputs). Not twice differentiable.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
TILE_BYTES = 1 << 29  # 512 MiB of logits per tile
MIN_VOCAB_CHUNK = 4096  # narrower tiles starve the GEMM: past that many tokens per tile the tokens are tiled
VOCAB_ALIGN = 128  # automatic vocabulary chunks are whole tensor-core / Cube tiles

# lse_target_(x_nC, labels_n, v0, lse_n, tgt_n): fold a logits tile of columns [v0, v0 + C) into the running
# logsumexp and pick the target logit where the label falls in it, in place.
# softmax_grad_(x_nC, labels_n, v0, lse_n, g_n): overwrite the tile with (softmax - onehot) * g, in place.
RowOps = tuple[Callable[..., None], Callable[..., None]]


def lse_target_torch(x_nC: torch.Tensor, labels_n: torch.Tensor, v0: int, lse_n: torch.Tensor,
                     tgt_n: torch.Tensor) -> None:
    xf = x_nC.to(lse_n.dtype)
    lse_n.copy_(torch.logaddexp(lse_n, torch.logsumexp(xf, dim=-1)))
    col = labels_n - v0
    inside = (col >= 0) & (col < x_nC.shape[1])
    t = xf.gather(1, col.clamp(0, x_nC.shape[1] - 1)[:, None]).squeeze(1)
    tgt_n.copy_(torch.where(inside, t, tgt_n))


def softmax_grad_torch(x_nC: torch.Tensor, labels_n: torch.Tensor, v0: int, lse_n: torch.Tensor,
                       g_n: torch.Tensor) -> None:
    d = torch.exp(x_nC.to(lse_n.dtype) - lse_n[:, None])
    col = labels_n - v0
    inside = (col >= 0) & (col < x_nC.shape[1])
    d.scatter_add_(1, col.clamp(0, x_nC.shape[1] - 1)[:, None], -inside.to(d.dtype)[:, None])
    x_nC.copy_(d * g_n[:, None])


TORCH_ROW_OPS: RowOps = (lse_target_torch, softmax_grad_torch)


def tiles(num_rows: int, vocab: int, elem_bytes: int, vocab_chunk: int | None = None,
          token_chunk: int | None = None) -> tuple[int, int]:
    """(token_chunk, vocab_chunk); None picks a `TILE_BYTES` tile of `elem_bytes` logits, all tokens at once up to
    TILE_BYTES / (elem_bytes * MIN_VOCAB_CHUNK) of them."""
    if token_chunk is None:
        token_chunk = TILE_BYTES // (elem_bytes * MIN_VOCAB_CHUNK)
    token_chunk = max(1, min(token_chunk, num_rows))
    if vocab_chunk is None:
        vocab_chunk = max(VOCAB_ALIGN, TILE_BYTES // (elem_bytes * token_chunk) // VOCAB_ALIGN * VOCAB_ALIGN)
    return token_chunk, max(1, min(vocab_chunk, vocab))


def _project(h_nD: torch.Tensor, w_CD: torch.Tensor) -> torch.Tensor:
    """One tile of logits, a fresh buffer in the input dtype that the row ops overwrite."""
    return h_nD @ w_CD.t()


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, row_ops: RowOps,
                vocab_chunk: int | None, token_chunk: int | None, skip_ignored: bool) -> torch.Tensor:
        if h_TD.dim() != 2 or w_VD.dim() != 2 or h_TD.shape[1] != w_VD.shape[1]:
            raise ValueError(f"cross_entropy takes h [T, D] and w [V, D], got {tuple(h_TD.shape)} and "
                             f"{tuple(w_VD.shape)}")
        if labels_T.shape != h_TD.shape[:1]:
            raise ValueError(f"labels must be [T] = [{h_TD.shape[0]}], got {tuple(labels_T.shape)}")
        if h_TD.dtype != w_VD.dtype:
            raise TypeError(f"h and w must share a dtype, got {h_TD.dtype} and {w_VD.dtype}")
        T, V = h_TD.shape[0], w_VD.shape[0]
        cdt = torch.promote_types(h_TD.dtype, torch.float32)
        rows_N = None
        h_ND, labels_N = h_TD, labels_T
        if skip_ignored:
            rows_N = torch.nonzero(labels_T != IGNORE_INDEX).squeeze(1)  # the device->host sync
            if rows_N.numel() < T:
                h_ND, labels_N = h_TD.index_select(0, rows_N), labels_T.index_select(0, rows_N)
            if rows_N.numel() and not bool(((labels_N >= 0) & (labels_N < V)).all()):
                raise IndexError(f"cross_entropy: labels must be -100 or in [0, {V})")
        N = h_ND.shape[0]
        elem = cdt.itemsize if row_ops is TORCH_ROW_OPS else h_TD.element_size()
        tn, tv = tiles(N, V, elem, vocab_chunk, token_chunk)
        lse_N = torch.full((N,), float("-inf"), dtype=cdt, device=h_TD.device)
        tgt_N = torch.zeros(N, dtype=cdt, device=h_TD.device)
        lse_target_, _ = row_ops
        for v0 in range(0, V, tv):
            w_CD = w_VD[v0:v0 + tv]
            for t0 in range(0, N, tn):
                r = slice(t0, t0 + tn)
                lse_target_(_project(h_ND[r], w_CD), labels_N[r], v0, lse_N[r], tgt_N[r])
        ctx.save_for_backward(h_TD, w_VD, labels_N, lse_N, *([] if rows_N is None else [rows_N]))
        ctx.row_ops, ctx.tiles, ctx.compact = row_ops, (tn, tv), N < T
        loss_N = torch.where(labels_N != IGNORE_INDEX, lse_N - tgt_N, 0.0)
        if not ctx.compact:
            return loss_N
        return loss_N.new_zeros(T).index_copy_(0, rows_N, loss_N)

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss_T: torch.Tensor):
        h_TD, w_VD, labels_N, lse_N, *rows = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tn, tv = ctx.tiles
        dt, cdt = h_TD.dtype, lse_N.dtype
        N, V, D = labels_N.shape[0], w_VD.shape[0], h_TD.shape[1]
        none = (None,) * 5
        if N == 0:  # every label is -100: zero gradients
            return (torch.zeros_like(h_TD) if need_h else None, torch.zeros_like(w_VD) if need_w else None) + none
        h_ND = h_TD.index_select(0, rows[0]) if ctx.compact else h_TD
        g_N = dloss_T.index_select(0, rows[0]) if ctx.compact else dloss_T
        g_N = torch.where(labels_N != IGNORE_INDEX, g_N.to(cdt), 0.0)
        dh_ND = torch.zeros(h_ND.shape, dtype=cdt, device=h_TD.device) if need_h else None
        dw_VD = torch.empty_like(w_VD) if need_w else None  # every block is written below
        _, softmax_grad_ = ctx.row_ops
        several = N > tn
        for v0 in range(0, V, tv):
            w_CD = w_VD[v0:v0 + tv]
            # Several token tiles sum into this weight block: in fp32 when the weights are not.
            acc_CD = torch.zeros(w_CD.shape[0], D, dtype=cdt, device=h_TD.device) \
                if need_w and several and dt != cdt else None
            for t0 in range(0, N, tn):
                r = slice(t0, t0 + tn)
                h_nD = h_ND[r]
                d_nC = _project(h_nD, w_CD)
                softmax_grad_(d_nC, labels_N[r], v0, lse_N[r], g_N[r])  # logits -> d loss / d logits, in place
                if need_h:
                    if dh_ND.dtype == d_nC.dtype:
                        dh_ND[r].addmm_(d_nC, w_CD)
                    else:
                        dh_ND[r] += d_nC @ w_CD
                if need_w:
                    if acc_CD is not None:
                        acc_CD += d_nC.t() @ h_nD
                    elif t0 == 0:
                        torch.mm(d_nC.t(), h_nD, out=dw_VD[v0:v0 + tv])
                    else:
                        dw_VD[v0:v0 + tv].addmm_(d_nC.t(), h_nD)
            if acc_CD is not None:
                dw_VD[v0:v0 + tv].copy_(acc_CD)
        dh_TD = None
        if need_h:
            dh_TD = dh_ND.to(dt)
            if ctx.compact:
                dh_TD = torch.zeros_like(h_TD).index_copy_(0, rows[0], dh_TD)
        return (dh_TD, dw_VD) + none


def linear_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, *,
                         row_ops: RowOps = TORCH_ROW_OPS, vocab_chunk: int | None = None,
                         token_chunk: int | None = None, skip_ignored: bool = False) -> torch.Tensor:
    """Per-token loss [T] (fp32, fp64 for fp64 inputs) of the lm-head projection h @ w^T; see the module docstring."""
    for name, value in (("vocab_chunk", vocab_chunk), ("token_chunk", token_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive int or None (automatic), got {value}")
    return LinearCrossEntropy.apply(h_TD, w_VD, labels_T, row_ops, vocab_chunk, token_chunk, skip_ignored)
