"""Training-step benchmark of an engine on synthetic packed micro-batches (the 2B shape by default).

    torchrun --nproc_per_node N -m sail_dist.bench.train_step [--model configs/model/sailvl2_2b.yaml]
        [--llm-layers 28] [--seq 8192] [--tiles-per-sample 2] [--micro-batches 2] [--offload none|cpu]
        [--backend gpu] [--steps 8] [--warmup 3] [key.sub=value ...]

Each micro-batch packs samples of `--sample-len` tokens, each with `--tiles-per-sample` 448 tiles
(256 vision tokens each), up to `--seq` tokens. Reports per-step time, tokens/s (global and per device),
MFU (model/flops.py over the device's dense bf16 peak), peak device memory; prints a table and ends
with one JSON line.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from sail_dist.backends.base import get_backend
from sail_dist.config import load_config
from sail_dist.data.synthetic import synthetic_batch
from sail_dist.model.flops import batch_flops, param_counts
from sail_dist.train.lr import lr_at
from sail_dist.train.metrics import peak_flops


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model and micro-batch shape arguments both training benchmarks take (see `micro_batch`, `shape_overrides`)."""
    p.add_argument("--model", default="configs/model/sailvl2_2b.yaml")
    p.add_argument("--llm-layers", type=int, default=0, help="reduce the LLM depth (0 = as configured)")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--sample-len", type=int, default=2048)
    p.add_argument("--tiles-per-sample", type=int, default=2)


def shape_overrides(a: argparse.Namespace) -> list[str]:
    """Config overrides of the shape arguments: the demo data switch, the reduced LLM depth."""
    return ["data.demo=true", *([f"model.llm.num_layers={a.llm_layers}"] if a.llm_layers else [])]


def micro_batch(cfg, seq: int, sample_len: int, tiles: int, seed: int):
    g = cfg.model.vit.grid
    n = max(seq // sample_len, 1)
    lens = [sample_len] * n
    lens[-1] += seq - sum(lens)
    return synthetic_batch(cfg.model, lens, [[(g, g)] * tiles for _ in lens], seed=seed)


# Kernel kinds by name, first match wins (attention before matmul: flash kernels' template names mention cutlass).
KERNEL_KINDS = {
    "communication": ("nccl",),
    "optimizer": ("multi_tensor", "adam", "foreach", "fused_sgd"),
    "attention": ("flash", "fmha", "attention", "_split_kernel", "_merge_kernel"),
    "matmul": ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "grouped_mm", "_moe_"),
    "copies": ("memcpy", "memset", "copy", "catarray", "cat_", "index", "gather", "scatter", "fill"),
    "elementwise": ("elementwise", "reduce", "triton", "softmax", "norm", "silu", "_ce_", "cross_entropy"),
}


def kernel_kind(name: str) -> str:
    name = name.lower()
    if name.startswith("triton_"):  # Inductor's generated kernels: templates are GEMMs, the rest fused element-wise
        return "matmul" if name.startswith("triton_tem") else "elementwise"  # (names say "_to_copy" for casts)
    return next((k for k, subs in KERNEL_KINDS.items() if any(x in name for x in subs)), "elementwise")


def device_time_breakdown(prof, wall_s: float) -> dict:
    """The profiled step split into matmul / attention / elementwise / copies / optimizer / communication device
    time and idle (the step's wall time in which no kernel runs: the union of kernel intervals subtracted).
    Kernels the table does not name are counted as elementwise (Inductor's and our fused element-wise kernels)."""
    sums = dict.fromkeys(KERNEL_KINDS, 0.0)
    spans = []
    for e in prof.events():
        if e.device_type.name != "CUDA" or e.time_range.elapsed_us() <= 0:
            continue
        # record_function ranges mirrored on the device timeline ("## Call CompiledFxGraph ...",
        # "Optimizer.step#..."): spans around kernels, not kernels; counting them would count their kernels twice
        if getattr(e, "is_user_annotation", False) or e.name.startswith("## ") or "#" in e.name:
            continue
        sums[kernel_kind(e.name)] += e.time_range.elapsed_us() / 1e3
        spans.append((e.time_range.start, e.time_range.end))
    busy = sum(e0 - s0 for s0, e0 in _union(spans))  # (streams overlap)
    out = {k: round(v, 1) for k, v in sums.items()}
    out["idle"] = round(max(wall_s * 1e3 - busy / 1e3, 0.0), 1)
    out["wall_ms"] = round(wall_s * 1e3, 1)
    return out


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) intervals as disjoint sorted intervals."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _events(trace: str | list[dict]) -> list[dict]:
    """A Chrome trace's events: read from a path (.json or .json.gz), or as already read."""
    if not isinstance(trace, str):
        return trace
    opener = gzip.open if trace.endswith(".gz") else open
    with opener(trace, "rt") as f:
        return json.load(f)["traceEvents"]


def _device_activities(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])


def _host_ops_by_thread(events: list[dict]) -> dict:
    by_thread: dict = {}
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            by_thread.setdefault(e["tid"], []).append(e)
    return by_thread


def _where(by_thread: dict, event: dict) -> str:
    """The host ops enclosing `event` on its thread: the outermost two and the innermost."""
    enclosing = [o["name"][:50] for o in by_thread.get(event["tid"], ()) if o["ts"] <= event["ts"] <= o["ts"] + o["dur"]]
    return " > ".join(enclosing[:2] + ([f"... {enclosing[-1]}"] if len(enclosing) > 2 else [])) or "(no op)"


def host_syncs(trace: str | list[dict], min_us: float = 100.0, top: int = 10) -> list[dict]:
    """The host's waits on the device (cuda*Synchronize of >= `min_us`) by the ops they ran in: after each one the
    device's queue is empty, so whatever the host launches next starts from idle."""
    events = _events(trace)
    by_thread = _host_ops_by_thread(events)
    waits: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and "Synchronize" in e.get("name", "") and e.get("dur", 0) >= min_us:
            acc = waits.setdefault(_where(by_thread, e), [0.0, 0])
            acc[0] += e["dur"] / 1e3
            acc[1] += 1
    ranked = sorted(waits.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"where": k, "ms": round(v[0], 3), "count": v[1]} for k, v in ranked]


def busy_timeline(trace: str | list[dict], window_ms: float = 20.0) -> list[int]:
    """Percent of each `window_ms` window (from the first device activity) in which some device activity runs
    (union over streams): where in the step the device idles (e.g. host-bound forwards, the optimizer's tail)."""
    device = _device_activities(_events(trace))
    if not device:
        return []
    t0, w = device[0]["ts"], window_ms * 1e3
    busy: dict[int, float] = {}
    for s, e in _union([(d["ts"], d["ts"] + d.get("dur", 0.0)) for d in device]):  # (overlapping streams once)
        while s < e:
            k = int((s - t0) // w)
            end = min(e, t0 + (k + 1) * w)
            busy[k] = busy.get(k, 0.0) + end - s
            s = end
    return [round(100 * busy.get(k, 0.0) / w) for k in range(max(busy) + 1)]


def idle_sources(trace: str | list[dict], min_gap_us: float = 5.0, top: int = 15) -> dict:
    """Where the device's idle time comes from, from a profiled step's Chrome trace: every gap of >= `min_gap_us`
    between device activities (kernels, memcpy, memset; union over streams) charged to what the host was running
    when it launched the activity that ends the gap (the launch's enclosing ops on its thread: outermost two and the
    innermost), and whether that launch came after the gap had begun (the host was late) or before (the device
    waited on something else)."""
    events = _events(trace)
    device = _device_activities(events)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    by_thread = _host_ops_by_thread(events)
    gaps: dict[str, list[float]] = {}
    late = early = 0.0
    busy_end = None
    for d in device:
        gap = d["ts"] - busy_end if busy_end is not None else 0.0
        if gap >= min_gap_us:
            launch = launches.get(d.get("args", {}).get("correlation"))
            if launch is None:
                key = f"(launch not recorded) {d['name'][:50]}"
            else:
                key = _where(by_thread, launch)
                if launch["ts"] > busy_end:
                    late += gap
                else:
                    early += gap
            acc = gaps.setdefault(key, [0.0, 0])
            acc[0] += gap / 1e3
            acc[1] += 1
        end = d["ts"] + d.get("dur", 0.0)
        busy_end = end if busy_end is None else max(busy_end, end)
    ranked = sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gap_ms": round(sum(v[0] for v in gaps.values()), 3), "host_late_ms": round(late / 1e3, 3),
            "device_waiting_ms": round(early / 1e3, 3),
            "gaps": [{"where": k, "ms": round(v[0], 3), "count": v[1]} for k, v in ranked]}


def report_profile(prof, wall_s: float, cuda: bool) -> dict | None:
    """Print the profiled step's kernel table, its split by kind (device_time_breakdown) and the memory-bound aten
    ops by input shape; returns the split (None off CUDA)."""
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
    if not cuda:
        return None
    split = device_time_breakdown(prof, wall_s)
    total = sum(v for k, v in split.items() if k != "wall_ms")
    print(f"profiled step {split['wall_ms']:.0f} ms (stretched by the profiler): " + ", ".join(
        f"{k} {v:.0f} ms ({100 * v / max(total, 1e-9):.0f}%)" for k, v in split.items() if k != "wall_ms"))
    # where the memory-bound aten ops come from: the same table by input shapes
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::copy_", "aten::add_", "aten::mul", "aten::sub", "aten::add")]
    rows.sort(key=lambda e: -e.self_device_time_total)
    for e in rows[:20]:
        print(f"  {e.key:<14}{e.self_device_time_total / 1e3:>9.1f} ms {e.count:>6}x  {str(e.input_shapes)[:110]}")
    return split


def report_idle(trace_path: str) -> dict:
    """Print and return the profiled step's idle gaps (idle_sources), host syncs and device-busy timeline."""
    events = _events(trace_path)  # (read once for the three)
    idle = idle_sources(events)
    print(f"idle gaps >= 5 us: {idle['gap_ms']:.0f} ms ({idle['host_late_ms']:.0f} ms with the host late to launch), "
          "by what the host ran when it launched the activity after the gap:")
    for r in idle["gaps"]:
        print(f"  {r['ms']:>8.1f} ms {r['count']:>6}x  {r['where'][:170]}")
    idle["host_syncs"] = host_syncs(events)
    print("host waits on the device (>= 0.1 ms), by where:")
    for r in idle["host_syncs"]:
        print(f"  {r['ms']:>8.1f} ms {r['count']:>6}x  {r['where'][:170]}")
    idle["busy_pct_per_20ms"] = busy_timeline(events)
    print("device busy % per 20 ms: " + " ".join(map(str, idle["busy_pct_per_20ms"])))
    return idle


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--offload", default="none", choices=["none", "cpu"])
    p.add_argument("--backend", default="gpu")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--label", default="")
    p.add_argument("--profile", action="store_true", help="profile the last step (torch.profiler) and print the "
                   "top kernels by device time")
    p.add_argument("--trace", default="", help="with --profile: where to write the profiled step's Chrome trace "
                   "(gzipped when the name ends in .gz; default a temporary file)")
    p.add_argument("--ab-host-wait", action="store_true", help="GPU backend: every other step with DeepSpeed's own "
                   "end of backward (a device-wide synchronize per micro-batch) instead of the stream wait "
                   "(backends/gpu/zero_step.py install_epilogue); both step times reported, paired in one run")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    if a.ab_host_wait and a.steps - a.warmup < 2:
        p.error("--ab-host-wait needs two timed steps or more (--steps minus --warmup), one of each kind")
    # the engine's and the compile workers' log lines (stderr; stdout ends with the JSON line)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    over = [*shape_overrides(a), f"train.steps={a.steps}", f"train.micro_batches={a.micro_batches}", "train.lr=1e-5",
            f"backend.name={a.backend}", f"backend.offload_optimizer={a.offload}", "train.out_dir=/tmp/sail_bench",
            *a.overrides]
    cfg = load_config(a.model, over)
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    t_build = time.perf_counter()
    engine = backend.build(cfg, env)
    build_s = time.perf_counter() - t_build
    times, losses, norms = [], [], []
    flops_step = 0.0
    profile_split = profile_idle = None
    ab = a.ab_host_wait and bool(getattr(engine, "stream_wait_epilogue", False))
    if a.ab_host_wait and not ab and env.is_main:
        print("--ab-host-wait: this engine keeps DeepSpeed's host wait (CPU, offload or another backend): no pair")
    if ab:
        from sail_dist.backends.gpu import zero_step
    for step in range(a.steps):
        if ab:  # odd steps: DeepSpeed's own end of backward, even steps: the installed stream wait
            (zero_step.remove_epilogue if step % 2 else zero_step.install_epilogue)(engine.ds.optimizer)
        mbs = [micro_batch(cfg, a.seq, a.sample_len, a.tiles_per_sample, seed=(step * env.dp_size + env.dp_rank) * 97 + m)
               for m in range(a.micro_batches)]
        flops_step = sum(batch_flops(cfg.model, b, cfg.train.train_modules).train for b in mbs)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        prof = None
        if a.profile and step == a.steps - 1:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True)
            prof.__enter__()
        t0 = time.perf_counter()
        stats = engine.train_step(mbs, lr_at(cfg.train, step))
        if prof is not None:
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            prof_wall = time.perf_counter() - t0
            prof.__exit__(None, None, None)
            if env.is_main:
                profile_split = report_profile(prof, prof_wall, env.device.type == "cuda")
                if a.trace or env.device.type == "cuda":  # (the idle analysis reads the trace)
                    trace = a.trace or os.path.join(tempfile.mkdtemp(), "trace.json")
                    prof.export_chrome_trace(trace)
                    if env.device.type == "cuda":
                        profile_idle = report_idle(trace)
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - t0)
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    dt = statistics.median(times[a.warmup:]) if len(times) > a.warmup else times[-1]
    pair = None
    if ab:
        timed = list(enumerate(times))[a.warmup:]
        dt = statistics.median(t for i, t in timed if i % 2 == 0)  # the shipped path
        host_s = statistics.median(t for i, t in timed if i % 2)
        pair = {"stream_wait_s": dt, "host_wait_s": host_s, "host_wait_over_stream_wait": host_s / dt}
    tokens_dev = a.seq * a.micro_batches / dt
    peak = peak_flops(env.device_name)
    mfu = flops_step / dt / peak if peak else float("nan")
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if env.device.type == "cuda" else float("nan")
    pc = param_counts(cfg.model)
    res = {"label": a.label or f"{os.path.basename(a.model)} offload={a.offload}", "device": env.device_name,
           "world_size": env.world_size, "backend": cfg.backend.name, "llm_layers": cfg.model.llm.num_layers,
           "params_b": round(pc["total"] / 1e9, 3), "seq": a.seq, "micro_batches": a.micro_batches,
           "tiles_per_sample": a.tiles_per_sample, "offload": a.offload, "step_s": dt,
           "tokens_per_s": tokens_dev * env.world_size, "tokens_per_s_per_device": tokens_dev,
           "mfu": mfu, "tflops_per_device": flops_step / dt / 1e12, "peak_mem_gib": mem,
           "loss_first": losses[0], "loss_last": losses[-1],
           "losses": [round(x, 6) for x in losses], "grad_norms": [round(x, 6) for x in norms], "step_times": [round(x, 4) for x in times],
           "build_s": build_s, "first_step_s": times[0], **({"profile_split_ms": profile_split} if profile_split else {}),
           **({"profile_idle": profile_idle} if profile_idle else {}), **({"ab_host_wait": pair} if pair else {})}
    if cfg.train.compile:
        from torch._dynamo.utils import compile_times, counters

        if env.is_main:  # where the first step's compilation went (dynamo tracing, AOT, Inductor, Triton), seconds
            print(compile_times(repr="str", aggregate=True))
        res["dynamo"] = {"unique_graphs": counters["stats"]["unique_graphs"],
                         # hits / misses / bypasses of the compile caches (train.compile_cache)
                         **{k: v for c in ("inductor", "aot_autograd") for k, v in counters[c].items() if "cache" in k},
                         "graph_breaks": sum(counters["graph_break"].values()),
                         "graph_break_reasons": [str(r)[:200] for r in list(counters["graph_break"])[:5]],
                         "recompiles_over_limit": counters["stats"].get("cache_size_limit", 0)}
    if env.is_main:
        print(f"{'label':<32}{'GPUs':>5}{'step s':>9}{'tok/s/dev':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
        print(f"{res['label']:<32}{env.world_size:>5}{dt:>9.3f}{tokens_dev:>11.0f}{res['tflops_per_device']:>9.1f}"
              f"{100 * mfu:>6.1f}%{mem:>9.1f}")
        if pair:
            print(f"{'  the same, DeepSpeed host wait':<32}{'':>5}{pair['host_wait_s']:>9.3f}   "
                  f"({pair['host_wait_over_stream_wait']:.3f}x the stream-wait step, odd steps of this run)")
        print(json.dumps(res))
    backend.teardown()
    return res


if __name__ == "__main__":
    main()
