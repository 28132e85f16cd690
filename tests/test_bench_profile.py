"""bench.train_step's profile analysis: idle device time charged to the host code that launched late."""
from __future__ import annotations

import gzip
import json

from sail_dist.bench.train_step import idle_sources, kernel_kind


def _trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_idle_gaps_are_charged_to_the_launching_ops(tmp_path):
    # Host thread 1: a step op around two launches; kernel A runs 0-10 us, kernel B is launched at 60 us (after A
    # ended: the host was late) inside aten::isfinite and runs 70-80 us; kernel C was launched early (at 5 us) but
    # starts only at 100 us (the device waited on something else), on another stream.
    ev = [
        {"cat": "cpu_op", "name": "step", "tid": 1, "ts": 0, "dur": 200},
        {"cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0, "dur": 6},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 1, "dur": 2, "args": {"correlation": 1}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 5, "dur": 1, "args": {"correlation": 3}},
        {"cat": "cpu_op", "name": "aten::isfinite", "tid": 1, "ts": 50, "dur": 20},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 60, "dur": 2, "args": {"correlation": 2}},
        {"cat": "kernel", "name": "nvjet_gemm", "ts": 0, "dur": 10, "args": {"correlation": 1}},
        {"cat": "kernel", "name": "isfinite_kernel", "ts": 70, "dur": 10, "args": {"correlation": 2}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 100, "dur": 5, "args": {"correlation": 3}},
        {"cat": "gpu_memset", "name": "Memset", "ts": 102, "dur": 1, "args": {"correlation": 99}},  # overlaps: no gap
    ]
    path = str(tmp_path / "t.json.gz")
    _trace(path, ev)
    r = idle_sources(path)
    assert r["gap_ms"] == 0.08
    where = {g["where"]: g for g in r["gaps"]}
    assert where["step > aten::isfinite"]["ms"] == 0.06 and where["step > aten::isfinite"]["count"] == 1
    assert where["step > aten::mm"]["ms"] == 0.02
    assert r["host_late_ms"] == 0.06 and r["device_waiting_ms"] == 0.02


def test_kernel_kinds():
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kernel_kind("nvjet_sm90_tst_128x192") == "matmul"
    assert kernel_kind("Memcpy DtoD (Device -> Device)") == "copies"
    assert kernel_kind("ncclDevKernel_AllReduce") == "communication"
    assert kernel_kind("triton_red_fused__to_copy_mean_mul_pow_rsqrt_0") == "elementwise"  # Inductor's fused RMSNorm
    assert kernel_kind("triton_tem_fused_mm_0") == "matmul"
    assert kernel_kind("_moe_gemm_kernel") == "matmul"


def test_host_syncs_and_busy_timeline(tmp_path):
    """Host waits on the device are charged to their enclosing ops (short ones ignored); the timeline is the busy
    share of each window, overlapping streams counted once."""
    from sail_dist.bench.train_step import busy_timeline, host_syncs

    ev = [
        {"cat": "cpu_op", "name": "backward", "tid": 2, "ts": 0, "dur": 50_000},
        {"cat": "cpu_op", "name": "aten::nonzero", "tid": 2, "ts": 10_000, "dur": 5_000},
        {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "tid": 2, "ts": 10_100, "dur": 4_000},
        {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "tid": 2, "ts": 30_000, "dur": 50},  # too short
        {"cat": "cpu_op", "name": "step", "tid": 1, "ts": 60_000, "dur": 3_000},
        {"cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "tid": 1, "ts": 60_500, "dur": 1_000},
        # device: 0-10 ms on two overlapping streams, then 25-30 ms, then 45-50 ms
        {"cat": "kernel", "name": "a", "ts": 0, "dur": 10_000, "args": {}},
        {"cat": "kernel", "name": "b", "ts": 2_000, "dur": 6_000, "args": {}},
        {"cat": "gpu_memcpy", "name": "c", "ts": 25_000, "dur": 5_000, "args": {}},
        {"cat": "kernel", "name": "d", "ts": 45_000, "dur": 5_000, "args": {}},
    ]
    path = str(tmp_path / "t.json.gz")
    _trace(path, ev)
    syncs = {s["where"]: s for s in host_syncs(path)}
    assert syncs == {"backward > aten::nonzero": {"where": "backward > aten::nonzero", "ms": 4.0, "count": 1},
                     "step": {"where": "step", "ms": 1.0, "count": 1}}
    assert busy_timeline(path, window_ms=20) == [50, 25, 25]
