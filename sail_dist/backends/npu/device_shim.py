"""A device shim that lets Megatron-core run on a machine with no accelerator (CPU + gloo).

Megatron-core assumes CUDA everywhere: `torch.cuda.current_device()`, `device="cuda"`, `.cuda()`,
CUDA streams and events, and asserts on `tensor.type() == "torch.cuda.FloatTensor"`. On Ascend,
`torch_npu.contrib.transfer_to_npu` (imported by `mindspeed.megatron_adaptor`) remaps all of that to the
NPU. This module is the same idea for the CPU, so CI runs the very code path the NPU runs:

- a global `TorchFunctionMode` rewrites every CUDA device argument (`"cuda"`, `"cuda:N"`, `torch.device`,
  a bare device index) to the CPU, turns `Tensor.cuda()` into a no-op, and makes `Tensor.type()` report
  `torch.cuda.*Tensor` names for CPU tensors (what the distributed optimizer and clip_grads check);
- `torch.cuda.current_device()` returns 0 (a device index the mode maps to the CPU); streams and events
  are no-ops; `synchronize` / `empty_cache` do nothing.

Apply it ONLY on a machine with neither CUDA nor an NPU (`apply_cpu_device_shim()` refuses otherwise):
on CUDA Megatron runs as is, on Ascend transfer_to_npu does this job. `torch.cuda.is_available()` stays
False, so our own code (and DeepSpeed, torch.distributed) keeps seeing a CPU machine. Megatron's CUDA
RNG tracker is not shimmed: the NPU backend never uses it (our model has no dropout and seeds its own
initialisation).
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}

_state = threading.local()
_APPLIED = False
_CPU = torch.device("cpu")


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d == "cuda" or d.startswith("cuda:")
    # A bare index means "CUDA device N" to torch; on this machine it can only mean the CPU.
    return isinstance(d, int) and not isinstance(d, bool)


def _to_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Rewrite the device in a `Tensor.to(...)` call: to(device), to(device, dtype), to(other), device=..."""
    if len(args) > 1 and _is_cuda_device(args[1]):
        args = (args[0], _CPU) + tuple(args[2:])
    return args, kwargs


class _CpuDeviceMode(TorchFunctionMode):
    """Maps CUDA devices to the CPU for every torch function call (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            t = args[0]
            if t.device.type == "cpu" and t.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[t.dtype]
            return func(*args)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args, kwargs = _to_args(args, kwargs)
        return func(*args, **kwargs)


class _NoOpStream:
    """Stand-in for torch.cuda.Stream / Event: everything is synchronous on the CPU."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, *args, **kwargs) -> "_NoOpStream":
        return _NoOpStream()

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, *args) -> float:
        return 0.0


def apply_cpu_device_shim() -> None:
    """Install the CPU device shim process-wide (idempotent). Refuses on a CUDA or NPU machine."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU device shim must not be applied on a CUDA machine: Megatron-core runs there as is")
    if hasattr(torch, "npu"):
        raise RuntimeError("the CPU device shim must not be applied on an Ascend machine: "
                           "mindspeed.megatron_adaptor (torch_npu's transfer_to_npu) does that job there")
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    # Entered for good: the mode stack is per thread, so keep a reference (it must outlive this call).
    _state.mode = _CpuDeviceMode()
    _state.mode.__enter__()
    _APPLIED = True
