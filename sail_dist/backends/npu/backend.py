"""NPU backend (Ascend): Megatron-core process groups, pipeline schedules and expert parallelism, with
MindSpeed's Megatron patches and torch_npu fused ops.

The same code runs in three places; only the platform preparation differs (all before any megatron
import, see `prepare_platform`):

| platform | preparation                                             | collectives | OpSet (auto)  | dtype |
|----------|---------------------------------------------------------|-------------|---------------|-------|
| Ascend   | `import torch_npu`, then `import mindspeed.megatron_adaptor` | hccl    | npu           | bf16  |
| CUDA     | nothing (Megatron runs as is)                           | nccl        | npu_emulated  | bf16  |
| CPU      | the device shim (device_shim.py)                        | gloo        | npu_emulated  | fp32  |
"""
from __future__ import annotations

import datetime
import importlib.util
import logging
import os

import torch
import torch.distributed as dist

from sail_dist.backends.base import DistEnv, check_local_device
from sail_dist.config import Config
from sail_dist.parallel.mesh import ParallelDims, resolve_parallel_dims

log = logging.getLogger(__name__)

_PLATFORM: str | None = None


def detect_platform() -> str:
    """"npu" when torch_npu imports and sees an NPU, else "cuda" when CUDA is available, else "cpu".

    torch_npu is only imported when it is installed (never install it off Ascend: it breaks `import torch` there)."""
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            import torch_npu  # noqa: F401

            if torch.npu.is_available():
                return "npu"
        except (ImportError, RuntimeError) as err:  # a broken install on a non-Ascend machine
            log.warning("torch_npu is installed but unusable here (%s); not using the NPU", err)
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_platform() -> str:
    """Make Megatron-core importable and runnable on this machine; idempotent; call before any megatron import.

    On Ascend, MindSpeed must patch Megatron before Megatron is imported anywhere (its adaptor also brings
    torch_npu's transfer_to_npu: cuda -> npu, nccl -> hccl). On CPU the device shim plays that role."""
    global _PLATFORM
    if _PLATFORM is not None:
        return _PLATFORM
    platform = detect_platform()
    if platform == "npu":
        import sys

        early = sorted(m for m in sys.modules if m == "megatron" or m.startswith("megatron."))
        if early:
            raise RuntimeError(f"megatron was imported before MindSpeed could patch it ({early[:3]}...): import "
                               "sail_dist.backends.npu.backend (or call prepare_platform()) first")
        try:
            import mindspeed.megatron_adaptor  # noqa: F401  (patches Megatron-core for Ascend)
        except ImportError as err:
            raise ImportError("the NPU backend on Ascend needs MindSpeed (the branch paired with Megatron "
                              "core_v0.12.1, installed from its repository): see docs/npu.md") from err
    elif platform == "cpu":
        from sail_dist.backends.npu.device_shim import apply_cpu_device_shim

        apply_cpu_device_shim()
    else:
        # Megatron's p2p / grad-reduction overlap relies on one device queue (MindSpeed scripts set it too).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from sail_dist.backends.npu.megatron_compat import apply_megatron_compat

    apply_megatron_compat()
    _PLATFORM = platform
    return platform


def _ensure_launcher_env() -> None:
    from sail_dist.backends.gpu.backend import ensure_launcher_env  # plain helper, imports no DeepSpeed

    ensure_launcher_env()


class NPUBackend:
    name = "npu"

    def __init__(self) -> None:
        self.env: DistEnv | None = None
        self.dims: ParallelDims | None = None
        self.platform: str | None = None

    def setup(self, cfg: Config) -> DistEnv:
        _ensure_launcher_env()
        self.platform = prepare_platform()
        local_rank = int(os.environ["LOCAL_RANK"])
        if self.platform == "npu":
            check_local_device(local_rank, torch.npu.device_count(), "NPU")
            torch.npu.set_device(local_rank)
            device, comm = torch.device("npu", local_rank), "hccl"
            device_name = torch.npu.get_device_name(local_rank)
        elif self.platform == "cuda":
            check_local_device(local_rank, torch.cuda.device_count(), "CUDA")
            torch.cuda.set_device(local_rank)
            device, comm = torch.device("cuda", local_rank), "nccl"
            device_name = torch.cuda.get_device_name(device)
        else:
            device, comm, device_name = torch.device("cpu"), "gloo", "cpu"
        timeout = datetime.timedelta(minutes=cfg.backend.dist_timeout_min)
        if not dist.is_initialized():
            dist.init_process_group(comm, timeout=timeout)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.dims = resolve_parallel_dims(cfg.parallel, world, cfg.model, cfg.train.micro_batches)

        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(
            pipeline_model_parallel_size=self.dims.pp,
            virtual_pipeline_model_parallel_size=self.dims.vpp if self.dims.vpp > 1 else None,
            expert_model_parallel_size=self.dims.ep,
            distributed_timeout_minutes=cfg.backend.dist_timeout_min,
        )
        me = self.dims.coords(rank)
        got = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
               ps.get_expert_model_parallel_rank())
        if got != (me.pp_rank, me.dp_rank, me.ep_rank):
            raise RuntimeError(f"rank {rank}: Megatron placed it at (pp, dp, ep) = {got}, sail_dist/parallel/mesh.py expected "
                               f"{(me.pp_rank, me.dp_rank, me.ep_rank)}; the rank order changed (Megatron version?)")
        self.env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, dp_rank=me.dp_rank,
                           dp_size=self.dims.dp, device=device, device_name=device_name,
                           is_last_stage=me.pp_rank == self.dims.pp - 1)
        if rank == 0:
            log.info("NPU backend on %s (%s, %s): %s", self.platform, device_name, comm, self.dims.describe())
        return self.env

    def build(self, cfg: Config, env: DistEnv):
        if self.dims is None:
            raise RuntimeError("NPUBackend.build() before setup(): setup prepares the platform Megatron is imported on")
        from sail_dist.backends.npu.engine import MegatronEngine

        return MegatronEngine(cfg, env, self.dims, self.platform)

    def teardown(self, clean: bool = True) -> None:
        if clean and dist.is_initialized():
            dist.barrier()  # see GPUBackend.teardown
        if self.dims is not None:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
