"""The OpSet: the seam between the model and kernels.

The model calls only these ops on its hot paths; a backend picks one implementation set by name and
the model never imports a backend (Megatron-core's spec idea, Liger-Kernel's one-op-many-backends).

Signatures (T tokens, H heads, D head dim, E experts, K top-k, V vocab):
  attention(q[T,Hq,D], k[T,Hkv,D], v[T,Hkv,D], cu_seqlens[S+1] int32, max_seqlen, causal) -> [T,Hq,D]
      varlen attention, softmax scale 1/sqrt(D), GQA when Hq > Hkv; no token attends across cu_seqlens.
  rms_norm(x[...,N], weight[N], eps) -> x.dtype      math in (at least) fp32
  rope(x[T,H,D], cos[T,D], sin[T,D]) -> x * cos + rotate_half(x) * sin   (half-split rotation)
  swiglu(x[...,2F]) -> silu(x[..., :F]) * x[..., F:]   (first half gate, second half up: torch_npu's layout)
  moe_experts(x[T,Hd], topk_idx[T,K] int, topk_weight[T,K], w_gate_up[E,Hd,2F], w_down[E,F,Hd]) -> [T,Hd]
      y[t] = sum_j topk_weight[t,j] * swiglu(x[t] @ w_gate_up[e]) @ w_down[e],  e = topk_idx[t,j]
  cross_entropy(h[T,Hd], w[V,Hd], labels[T]) -> per-token loss [T] float32 (0 where labels == -100)
      the lm-head projection is part of the op so implementations may chunk it and never hold [T,V].
  decode_attention(q[B,Hq,D], k_cache[B,S,Hkv,D], v_cache[B,S,Hkv,D], lengths[B] int) -> [B,Hq,D]
      generation's one-query-per-sequence attention over a KV cache (BSND): query b attends to cache rows
      [0, lengths[b]) of sequence b (the current token's K/V already written at lengths[b] - 1), softmax scale
      1/sqrt(D), GQA as in `attention` (query head h reads kv head h // (Hq/Hkv)); lengths[b] >= 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sail_dist.registry import Registry


@dataclass(frozen=True)
class OpSet:
    name: str
    attention: Callable
    rms_norm: Callable
    rope: Callable
    swiglu: Callable
    moe_experts: Callable
    cross_entropy: Callable
    decode_attention: Callable

    def replace(self, **ops: Callable) -> "OpSet":
        """A copy with some ops swapped (e.g. the GPU set with another expert implementation)."""
        from dataclasses import replace

        return replace(self, **ops)


# Factories are imported lazily so that e.g. triton or torch_npu are only imported when their OpSet is asked for.
OPSETS = Registry("OpSet", {
    "reference": "sail_dist.kernels.reference:opset",
    "gpu": "sail_dist.kernels.gpu:opset",
    "npu": "sail_dist.kernels.npu.ops:opset",
    "npu_emulated": "sail_dist.kernels.npu.ops:emulated_opset",
})


def register_opset(name: str, factory: str | Callable[..., OpSet]) -> None:
    """Register an OpSet factory under `name` (a callable, or a lazy "module:function" string)."""
    OPSETS.register(name, factory)


def available_opsets() -> list[str]:
    return OPSETS.names()


# Backend-config options each OpSet understands (the others take none).
_CONFIG_OPTIONS = {"gpu": ("moe_impl", "kernels", "attention_impl")}


def opset_for_backend(name: str, backend_cfg) -> OpSet:
    """The OpSet `name` with the options it takes from a BackendConfig (e.g. the GPU set's `moe_impl`, `kernels`
    (the Triton kernels' switches) and `attention_impl`)."""
    return get_opset(name, **{k: getattr(backend_cfg, k) for k in _CONFIG_OPTIONS.get(name, ())})


def get_opset(name: str, **options) -> OpSet:
    """Build the OpSet registered as `name`; options go to its factory (e.g. moe_impl="grouped_mm")."""
    return OPSETS.get(name)(**options)
