"""The NPU OpSet: the model's hot ops as torch_npu fused kernels.

One implementation, two op providers: `opset()` runs it on the real `torch_npu` (an Ascend machine with
CANN), `emulated_opset()` runs the very same code on `sail_dist/kernels/npu/emulation.py`, a pure-PyTorch copy of
those ops with identical signatures and index conventions (what CI and the CPU/CUDA runs of the NPU
backend use). This is the only file that imports torch_npu.

The ops (semantics: torch_npu's op documentation, Ascend/op-plugin), and the conventions converted at each call site:
  attention     npu_fusion_attention, layout TND. Our cu_seqlens `[S+1]` starts with 0; torch_npu wants
                cumulative END offsets without it, as a host list -> `cu_seqlens.tolist()[1:]`, read once per
                forward (every layer gets the same cu_seqlens tensor: `_HostInts`). The
                scale defaults to 1.0 there, so 1/sqrt(D) is passed explicitly; causal = the compressed
                2048x2048 triu mask + sparse_mode 2; GQA is native (Nq % Nkv == 0).
  rms_norm      npu_rms_norm(...)[0]: multiplies by the weight in fp32 and casts once, so bf16 results
                differ from the reference (which casts first) in the last bit; fp32 agrees.
  rope          npu_rotary_mul on a 4-D view: x `[T, H, D]` -> BSND `[1, T, H, D]`, cos/sin `[1, T, 1, D]`.
  swiglu        npu_swiglu(x, dim=-1): first half gate, second half up (our layout too).
  moe_experts   npu_moe_token_permute -> npu_grouped_matmul (inside GroupedMatmul, an autograd.Function,
                because torch_npu's gmm has no autograd) -> npu_swiglu -> npu_grouped_matmul ->
                npu_moe_token_unpermute weighted by topk_weight: the permute/unpermute family the Ascend
                training stacks use (MindSpeed / MindSpeed-MM), not the inference-only init/finalize ops.
  decode_attention  npu_incre_flash_attention (the decode-step FlashAttention over a KV cache), layout BSND: q
                `[B, Hq, D]` -> `[B, 1, Hq, D]`, the cache `[B, S_max, Hkv, D]` as is; `actual_seq_lengths` = the
                valid cache rows per sequence as a host list (torch_npu's int[]; one device->host read per decode
                step, shared by the layers like cu_seqlens); scale_value 1/sqrt(D) passed (default 1.0); GQA
                by num_key_value_heads. Inference only (no autograd on NPU).
  cross_entropy the lm head inside the op (kernels/linear_cross_entropy.py, shared with the GPU OpSet): tiles
                of at most 512 MiB of fp32 logits, never [T, V], -100 rows skipped; plain torch ops, so the
                real path and the emulation run the same code.
"""
from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any

import torch

from sail_dist.kernels.linear_cross_entropy import linear_cross_entropy
from sail_dist.kernels.opset import OpSet

# MindSpeed's packed-sequence causal mask: always 2048 x 2048, True above the diagonal (= masked).
_COMPRESSED_CAUSAL_MASK_SIZE = 2048
_SPARSE_MODE_FULL = 0  # sparse_mode 0 with no mask: full attention
_SPARSE_MODE_LEFT_UP_CAUSAL = 2  # causal aligned at each sequence's top-left corner (Sq == Skv here)


class NpuUnavailableError(ImportError):
    """torch_npu (and with it an Ascend NPU + CANN) is not usable in this environment."""


@functools.lru_cache(maxsize=None)
def _compressed_causal_mask(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(_COMPRESSED_CAUSAL_MASK_SIZE, _COMPRESSED_CAUSAL_MASK_SIZE, dtype=torch.bool,
                                 device=device), diagonal=1)


class GroupedMatmul(torch.autograd.Function):
    """`y[M, N] = x[M, K] @ w[e]` for the rows of group e, with the backward torch_npu lacks.

    x rows must be sorted by group; `group_list` is an int64 tensor, cumulative end offsets
    (group_list_type 0, MindSpeed's `npu_gmm`) or per-group counts (type 1, `npu_gmm_v2` / MindSpeed-MM).
    Backward, as MindSpeed's `npu_gmm` does it:
      dx = gmm([dy], [w.transpose(1, 2)], group_type=0)       rows grouped, transposed weight view
      dW = gmm([x.T], [dy], group_type=2, split_item=3)       contraction grouped -> [E, K, N]
    `npu` is torch_npu or the emulation module; it is looked up at call time.
    """

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, w_EKN: torch.Tensor, group_list: torch.Tensor, group_list_type: int,
                npu: ModuleType) -> torch.Tensor:
        ctx.save_for_backward(x_MK, w_EKN, group_list)
        ctx.group_list_type = group_list_type
        ctx.npu = npu
        return npu.npu_grouped_matmul([x_MK], [w_EKN], bias=None, group_list=group_list, split_item=2,
                                      group_type=0, group_list_type=group_list_type)[0]

    @staticmethod
    def backward(ctx, dy_MN: torch.Tensor):
        x_MK, w_EKN, group_list = ctx.saved_tensors
        npu, group_list_type = ctx.npu, ctx.group_list_type
        dy_MN = dy_MN.contiguous()  # gmm's x operand may not be a strided view (only the weight may)
        dx_MK = dw_EKN = None
        if ctx.needs_input_grad[0]:
            dx_MK = npu.npu_grouped_matmul([dy_MN], [w_EKN.transpose(1, 2)], bias=None, group_list=group_list,
                                           split_item=2, group_type=0, group_list_type=group_list_type)[0]
        if ctx.needs_input_grad[1]:
            dw_EKN = npu.npu_grouped_matmul([x_MK.t()], [dy_MN], bias=None, group_list=group_list, split_item=3,
                                            group_type=2, group_list_type=group_list_type)[0]
        return dx_MK, dw_EKN, None, None, None


class _NpuOps:
    """The OpSet callables, bound to one op provider (torch_npu or the emulation)."""

    def __init__(self, npu: ModuleType, group_list_type: int = 0, ce_vocab_chunk: int | None = None,
                 ce_token_chunk: int | None = None):
        if group_list_type not in (0, 1):
            raise ValueError(f"group_list_type must be 0 (cumulative offsets) or 1 (counts), got {group_list_type}")
        for name, value in (("ce_vocab_chunk", ce_vocab_chunk), ("ce_token_chunk", ce_token_chunk)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive int or None (automatic), got {value}")
        self.npu = npu
        self._host_ints = _HostInts()
        self.group_list_type = group_list_type
        self.ce_vocab_chunk = ce_vocab_chunk
        self.ce_token_chunk = ce_token_chunk

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, causal: bool) -> torch.Tensor:
        # max_seqlen is not needed: TND varlen takes per-sequence lengths, not a padded size.
        num_q_heads, head_dim = q.shape[1], q.shape[2]
        # Our cu_seqlens [S+1] starts with 0; torch_npu wants cumulative ends WITHOUT it, as host ints
        # (lengths 2 2 2 -> [2, 4, 6]): a device->host read, once per forward (every layer gets the same tensor).
        seq_ends = self._host_ints(cu_seqlens)[1:]
        if causal:
            mask, sparse_mode = _compressed_causal_mask(q.device), _SPARSE_MODE_LEFT_UP_CAUSAL
        else:
            mask, sparse_mode = None, _SPARSE_MODE_FULL
        return self.npu.npu_fusion_attention(
            q, k, v, num_q_heads, "TND",  # head_num = query heads; GQA by Nq % Nkv
            atten_mask=mask,
            scale=1.0 / math.sqrt(head_dim),  # torch_npu defaults to 1.0
            actual_seq_qlen=seq_ends,
            actual_seq_kvlen=seq_ends,  # self-attention: same boundaries
            sparse_mode=sparse_mode,
        )[0]

    def decode_attention(self, q_BHD: torch.Tensor, k_cache_BSHD: torch.Tensor, v_cache_BSHD: torch.Tensor,
                         lengths_B: torch.Tensor) -> torch.Tensor:
        num_q_heads, head_dim = q_BHD.shape[1], q_BHD.shape[2]
        out = self.npu.npu_incre_flash_attention(
            q_BHD.unsqueeze(1), k_cache_BSHD, v_cache_BSHD,
            # host ints: valid cache rows per sequence (right padding); read once per decode step
            actual_seq_lengths=list(self._host_ints(lengths_B)),
            num_heads=num_q_heads, num_key_value_heads=k_cache_BSHD.shape[2],
            scale_value=1.0 / math.sqrt(head_dim),  # torch_npu defaults to 1.0
            input_layout="BSND")
        return out.squeeze(1)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.npu.npu_rms_norm(x, weight, epsilon=eps)[0]  # [1] is rstd

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # npu_rotary_mul is 4-D only: x [T, H, D] -> BSND [1, T, H, D]; cos/sin [T, D] -> [1, T, 1, D]
        # (the "1S1D" broadcast). r1/r2 must share x's dtype.
        cos_11TD = cos.to(x.dtype)[None, :, None, :]
        sin_11TD = sin.to(x.dtype)[None, :, None, :]
        return self.npu.npu_rotary_mul(x.unsqueeze(0), cos_11TD, sin_11TD).squeeze(0)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.npu.npu_swiglu(x, dim=-1)

    def moe_experts(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                    w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        npu = self.npu
        num_experts = w_gate_up.shape[0]
        # torch_npu takes int32 expert ids. permuted_TKH rows are expert-major (ascending token inside
        # an expert); sorted_indices[t*K + j] is the permuted row of (token t, slot j): the inverse of
        # Megatron's sorted_indices, only ever fed to the matching unpermute below.
        permuted_TKH, sorted_indices = npu.npu_moe_token_permute(x, topk_idx.to(torch.int32))
        # Tokens per expert, as the NPU stacks compute it: histc over unit-width bins [e, e+1) (float
        # histc is exact for counts < 2^24); an empty expert gets 0 and an empty group in the gmm.
        counts_E = torch.histc(topk_idx.float(), bins=num_experts, min=0, max=num_experts).to(torch.int64)
        # group_list is int64: per-expert counts (type 1) or their cumsum = end offsets (type 0).
        group_list = counts_E if self.group_list_type == 1 else torch.cumsum(counts_E, dim=0)
        h_TK2F = GroupedMatmul.apply(permuted_TKH, w_gate_up, group_list, self.group_list_type, npu)
        a_TKF = npu.npu_swiglu(h_TK2F, dim=-1)
        y_TKH = GroupedMatmul.apply(a_TKF, w_down, group_list, self.group_list_type, npu)
        # out[t] = sum_j topk_weight[t, j] * y[sorted_indices[t*K + j]]; grads reach y and topk_weight.
        return npu.npu_moe_token_unpermute(y_TKH, sorted_indices, probs=topk_weight)

    def cross_entropy(self, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Torch row ops: plain torch on the NPU as in the emulation; -100 rows skipped (the sync is cheap next to
        # the attention's per-layer cu_seqlens read).
        return linear_cross_entropy(h, w, labels, vocab_chunk=self.ce_vocab_chunk, token_chunk=self.ce_token_chunk,
                                    skip_ignored=True)


class _HostInts:
    """The host list of a device int tensor, read once while the same tensor comes back unmodified: every layer of a
    forward passes the same cu_seqlens, and every layer of a decode step the same lengths (SailVL.decode_step), so one
    device->host read (a sync) serves all layers instead of one per layer. Keeps a reference to the last tensor, so
    its identity cannot be taken by another while it is cached; an in-place change bumps its version."""

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._version = -1
        self._ints: list[int] = []

    def __call__(self, t: torch.Tensor) -> list[int]:
        if t is not self._tensor or t._version != self._version:
            self._tensor, self._version, self._ints = t, t._version, t.tolist()
        return self._ints


def _build(name: str, npu: ModuleType, group_list_type: int, ce_vocab_chunk: int | None,
           ce_token_chunk: int | None) -> OpSet:
    ops = _NpuOps(npu, group_list_type, ce_vocab_chunk, ce_token_chunk)
    return OpSet(name, attention=ops.attention, rms_norm=ops.rms_norm, rope=ops.rope, swiglu=ops.swiglu,
                 moe_experts=ops.moe_experts, cross_entropy=ops.cross_entropy, decode_attention=ops.decode_attention)


def _import_torch_npu() -> Any:
    try:
        import torch_npu  # noqa: F401  (the only torch_npu import in the project)
    except (ImportError, RuntimeError) as err:  # RuntimeError: torch's backend autoload of a broken install
        raise NpuUnavailableError(
            "The 'npu' OpSet needs an Ascend NPU machine with CANN and a torch_npu build matching this torch "
            f"({torch.__version__}); see docs/npu.md. Off-NPU, use the 'npu_emulated' OpSet. "
            f"(import torch_npu failed: {err})"
        ) from err
    return torch_npu


def opset(group_list_type: int = 0, ce_vocab_chunk: int | None = None, ce_token_chunk: int | None = None) -> OpSet:
    """The OpSet on real torch_npu. group_list_type: 0 = cumulative offsets (MindSpeed), 1 = counts.
    ce_vocab_chunk / ce_token_chunk: the cross-entropy's tile (None = automatic, see `LinearCrossEntropy`)."""
    return _build("npu", _import_torch_npu(), group_list_type, ce_vocab_chunk, ce_token_chunk)


def emulated_opset(group_list_type: int = 0, ce_vocab_chunk: int | None = None,
                   ce_token_chunk: int | None = None) -> OpSet:
    """The same OpSet on the pure-PyTorch emulation of the torch_npu ops (CPU / CUDA)."""
    from sail_dist.kernels.npu import emulation

    return _build("npu_emulated", emulation, group_list_type, ce_vocab_chunk, ce_token_chunk)
