"""Two per-tensor loops of DeepSpeed's ZeRO-1/2 optimizer step done in a few kernels.

Before every update DeepSpeed (0.19) checks each gradient partition for inf/NaN (`has_overflow`: amax, amin, two
isfinite, and, not, add: seven tiny kernels per tensor) and then computes the gradient norm with one `vector_norm` per
tensor (`get_grad_norm_direct`). At 2B that is ~3,000 kernel launches per optimizer step, during which the GPU mostly
waits for the host (the profile in BENCHMARKS.md). DeepSpeed has no switch for either: `bf16.check_grad_overflow=false`
also drops the test that turns a non-finite norm into a skipped step.

`install` replaces both on the engine's ZeRO optimizer instance:
- the norm is `torch._foreach_norm` over the partition's gradients (fp32 per-tensor norms, then DeepSpeed's own
  sum, all-reduce and masking), the same math in a handful of kernels;
- the separate overflow check is dropped: a partition holding an inf or NaN makes its norm non-finite, which
  DeepSpeed's step already tests right after the norm (`is_invalid_grad_norm`, while `check_grad_overflow` is on) and
  turns into the same skipped step. The norm is all-reduced over data parallel, so every rank decides alike.
`install` also works around a DeepSpeed 0.19 bug found by this project's tests: with CPU offload and the
fp32 device-side gradient accumulation (`grad_accum_dtype: fp32`), a skipped (non-finite) step leaves the inf/NaN in
the fp32 partition buffer, so every later step is skipped too; the non-offload path drops the buffer, as we do here.

Written by hand because DeepSpeed offers neither as an option; installed only where those preconditions hold
(no CPU offload, whose path checks overflow during its copies; the norm computed; no model/pipeline parallel).
"""
from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


def squared_norm(gradients, device) -> torch.Tensor:
    """Sum of squares of a ZeRO gradient partition's tensors (DeepSpeed's `_zero_padding` views left out): fp32
    per-tensor norms in one foreach kernel, then squared and summed; 0 on `device` for an empty partition."""
    grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).pow(2).sum()


def _grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeed's `get_grad_norm_direct` (L2), with one foreach norm instead of a kernel per tensor."""
    import deepspeed.comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    total = squared_norm(gradients, self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _no_separate_overflow_check(self, partition_gradients=True):
    return False  # the non-finite norm is the check (module docstring)


def _clear_after_skipped_step(zero_optimizer) -> None:
    """After an optimizer step that DeepSpeed skipped for a non-finite gradient: drop the accumulated gradient
    partitions, as DeepSpeed's own non-offload path does (module docstring)."""
    grads = getattr(zero_optimizer, "averaged_gradients", None)
    if getattr(zero_optimizer, "overflow", False) and isinstance(grads, dict):
        for k in grads:
            grads[k] = None


def install(zero_optimizer) -> bool:
    """Patch DeepSpeed's ZeRO-1/2 optimizer (the engine's `ds.optimizer`): always the clearing after a skipped step
    (its `step` is wrapped); the two loops replaced where the preconditions hold. Returns whether the loops were
    replaced (False: DeepSpeed's own, e.g. with offload or where its internals differ from the version this was
    written against)."""
    step = zero_optimizer.step

    def step_then_clear(*args, **kwargs):
        out = step(*args, **kwargs)
        _clear_after_skipped_step(zero_optimizer)
        return out

    zero_optimizer.step = step_then_clear
    needed = ("get_grad_norm_direct", "has_overflow", "check_grad_overflow", "compute_grad_norm", "cpu_offload",
              "dp_process_group", "_model_parallel_all_reduce", "model_parallel_rank")
    missing = [n for n in needed if not hasattr(zero_optimizer, n)]
    if missing:
        log.info("ZeRO step: DeepSpeed's optimizer lacks %s; keeping its per-tensor norm and overflow loops", missing)
        return False
    if zero_optimizer.cpu_offload or not zero_optimizer.compute_grad_norm or zero_optimizer.model_parallel_rank != 0:
        return False
    zero_optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_direct, zero_optimizer)
    if zero_optimizer.check_grad_overflow:  # (only then does the step test the norm itself)
        zero_optimizer.has_overflow = types.MethodType(_no_separate_overflow_check, zero_optimizer)
    return True
