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

`install_reduction` trims DeepSpeed's per-micro-batch gradient path into the fp32 accumulation buffer
(`grad_accum_dtype: fp32`). For each reduction bucket DeepSpeed 0.19 divides the bucket by the DP size, flattens
its gradient slices into a new tensor, all-reduces that, adds each of this rank's slices into the fp32 partition
through an fp32 copy of it (`source.to(fp32)`) and copies the reduced slices back into the bucket: ~34 bytes of
memory traffic per parameter per micro-batch, at one rank too. Measured on the reduced A3B (3.2B parameters), the
engine's part of the step was ~40 % beside the model's own work (BENCHMARKS.md). Patched:
- the slices are one span of the bucket: it is all-reduced in place (no flatten, no copy back);
- the add into the fp32 partition reads the bf16 gradient directly (the cast happens in the add: the same fp32
  sums, bitwise);
- over a data-parallel group of one rank the reduction is the identity and the division is by 1: neither runs.

`install_epilogue` removes a host wait from every micro-batch. With `overlap_comm`, DeepSpeed ends each backward
(`independent_gradient_partition_epilogue`) with a device-wide `synchronize()` before it drops the bucket
gradients. The host then stands still until the device has run the whole backward, so the next micro-batch's
batch copy and first forward kernels start from an empty queue. A stream wait gives the same ordering on the
device: the compute stream waits for the reduction stream. The freed buffers are safe because every buffer that
the reduction stream reads is `record_stream`-ed to it (DeepSpeed's path and `_allreduce_and_add` alike), so the
caching allocator holds it until that stream is done.
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


def _add_in_place(output, source) -> None:
    """DeepSpeed's `_add_to_grad_partition_buffer` without the fp32 copy of `source` (the add casts as it reads)."""
    if output is not None:
        output.add_(source)


def contiguous_run(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one 1-D view spanning `tensors` when they lie back to back, in order, in one storage (a reduction
    bucket's gradient slices), else None."""
    first = tensors[0]
    ptr, start = first.untyped_storage().data_ptr(), first.storage_offset()
    end = start
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != end):
            return None
        end += t.numel()
    return first.as_strided((end - start,), (1,), start)


def _allreduce_and_add(self, small_bucket, communication_data_type, log=None, divide=True, process_group=None,
                       bucket_ranks=None, output_bucket=None):
    """DeepSpeed's `allreduce_and_copy_with_multiple_ranks` on the bucket itself (module docstring): the slices'
    span all-reduced in place (skipped over one rank), then each of this rank's slices added into its fp32
    partition slice. DeepSpeed's own where the slices are not one span or the reduction changes dtype."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import stage_1_and_2

    flat = contiguous_run(small_bucket)
    if (flat is None or flat.dtype != communication_data_type or self.sequence_parallel_size != 1
            or stage_1_and_2.pg_correctness_test):
        return type(self).allreduce_and_copy_with_multiple_ranks(
            self, small_bucket, communication_data_type, log=log, divide=divide, process_group=process_group,
            bucket_ranks=bucket_ranks, output_bucket=output_bucket)
    group = self.dp_process_group if process_group is None else process_group
    world = dist.get_world_size(group=group)
    record = self.overlap_comm and not get_accelerator().resolves_data_dependency()
    if world > 1:
        if divide and self.gradient_average:
            flat.div_(world)
        dist.all_reduce(flat, group=group)
        if record:
            flat.record_stream(self.reduction_stream)
    local = dist.get_rank(group=group)
    for buf, bucket_rank, output in zip(small_bucket, bucket_ranks, output_bucket or [None] * len(small_bucket)):
        mine = local in bucket_rank if isinstance(bucket_rank, frozenset) else local == bucket_rank
        if mine and output is not None:
            _add_in_place(output, buf.view_as(output))
            if record:
                buf.record_stream(self.reduction_stream)


def install_reduction(zero_optimizer) -> str:
    """Patch DeepSpeed's ZeRO-1/2 gradient path into its fp32 accumulation buffer (module docstring). Returns what
    was installed: "" (DeepSpeed's internals differ from 0.19's, or no fp32 accumulation buffer), "in_place"
    (reduction on the bucket, add without the fp32 copy), "in_place+one_rank" (and no collective or division)."""
    import deepspeed.comm as dist

    needed = ("_add_to_grad_partition_buffer", "allreduce_and_copy_with_multiple_ranks",
              "_use_compact_grad_partition_buffer", "use_multi_rank_bucket_allreduce", "gradient_average",
              "sequence_parallel_size", "dp_process_group", "reduction_stream", "overlap_comm", "bit16_groups")
    missing = [n for n in needed if not hasattr(zero_optimizer, n)]
    if missing:
        log.info("ZeRO reduction: DeepSpeed's optimizer lacks %s; keeping its gradient path", missing)
        return ""
    if not any(zero_optimizer._use_compact_grad_partition_buffer(i) for i in range(len(zero_optimizer.bit16_groups))):
        return ""
    zero_optimizer._add_to_grad_partition_buffer = _add_in_place
    zero_optimizer.allreduce_and_copy_with_multiple_ranks = types.MethodType(_allreduce_and_add, zero_optimizer)
    if dist.get_world_size(group=zero_optimizer.dp_process_group) != 1 or zero_optimizer.sequence_parallel_size != 1:
        return "in_place"
    zero_optimizer.gradient_average = False  # (one rank: average_tensor's division of every bucket by 1)
    return "in_place+one_rank"


def _epilogue_with_stream_wait(self):
    """DeepSpeed's `independent_gradient_partition_epilogue` with its device-wide synchronize replaced by the
    compute stream waiting on the reduction stream (module docstring)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    reduction = self.reduction_stream
    shadowed = "synchronize" in vars(acc)
    saved = acc.synchronize
    acc.synchronize = lambda device_index=None: acc.current_stream().wait_stream(reduction)
    try:
        return type(self).independent_gradient_partition_epilogue(self)
    finally:
        if shadowed:
            acc.synchronize = saved
        else:
            del acc.synchronize


def install_epilogue(zero_optimizer) -> bool:
    """Patch the end of DeepSpeed's ZeRO-1/2 backward to wait on the device instead of the host (module docstring).
    Only with `overlap_comm` on a device with a reduction stream and without CPU offload (whose gradient copies to
    the host need the host wait). Returns whether it was installed."""
    from deepspeed.accelerator import get_accelerator

    needed = ("independent_gradient_partition_epilogue", "reduction_stream", "overlap_comm", "cpu_offload")
    if any(not hasattr(zero_optimizer, n) for n in needed):
        log.info("ZeRO epilogue: DeepSpeed's optimizer lacks one of %s; keeping its host wait", needed)
        return False
    if (not zero_optimizer.overlap_comm or zero_optimizer.cpu_offload or zero_optimizer.reduction_stream is None
            or get_accelerator().resolves_data_dependency()):
        return False
    zero_optimizer.independent_gradient_partition_epilogue = types.MethodType(_epilogue_with_stream_wait,
                                                                             zero_optimizer)
    return True


def remove_epilogue(zero_optimizer) -> None:
    """Undo `install_epilogue`: DeepSpeed's own end of backward, host wait included (the benchmark's anchor)."""
    vars(zero_optimizer).pop("independent_gradient_partition_epilogue", None)
