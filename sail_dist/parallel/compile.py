"""torch.compile applied from outside the model, per block (torchtitan's per-TransformerBlock compile).

Compiling each ViT block and each dense LLM layer whole fuses their elementwise work (RMSNorm's fp32 round
trips, QK-norm, RoPE, SwiGLU, residual adds and their backward accumulations), which eager mode runs as
dozens of memory-bound kernels. MoE layers are compiled by parts (norms and attention) and their MoE block
stays eager (data-dependent routing, all-reduces, custom kernels). The ViT's post-norm, the adapter and the
LLM's final norm are compiled too (the adapter's MLP only: its pixel-shuffle index is host work over the image
grids, which would break the graph). Instances of one class share their compiled graphs (dynamo inlines
nn.Modules), so a 28-layer model compiles a handful of graphs. The instance's forward is replaced, so parameter
names are unchanged; `dynamic=True` because packed micro-batches change length every step.
"""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from sail_dist.model.moe import MoE

log = logging.getLogger(__name__)


def use_compile_cache(cache_dir: str) -> str:
    """Cache compiled artefacts under `cache_dir` across runs: Inductor's FX-graph cache (generated code) and
    AOTAutograd cache (traced joint graphs) in <dir>/inductor, Triton's compiled kernels in <dir>/triton. A variable
    the user already exported (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) wins. "" keeps torch's defaults
    (/tmp/torchinductor_<user>, ~/.triton). Returns the Inductor cache directory in use."""
    if cache_dir:
        root = os.path.abspath(os.path.expanduser(cache_dir))
        for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
            if not os.environ.get(var):
                os.makedirs(os.path.join(root, sub), exist_ok=True)
                os.environ[var] = os.path.join(root, sub)
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir  # (both caches on by default)

    return inductor_cache_dir()


def start_compile_workers(wait_s: float = 120.0) -> bool:
    """Start Inductor's compile worker pool now and wait (up to `wait_s`) until it takes jobs; CUDA only. On a warm
    cache the first step loads each compiled graph from the cache, and Inductor hands that graph's Triton kernels to
    the worker pool only once the pool is ready, else builds them one after another in this process (measured at 2B
    on an H200: 52 s of a 67 s warm first step). Returns whether the pool is ready."""
    if not torch.cuda.is_available():
        return False  # (CPU: Inductor's C++ kernels; the pool would only compete for the cores)
    try:
        from torch._inductor.async_compile import AsyncCompile, get_compile_threads
    except ImportError:
        return False
    if get_compile_threads() <= 1:
        return False
    t0 = time.perf_counter()
    AsyncCompile.warm_pool()
    while not AsyncCompile.use_process_pool():
        if time.perf_counter() - t0 > wait_s:
            log.warning("Inductor's compile workers were not ready after %.0f s; compiling in this process", wait_s)
            return False
        time.sleep(0.05)
    log.info("Inductor's %d compile workers ready in %.1f s", get_compile_threads(), time.perf_counter() - t0)
    return True


def _compile(obj: nn.Module, name: str = "forward", dynamic: bool | None = True) -> bool:
    """Replace obj.<name> by its compiled version once (instance attribute: parameter names stay)."""
    flag = f"_sail_compiled_{name}"
    if getattr(obj, flag, False):
        return False
    setattr(obj, name, torch.compile(getattr(obj, name), dynamic=dynamic))
    setattr(obj, flag, True)
    return True


def apply_compile(model: nn.Module, vit: bool = True, llm: bool = True) -> int:
    """Compile the ViT's blocks, post-norm and the adapter, and the LLM's layers (MoE layers by parts) and
    final norm; returns how many modules were compiled."""
    mods: list[nn.Module] = [*model.vision.blocks, model.vision.post_norm] if vit else []
    if vit:  # the adapter's MLP; its pixel-shuffle index is built on the host from the image grids
        _compile(model.adapter, "project")
    if llm:
        for layer in model.llm.layers:
            if isinstance(layer.mlp, MoE):
                mods += [layer.input_norm, layer.attn, layer.post_attn_norm]
            else:
                mods.append(layer)
        mods.append(model.llm.norm)
    for m in mods:
        _compile(m)
    return len(mods) + int(vit)


def compile_generation(model: nn.Module) -> int:
    """Compile the pure pieces of KV-cache generation per LLM layer (the sampler's `compile` switch): the input
    norm + qkv projection + QK-norm + RoPE before the cache write, and (dense layers) o_proj + residual + norm +
    SwiGLU MLP + residual after the attention. They serve the packed prefill [T, D] and the decode step [B, D];
    the cache write and the attention stay outside (in-place writes into a view of the cache, and the OpSet's own
    kernels), as in vLLM's piecewise graphs. Default dynamic shapes: the first shape compiles static, the next
    recompiles with the token dimension dynamic, and the sampler's CUDA graph replays the decode step's kernels.
    MoE layers keep their MoE block eager (routing and the expert kernels). Returns how many methods were compiled."""
    targets = [(layer, "pre_attention") for layer in model.llm.layers]
    targets += [(layer, "post_attention") for layer in model.llm.layers if not isinstance(layer.mlp, MoE)]
    return sum(_compile(obj, name, dynamic=None) for obj, name in targets)
