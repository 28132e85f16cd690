"""The GPU OpSet (NVIDIA): varlen flash attention, Triton fused MoE experts, vocab-chunked linear cross-entropy.

    get_opset("gpu", moe_impl="triton" | "grouped_mm" | "loop", attention_impl="auto" | "triton" | "flash_attn" |
              "aten_flash" | "torch_varlen" | "reference", kernels=KernelConfig(...))

`kernels` (the config's `backend.kernels`, table in docs/gpu.md) selects the Triton experts' paths.

Every op also accepts CPU tensors (tests, CPU CI): attention then runs the reference, and the Triton
experts and the cross-entropy's Triton row kernels fall back to torch, unless the process runs Triton's
interpreter (TRITON_INTERPRET=1 from before triton's import). The loop / grouped_mm experts are plain torch
and run anywhere (torch._grouped_mm wants 16-byte-aligned rows). rms_norm / rope / swiglu run as one Triton kernel
each way (sail_dist/kernels/triton/{rms_norm,rope,swiglu}.py; `backend.kernels.elementwise`) in eager code, and as
the reference's torch ops inside code that torch.compile traces (`train.compile=true`), which fuses them with their
neighbours per block (sail_dist/parallel/compile.py): an opaque kernel there would stop that fusion. Measured
figures: BENCHMARKS.md.
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

from sail_dist.config import KernelConfig
from sail_dist.kernels import reference as ref
from sail_dist.kernels.linear_cross_entropy import TORCH_ROW_OPS, RowOps, linear_cross_entropy
from sail_dist.kernels.opset import OpSet
from sail_dist.kernels.triton import interpreting

log = logging.getLogger(__name__)

MOE_IMPLS = ("triton", "grouped_mm", "loop")
ATTENTION_IMPLS = ("auto", "triton", "flash_attn", "aten_flash", "torch_varlen", "reference")


@functools.cache
def _log_once(msg: str) -> None:
    log.info(msg)


# --------------------------------------------------------------------------------------------------
# Attention over cu_seqlens
# --------------------------------------------------------------------------------------------------
def _flash_attn_fn():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - ImportError, or a flash-attn build that fails to load
        return None
    return flash_attn_varlen_func


def _torch_varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_attention(q, k, v, cu_seqlens, max_seqlen, causal):
    fn = _flash_attn_fn()
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, causal=causal)


def _make_torch_varlen_attention():
    """torch's varlen attention with its keyword spelling resolved here, once: inspecting the signature inside the
    attention call broke the graph of every compiled layer around it (dynamo cannot trace inspect.signature)."""
    fn = _torch_varlen_fn()
    params = frozenset(inspect.signature(fn).parameters)
    # torch 2.10 spelled causality `is_causal`; later versions take a (left, right) window instead.
    windowed, gqa = "window_size" in params, "enable_gqa" in params

    def attention(q, k, v, cu_seqlens, max_seqlen, causal):
        if windowed:
            kwargs = {"window_size": (-1, 0) if causal else (-1, -1)}
        else:
            kwargs = {"is_causal": causal}
        if q.shape[1] != k.shape[1]:
            if gqa:
                kwargs["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)

    return attention


def _triton_flash_module():
    try:
        from sail_dist.kernels.triton import flash_attention
    except ImportError:
        return None
    return flash_attention


def _hopper() -> bool:
    """Hopper (sm_90: H100, H200), where the Triton kernel was measured faster than FlashAttention-2 (BENCHMARKS.md)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _aten_flash_available() -> bool:
    return torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")


class _AtenFlashVarlen(torch.autograd.Function):
    """torch's own flash-attention kernels over cu_seqlens, called directly: the kernels under `varlen_attn`
    without its custom-op wrapper (whose per-call host work, ~0.5 ms under the profiler, left the device idle in
    the forward) and with GQA native (torch 2.11's wrapper has no `enable_gqa`: k / v were repeated to Hq heads).
    These two aten ops are what SDPA's flash path calls; their positional signatures are stable since torch 2.2."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, causal: bool):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, causal, False)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_seqlen, ctx.causal = max_seqlen, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout if dout.stride(-1) == 1 else dout.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens,
            ctx.max_seqlen, ctx.max_seqlen, 0.0, ctx.causal, rng_state, unused)
        return dq, dk, dv, None, None, None


def _aten_flash_attention(q, k, v, cu_seqlens, max_seqlen, causal):
    return _AtenFlashVarlen.apply(q, k, v, cu_seqlens, max_seqlen, causal)


def _resolve_attention(attention_impl: str) -> str:
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={attention_impl!r}; choose one of {ATTENTION_IMPLS}")
    if attention_impl == "auto":
        if _hopper() and _triton_flash_module() is not None:
            return "triton"
        if _flash_attn_fn() is not None:
            return "flash_attn"
        if _aten_flash_available():
            return "aten_flash"
        if _torch_varlen_fn() is not None:
            return "torch_varlen"
        return "reference"
    if attention_impl == "triton" and _triton_flash_module() is None:
        raise ImportError("attention_impl='triton' but triton is not importable")
    if attention_impl == "flash_attn" and _flash_attn_fn() is None:
        raise ImportError("attention_impl='flash_attn' but flash_attn is not importable")
    if attention_impl == "aten_flash" and not _aten_flash_available():
        raise ImportError("attention_impl='aten_flash' needs CUDA and torch.ops.aten._flash_attention_forward")
    if attention_impl == "torch_varlen" and _torch_varlen_fn() is None:
        raise ImportError("attention_impl='torch_varlen' but torch.nn.attention.varlen is missing")
    return attention_impl


def make_attention(attention_impl: str = "auto"):
    """attention(q[T,Hq,D], k, v, cu_seqlens, max_seqlen, causal) on the chosen kernel; the reference
    for CPU tensors and for dtypes the flash kernels lack (fp32). "triton" (sail_dist/kernels/triton/
    flash_attention.py) takes head dims 16-128 (powers of 2) and also runs CPU tensors in Triton's interpreter;
    other head dims go to torch's flash kernels (`aten_flash`) when there, else the reference."""
    impl = _resolve_attention(attention_impl)
    if impl == "triton":
        mod = _triton_flash_module()
        _log_once("sail_dist gpu OpSet: attention = triton")

        def attention(q, k, v, cu_seqlens, max_seqlen, causal):
            if not mod.supported_head_dim(q.shape[-1]) or not (q.is_cuda or mod.INTERPRET):
                if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _aten_flash_available():
                    return _aten_flash_attention(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), causal)
                return ref.attention(q, k, v, cu_seqlens, max_seqlen, causal)
            return mod.flash_attention(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), causal)

        attention.impl = impl
        return attention
    if impl == "torch_varlen":
        fast = _make_torch_varlen_attention()
    else:
        fast = {"flash_attn": _flash_attention, "aten_flash": _aten_flash_attention}.get(impl)
    _log_once(f"sail_dist gpu OpSet: attention = {impl}")

    def attention(q, k, v, cu_seqlens, max_seqlen, causal):
        if fast is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            if fast is not None:
                _log_once(f"sail_dist gpu OpSet: attention on {q.device.type}/{q.dtype} -> reference")
            return ref.attention(q, k, v, cu_seqlens, max_seqlen, causal)
        return fast(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), causal)

    attention.impl = impl
    return attention


# --------------------------------------------------------------------------------------------------
# Decode attention over the KV cache (generation)
# --------------------------------------------------------------------------------------------------
DECODE_ATTENTION_IMPLS = ("auto", "flash_attn", "triton", "sdpa", "reference")


def _flash_kvcache_fn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # noqa: BLE001 - ImportError, or a flash-attn build that fails to load
        return None
    return flash_attn_with_kvcache


def _decode_attention_sdpa(q_BHD, k_cache_BSHD, v_cache_BSHD, lengths_B):
    """torch SDPA over the whole cache with a length mask: no host sync, so it is CUDA-graph capturable.
    The Hq/Hkv query heads of a kv head are that head's query rows, so GQA needs no repeated cache."""
    B, Hq, D = q_BHD.shape
    S, Hkv = k_cache_BSHD.shape[1], k_cache_BSHD.shape[2]
    q_BHGD = q_BHD.view(B, Hkv, Hq // Hkv, D)
    keep_B11S = (torch.arange(S, device=q_BHD.device)[None, :] < lengths_B.to(torch.long)[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q_BHGD, k_cache_BSHD.transpose(1, 2).to(q_BHD.dtype),
                                       v_cache_BSHD.transpose(1, 2).to(q_BHD.dtype), attn_mask=keep_B11S)
    return o.reshape(B, Hq, D)


def _decode_attention_flash(q_BHD, k_cache_BSHD, v_cache_BSHD, lengths_B):
    """flash-attn's KV-cache kernel (split-KV over the valid rows only; cache_seqlens on the device)."""
    o = _flash_kvcache_fn()(q_BHD[:, None], k_cache_BSHD, v_cache_BSHD, cache_seqlens=lengths_B.to(torch.int32))
    return o[:, 0]


def _triton_decode_fn():
    try:
        from sail_dist.kernels.triton.decode_attention import decode_attention
    except ImportError:
        return None
    return decode_attention


def make_decode_attention(impl: str = "auto"):
    """decode_attention(q[B,Hq,D], k_cache[B,S,Hkv,D], v_cache, lengths[B]) on the chosen kernel: "triton" (split-KV,
    reads only the valid rows; sail_dist/kernels/triton/decode_attention.py), flash-attn's KV-cache kernel, or a
    masked SDPA over the whole cache; "auto" = triton when importable, else flash_attn, else sdpa. The flash path
    takes fp16/bf16 only (other CUDA dtypes go to SDPA); CPU tensors take the reference."""
    if impl not in DECODE_ATTENTION_IMPLS:
        raise ValueError(f"decode attention impl={impl!r}; choose one of {DECODE_ATTENTION_IMPLS}")
    if impl == "auto":
        impl = "triton" if _triton_decode_fn() is not None else "flash_attn" if _flash_kvcache_fn() is not None \
            else "sdpa"
    if impl == "triton" and _triton_decode_fn() is None:
        raise ImportError("decode attention impl='triton' but triton is not importable")
    if impl == "flash_attn" and _flash_kvcache_fn() is None:
        raise ImportError("decode attention impl='flash_attn' but flash_attn.flash_attn_with_kvcache is not importable")

    def decode_attention(q_BHD, k_cache_BSHD, v_cache_BSHD, lengths_B):
        if impl == "reference" or not q_BHD.is_cuda:
            return ref.decode_attention(q_BHD, k_cache_BSHD, v_cache_BSHD, lengths_B)
        D = q_BHD.shape[-1]
        if impl == "triton":
            if D >= 16 and not D & (D - 1):  # the kernel's tiles take power-of-2 head dims
                return _triton_decode_fn()(q_BHD, k_cache_BSHD, v_cache_BSHD, lengths_B)
            _log_once(f"sail_dist gpu OpSet: decode_attention = sdpa for head_dim {D} (the Triton kernel takes "
                      "power-of-2 head dims >= 16)")
        half = q_BHD.dtype in (torch.float16, torch.bfloat16) and q_BHD.dtype == k_cache_BSHD.dtype
        if impl == "flash_attn" and half:
            return _decode_attention_flash(q_BHD, k_cache_BSHD, v_cache_BSHD, lengths_B)
        return _decode_attention_sdpa(q_BHD, k_cache_BSHD, v_cache_BSHD, lengths_B)

    decode_attention.impl = impl
    return decode_attention


# --------------------------------------------------------------------------------------------------
# MoE experts: three interchangeable implementations of one contract
# --------------------------------------------------------------------------------------------------
def _rows_and_inverse(topk_idx_TK, num_experts):
    from sail_dist.kernels.triton.moe_routing import route

    r = route(topk_idx_TK, num_experts)
    # Inverse of the sort: flat slot (t, k) -> sorted row, to put rows back in (token, slot) order.
    inv_M = torch.empty_like(r.perm_M)
    inv_M[r.perm_M] = torch.arange(r.num_rows, device=inv_M.device)
    return r, inv_M


def _weighted_sum(y_TKH, topk_weight_TK, x_TH):
    """sum_k topk_weight[t, k] * y[t, k]: the combine, contiguous over the K slots (deterministic)."""
    T, K = topk_weight_TK.shape
    return (y_TKH.view(T, K, y_TKH.shape[-1]) * topk_weight_TK.to(x_TH.dtype)[..., None]).sum(1)


def moe_experts_loop(x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH):
    """Per-expert loop (one host sync for the counts): the baseline, fine for a handful of experts."""
    E = w_gate_up_EHF2.shape[0]
    r, inv_M = _rows_and_inverse(topk_idx_TK, E)
    xs_MH = x_TH.index_select(0, r.tok_M.long())
    outs = []
    for e, xe in enumerate(torch.split(xs_MH, r.counts_E.tolist())):
        if xe.shape[0]:
            outs.append(ref.swiglu(xe @ w_gate_up_EHF2[e]) @ w_down_EFH[e])
    y_MH = torch.cat(outs) if outs else xs_MH.new_zeros(0, x_TH.shape[1])
    # index_select's backward scatters onto a permutation: no colliding atomics.
    return _weighted_sum(y_MH.index_select(0, inv_M), topk_weight_TK, x_TH)


def moe_experts_grouped_mm(x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH, align: int = 16):
    """torch._grouped_mm over expert groups (autograd through torch). Each group is padded to a multiple
    of `align` rows (the kernels' alignment, as torchtitan does) inside a buffer of static size
    M + E*(align-1) rounded up, so no host sync; the last group also takes the tail. Padding rows copy
    token 0 (finite, never read back: their gradient is zero)."""
    E = w_gate_up_EHF2.shape[0]
    r, inv_M = _rows_and_inverse(topk_idx_TK, E)
    M = r.num_rows
    M_pad = -(-(M + E * (align - 1)) // align) * align
    padded_E = (r.counts_E.long() + align - 1) // align * align
    ends_E = torch.cumsum(padded_E, 0)
    expert_M = r.expert_M.long()
    # sorted row -> padded row: its expert's padded start plus its rank inside the expert.
    dest_M = (ends_E - padded_E)[expert_M] + torch.arange(M, device=x_TH.device) - r.offsets_E1[:-1].long()[expert_M]
    offs_E = torch.cat([ends_E[:-1], ends_E.new_full((1,), M_pad)]).to(torch.int32)
    src_pad = torch.zeros(M_pad, dtype=torch.long, device=x_TH.device)
    src_pad[dest_M] = r.tok_M.long()

    h_pad = torch._grouped_mm(x_TH.index_select(0, src_pad), w_gate_up_EHF2, offs=offs_E)
    y_pad = torch._grouped_mm(ref.swiglu(h_pad), w_down_EFH, offs=offs_E)
    return _weighted_sum(y_pad.index_select(0, dest_M[inv_M]), topk_weight_TK, x_TH)


def moe_experts_triton(x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH,
                       opts: KernelConfig = KernelConfig()):
    """Fused Triton experts (sail_dist/kernels/triton/moe.py) on the paths `opts` selects, on CUDA, or on CPU
    when this process runs Triton's interpreter; the reference otherwise."""
    if not x_TH.is_cuda:
        mod = None
        if interpreting():
            from sail_dist.kernels.triton import moe as mod
        if mod is None or not mod.INTERPRET:  # (kernels compiled for the GPU cannot take CPU tensors)
            _log_once("sail_dist gpu OpSet: moe_experts on CPU without the Triton interpreter -> reference")
            return ref.moe_experts(x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH)
        return mod.moe_experts(x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH, opts)
    from sail_dist.kernels.triton.moe import moe_experts

    return moe_experts(x_TH, topk_idx_TK, topk_weight_TK, w_gate_up_EHF2, w_down_EFH, opts)


_MOE = {"triton": moe_experts_triton, "grouped_mm": moe_experts_grouped_mm, "loop": moe_experts_loop}


# --------------------------------------------------------------------------------------------------
# RMSNorm, RoPE, SwiGLU: a Triton kernel each way in eager code, the reference's ops under torch.compile
# --------------------------------------------------------------------------------------------------
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fused_elementwise(name: str, reference):
    """`name` from sail_dist/kernels/triton/<name>.py for CUDA tensors (or CPU ones in Triton's interpreter) outside
    torch.compile; the reference inside traced code (Inductor fuses it there), for other dtypes, and on CPU."""
    def op(x, *args):
        if torch.compiler.is_compiling() or x.dtype not in _FUSED_DTYPES or not (x.is_cuda or interpreting()):
            return reference(x, *args)
        kernel = _elementwise_kernel(name)
        if kernel is None:
            return reference(x, *args)
        return kernel(x, *args)

    op.__name__ = name
    return op


@functools.cache
def _elementwise_kernel(name: str):
    import importlib

    try:
        mod = importlib.import_module(f"sail_dist.kernels.triton.{name}")
    except ImportError:  # no triton
        _log_once(f"sail_dist gpu OpSet: {name} -> reference (triton is not importable)")
        return None
    if not torch.cuda.is_available() and not mod.INTERPRET:  # (kernels compiled for the GPU cannot take CPU tensors)
        return None
    return getattr(mod, name)


# --------------------------------------------------------------------------------------------------
# Cross-entropy with the lm-head inside (kernels/linear_cross_entropy.py), Triton row kernels on CUDA
# --------------------------------------------------------------------------------------------------
def _ce_row_ops(x: torch.Tensor) -> RowOps:
    """The Triton row kernels on CUDA (or in Triton's interpreter, for tests), else the same math in torch."""
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and (x.is_cuda or interpreting()):
        try:
            from sail_dist.kernels.triton import cross_entropy as k
        except ImportError:  # no triton: the torch version
            k = None
        if k is not None and (x.is_cuda or k.INTERPRET):
            return k.lse_target_, k.softmax_grad_
    return TORCH_ROW_OPS


def cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor,
                  chunk_size: int | None = None) -> torch.Tensor:
    """Per-token fp32 loss [T] of the lm-head projection h @ w^T in vocabulary blocks (`chunk_size` wide;
    default: a 512 MiB block of logits); no -100 compaction, which would cost a host sync per call."""
    return linear_cross_entropy(h_TD, w_VD, labels_T, row_ops=_ce_row_ops(h_TD), vocab_chunk=chunk_size)


# --------------------------------------------------------------------------------------------------
def opset(moe_impl: str = "triton", attention_impl: str = "auto", kernels: KernelConfig = KernelConfig(),
          decode_attention_impl: str = "auto") -> OpSet:
    """The GPU OpSet; `moe_impl` picks the experts' implementation so the three compare end to end, `kernels`
    the Triton experts' paths, `decode_attention_impl` generation's KV-cache attention."""
    if moe_impl not in _MOE:
        raise ValueError(f"moe_impl={moe_impl!r}; choose one of {MOE_IMPLS}")
    _log_once(f"sail_dist gpu OpSet: moe_experts = {moe_impl}")
    experts = functools.partial(moe_experts_triton, opts=kernels) if moe_impl == "triton" else _MOE[moe_impl]
    norm_ops = {n: _fused_elementwise(n, getattr(ref, n)) if kernels.elementwise else getattr(ref, n)
                for n in ("rms_norm", "rope", "swiglu")}
    _log_once(f"sail_dist gpu OpSet: rms_norm / rope / swiglu = {'triton' if kernels.elementwise else 'torch'} "
              "outside compiled code")
    return OpSet(f"gpu[{moe_impl}]", attention=make_attention(attention_impl), **norm_ops, moe_experts=experts,
                 cross_entropy=cross_entropy, decode_attention=make_decode_attention(decode_attention_impl))
