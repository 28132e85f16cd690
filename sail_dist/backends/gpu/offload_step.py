"""ZeRO-1/2's CPU-offload optimizer step: the gradients taken whole from the device, one host pass fewer, the copies
overlapped.

Gradients. With bf16 weights and fp32 accumulation (`grad_accum_dtype: fp32`), DeepSpeed 0.19.8 accumulates each
rank's gradient partition over the micro-batches in an fp32 device buffer; with offload it then copies it to the
host per parameter, during the boundary micro-batch's backward, taking per-parameter norms for the clip as it goes.
That copy loses gradients once the backward reduces more than one bucket: a parameter that got no gradient in the
boundary micro-batch (the ViT's, under a text-only micro-batch) keeps a stale host gradient, and others were copied
wrong too (tests/test_gpu_backend.py::test_bf16_fp32_grad_accumulation_tracks_fp32_reference: a 0.70x step-0
norm with 4096-element buckets; the 2B step on one H200 with 5e8-element buckets: 0.25x, BENCHMARKS.md), while the
device buffer itself is right. `install` drops those per-parameter copies and has the step take each group's
whole device partition instead: its norm (per-parameter fp32 norms on the device, summed, as the non-offload step),
the overflow flag from it, and the copy to the host (whole, or chunk by chunk inside the chunked step below).

The host step.

DeepSpeed 0.19's offload step makes, per parameter group, three passes over the whole fp32 partition on the host,
one after another: the clip scale on the gradient, DeepSpeedCPUAdam, a cast into a pinned bf16 buffer; then one
copy of that buffer to the device. At 2B (2.42B elements, one H200 host's 16 cores; BENCHMARKS.md) those take
0.14 + 0.41 + 0.17 s and the copy 0.09 s, one after another. `install` replaces the optimizer's `step` with the same
step doing, per chunk of the partition: the clip scale (skipped when DeepSpeed's factor is exactly 1: the same
values), DeepSpeedCPUAdam on that chunk, then the chunk's fp32 master weights copied to the device (from DeepSpeed's
pinned fp32 partition) and cast to bf16 there. The host makes no cast pass, and each chunk's copy and cast run on
the device while the host updates the next chunk; only Adam and the scale stay on the host's clock.

The arithmetic is DeepSpeed's element for element: the factor from DeepSpeed's own `unscale_and_clip_grads`, the
same DeepSpeedCPUAdam kernel (`adam_update`) on contiguous slices, the same round-to-nearest-even cast. Chunks
start at multiples of 4096 elements (the kernel's vector steps cover at most 128), so its vector / scalar split falls
on the same elements as over the whole partition, and the results are bitwise equal (tested). Written by hand
because DeepSpeed's step has no chunked mode and no whole-partition gradient copy; the chunked step is installed
only where its preconditions hold (DeepSpeedCPUAdam; no ZenFlow, Muon or autocast grad scaler); elsewhere DeepSpeed's
own step runs, after the gradient copy.
"""
from __future__ import annotations

import logging
import math
import types
from typing import Callable

import torch

from sail_dist.backends.gpu.zero_step import squared_norm

log = logging.getLogger(__name__)

CHUNK_ALIGN = 4096


def host_adam_chunked(adam, param_group: dict, p_N: torch.Tensor, g_N: torch.Tensor, grad_scale: torch.Tensor | None,
                      out_N: torch.Tensor, chunk: int, stage: list[torch.Tensor] | None = None,
                      grad_src_N: torch.Tensor | None = None, copy_stream=None, host_numel: int | None = None,
                      between: Callable[[], None] | None = None) -> None:
    """One DeepSpeedCPUAdam step over the flat fp32 partition `p_N` (gradient `g_N`, its state in `adam.state[p_N]`),
    chunk by chunk: the gradient times `grad_scale` (None: unscaled), Adam, then the bit16 copy into `out_N`. With
    `out_N` on the device, each chunk goes there in fp32 (non-blocking, from pinned `p_N`) through `stage` (two
    fp32 device buffers of `chunk` elements, used in turn; same stream, so a buffer is reused only after its cast)
    and is cast on the device. With `grad_src_N` (the gradient partition where it was accumulated, e.g. on the
    device), `g_N` is filled from it chunk by chunk, each chunk's copy issued one chunk ahead on `copy_stream` (a
    CUDA stream; None: copied in place) so that it runs while the host updates the chunk before.

    `host_numel` (None: all): only the partition's first `host_numel` elements are updated here (the rest is the
    device-resident share, `DeviceShare`); the state's step counter still advances once. `between` is called once
    the first gradient chunk's copy is queued, before the host's first Adam chunk: the device share's update is
    queued there, so that the device runs it while the host works."""
    if chunk <= 0 or chunk % CHUNK_ALIGN:
        raise ValueError(f"offload chunk {chunk} must be a positive multiple of {CHUNK_ALIGN} elements "
                         "(module docstring)")
    on_device = out_N.device.type != "cpu"
    if on_device and (stage is None or len(stage) != 2 or min(b.numel() for b in stage) < chunk):
        raise ValueError("a device-side bit16 partition needs two fp32 device staging buffers of >= chunk elements")
    state = adam.state[p_N]
    if not state:  # DeepSpeedCPUAdam.step's own lazy init
        state["step"] = 0
        dtype = torch.float if adam.fp32_optimizer_states else p_N.dtype
        state["exp_avg"] = torch.zeros_like(p_N.data, dtype=dtype)
        state["exp_avg_sq"] = torch.zeros_like(p_N.data, dtype=dtype)
    state["step"] += 1
    beta1, beta2 = param_group["betas"]
    p, g, m, v = p_N.data, g_N.data, state["exp_avg"], state["exp_avg_sq"]
    n = p.numel() if host_numel is None else host_numel
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    fetched: list = []  # per chunk: the event its gradient copy records (None: copied already)

    def fetch(k: int) -> None:
        s, e = bounds[k]
        if copy_stream is None:
            g[s:e].copy_(grad_src_N[s:e])
            fetched.append(None)
            return
        with torch.cuda.stream(copy_stream):
            g[s:e].copy_(grad_src_N[s:e], non_blocking=True)
            fetched.append(torch.cuda.Event())
            fetched[-1].record(copy_stream)

    if grad_src_N is not None and bounds:
        if copy_stream is not None:
            copy_stream.wait_stream(torch.cuda.current_stream())  # the source is complete on the compute stream
        fetch(0)
    if between is not None:
        between()
    for k, (s, e) in enumerate(bounds):
        if grad_src_N is not None:
            if k + 1 < len(bounds):
                fetch(k + 1)
            if fetched[k] is not None:
                fetched[k].synchronize()
        if grad_scale is not None:
            g[s:e].mul_(grad_scale)
        adam.ds_opt_adam.adam_update(adam.opt_id, state["step"], param_group["lr"], beta1, beta2, param_group["eps"],
                                     param_group["weight_decay"], param_group["bias_correction"], p[s:e], g[s:e],
                                     m[s:e], v[s:e])
        if on_device:
            buf = stage[k % 2][:e - s]
            buf.copy_(p[s:e], non_blocking=True)
            out_N[s:e].copy_(buf)
        else:
            out_N[s:e].copy_(p[s:e])


def host_share(numel: int, ratio: float) -> int:
    """How many of a partition's `numel` elements the host updates at `backend.offload_ratio` = `ratio`: all at 1,
    else `ratio * numel` rounded down to a multiple of CHUNK_ALIGN (the host's chunks then fall as over the whole
    partition)."""
    return numel if ratio >= 1.0 else int(ratio * numel) // CHUNK_ALIGN * CHUNK_ALIGN


class DeviceShare:
    """Under `backend.offload_ratio` < 1, the tail [start, N) of one parameter group's fp32 partition kept on the
    device: its fp32 master weights and Adam moments there, updated by torch's AdamW (fused on CUDA: the kernel of
    the non-offload path) while the host updates [0, start) with DeepSpeedCPUAdam. The device's Adam pass over its
    share takes milliseconds where the host's takes ~0.25 s per billion elements, so the step's host part shrinks
    with the ratio, for 12 bytes of device memory per element kept there (DeepSpeed's `offload_optimizer.ratio`
    does the same under ZeRO-3 only).

    DeepSpeed's host partition and DeepSpeedCPUAdam's state stay the copy that checkpoints, snapshots and
    `safe_get_full_fp32_param` read: `state_to_host` writes the shares back first, and a share marked stale
    (`shares_stale`, after a load or restore) is read again from the host before its next update."""

    def __init__(self, start: int, device: torch.device) -> None:
        self.start, self.device, self.stale = start, device, True
        self.p: torch.Tensor | None = None
        self.adam: torch.optim.AdamW | None = None

    def load(self, p_N: torch.Tensor, state: dict, param_group: dict) -> None:
        """(Re)read the share from the host: master weights, moments and the step count before this step's."""
        s = self.start
        self.p = p_N.data[s:].to(self.device, copy=True)
        fused = self.device.type == "cuda"
        self.adam = torch.optim.AdamW([self.p], lr=param_group["lr"], betas=param_group["betas"],
                                      eps=param_group["eps"], weight_decay=param_group["weight_decay"],
                                      fused=fused, foreach=None if fused else False)
        self.adam.state[self.p] = {  # (host_adam_chunked has initialised and advanced the host state by now)
            "step": torch.tensor(float(state["step"] - 1), dtype=torch.float32,
                                 device=self.device if fused else "cpu"),
            "exp_avg": state["exp_avg"][s:].to(self.device, copy=True),
            "exp_avg_sq": state["exp_avg_sq"][s:].to(self.device, copy=True)}
        self.stale = False

    def update(self, param_group: dict, g: torch.Tensor | None, grad_scale: torch.Tensor | None,
               out: torch.Tensor) -> None:
        """One AdamW step of the share on its gradient `g` (None: no gradient reached the group, zeros; scaled in
        place by `grad_scale`), then its bit16 copy into `out` (the share's slice of the bit16 partition); queued
        on the current stream, no sync."""
        g = torch.zeros_like(self.p) if g is None else g
        if grad_scale is not None:
            g.mul_(float(grad_scale))  # (the fp32 factor the host multiplies by: the same product)
        group = self.adam.param_groups[0]
        for key in ("lr", "betas", "eps", "weight_decay"):
            group[key] = param_group[key]
        self.p.grad = g
        self.adam.step()
        self.p.grad = None
        out.copy_(self.p)

    def to_host(self, p_N: torch.Tensor, state: dict) -> None:
        s = self.start
        p_N.data[s:].copy_(self.p)
        st = self.adam.state[self.p]
        state["exp_avg"][s:].copy_(st["exp_avg"])
        state["exp_avg_sq"][s:].copy_(st["exp_avg_sq"])


def state_to_host(zero_optimizer) -> None:
    """Write every device share (`DeviceShare`) back into DeepSpeed's host partitions and DeepSpeedCPUAdam's state:
    before a checkpoint, a snapshot, or a read of the fp32 master weights. A no-op at `offload_ratio` 1."""
    for i, share in enumerate(getattr(zero_optimizer, "_sail_device_shares", [])):
        if share is not None and not share.stale:
            p_N = zero_optimizer.single_partition_of_fp32_groups[i]
            share.to_host(p_N, zero_optimizer.optimizer.state[p_N])


def shares_stale(zero_optimizer) -> None:
    """After DeepSpeed's host partitions were written (a checkpoint load, a snapshot restore): each device share is
    read again from the host before its next update."""
    for share in getattr(zero_optimizer, "_sail_device_shares", []):
        if share is not None:
            share.stale = True


def grad_scale_of(zero_optimizer, scaled_global_grad_norm) -> torch.Tensor | None:
    """The factor DeepSpeed's `unscale_and_clip_grads` multiplies the gradient partitions by (read off a probe of
    ones, so it is DeepSpeed's own computation), or None where it is exactly 1 (no clipping, no loss scale)."""
    probe = torch.ones(1)
    zero_optimizer.unscale_and_clip_grads([probe], scaled_global_grad_norm)
    return None if probe.item() == 1.0 else probe


def _device_grad_partitions(self) -> list[torch.Tensor | None]:
    """Per parameter group the fp32 gradient partition accumulated on the device over the step's micro-batches
    (DeepSpeed's compact partition buffer), None where no gradient reached the group this step; their squared norms
    kept for `_grad_norm_from_device`, and the overflow flag DeepSpeed's step tests set from them."""
    from deepspeed.accelerator import get_accelerator

    if self.overlap_comm:  # the reductions that fill the buffers run on DeepSpeed's reduction stream
        get_accelerator().current_stream().wait_stream(self.reduction_stream)
    flats, sq = [], []
    for i in range(len(self.bit16_groups)):
        buffers = self.averaged_gradients.get(i)
        flats.append(getattr(buffers, "flat_partition", None))
        # per-parameter norms, as the non-offload step takes them (one norm over the whole partition on the CPU
        # sums too many terms in fp32: 5e-5 off at 0.5M elements)
        sq.append(squared_norm([] if buffers is None else buffers, get_accelerator().current_device_name()))
    self._sail_grad_sq = sq
    self.local_overflow = not bool(torch.isfinite(torch.stack(sq).sum()))
    return flats


def _grad_norm_from_device(self, params):
    """DeepSpeed's `complete_grad_norm_calculation_for_cpu_offload` (the L2 norm of one group's partition, summed
    over data parallel; -1 where not finite), from the device partition's squared norm instead of per-parameter
    norms taken during the boundary micro-batch."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    i = next(k for k, group in enumerate(self.params_in_partition) if group is params)
    # on the accelerator, as DeepSpeed's all-reduce here (`self.device` is the host under offload)
    total = self._sail_grad_sq[i].reshape(1).float().to(get_accelerator().current_device_name())
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    norm = total[0].item() ** 0.5
    return torch.tensor(norm if math.isfinite(norm) else -1.0, device=self.device, dtype=torch.float)


def _copy_grads_in_partition(self, param, group_idx=None):
    """DeepSpeed's `copy_grads_in_partition`, for groups accumulated on the device in fp32 under offload: no
    per-parameter norm, overflow test or host copy at the boundary (the step takes the whole partition instead)."""
    if group_idx is None:
        group_idx = self._get_param_group_idx(param)
    if not self._use_compact_grad_partition_buffer(group_idx):
        return type(self).copy_grads_in_partition(self, param, group_idx)
    self._offload_accumulated_param_ids.add(self.get_param_id(param))
    if self.is_gradient_accumulation_boundary():
        self.clear_grad_attribute(param)


def _grads_to_host(flats: list[torch.Tensor | None], host_grads: list[torch.Tensor]) -> None:
    for flat, host in zip(flats, host_grads):
        if flat is None:
            host.zero_()
        else:
            host.copy_(flat)


def gradients_to_host(zero_optimizer) -> None:
    """Where `install` keeps the step's gradients on the device until the step: copy them into DeepSpeed's host fp32
    gradient partition now (after the boundary micro-batch's backward), for readers of the host partition before the
    step (`deepspeed.utils.safe_get_full_grad`). A no-op elsewhere."""
    if getattr(zero_optimizer, "_sail_device_grads", False):
        _grads_to_host(_device_grad_partitions(zero_optimizer),
                       [p.grad for p in zero_optimizer.single_partition_of_fp32_groups])


def _offload_step(self, closure=None):
    """DeepSpeed 0.19.8's `DeepSpeedZeroOptimizer.step` on its CPU-offload path (the preconditions `install` checks),
    with the per-group work done by `host_adam_chunked`; the rest (overflow, norm, skipped steps, gather) as
    DeepSpeed writes it. The pinned bf16 host buffer DeepSpeed casts into is left unused. With the gradients on the
    device (`_device_grads`), each group's is copied to the host chunk by chunk inside `host_adam_chunked`."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    flats = _device_grad_partitions(self) if self._sail_device_grads else None
    self.micro_step_id = INITIAL_MICRO_STEP_ID
    self._wait_for_offload_copies()
    self._offload_accumulated_param_ids = set()
    if not self.compute_grad_norm:
        self._global_grad_norm = None
    self.overflow = False
    if self.check_grad_overflow:
        self.check_overflow(partition_gradients=self.partition_gradients)
    scaled_global_grad_norm = None
    if self.compute_grad_norm and not self.overflow:
        scaled_global_grad_norm = self.scaled_global_norm()
        if (self.dtype != torch.bfloat16 or self.check_grad_overflow) and is_invalid_grad_norm(scaled_global_grad_norm):
            self.overflow = True
    prev_scale = self.loss_scale
    self._update_scale(self.overflow)
    if self.overflow:
        if self.compute_grad_norm:
            self._global_grad_norm = float("inf")
        self.zero_grad(set_to_none=True)
        self._release_preflattened_grad_buffers()
        self.reset_cpu_buffers()
        return
    if scaled_global_grad_norm is not None:
        self._global_grad_norm = scaled_global_grad_norm / prev_scale

    scale = grad_scale_of(self, scaled_global_grad_norm)
    for i, _ in enumerate(self.bit16_groups):
        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        fp32_partition = self.single_partition_of_fp32_groups[i]
        out = self.parallel_partitioned_bit16_groups[i][partition_id]
        chunk = self._sail_offload_chunk
        stage, src, copy_stream = None, None, None
        if out.device.type != "cpu":
            stage = getattr(self, "_sail_offload_stage", None)
            if stage is None or stage[0].device != out.device:
                stage = self._sail_offload_stage = [torch.empty(chunk, device=out.device) for _ in range(2)]
        if flats is not None:
            src = flats[i]
            if src is None:
                fp32_partition.grad.zero_()
            elif src.device.type == "cuda":
                copy_stream = getattr(self, "_sail_grad_copy_stream", None)
                if copy_stream is None:
                    copy_stream = self._sail_grad_copy_stream = torch.cuda.Stream(device=src.device)
        group = self.optimizer.param_groups[i]
        share, between, host_numel = self._sail_device_shares[i], None, None
        if share is not None:
            host_numel = share.start
            if flats is None:  # gradients on the host (bf16 accumulation): the share's part goes to the device
                g_share = fp32_partition.grad[share.start:].to(out.device, non_blocking=True)
            else:  # DeepSpeed's device accumulation buffer, dead after this step: scaled in place
                g_share = None if src is None else src[share.start:]

            def update_share(share=share, fp32_partition=fp32_partition, group=group, g_share=g_share, out=out):
                if share.stale:
                    share.load(fp32_partition, self.optimizer.state[fp32_partition], group)
                share.update(group, g_share, scale, out[share.start:])
            between = update_share
        host_adam_chunked(self.optimizer, group, fp32_partition, fp32_partition.grad, scale, out, chunk, stage, src,
                          copy_stream, host_numel, between)
        self._lazy_init_hp_params_optimizer_state()
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None

    self.reset_cpu_buffers()
    all_gather_dp_groups(groups_flat=self.bit16_groups_flat, partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                         dp_process_group=self.real_dp_process_group,
                         start_alignment_factor=self.nccl_start_alignment_factor,
                         allgather_bucket_size=self.allgather_bucket_size)
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)


_NEEDED = ("cpu_offload", "zenflow", "torch_autocast_gradscaler", "single_partition_of_fp32_groups",
           "parallel_partitioned_bit16_groups", "real_dp_process_group", "params_in_partition",
           "bit16_groups", "bit16_groups_flat", "_wait_for_offload_copies", "_offload_accumulated_param_ids",
           "check_grad_overflow", "compute_grad_norm", "scaled_global_norm", "_update_scale", "unscale_and_clip_grads",
           "_lazy_init_hp_params_optimizer_state", "_release_preflattened_grad_buffers", "reset_cpu_buffers",
           "_update_model_bit16_weights", "nccl_start_alignment_factor", "allgather_bucket_size", "averaged_gradients",
           "overlap_comm", "dp_process_group", "_model_parallel_all_reduce", "device", "local_overflow",
           "copy_grads_in_partition", "complete_grad_norm_calculation_for_cpu_offload",
           "_use_compact_grad_partition_buffer", "_get_param_group_idx", "get_param_id", "clear_grad_attribute",
           "is_gradient_accumulation_boundary")


def install(zero_optimizer, chunk: int, ratio: float = 1.0) -> str:
    """Patch a ZeRO-1/2 optimizer with CPU offload (the engine's `ds.optimizer`; module docstring): the step's
    gradients from the device's fp32 partition wherever DeepSpeed accumulates them there, and the chunked host step
    where `chunk` > 0 and its preconditions hold, with the share 1 - `ratio` of each partition kept and updated on
    the device (`DeviceShare`). Returns what was installed, for the log ("" = nothing)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not getattr(zero_optimizer, "cpu_offload", False):
        return ""
    missing = [n for n in _NEEDED if not hasattr(zero_optimizer, n)]
    if missing:
        raise RuntimeError(f"CPU offload: DeepSpeed's ZeRO optimizer lacks {missing}; sail_dist's offload step "
                           "(backends/gpu/offload_step.py) is written against DeepSpeed 0.19.8, whose own step "
                           "loses gradients with fp32 accumulation (module docstring). Install deepspeed==0.19.8.")
    zo = zero_optimizer
    zo._sail_device_grads = all(zo._use_compact_grad_partition_buffer(i) for i in range(len(zo.bit16_groups)))
    if zo._sail_device_grads:
        zo.copy_grads_in_partition = types.MethodType(_copy_grads_in_partition, zo)
        zo.complete_grad_norm_calculation_for_cpu_offload = types.MethodType(_grad_norm_from_device, zo)
    muon = any(getattr(p, "use_muon", False) for g in zo.bit16_groups for p in g)
    chunked = (chunk > 0 and type(zo.optimizer) is DeepSpeedCPUAdam and not zo.zenflow
               and not zo.torch_autocast_gradscaler and not muon)
    if ratio < 1.0 and not chunked:
        raise ValueError(f"backend.offload_ratio={ratio} needs the chunked host step: DeepSpeedCPUAdam "
                         "(backend.torch_adam=false), backend.offload_chunk > 0, no ZenFlow / Muon / autocast scaler")
    if ratio < 1.0 and (not getattr(zo.optimizer, "adamw_mode", True)
                        or not all(g.get("bias_correction", True) for g in zo.optimizer.param_groups)):
        raise ValueError(f"backend.offload_ratio={ratio}: the device share runs torch's AdamW, which needs "
                         "DeepSpeedCPUAdam in AdamW mode with bias correction (the engine's configuration)")
    if chunked:
        zo._sail_offload_chunk = chunk
        zo.step = types.MethodType(_offload_step, zo)
        device = zo.parallel_partitioned_bit16_groups[0][0].device
        shares = []
        for p_N in zo.single_partition_of_fp32_groups:
            start = host_share(p_N.numel(), ratio)
            shares.append(DeviceShare(start, device) if start < p_N.numel() else None)
        zo._sail_device_shares = shares
    elif zo._sail_device_grads:
        step = zo.step

        def step_from_device_grads(*args, **kwargs):
            _grads_to_host(_device_grad_partitions(zo), [p.grad for p in zo.single_partition_of_fp32_groups])
            return step(*args, **kwargs)

        zo.step = step_from_device_grads
    parts = (["gradients from the device's fp32 partition"] if zo._sail_device_grads else []) + (
        [f"host step in chunks of {chunk}"] if chunked else [])
    kept = sum(p.numel() - s.start for p, s in zip(zo.single_partition_of_fp32_groups,
                                                  getattr(zo, "_sail_device_shares", [])) if s is not None)
    if kept:
        parts.append(f"{kept / 1e6:.1f}M of this rank's optimizer elements kept on the device (offload_ratio={ratio}, "
                     f"{kept * 12 / 2**30:.2f} GiB)")
    return ", ".join(parts)
