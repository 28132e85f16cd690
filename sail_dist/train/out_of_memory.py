"""What a user reads when a training step runs out of device memory.

The allocator's own message (CUDA's or torch_npu's) says how much was asked for and what is reserved, but not which
settings of this trainer would make the step fit. `advice` lists the ones of this config that lower the step's
memory, about the cheapest in step time first, each as the override to pass, and says which a resume of the last
checkpoint accepts (docs/checkpoints.md: checkpoint.MEMORY_KEYS and the layout keys) and which start a new run.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sail_dist.config import Config
from sail_dist.train.checkpoint import may_change_on_resume


class OutOfDeviceMemoryError(RuntimeError):
    """A training step ran out of device memory; the message lists the ways on for this config."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's `torch.OutOfMemoryError`, or torch_npu's RuntimeError ("NPU out of memory")."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def ways_on(cfg: Config) -> list[tuple[str, bool]]:
    """(override and what it does, whether a resume accepts it) for this config, about the cheapest in step time
    first. Whether a resume accepts it is checkpoint.py's rule (`may_change_on_resume`) over the keys it changes."""
    b, t, d = cfg.backend, cfg.train, cfg.data
    ways: list[tuple[str, tuple[str, ...], bool]] = []  # (text, the keys it changes, with another DP size)
    if b.name == "gpu":
        if b.offload_optimizer == "none":
            ways.append(("backend.offload_optimizer=cpu backend.torch_adam=false backend.offload_ratio=0.3: 30 % of "
                         "the optimizer's fp32 state (12 bytes per parameter / DP ranks) on the host; raise the ratio "
                         "up to 1 for more (docs/gpu.md, partial offload)",
                         ("backend.offload_optimizer", "backend.torch_adam", "backend.offload_ratio"), False))
        elif b.offload_ratio < 1:
            ways.append((f"backend.offload_ratio={min(1.0, round(b.offload_ratio + 0.3, 2)):g} (now "
                         f"{b.offload_ratio:g}): more of the optimizer state on the host", ("backend.offload_ratio",),
                         False))
    if b.name == "npu":
        ways.append((f"parallel.pp={2 * cfg.parallel.pp}: the LLM's layers over twice the pipeline stages",
                     ("parallel.pp",), False))
    for family, name in (("llm", "LLM"), ("vit", "ViT")):
        if not getattr(t.activation_checkpointing, family):
            ways.append((f"train.activation_checkpointing.{family}=true: recompute the {name} blocks' "
                         "activations in the backward instead of keeping them",
                         (f"train.activation_checkpointing.{family}",), False))
    if d.pack_tokens >= 2048:
        ways.append((f"data.pack_tokens={d.pack_tokens // 2} train.micro_batches={2 * t.micro_batches}: half the "
                     "tokens per micro-batch, the same per step", ("data.pack_tokens", "train.micro_batches"), False))
    ways.append(("more data-parallel ranks, with train.micro_batches lowered to keep DP x micro-batches: the "
                 "optimizer state and gradients are partitioned over them (elastic resume)", ("train.micro_batches",),
                 True))
    return [(text, all(may_change_on_resume(k, elastic) for k in keys)) for text, keys, elastic in ways]


def device_peak_gib(device: torch.device) -> float | None:
    """The most memory this process allocated on `device` (its accelerator module's `max_memory_allocated`)."""
    module = getattr(torch, device.type, None)
    if device.type == "cpu" or not hasattr(module, "max_memory_allocated"):
        return None
    return module.max_memory_allocated(device) / 2**30


def advice(cfg: Config, step: int, rank: int, last_checkpoint: str | None, peak_gib: float | None) -> str:
    """The message of the OutOfDeviceMemoryError for step `step` (1-based) on `rank`."""
    peak = f" (peak {peak_gib:.1f} GiB allocated on this rank)" if peak_gib is not None else ""
    lines = [f"step {step} ran out of device memory on rank {rank}{peak}. Settings that lower the step's memory, "
             "about the cheapest in step time first:"]
    lines += [f"  - {w}" + ("  [a resume accepts it]" if resumable else "  [a new run]")
              for w, resumable in ways_on(cfg)]
    if last_checkpoint:
        lines.append(f"To continue this run with a setting marked [a resume accepts it]: "
                     f"train.resume={last_checkpoint}")
    else:
        lines.append("No checkpoint was written yet: train.save_every keeps the progress of the next run.")
    lines.append("The allocator's own message is in the traceback file.")
    return "\n".join(lines)


@contextmanager
def explained(cfg: Config, step: int, rank: int, last_checkpoint: str | None, device: torch.device) -> Iterator[None]:
    """Around a training step: an out-of-memory error leaves as an OutOfDeviceMemoryError with `advice` (the
    allocator's error chained as its cause); anything else passes unchanged."""
    try:
        yield
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfDeviceMemoryError(advice(cfg, step, rank, last_checkpoint, device_peak_gib(device))) from e
