"""Backend / Engine protocols and the backend registry.

The trainer, the data pipeline and the stages are written once against these; a backend owns process
groups, parallel wrapping, the optimizer and checkpoint format of its engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.registry import Registry


@dataclass
class DistEnv:
    """Where this process sits: global rank/world, its data-parallel coordinates, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_name: str = "cpu"  # for the MFU peak table, e.g. "NVIDIA H100 80GB HBM3"
    is_last_stage: bool = True  # pipeline: only the last stage computes the loss

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainStepStats:
    """What `Engine.train_step` reports: global values on every rank unless noted."""

    loss: float  # the step objective (sum of the objective's shares over micro-batches and ranks), without aux
    aux_loss: float  # mean MoE load-balancing loss (0 for dense models)
    grad_norm: float  # global gradient norm before clipping
    lr: float
    tokens: int  # tokens this rank processed
    samples: int
    skipped: bool = False  # non-finite loss or gradient: the update was skipped
    flops: float = 0.0  # training FLOPs this rank performed (model/flops.py)
    expert_counts: torch.Tensor | None = None  # [n_moe_layers, E] token-slot counts (global over DP)
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's step metrics (objectives/base.py)
    time_s: float = 0.0


class LayerGradRecorder:
    """Per-parameter gradients of one step, for parity checks: set `track_layer_grads = True` before
    `train_step`; the engine records its full reduced gradients inside the step (collective: after the
    reduction, before clipping and the update) into `last_layer_grads`, on rank 0."""

    track_layer_grads: bool = False
    last_layer_grads: dict[str, torch.Tensor] = {}  # replaced per step, never mutated

    def layer_grads(self) -> dict[str, torch.Tensor]:
        """The last recorded step's gradients per global parameter name, on rank 0 ({} elsewhere)."""
        if not self.track_layer_grads:
            raise RuntimeError("set engine.track_layer_grads = True before train_step to record per-layer gradients")
        return dict(self.last_layer_grads)


class Engine(Protocol):
    model: nn.Module  # the unwrapped single-device model (for evaluation and export)

    def train_step(self, micro_batches: list[PackedBatch], lr: float) -> TrainStepStats: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


class Backend(Protocol):
    name: str

    def setup(self, cfg: Config) -> DistEnv: ...

    def build(self, cfg: Config, env: DistEnv) -> Engine: ...

    def teardown(self, clean: bool = True) -> None: ...


def check_local_device(local_rank: int, visible: int, kind: str) -> None:
    """Fail with the fix when this node started more ranks than it has `kind` devices (the raw error would be
    an "invalid device ordinal" from deep inside set_device)."""
    if local_rank >= visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this node has {visible} visible {kind} device(s): start at most {visible} "
            f"processes per node (torchrun --nproc_per_node), or check CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES")


def model_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """train.precision: `auto` = bf16 on accelerators (fp32 master weights in the optimizer), fp32 on CPU."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type != "cpu"):
        return torch.bfloat16
    return torch.float32


def all_reduce_sum(group: dist.ProcessGroup | None = None, device: torch.device | None = None
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A sum over `group` (in place, after a move to `device`, which NCCL needs; a no-op without a process group):
    the hook engines give `MoE.reduce_counts` and `Objective.begin_step`."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if device is not None:
            t = t.to(device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, group=group)
        return t

    return reduce


def check_micro_batches(micro_batches: list[PackedBatch], expected: int) -> int:
    """The step's micro-batch count, which must be `train.micro_batches` (both frameworks are built for it)."""
    if len(micro_batches) != expected:
        raise ValueError(f"got {len(micro_batches)} micro-batches for a step configured with "
                         f"train.micro_batches={expected}")
    return expected


BACKENDS = Registry("backend", {"gpu": "sail_dist.backends.gpu.backend:GPUBackend",
                                "npu": "sail_dist.backends.npu.backend:NPUBackend"})


def get_backend(name: str) -> Backend:
    """The backend registered as `name` ("gpu" or "npu"), imported lazily."""
    return BACKENDS.get(name)()
