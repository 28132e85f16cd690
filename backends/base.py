"""Backend / Engine protocols and the backend registry.

The trainer, the data pipeline and the stages are written once against these; a backend owns process
groups, parallel wrapping, the optimizer and checkpoint format of its engine.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch


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
class StepStats:
    loss: float  # global, normalised language-model loss of the step (what the optimizer minimised, without aux)
    aux_loss: float  # mean MoE load-balancing loss (0 for dense models)
    grad_norm: float  # global gradient norm before clipping
    lr: float
    tokens: int  # tokens this rank processed
    samples: int
    skipped: bool = False  # non-finite loss or gradient: the update was skipped
    flops: float = 0.0  # training FLOPs this rank performed (model/flops.py)
    expert_counts: torch.Tensor | None = None  # [n_moe_layers, E] token-slot counts (global over DP)
    time_s: float = 0.0


class Engine(Protocol):
    model: nn.Module  # the unwrapped single-device model (for evaluation and export)

    def train_step(self, micro_batches: list[PackedBatch], step: int) -> StepStats: ...

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


def all_reduce_sum(group: dist.ProcessGroup | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An in-place sum over `group` (the hook engines give `MoE.reduce_counts`)."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    return reduce


_BACKENDS = {"gpu": "sail_dist.backends.gpu.backend:GPUBackend", "npu": "sail_dist.backends.npu.backend:NPUBackend"}


def get_backend(name: str) -> Backend:
    """The backend registered as `name` ("gpu" or "npu"), imported lazily."""
    if name not in _BACKENDS:
        raise KeyError(f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
