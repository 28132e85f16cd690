"""The host half of a CPU-offloaded optimizer step, piece by piece: DeepSpeed's order against the chunked pipeline.

    python -m sail_dist.bench.offload_step [--numel 2.42e9] [--chunks 1,4,16,64] [--repeats 3] [--threads 0]

Works on a flat fp32 partition of `--numel` elements (default: the 2B model's), pinned on the host as DeepSpeed's
ZeRO-2 offload keeps it, with DeepSpeedCPUAdam. Times, each wall clock to completion (device copies synchronised):
- the sequence of DeepSpeed 0.19's step, after the whole fp32 gradient partition is copied from the device (as the
  engine's offload step takes it): the copy, the clip scale over the whole gradient, DeepSpeedCPUAdam over the whole
  partition, the cast into the pinned bf16 buffer, the copy of that buffer to the device; each pass alone and the sum;
- the same work through `backends/gpu/offload_step.host_adam_chunked` at each `--chunks` size (in Mi elements):
  per chunk the gradient's copy from the device (one chunk ahead, on a side stream), the scale and Adam on the host,
  then the chunk's fp32 copy to the device and its cast there, queued while the host goes on.
First it checks on a small partition (three steps) that the chunked step gives bitwise the same parameters, moments
and device copy as DeepSpeed's sequence. Without CUDA the device copies are left out. A table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sail_dist.backends.gpu.offload_step import CHUNK_ALIGN, host_adam_chunked

GROUP = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "bias_correction": True}


def _adam(p):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam([p], lr=GROUP["lr"], betas=GROUP["betas"], eps=GROUP["eps"],
                            weight_decay=GROUP["weight_decay"], adamw_mode=True)


def _pin(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    return t.pin_memory() if cuda else t


def _partition(n: int, cuda: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    p = _pin(torch.empty(n).uniform_(-1, 1, generator=g), cuda)
    p.grad = _pin(torch.empty(n).normal_(0, 1e-3, generator=g), cuda)
    return p


SCALE = 1.0 / torch.tensor(1.7)  # the shape of DeepSpeed's clip: grad.mul_(1. / combined_scale), a 0-d tensor


def deepspeed_sequence(adam, p, buf, dev, g_dev=None) -> None:
    """DeepSpeed 0.19.8's offload step body for one group: whole-partition passes, then one copy; first the whole
    gradient partition from the device (`g_dev`), as the engine's offload step takes it (backends/gpu/offload_step.py)."""
    if g_dev is not None:
        p.grad.copy_(g_dev)
    p.grad.mul_(SCALE)
    adam.step()
    buf.copy_(p)
    if dev is not None:
        dev.copy_(buf, non_blocking=True)


def check_bitwise(n: int, chunk: int, cuda: bool, steps: int = 3) -> bool:
    """The chunked step against DeepSpeed's sequence on the same partition, `steps` steps with fresh gradients."""
    pa, pb = _partition(n, cuda, 0), _partition(n, cuda, 0)
    ada, adb = _adam(pa), _adam(pb)
    bufa, bufb = (_pin(torch.empty(n, dtype=torch.bfloat16), cuda) for _ in range(2))
    deva, devb = ((torch.empty(n, dtype=torch.bfloat16, device="cuda") for _ in range(2)) if cuda else (None, None))
    stage = [torch.empty(chunk, device="cuda") for _ in range(2)] if cuda else None
    stream = torch.cuda.Stream() if cuda else None
    for step in range(steps):
        fresh = torch.empty(n).normal_(0, 1e-3, generator=torch.Generator().manual_seed(100 + step))
        # the gradient's source: where the engine accumulated it (the device; on the host without CUDA)
        src = fresh.to("cuda") if cuda else fresh
        pa.grad.zero_()
        pb.grad.zero_()
        deepspeed_sequence(ada, pa, bufa, deva, src)
        host_adam_chunked(adb, adb.param_groups[0], pb, pb.grad, SCALE.reshape(1), devb if cuda else bufb, chunk, stage,
                          src, stream)
    if cuda:
        torch.cuda.synchronize()
    sa, sb = ada.state[pa], adb.state[pb]
    same = [torch.equal(pa, pb), torch.equal(sa["exp_avg"], sb["exp_avg"]), torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"]),
            sa["step"] == sb["step"] == steps, torch.equal(deva, devb) if cuda else torch.equal(bufa, bufb)]
    return all(same)


def _timed(fn, cuda: bool) -> float:
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=float, default=2.42e9)
    ap.add_argument("--chunks", default="1,4,16,64", help="chunk sizes in Mi elements")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="host threads (0: torch's default)")
    ap.add_argument("--check-numel", type=int, default=(1 << 22) + 777)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    n = int(a.numel) // CHUNK_ALIGN * CHUNK_ALIGN + 777  # an unaligned tail, as a real partition has
    ok = check_bitwise(a.check_numel, CHUNK_ALIGN * 16, cuda)
    print(f"bitwise equal to DeepSpeed's sequence (chunk {CHUNK_ALIGN * 16}, {a.check_numel} elements, 3 steps): {ok}")

    p = _partition(n, cuda, 1)
    adam = _adam(p)
    buf = _pin(torch.empty(n, dtype=torch.bfloat16), cuda)
    dev = torch.empty(n, dtype=torch.bfloat16, device="cuda") if cuda else None
    adam.step()  # the moments allocated and touched outside the timing
    rows: dict[str, float] = {}

    def best(name, fn):
        rows[name] = min(_timed(fn, cuda) for _ in range(a.repeats))

    g_dev = torch.zeros(n, device="cuda") if cuda else None
    if cuda:
        best("grad fp32 device -> host (whole)", lambda: p.grad.copy_(g_dev, non_blocking=True))
    best("clip scale (whole)", lambda: p.grad.mul_(SCALE))
    best("DeepSpeedCPUAdam (whole)", adam.step)
    best("cast to pinned bf16 (whole)", lambda: buf.copy_(p))
    if cuda:
        best("bf16 host -> device (whole)", lambda: dev.copy_(buf, non_blocking=True))
    best("DeepSpeed's sequence", lambda: deepspeed_sequence(adam, p, buf, dev, g_dev))
    stream = torch.cuda.Stream() if cuda else None
    for c in (int(x) for x in a.chunks.split(",")):
        stage = [torch.empty(c << 20, device="cuda") for _ in range(2)] if cuda else None
        best(f"chunked, {c} Mi", lambda c=c, stage=stage: host_adam_chunked(
            adam, adam.param_groups[0], p, p.grad, SCALE.reshape(1), dev if cuda else buf, c << 20, stage, g_dev,
            stream))
        del stage
    print(f"{'piece (' + f'{n / 1e9:.2f}B fp32 elements, {torch.get_num_threads()} host threads)':<62}{'s':>8}")
    for name, s in rows.items():
        print(f"{name:<62}{s:>8.3f}")
    chunked = {k: v for k, v in rows.items() if k.startswith("chunked")}
    best_name = min(chunked, key=chunked.get)
    ds = rows["DeepSpeed's sequence"]
    print(f"best chunked ({best_name}): {chunked[best_name]:.3f} s = {ds / chunked[best_name]:.2f}x DeepSpeed's sequence")
    result = {"numel": n, "threads": torch.get_num_threads(), "cuda": cuda, "bitwise_equal": ok,
              "seconds": rows, "speedup_chunked": ds / chunked[best_name], "best_chunk": best_name}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
