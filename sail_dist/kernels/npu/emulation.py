"""Pure-PyTorch emulation of the torch_npu fused ops the NPU backend calls.

Every function here has the name, signature (argument names, keyword-only markers, defaults), output
dtypes, shapes and index conventions of its torch_npu counterpart, so `sail_dist/kernels/npu/ops.py` runs the very
same code on `torch_npu` (an Ascend machine) or on this module (CPU / CUDA, CI). The spec is torch_npu's own
documentation of each op: the Ascend/op-plugin repository's docstrings, CPU golden implementations and meta
registrations. torch_npu is never imported here. Only the ops ops.py calls are emulated (not the inference-only
gating / init_routing / finalize_routing / compute_expert_tokens family: the training path uses token permute /
unpermute instead).

Emulation fidelity
------------------
Exact (same values, up to floating-point summation order):
  * every index convention and integer output: token permute/unpermute (`sorted_indices` is the
    *inverse* of Megatron's, token-major `t*K + j`), grouped-matmul `group_list` (type 0 cumulative
    ends, type 1 counts), fusion-attention `actual_seq_qlen/kvlen` (cumulative ends, no leading 0);
    stable sorts; int32 index outputs.
  * fp32 math (and fp64, below): results equal the op-plugin goldens / the reference OpSet up to
    summation order (~1e-7 relative in fp32).
Approximate:
  * bf16/fp16 rounding order. The emulation computes in fp32 and rounds once at the end. That is the
    golden for rms_norm (fp32 `x * rstd * gamma`, then cast) and grouped matmul (fp32
    accumulation) and is assumed for swiglu/rotary_mul/unpermute. npu_fusion_attention is a tiled
    FlashAttention kernel: it rounds the probabilities to bf16/fp16 before the P @ V matmul and
    rescales partial sums online; the emulation does an exact two-pass fp32 softmax, so bf16 outputs
    differ at the ~1e-2 relative level (the op-plugin test tolerance is 5e-3).
  * fusion-attention backward is autograd over the forward math, not `npu_fusion_attention_grad`:
    mathematically exact gradients, different rounding.
  * softmax_max / softmax_sum: per query row, the max of the scaled (pse-added, masked) scores and
    `sum(exp(s - max))`, fp32, repeated over the trailing 8 (the TND golden); `[T, N, 8]` for TND and
    `[B, N, S, 8]` otherwise. They are informational here (only the NPU's own backward consumes them).
    Fully-masked rows are invalid input on NPU ("no all-masked rows"); the emulation returns output 0,
    max -inf, sum 0 for them. `seed`, `offset`, `numels` are 0 (no dropout).
  * Rows the NPU leaves undefined are zero here: grouped-matmul rows past the last group end.
Not emulated (raise NotImplementedError rather than compute something else): dropout
(`keep_prob < 1`, the NPU RNG cannot be reproduced), sparse_mode 4..8, `prefix`, `sink`,
`padding_mask`, an explicit full mask with TND, quantised grouped matmul, `padded_mode`,
rotary `rotate`.
Extensions: fp64 inputs are accepted (torch_npu has no fp64 kernels) so tests can check gradients in
double precision; everything else that torch_npu rejects or documents as invalid raises here too
(non-int64 group_list tensors, non-cumulative or tensor `actual_seq_*`, more than 1024 varlen sequences,
a compressed causal mask that is not the 2048x2048 `triu(ones, 1)`), so CI catches what would fail on
Ascend.

Autograd follows op-plugin's derivatives.yaml: fusion_attention (q, k, v, pse),
rms_norm (x, gamma; rstd is not differentiable), rotary_mul (x, r1, r2), swiglu, token_permute
(tokens) and token_unpermute (permuted_tokens, probs) are differentiable; grouped_matmul has no
derivative on NPU. There, autograd's fallback for it warns at backward time and produces no gradient;
here it runs under `torch.no_grad()` (outputs detached) and emits `NpuNoAutogradWarning` when called on
tensors that require grad with grad mode on. Code that needs its gradients must wrap it in its own
`autograd.Function` (as ops.py does), and fails here as on NPU otherwise.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "NpuNoAutogradWarning",
    "npu_fusion_attention",
    "npu_grouped_matmul",
    "npu_incre_flash_attention",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_swiglu",
]

_COMPRESSED_MASK_SIZE = 2048  # sparse_mode 2/3/4 take this optimised triu mask, whatever the lengths
_MAX_VARLEN_SEQUENCES = 1024  # torch_npu docstring: "max 1K in varlen"
_MAX_TOKEN_PERMUTE_TOPK = 512
_MAX_GMM_GROUPS_SINGLE_WEIGHT = 1024  # one 3-D weight tensor
_MAX_GMM_GROUPS_WEIGHT_LIST = 128  # a list of 2-D weights
_MAX_GMM_INNER_DIM = 65536


class NpuNoAutogradWarning(UserWarning):
    """An op without autograd on NPU was called on tensors that require grad."""


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 for half types (what the NPU kernels accumulate in); fp64 stays fp64 (emulation extension)."""
    out = torch.float32
    for dtype in dtypes:
        if dtype.is_floating_point:
            out = torch.promote_types(out, dtype)
    return out


def _tensors_in(values: Any):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors_in(value)


def _no_autograd(fn: Callable) -> Callable:
    """Mark an op that has no derivative on NPU: run it under no_grad and warn if grads were expected.

    On NPU such an op gets autograd's fallback node, which warns at backward and returns no gradient;
    detaching here makes code that relies on those gradients fail in CI as it would on Ascend.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled() and any(t.requires_grad for t in _tensors_in((*args, *kwargs.values()))):
            warnings.warn(
                f"{fn.__name__} has no autograd on NPU (no derivative in op-plugin's derivatives.yaml): "
                "its outputs are detached here, and on an NPU backward through it warns and yields no "
                "gradient. Wrap it in your own torch.autograd.Function.",
                NpuNoAutogradWarning,
                stacklevel=2,
            )
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def _check_index_dtype(name: str, tensor: torch.Tensor, allowed=(torch.int32,)) -> None:
    if tensor.dtype not in allowed:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be {names}, got {tensor.dtype}")


def _gather_rows(rows_RH: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`rows_RH[index]` (differentiable), where an index past the end of a truncated tensor (a copy cut off
    by the permute's `num_out_tokens`) yields a zero row. Shape `[*index.shape, H]`."""
    hidden = rows_RH.shape[-1]
    if rows_RH.shape[0] == 0 and index.numel() > 0:  # nothing to gather from (every copy was cut off)
        return rows_RH.new_zeros(*index.shape, hidden)
    valid = index < rows_RH.shape[0]
    gathered = rows_RH.index_select(0, torch.where(valid, index, 0).reshape(-1)).view(*index.shape, hidden)
    return torch.where(valid.unsqueeze(-1), gathered, gathered.new_zeros(()))


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse


# ---------------------------------------------------------------------------------------------------
# 1.6 token permute / unpermute (differentiable)
# ---------------------------------------------------------------------------------------------------


def npu_moe_token_permute(tokens: torch.Tensor, indices: torch.Tensor, num_out_tokens: Optional[int] = None,
                          padded_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate each token once per routed expert and group the copies by expert.

    tokens `[N, H]`; indices `[N, K]` (or `[N]`, K = 1) int32/int64 expert ids. Returns
    `permuted_tokens [R, H]` (expert-major, ascending token inside an expert; R = N*K unless
    num_out_tokens truncates) and `sorted_indices [N*K]` int32, where `sorted_indices[t*K + j]` is the
    row of permuted_tokens holding (token t, slot j). Note: that is the INVERSE of Megatron's
    `sorted_indices`; feed it only to `npu_moe_token_unpermute`. Differentiable w.r.t. tokens.
    """
    if padded_mode:
        raise NotImplementedError("npu_moe_token_permute: padded_mode must be False")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [N, H], got shape {tuple(tokens.shape)}")
    _check_index_dtype("indices", indices, (torch.int32, torch.int64))
    if indices.dim() not in (1, 2) or indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"indices must be [N, K] or [N] with N = {tokens.shape[0]}, got {tuple(indices.shape)}")
    topk = 1 if indices.dim() == 1 else indices.shape[1]
    if topk > _MAX_TOKEN_PERMUTE_TOPK:
        raise ValueError(f"top-k {topk} exceeds torch_npu's limit of {_MAX_TOKEN_PERMUTE_TOPK}")

    flat_expert = indices.reshape(-1)
    num_copies = flat_expert.numel()
    # Megatron's sorted_indices: destination row -> source flat index (token-major t*K + j). The sort
    # is stable, so the copies routed to one expert stay in ascending token order.
    dst_to_src = torch.argsort(flat_expert, stable=True)
    if not num_out_tokens:  # None or 0: keep every copy
        num_rows = num_copies
    elif num_out_tokens > 0:
        num_rows = min(num_out_tokens, num_copies)
    else:
        num_rows = max(num_copies + num_out_tokens, 0)
    permuted_tokens = tokens.index_select(0, dst_to_src[:num_rows] // topk)
    # torch_npu returns the inverse map (source flat index -> destination row), always full length.
    sorted_indices = _inverse_permutation(dst_to_src).to(torch.int32)
    return permuted_tokens, sorted_indices


def npu_moe_token_unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor,
                            probs: Optional[torch.Tensor] = None, padded_mode: bool = False,
                            restore_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Gather each token's K expert outputs back and combine them with the routing weights.

    `out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t*K + j]]`, `[N, H]` in the dtype of
    permuted_tokens, K = probs.shape[1] (1 when probs is None). Copies cut off by `num_out_tokens` in
    the permute (destination row >= permuted_tokens rows) contribute zero. Differentiable w.r.t.
    permuted_tokens and probs.
    """
    if padded_mode:
        raise NotImplementedError("npu_moe_token_unpermute: padded_mode must be False")
    if permuted_tokens.dim() != 2:
        raise ValueError(f"permuted_tokens must be [R, H], got shape {tuple(permuted_tokens.shape)}")
    _check_index_dtype("sorted_indices", sorted_indices, (torch.int32, torch.int64))
    topk = 1 if probs is None else probs.shape[1]
    if sorted_indices.dim() != 1 or sorted_indices.numel() % topk:
        raise ValueError(f"sorted_indices must be [N*K] with K = {topk}, got shape {tuple(sorted_indices.shape)}")
    num_tokens = sorted_indices.numel() // topk
    if probs is not None and probs.shape != (num_tokens, topk):
        raise ValueError(f"probs must be [N, K] = [{num_tokens}, {topk}], got {tuple(probs.shape)}")

    compute_dtype = _compute_dtype(permuted_tokens.dtype, *(() if probs is None else (probs.dtype,)))
    copies_NKH = _gather_rows(permuted_tokens, sorted_indices.long().view(num_tokens, topk)).to(compute_dtype)
    if probs is not None:
        copies_NKH = copies_NKH * probs.to(compute_dtype).unsqueeze(-1)
    out_NH = copies_NKH.sum(dim=1).to(permuted_tokens.dtype)
    return out_NH.reshape(restore_shape) if restore_shape is not None else out_NH


# ---------------------------------------------------------------------------------------------------
# 1.4 grouped matmul (no autograd)
# ---------------------------------------------------------------------------------------------------


def _group_ends(group_list: Any, group_list_type: int, num_rows: int) -> list[int]:
    """group_list (int64 tensor or host ints) -> cumulative end offsets as host ints."""
    if group_list is None:
        raise ValueError("group_list is required for group_type 0 and 2")
    if isinstance(group_list, torch.Tensor):
        if group_list.dtype != torch.int64:
            raise TypeError(f"group_list must be an int64 tensor, got {group_list.dtype}")
        values = group_list.reshape(-1).tolist()
    else:
        values = [int(v) for v in group_list]
    if any(v < 0 for v in values):
        raise ValueError(f"group_list values must be non-negative, got {values}")
    if group_list_type == 0:  # cumulative end offsets
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"group_list_type=0 expects non-decreasing cumulative offsets, got {values}")
        ends = values
    elif group_list_type == 1:  # per-group sizes
        ends, total = [], 0
        for v in values:
            total += v
            ends.append(total)
    else:
        raise NotImplementedError(f"group_list_type={group_list_type} is not emulated (0 = cumsum, 1 = counts)")
    if ends and ends[-1] > num_rows:
        raise ValueError(f"group_list covers {ends[-1]} rows but the grouped axis has {num_rows}")
    return ends


@_no_autograd
def npu_grouped_matmul(x: Sequence[torch.Tensor], weight: Sequence[torch.Tensor], *,
                       bias: Optional[Sequence[torch.Tensor]] = None, scale=None, offset=None,
                       antiquant_scale=None, antiquant_offset=None, per_token_scale=None,
                       group_list: Optional[torch.Tensor | Sequence[int]] = None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item: int = 0,
                       group_type: Optional[int] = None, group_list_type: int = 0, act_type: int = 0,
                       output_dtype: Optional[torch.dtype] = None, tuning_config=None) -> list[torch.Tensor]:
    """Grouped matmul (no autograd on NPU). The training forms (those MindSpeed's `npu_gmm` uses):

      * group_type 0, rows grouped: `gmm([x[M,K]], [W[E,K,N]], group_list, split_item=2|3)` -> `[y[M,N]]`,
        rows `[start_e, end_e)` times `W[e]` (rows must already be sorted by expert); the weight may be a
        transposed view (dx: `[W.transpose(1, 2)]`) or a list of E `[K, N]` tensors. Rows past the last
        group end are 0 here (undefined on NPU).
      * group_type 2, contraction grouped (weight gradients): `gmm([x.T[K,M]], [dy[M,N]], group_list,
        split_item=3)` -> `[dW[E,K,N]]`, `dW[e] = x[s_e:e_e].T @ dy[s_e:e_e]`, zeros for an empty group.
      * group_type -1 / None: independent matmuls `y_i = x_i @ w_i (+ bias_i)`.

    group_list: int64 tensor or host ints; group_list_type 0 = cumulative end offsets, 1 = group sizes.
    split_item 0/1 -> one output per group; 2/3 -> a single output tensor. Math in fp32 (fp64 for fp64),
    output in x's dtype.
    """
    for name, value in (("scale", scale), ("offset", offset), ("antiquant_scale", antiquant_scale),
                        ("antiquant_offset", antiquant_offset), ("per_token_scale", per_token_scale),
                        ("activation_input", activation_input), ("activation_quant_scale", activation_quant_scale),
                        ("activation_quant_offset", activation_quant_offset)):
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
            raise NotImplementedError(f"npu_grouped_matmul: quantisation argument {name} is not emulated")
    if act_type != 0:
        raise NotImplementedError("npu_grouped_matmul: fused activation (act_type != 0) is not emulated")
    if split_item not in (0, 1, 2, 3):
        raise ValueError(f"split_item must be 0..3, got {split_item}")
    x, weight = list(x), list(weight)
    if not x or not weight:
        raise ValueError("x and weight must be non-empty lists of tensors")
    out_dtype = x[0].dtype
    if output_dtype is not None and output_dtype != out_dtype:
        raise NotImplementedError("npu_grouped_matmul: output_dtype other than x's dtype is not emulated")
    compute_dtype = _compute_dtype(*(t.dtype for t in x + weight))
    group_type = -1 if group_type is None else group_type
    single_output = split_item in (2, 3)

    if group_type == -1:
        if group_list is not None:
            raise ValueError("group_type=-1 (no grouping) takes no group_list; use group_type=0")
        if len(x) != len(weight):
            raise ValueError(f"group_type=-1 needs as many x as weight tensors, got {len(x)} and {len(weight)}")
        outs = []
        for i, (x_i, w_i) in enumerate(zip(x, weight)):
            y_i = x_i.to(compute_dtype) @ w_i.to(compute_dtype)
            if bias is not None:
                y_i = y_i + bias[i].to(compute_dtype)
            outs.append(y_i.to(out_dtype))
        return [torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])] if single_output else outs

    if group_type == 0:
        if len(x) != 1 or x[0].dim() != 2:
            raise NotImplementedError("group_type=0 is emulated for a single 2-D x tensor")
        x_MK = x[0]
        if len(weight) == 1 and weight[0].dim() == 3:
            weights_KN = list(weight[0].unbind(0))
            max_groups = _MAX_GMM_GROUPS_SINGLE_WEIGHT
        else:
            weights_KN, max_groups = weight, _MAX_GMM_GROUPS_WEIGHT_LIST
        num_groups = len(weights_KN)
        if num_groups > max_groups:
            raise ValueError(f"{num_groups} groups exceed torch_npu's limit of {max_groups} for this weight form")
        if x_MK.shape[-1] >= _MAX_GMM_INNER_DIM or weights_KN[0].shape[-1] >= _MAX_GMM_INNER_DIM:
            raise ValueError(f"the inner dims of x and weight must be < {_MAX_GMM_INNER_DIM}")
        ends = _group_ends(group_list, group_list_type, x_MK.shape[0])
        if len(ends) != num_groups:
            raise ValueError(f"group_list has {len(ends)} groups but there are {num_groups} weights")
        num_out = weights_KN[0].shape[-1]
        y_MN = x_MK.new_zeros(x_MK.shape[0], num_out, dtype=compute_dtype)
        starts = [0] + ends[:-1]
        for e, (s, t) in enumerate(zip(starts, ends)):
            if t > s:
                y_e = x_MK[s:t].to(compute_dtype) @ weights_KN[e].to(compute_dtype)
                if bias is not None:
                    y_e = y_e + (bias[0][e] if len(bias) == 1 and bias[0].dim() == 2 else bias[e]).to(compute_dtype)
                y_MN[s:t] = y_e
        y_MN = y_MN.to(out_dtype)
        return [y_MN] if single_output else [y_MN[s:t] for s, t in zip(starts, ends)]

    if group_type == 2:
        if len(x) != 1 or len(weight) != 1 or x[0].dim() != 2 or weight[0].dim() != 2:
            raise ValueError("group_type=2 takes x = [x.T [K, M]] and weight = [dy [M, N]]")
        if bias is not None:
            raise ValueError("group_type=2 (weight gradients) takes no bias")
        xT_KM, dy_MN = x[0], weight[0]
        if xT_KM.shape[1] != dy_MN.shape[0]:
            raise ValueError(f"x.T is {tuple(xT_KM.shape)} but dy is {tuple(dy_MN.shape)}: grouped axis differs")
        ends = _group_ends(group_list, group_list_type, dy_MN.shape[0])
        dW_EKN = xT_KM.new_zeros(len(ends), xT_KM.shape[0], dy_MN.shape[1], dtype=compute_dtype)
        for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
            if t > s:
                dW_EKN[e] = xT_KM[:, s:t].to(compute_dtype) @ dy_MN[s:t].to(compute_dtype)
        dW_EKN = dW_EKN.to(out_dtype)
        return [dW_EKN] if single_output else list(dW_EKN.unbind(0))

    raise ValueError(f"group_type must be -1 (None), 0 or 2, got {group_type}")


# ---------------------------------------------------------------------------------------------------
# 1.8 swiglu, 1.9 rms_norm, 1.10 rotary_mul (differentiable)
# ---------------------------------------------------------------------------------------------------


def npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`silu(A) * B` with `A, B = x.chunk(2, dim)`: the FIRST half is the gate. Output halves `dim`."""
    if not 1 <= x.dim() <= 8:
        raise ValueError(f"npu_swiglu supports 1-8 dims, got {x.dim()}")
    if x.shape[dim] % 2:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} must be even")
    gate, up = x.chunk(2, dim=dim)
    compute_dtype = _compute_dtype(x.dtype)
    return (F.silu(gate.to(compute_dtype)) * up.to(compute_dtype)).to(x.dtype)


def npu_rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`y = (x_fp32 * rstd * gamma_fp32).to(x.dtype)`, `rstd = 1 / sqrt(mean(x^2) + eps)` over gamma's dims.

    Returns `(y, rstd)`; rstd is float32 with x's leading dims and 1 for each gamma dim, and is not
    differentiable. Note the order: gamma multiplies in fp32 before the cast (Qwen/HF cast first), so
    bf16 results differ from the reference OpSet in the last bit.
    """
    if gamma.dim() == 0 or tuple(x.shape[-gamma.dim():]) != tuple(gamma.shape):
        raise ValueError(f"gamma {tuple(gamma.shape)} must match the trailing dims of x {tuple(x.shape)}")
    compute_dtype = _compute_dtype(x.dtype, gamma.dtype)
    reduce_dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    x_c = x.to(compute_dtype)
    rstd = torch.rsqrt(x_c.pow(2).mean(dim=reduce_dims, keepdim=True) + epsilon)
    y = (x_c * rstd * gamma.to(compute_dtype)).to(x.dtype)
    return y, rstd.detach().to(torch.float32)


def npu_rotary_mul(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                   rotate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`r1 * x + r2 * rotate(x)` with r1 = cos, r2 = sin (full head dim D, broadcast to x).

    half: `rotate(x) = cat(-x2, x1)` with `x1, x2 = x.chunk(2, -1)`; interleave: each pair
    `(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])`. x must be 4-D (BNSD / BSND / SBND); r1/r2 broadcast
    (e.g. `1S1D`, `S11D`, `11SD`) and share x's dtype. Differentiable w.r.t. x, r1 and r2.
    """
    if rotate is not None:
        raise NotImplementedError("npu_rotary_mul: the `rotate` matrix form is not emulated")
    if x.dim() != 4:
        raise ValueError(f"npu_rotary_mul takes a 4-D x, got shape {tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"head dim {x.shape[-1]} must be even")
    if r1.dtype != x.dtype or r2.dtype != x.dtype:
        raise TypeError(f"r1/r2 must have x's dtype {x.dtype}, got {r1.dtype} and {r2.dtype}")
    for name, r in (("r1", r1), ("r2", r2)):
        if r.dim() != 4 or torch.broadcast_shapes(r.shape, x.shape) != x.shape:
            raise ValueError(f"{name} {tuple(r.shape)} must be 4-D and broadcast to x {tuple(x.shape)}")
    compute_dtype = _compute_dtype(x.dtype)
    x_c = x.to(compute_dtype)
    if rotary_mode == "half":
        x1, x2 = x_c.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    elif rotary_mode == "interleave":
        rotated = torch.stack((-x_c[..., 1::2], x_c[..., 0::2]), dim=-1).flatten(-2)
    else:
        raise ValueError(f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    return (r1.to(compute_dtype) * x_c + r2.to(compute_dtype) * rotated).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# 1.11 fusion attention (differentiable w.r.t. q, k, v, pse)
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _canonical_compressed_mask(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(_COMPRESSED_MASK_SIZE, _COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device), 1)


def _check_compressed_mask(atten_mask: Optional[torch.Tensor], sparse_mode: int) -> None:
    """sparse_mode 2/3 take the optimised 2048x2048 `triu(ones, 1)` mask (True = masked); the kernel
    derives the causal structure from it, so anything else would not mean what the caller thinks."""
    if atten_mask is None:
        raise ValueError(f"sparse_mode={sparse_mode} requires atten_mask = torch.triu(torch.ones(2048, 2048, "
                         "dtype=torch.bool), 1)")
    if tuple(atten_mask.shape) != (_COMPRESSED_MASK_SIZE, _COMPRESSED_MASK_SIZE):
        raise ValueError(f"sparse_mode={sparse_mode} takes the compressed [2048, 2048] mask, "
                         f"got {tuple(atten_mask.shape)}")
    if not torch.equal(atten_mask.bool(), _canonical_compressed_mask(atten_mask.device)):
        raise ValueError(f"sparse_mode={sparse_mode}: atten_mask must be torch.triu(torch.ones(2048, 2048), 1) "
                         "(True = masked)")


def _structural_mask(sq: int, skv: int, sparse_mode: int, pre_tockens: int, next_tockens: int,
                     has_explicit_mask: bool, device: torch.device) -> Optional[torch.Tensor]:
    """The [Sq, Skv] part of the mask (True = masked) that sparse_mode defines, or None."""
    if sparse_mode in (2, 3):
        row = torch.arange(sq, device=device).unsqueeze(1)
        col = torch.arange(skv, device=device).unsqueeze(0)
        # 2 = leftUpCausal (diagonal through the top-left corner), 3 = rightDownCausal (bottom-right).
        return col > row + (skv - sq if sparse_mode == 3 else 0)
    if sparse_mode == 0 and has_explicit_mask and (pre_tockens < sq or next_tockens < skv):
        # Mode 0 with a mask computes only the band -pre_tockens <= j - i <= next_tockens.
        row = torch.arange(sq, device=device).unsqueeze(1)
        col = torch.arange(skv, device=device).unsqueeze(0)
        return (col - row > next_tockens) | (row - col > pre_tockens)
    return None  # mode 0 without a mask ignores pre/next_tockens; mode 1 uses the mask alone


def _attention_core(q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, v_BNSD: torch.Tensor,
                    masked: Optional[torch.Tensor], scale: float, pse: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(scale * (q k^T + pse), masked -> -inf) @ v in fp32 (fp64 for fp64).

    Returns the output `[B, N, Sq, Dv]` in the compute dtype and the row max / row sum `[B, N, Sq]`.
    """
    compute_dtype = _compute_dtype(q_BNSD.dtype)
    group = q_BNSD.shape[1] // k_BNSD.shape[1]
    if group > 1:  # GQA: query head h reads kv head h // group
        k_BNSD = k_BNSD.repeat_interleave(group, dim=1)
        v_BNSD = v_BNSD.repeat_interleave(group, dim=1)
    batch, heads, sq = q_BNSD.shape[:3]
    if k_BNSD.shape[2] == 0:  # nothing to attend to: undefined on NPU, zero here
        out = q_BNSD.new_zeros(batch, heads, sq, v_BNSD.shape[-1], dtype=compute_dtype)
        empty = q_BNSD.new_zeros(batch, heads, sq, dtype=compute_dtype)
        return out, empty - float("inf"), empty
    scores = torch.matmul(q_BNSD.to(compute_dtype), k_BNSD.to(compute_dtype).transpose(-1, -2))
    if pse is not None:  # torch_npu: scale * (pse + q k^T)
        scores = scores + pse.to(compute_dtype)
    scores = scores * scale
    dead_rows = None
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
        dead_rows = masked.all(dim=-1, keepdim=True)  # fully-masked rows: invalid on NPU, output 0 here
        if bool(dead_rows.any()):
            scores = scores.masked_fill(dead_rows, 0.0)  # keep softmax (and its backward) finite
        else:
            dead_rows = None
    # torch.softmax rather than exp/sum/divide: its fused backward is the accurate one (what
    # FlashAttention's backward computes too), which keeps fp32 gradients within ~2e-7 of fp64.
    probs = torch.softmax(scores, dim=-1)
    if dead_rows is not None:
        probs = probs.masked_fill(dead_rows, 0.0)
    out = torch.matmul(probs, v_BNSD.to(compute_dtype))
    with torch.no_grad():  # softmax_max / softmax_sum: informational, not differentiable
        row_max = scores.amax(dim=-1, keepdim=True)
        row_sum = torch.exp(scores - row_max).sum(dim=-1, keepdim=True)
        if dead_rows is not None:
            row_max = row_max.masked_fill(dead_rows, float("-inf"))
            row_sum = row_sum.masked_fill(dead_rows, 0.0)
    return out, row_max.squeeze(-1), row_sum.squeeze(-1)


def _cumulative_ends(name: str, values: Any) -> list[int]:
    if values is None:
        raise ValueError(f"input_layout='TND' requires {name} (cumulative end offsets without a leading 0)")
    if isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a host list of ints (torch_npu's int[]), got a tensor; "
                        "convert with cu_seqlens[1:].tolist()")
    return [int(v) for v in values]


def _varlen_bounds(actual_seq_qlen: Any, actual_seq_kvlen: Any, t_q: int, t_kv: int) -> list[tuple[int, int, int, int]]:
    """[(q_start, q_end, kv_start, kv_end)] per sequence from torch_npu's cumulative-end lists."""
    q_ends = _cumulative_ends("actual_seq_qlen", actual_seq_qlen)
    kv_ends = _cumulative_ends("actual_seq_kvlen", actual_seq_kvlen)
    if len(q_ends) != len(kv_ends):
        raise ValueError("actual_seq_qlen and actual_seq_kvlen must have the same length "
                         f"({len(q_ends)} vs {len(kv_ends)})")
    while q_ends and q_ends[-1] == 0 and kv_ends[-1] == 0:  # trailing zeros skip trailing batches
        q_ends.pop()
        kv_ends.pop()
    if len(q_ends) > _MAX_VARLEN_SEQUENCES:
        raise ValueError(f"{len(q_ends)} sequences exceed the varlen limit of {_MAX_VARLEN_SEQUENCES}")
    for name, ends, total in (("actual_seq_qlen", q_ends, t_q), ("actual_seq_kvlen", kv_ends, t_kv)):
        if any(e < 0 for e in ends) or any(b < a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"{name} must be cumulative (non-decreasing) end offsets without a leading 0 "
                             f"(lengths 2 2 2 -> 2 4 6), got {ends}")
        if ends and ends[-1] > total:
            raise ValueError(f"{name} ends at {ends[-1]} but the tensor has {total} tokens")
    q_starts, kv_starts = [0] + q_ends[:-1], [0] + kv_ends[:-1]
    return list(zip(q_starts, q_ends, kv_starts, kv_ends))


def npu_fusion_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int,
                         input_layout: str, pse: Optional[torch.Tensor] = None,
                         padding_mask: Optional[torch.Tensor] = None, atten_mask: Optional[torch.Tensor] = None,
                         scale: float = 1.0, keep_prob: float = 1.0, pre_tockens: int = 2147483647,
                         next_tockens: int = 2147483647, inner_precise: int = 0, prefix: Optional[Sequence[int]] = None,
                         actual_seq_qlen: Optional[Sequence[int]] = None,
                         actual_seq_kvlen: Optional[Sequence[int]] = None,
                         sparse_mode: int = 0, gen_mask_parallel: bool = True, sync: bool = False,
                         softmax_layout: str = "", sink: Optional[torch.Tensor] = None):
    """FlashAttention forward: `softmax(Mask(scale * (pse + q k^T), atten_mask)) @ v`.

    Returns the 7-tuple `(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)`;
    use `[0]`. Layouts: BSH, SBH, BSND, BNSD, TND (`q [Tq, Nq, D]`, `k/v [Tkv, Nkv, D]`, GQA when
    Nq % Nkv == 0; head_num = Nq). NOTE: `scale` defaults to 1.0 (pass 1/sqrt(D)). TND needs
    `actual_seq_qlen/actual_seq_kvlen`: host int lists of cumulative END offsets WITHOUT a leading 0
    (lengths 2 2 2 2 2 -> 2 4 6 8 10); repeated values are empty sequences, trailing zeros skip
    trailing batches. atten_mask: bool/uint8, True = masked. sparse_mode 0 = the explicit mask (plus the
    pre/next_tockens band) or none at all; 1 = the explicit mask only; 2 = causal aligned top-left and
    3 = causal aligned bottom-right, both with the compressed `triu(ones(2048, 2048), 1)` mask.
    Differentiable w.r.t. query, key, value (and pse); softmax_max/sum are not.
    """
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if keep_prob != 1.0:
        raise NotImplementedError("dropout (keep_prob < 1) is not emulated: the NPU's RNG cannot be reproduced")
    if padding_mask is not None or prefix is not None or sink is not None:
        raise NotImplementedError("padding_mask, prefix and sink are not emulated")
    if sparse_mode not in (0, 1, 2, 3):
        raise NotImplementedError(f"sparse_mode={sparse_mode} is not emulated (0, 1, 2, 3 are)")
    if softmax_layout not in ("", "TND"):
        raise NotImplementedError(f"softmax_layout={softmax_layout!r} is not emulated")
    if atten_mask is not None and atten_mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"atten_mask must be bool or uint8 (True/1 = masked), got {atten_mask.dtype}")
    if sparse_mode in (2, 3):
        _check_compressed_mask(atten_mask, sparse_mode)
    elif sparse_mode == 1 and atten_mask is None:
        raise ValueError("sparse_mode=1 (allMask) requires the full atten_mask")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    expected_dim = {"BSH": 3, "SBH": 3, "BSND": 4, "BNSD": 4, "TND": 3}.get(input_layout)
    if expected_dim is None:
        raise ValueError(f"input_layout must be one of BSH, SBH, BSND, BNSD, TND, got {input_layout!r}")
    if not query.dim() == key.dim() == value.dim() == expected_dim:
        raise ValueError(f"layout {input_layout} takes {expected_dim}-D query/key/value")
    if input_layout != "TND" and (actual_seq_qlen is not None or actual_seq_kvlen is not None):
        raise ValueError("actual_seq_qlen/actual_seq_kvlen are only valid with input_layout='TND'")
    explicit_mask = atten_mask.bool() if (atten_mask is not None and sparse_mode in (0, 1)) else None

    if input_layout == "TND":
        return _fusion_attention_tnd(query, key, value, head_num, pse, explicit_mask, float(scale), pre_tockens,
                                     next_tockens, actual_seq_qlen, actual_seq_kvlen, sparse_mode)

    # Bring every batched layout to BNSD.
    if input_layout in ("BSH", "SBH"):
        if input_layout == "SBH":
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query.shape[-1] % head_num:
            raise ValueError(f"hidden size {query.shape[-1]} is not a multiple of head_num {head_num}")
        head_dim = query.shape[-1] // head_num
        if key.shape[-1] % head_dim:
            raise ValueError(f"key hidden size {key.shape[-1]} is not a multiple of the head dim {head_dim}")
        kv_heads = key.shape[-1] // head_dim
        q_BNSD = query.unflatten(-1, (head_num, head_dim)).transpose(1, 2)
        k_BNSD = key.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
        v_BNSD = value.unflatten(-1, (kv_heads, value.shape[-1] // kv_heads)).transpose(1, 2)
    elif input_layout == "BSND":
        q_BNSD, k_BNSD, v_BNSD = (t.transpose(1, 2) for t in (query, key, value))
    else:
        q_BNSD, k_BNSD, v_BNSD = query, key, value
    if q_BNSD.shape[1] != head_num:
        raise ValueError(f"head_num={head_num} but query has {q_BNSD.shape[1]} heads")
    if head_num % k_BNSD.shape[1]:
        raise ValueError(f"query heads {head_num} must be a multiple of key/value heads {k_BNSD.shape[1]}")
    sq, skv = q_BNSD.shape[2], k_BNSD.shape[2]

    masked = explicit_mask
    if masked is not None:
        if masked.dim() not in (2, 4) or tuple(masked.shape[-2:]) != (sq, skv):
            raise ValueError(f"atten_mask must be [Sq, Skv], [B, 1, Sq, Skv] or [B, N, Sq, Skv] with "
                             f"Sq={sq}, Skv={skv}; got {tuple(masked.shape)}")
    structural = _structural_mask(sq, skv, sparse_mode, pre_tockens, next_tockens, masked is not None, query.device)
    if structural is not None:
        masked = structural if masked is None else (masked | structural)
    out_BNSD, row_max, row_sum = _attention_core(q_BNSD, k_BNSD, v_BNSD, masked, float(scale), pse)
    out_BNSD = out_BNSD.to(query.dtype)

    if input_layout == "BNSD":
        out = out_BNSD
    elif input_layout == "BSND":
        out = out_BNSD.transpose(1, 2)
    else:
        out = out_BNSD.transpose(1, 2).flatten(-2)  # BSH
        if input_layout == "SBH":
            out = out.transpose(0, 1)
    softmax_max = row_max.detach().float().unsqueeze(-1).expand(*row_max.shape, 8).contiguous()
    softmax_sum = row_sum.detach().float().unsqueeze(-1).expand(*row_sum.shape, 8).contiguous()
    return out, softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0


def _fusion_attention_tnd(query, key, value, head_num, pse, explicit_mask, scale, pre_tockens, next_tockens,
                          actual_seq_qlen, actual_seq_kvlen, sparse_mode):
    """Varlen (packed) attention: one sequence at a time, no token attends across a boundary."""
    t_q, n_q = query.shape[:2]
    n_kv = key.shape[1]
    if n_q != head_num:
        raise ValueError(f"head_num={head_num} but query has {n_q} heads")
    if n_q % n_kv:
        raise ValueError(f"query heads {n_q} must be a multiple of key/value heads {n_kv}")
    if explicit_mask is not None:
        raise NotImplementedError("an explicit (uncompressed) atten_mask with TND is not emulated; "
                                  "use sparse_mode 2/3 with the compressed mask, or no mask")
    if pse is not None:
        raise NotImplementedError("pse with TND is not emulated")
    bounds = _varlen_bounds(actual_seq_qlen, actual_seq_kvlen, t_q, key.shape[0])

    compute_dtype = _compute_dtype(query.dtype)
    outs, maxes, sums = [], [], []
    for q_start, q_end, kv_start, kv_end in bounds:
        if q_end == q_start:  # an empty sequence (a repeated value)
            continue
        q_1NSD = query[q_start:q_end].transpose(0, 1).unsqueeze(0)
        k_1NSD = key[kv_start:kv_end].transpose(0, 1).unsqueeze(0)
        v_1NSD = value[kv_start:kv_end].transpose(0, 1).unsqueeze(0)
        masked = _structural_mask(q_end - q_start, kv_end - kv_start, sparse_mode, pre_tockens, next_tockens,
                                  False, query.device)
        out, row_max, row_sum = _attention_core(q_1NSD, k_1NSD, v_1NSD, masked, scale, None)
        outs.append(out[0].transpose(0, 1))  # [Sq, N, Dv]
        maxes.append(row_max[0].t())
        sums.append(row_sum[0].t())
    covered = bounds[-1][1] if bounds else 0
    if covered < t_q:  # rows past the last sequence: not computed on NPU, zero here
        outs.append(query.new_zeros(t_q - covered, n_q, value.shape[-1], dtype=compute_dtype))
        maxes.append(query.new_zeros(t_q - covered, n_q, dtype=compute_dtype))
        sums.append(query.new_zeros(t_q - covered, n_q, dtype=compute_dtype))
    if not outs:
        outs, maxes, sums = ([query.new_zeros(0, n_q, value.shape[-1], dtype=compute_dtype)],
                             [query.new_zeros(0, n_q)], [query.new_zeros(0, n_q)])
    out = torch.cat(outs).to(query.dtype)
    softmax_max = torch.cat(maxes).detach().float().unsqueeze(-1).expand(-1, -1, 8).contiguous()
    softmax_sum = torch.cat(sums).detach().float().unsqueeze(-1).expand(-1, -1, 8).contiguous()
    return out, softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0


# ---------------------------------------------------------------------------------------------------
# incremental (decode) flash attention over a KV cache (inference only: no autograd on NPU)
# ---------------------------------------------------------------------------------------------------

_MAX_IFA_GQA_RATIO = 64  # num_heads / num_key_value_heads


@_no_autograd
def npu_incre_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                              padding_mask: Optional[torch.Tensor] = None, pse_shift: Optional[torch.Tensor] = None,
                              atten_mask: Optional[torch.Tensor] = None,
                              actual_seq_lengths: Optional[Sequence[int]] = None, dequant_scale1=None,
                              quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None,
                              antiquant_scale=None, antiquant_offset=None, block_table=None, kv_padding_size=None,
                              num_heads: int = 1, scale_value: float = 1.0, input_layout: str = "BSH",
                              num_key_value_heads: int = 0, block_size: int = 0, inner_precise: int = 1
                              ) -> torch.Tensor:
    """Incremental FlashAttention (one query step per batch entry over a KV cache):
    `softmax(scale_value * q k^T + atten_mask) @ v`, output shaped like `query`.

    Layouts: BSH (`[B, S, N*D]`), BSND, BNSD; query S is 1 (the decode step), key/value `[B, S_max, ...]` the
    cache (same shape). `actual_seq_lengths`: host int list `[B]` (or `[1]`, broadcast) of the valid KV rows
    per batch entry, right padding: entry b reads rows `[0, actual_seq_lengths[b])`; None = all S_max rows.
    num_heads = query heads; num_key_value_heads 0 = num_heads, else GQA with query head h reading kv head
    h // (num_heads / num_key_value_heads), the ratio at most 64. atten_mask: bool/int8/uint8 `[B, 1, S_max]`
    style (broadcast to `[B, N, 1, S_max]`), 1 = masked. NOTE: scale_value defaults to 1.0.
    Not emulated (raise): page attention (block_table), quantisation, pse_shift, KV left padding
    (kv_padding_size). Math in fp32 (fp64 for fp64, an emulation extension; the NPU takes fp16/bf16).
    """
    for name, v in (("block_table", block_table), ("pse_shift", pse_shift), ("kv_padding_size", kv_padding_size),
                    ("dequant_scale1", dequant_scale1), ("quant_scale1", quant_scale1),
                    ("dequant_scale2", dequant_scale2), ("quant_scale2", quant_scale2),
                    ("quant_offset2", quant_offset2), ("antiquant_scale", antiquant_scale),
                    ("antiquant_offset", antiquant_offset)):
        if v is not None:
            raise NotImplementedError(f"npu_incre_flash_attention: {name} is not emulated")
    if padding_mask is not None:
        raise ValueError("npu_incre_flash_attention: padding_mask is reserved (unused) on torch_npu; pass None")
    if not isinstance(scale_value, (int, float)):
        raise TypeError(f"scale_value must be a Python float, got {type(scale_value).__name__}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    expected_dim = {"BSH": 3, "BSND": 4, "BNSD": 4}.get(input_layout)
    if expected_dim is None:
        raise ValueError(f"input_layout must be BSH, BSND or BNSD, got {input_layout!r}")
    if not query.dim() == key.dim() == expected_dim:
        raise ValueError(f"layout {input_layout} takes {expected_dim}-D query/key/value")
    kv_heads = num_key_value_heads or num_heads
    if num_heads % kv_heads or num_heads // kv_heads > _MAX_IFA_GQA_RATIO:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_key_value_heads={kv_heads} with a ratio "
                         f"of at most {_MAX_IFA_GQA_RATIO}")
    if input_layout == "BSH":
        head_dim = query.shape[-1] // num_heads
        q_BNSD = query.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)
        k_BNSD = key.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
        v_BNSD = value.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
    elif input_layout == "BSND":
        q_BNSD, k_BNSD, v_BNSD = (t.transpose(1, 2) for t in (query, key, value))
    else:
        q_BNSD, k_BNSD, v_BNSD = query, key, value
    if q_BNSD.shape[1] != num_heads or k_BNSD.shape[1] != kv_heads:
        raise ValueError(f"query has {q_BNSD.shape[1]} heads (num_heads={num_heads}), key has {k_BNSD.shape[1]} "
                         f"(num_key_value_heads={num_key_value_heads})")
    batch, s_max = q_BNSD.shape[0], k_BNSD.shape[2]
    if q_BNSD.shape[2] != 1:
        raise NotImplementedError(f"npu_incre_flash_attention is the decode step: query S must be 1, "
                                  f"got {q_BNSD.shape[2]}")
    if actual_seq_lengths is None:
        lengths = [s_max] * batch
    else:
        if isinstance(actual_seq_lengths, torch.Tensor):
            raise TypeError("actual_seq_lengths must be a host list of ints (torch_npu's SymInt[]), got a tensor; "
                            "convert with .tolist()")
        lengths = [int(v) for v in actual_seq_lengths]
        if len(lengths) == 1:
            lengths = lengths * batch
        if len(lengths) != batch:
            raise ValueError(f"actual_seq_lengths has {len(lengths)} entries for batch {batch} (want B or 1)")
        if any(not 0 <= n <= s_max for n in lengths):
            raise ValueError(f"actual_seq_lengths {lengths} outside [0, S_max={s_max}]")
    col = torch.arange(s_max, device=query.device)
    masked_B11S = (col[None, :] >= torch.tensor(lengths, device=query.device)[:, None])[:, None, None, :]
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.int8, torch.uint8):
            raise TypeError(f"atten_mask must be bool/int8/uint8 (1 = masked), got {atten_mask.dtype}")
        masked_B11S = masked_B11S | atten_mask.bool().reshape(batch, -1, 1, s_max)
    out, _, _ = _attention_core(q_BNSD, k_BNSD, v_BNSD, masked_B11S.expand(batch, num_heads, 1, s_max),
                                float(scale_value), None)
    out = out.to(query.dtype)
    if input_layout == "BNSD":
        return out
    if input_layout == "BSND":
        return out.transpose(1, 2)
    return out.transpose(1, 2).flatten(-2)
