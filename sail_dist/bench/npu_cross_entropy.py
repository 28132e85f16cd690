"""NPU OpSet cross entropy: peak memory and time of the tiled linear cross-entropy against the full logits.

    python -m sail_dist.bench.npu_cross_entropy [--shapes bf16_4k,bf16_4k_half_masked,fp32_2k]
                                                [--impls full,tiled,tiled_v8k] [--repeats 2] [--json PATH]

`cross_entropy(h[T, D], w[V, D], labels[T])` forward + backward at the Qwen3 vocabulary (V = 151,936,
D = 2048, the SAIL-VL2-2B lm head) on the CPU, through the `npu_emulated` OpSet (the very code the real
`npu` OpSet runs: it calls no torch_npu op). Implementations:
  full       logits = h @ w.T, then fp32 F.cross_entropy (the reference OpSet, and what the NPU OpSet did before)
  tiled      kernels/linear_cross_entropy.py (shared with the GPU OpSet), automatic tiles (512 MiB of fp32 logits)
  tiled_v8k  the same with 8192-word vocabulary chunks (a smaller tile: the memory / GEMM-width knob)
Each (shape, implementation) runs in its own process so the peak is its own: the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus the resident set at that point, so the
figure is what the op adds on top of its inputs, the gradients dh and dw it returns included (they are listed
apart: every implementation must hold them). torch's CPU allocator caches nothing, so RSS follows the tensors.
Time is the best of --repeats forward + backward runs (the GEMMs dominate; `tiled` runs 4 lm-head GEMMs to
`full`'s 3, the backward recomputing the logits, but skips the rows labelled -100). Errors are relative
Frobenius norms: against `full` (loss, dh, dw), and against an fp64 evaluation of the reference on 64 sampled
tokens with a target (loss and dh: a token's dh depends only on its own logits), which puts `full`'s own bf16
rounding beside ours. A table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from sail_dist.bench.numerics import rel_err

SHAPES = {
    # name: (T, D, V, dtype, share of labels that are -100)
    "bf16_4k": (4096, 2048, 151936, torch.bfloat16, 0.0),
    "bf16_4k_half_masked": (4096, 2048, 151936, torch.bfloat16, 0.5),
    "fp32_2k": (2048, 2048, 151936, torch.float32, 0.0),
    "tiny": (64, 32, 1000, torch.float32, 0.25),  # smoke test of the script
}
IMPLS = ("full", "tiled", "tiled_v8k")
GIB = 1 << 30


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _inputs(T: int, D: int, V: int, dtype: torch.dtype, masked: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g).to(dtype)  # final-norm output: unit scale
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)  # lm head at init scale
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < masked] = -100
    dloss = torch.rand(T, generator=g)  # per-token loss weights, as the trainer's objective gives
    return h, w, labels, dloss


def _op(impl: str):
    from sail_dist.kernels import get_opset

    if impl == "full":
        return get_opset("reference").cross_entropy
    return get_opset("npu_emulated", ce_vocab_chunk=8192 if impl == "tiled_v8k" else None).cross_entropy


def _child(shape: str, impl: str, out_dir: str, repeats: int) -> None:
    T, D, V, dtype, masked = SHAPES[shape]
    op = _op(impl)
    small = _inputs(8, 16, 64, dtype, 0.0)  # warm-up: thread pools and kernels, outside the measurement
    sh, sw = small[0].requires_grad_(), small[1].requires_grad_()
    op(sh, sw, small[2]).backward(small[3])
    h, w, labels, dloss = _inputs(T, D, V, dtype, masked)
    h.requires_grad_()
    w.requires_grad_()
    fwd_s, bwd_s = [], []
    for rep in range(repeats):  # the peak is the first run's; times are the best of `repeats` (a shared box)
        h.grad = w.grad = None
        if rep == 0:
            _reset_peak_rss()
            base_kib = _proc_status_kib("VmRSS")
        t0 = time.perf_counter()
        loss = op(h, w, labels)
        t1 = time.perf_counter()
        loss.backward(dloss.to(loss.dtype))
        t2 = time.perf_counter()
        if rep == 0:
            peak_kib = _proc_status_kib("VmHWM")
            torch.save({"loss": loss.detach(), "dh": h.grad, "dw": w.grad}, os.path.join(out_dir, f"{impl}.pt"))
        fwd_s.append(t1 - t0)
        bwd_s.append(t2 - t1)
        del loss
    print(json.dumps({"peak_bytes": (peak_kib - base_kib) * 1024, "fwd_s": min(fwd_s), "bwd_s": min(bwd_s)}))


def _fp64_sample(shape: str, num: int = 64) -> dict[str, torch.Tensor]:
    """Exact (fp64 reference) loss and dh of `num` tokens that have a target, and their row indices."""
    from sail_dist.kernels import get_opset

    T, D, V, dtype, masked = SHAPES[shape]
    h, w, labels, dloss = _inputs(T, D, V, dtype, masked)
    valid = torch.nonzero(labels != -100).squeeze(1)
    rows = valid[torch.randperm(valid.numel(), generator=torch.Generator().manual_seed(1))[:num]].sort().values
    h64 = h[rows].double().requires_grad_()
    loss64 = get_opset("reference").cross_entropy(h64, w.double(), labels[rows])
    (dh64,) = torch.autograd.grad(loss64, [h64], dloss[rows].double())
    return {"rows": rows, "loss": loss64.detach(), "dh": dh64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="bf16_4k,bf16_4k_half_masked,fp32_2k")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--repeats", type=int, default=2, help="forward + backward runs per case; best time")
    parser.add_argument("--json", default=None, help="also write the JSON figures to this path")
    parser.add_argument("--child", nargs=3, metavar=("SHAPE", "IMPL", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, repeats=args.repeats)
        return
    shapes, impls = args.shapes.split(","), args.impls.split(",")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for impl in impls:
        if impl not in IMPLS:
            parser.error(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if "full" in impls:  # the baseline the others are compared with runs first
        impls = ["full"] + [i for i in impls if i != "full"]

    results: dict[str, dict] = {}
    header = (f"{'shape':>20} {'impl':>10} {'peak GiB':>9} {'grads GiB':>9} {'working GiB':>11} {'fwd s':>7} "
              f"{'bwd s':>7} | vs full: {'loss':>7} {'dh':>7} {'dw':>7} | vs fp64: {'loss':>7} {'dh':>7}")
    print(header)
    for name in shapes:
        T, D, V, dtype, masked = SHAPES[name]
        grads_bytes = (T * D + V * D) * dtype.itemsize
        results[name] = {"T": T, "D": D, "V": V, "dtype": str(dtype).replace("torch.", ""), "masked": masked,
                         "fp32_logits_bytes": T * V * 4, "grads_bytes": grads_bytes, "impls": {}}
        exact = _fp64_sample(name)
        with tempfile.TemporaryDirectory() as out_dir:
            for impl in impls:
                proc = subprocess.run([sys.executable, "-m", "sail_dist.bench.npu_cross_entropy", "--child", name,
                                       impl, out_dir, "--repeats", str(args.repeats)],
                                      capture_output=True, text=True, check=True)
                fig = json.loads(proc.stdout.strip().splitlines()[-1])
                fig["working_bytes"] = fig["peak_bytes"] - grads_bytes
                got = torch.load(os.path.join(out_dir, f"{impl}.pt"))
                fig["err64_loss"] = rel_err(got["loss"][exact["rows"]], exact["loss"])
                fig["err64_dh"] = rel_err(got["dh"][exact["rows"]], exact["dh"])
                if impl != "full" and "full" in impls:
                    want = torch.load(os.path.join(out_dir, "full.pt"))
                    fig.update({f"err_{k}": rel_err(got[k], want[k]) for k in ("loss", "dh", "dw")})
                    del want
                del got
                results[name]["impls"][impl] = fig
                vs_full = " ".join(f"{fig[k]:7.1e}" if k in fig else f"{'-':>7}"
                                   for k in ("err_loss", "err_dh", "err_dw"))
                print(f"{name:>20} {impl:>10} {fig['peak_bytes'] / GIB:9.2f} {grads_bytes / GIB:9.2f} "
                      f"{fig['working_bytes'] / GIB:11.2f} {fig['fwd_s']:7.2f} {fig['bwd_s']:7.2f} | vs full: "
                      f"{vs_full} | vs fp64: {fig['err64_loss']:7.1e} {fig['err64_dh']:7.1e}", flush=True)
        full, tiled = results[name]["impls"].get("full"), results[name]["impls"].get("tiled")
        if full and tiled:
            results[name]["peak_reduction"] = full["peak_bytes"] / tiled["peak_bytes"]
            results[name]["working_reduction"] = full["working_bytes"] / tiled["working_bytes"]

    print()
    for name, r in results.items():
        if "peak_reduction" in r:
            print(f"{name}: peak {r['peak_reduction']:.1f}x lower, working memory (peak minus the gradients) "
                  f"{r['working_reduction']:.1f}x lower; the fp32 logits alone would be "
                  f"{r['fp32_logits_bytes'] / GIB:.2f} GiB")
    load = os.getloadavg()[1]  # the 5-minute load: times on a shared box are only as good as this
    print(f"5-minute load average at the end: {load:.1f} on {os.cpu_count()} cores")
    out = {"bench": "npu_cross_entropy", "machine": f"{os.uname().machine} {os.cpu_count()} cores",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_5min": load, "shapes": results}
    line = json.dumps(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
