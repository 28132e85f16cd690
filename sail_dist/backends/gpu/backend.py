"""GPU backend (NVIDIA): DeepSpeed ZeRO-2 (+ optional CPU offload of the optimizer) over NCCL.

With no GPU the same code runs on DeepSpeed's CPU accelerator over gloo, in fp32: that is how CI and
the laptop demo exercise it.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys

import torch

from sail_dist.backends.base import DistEnv, check_local_device
from sail_dist.config import Config

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env() -> None:
    """A plain `python` run is a world of one: give torch.distributed what torchrun would have."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})


def host_threads_for_offload(local_world_size: int) -> int:
    """Give each rank its share of the host cores and pin it there (DeepSpeed PR #7474's --bind_cores_to_rank).

    torchrun sets OMP_NUM_THREADS=1, which leaves DeepSpeedCPUAdam (OpenMP) on a single core: the optimizer step
    of a 2B model then takes seconds. The variable must be set before the op's OpenMP runtime loads.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    share = max(1, len(cores) // max(local_world_size, 1))
    mine = cores[local_rank * share:(local_rank + 1) * share] or cores
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))
    torch.set_num_threads(len(mine))
    return len(mine)


class GPUBackend:
    name = "gpu"

    def __init__(self) -> None:
        self.env: DistEnv | None = None

    def setup(self, cfg: Config) -> DistEnv:
        ensure_launcher_env()
        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed JIT-builds ops (CPUAdam, the CPU shm comm op): keep them in a cache that survives runs.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/sail_dist/torch_extensions"))
        import deepspeed

        # The shared-memory all-reduce op DeepSpeed builds on CPU serves inference only; skip its build.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda *a, **k: None
        local_rank = int(os.environ["LOCAL_RANK"])
        if cfg.backend.offload_optimizer == "cpu" and cuda:
            log.info("CPU offload: %d host threads for this rank",
                     host_threads_for_offload(int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        if cuda:
            check_local_device(local_rank, torch.cuda.device_count(), "CUDA")
            torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   timeout=datetime.timedelta(minutes=cfg.backend.dist_timeout_min))
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if cfg.parallel.dp not in (0, world):
            raise ValueError(f"parallel.dp={cfg.parallel.dp} but the GPU backend runs pure data parallel over all "
                             f"{world} ranks: set parallel.dp=0 (auto) or launch {cfg.parallel.dp} processes")
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        self.env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, dp_rank=rank, dp_size=world,
                           device=device, device_name=name)
        return self.env

    def build(self, cfg: Config, env: DistEnv):
        from sail_dist.backends.gpu.engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env)

    def teardown(self, clean: bool = True) -> None:
        """clean: every rank got here normally, so wait for the others before tearing the group down
        (after an error a peer may never arrive)."""
        if torch.distributed.is_initialized():
            if clean:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
