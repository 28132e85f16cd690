"""The GPU OpSet's varlen attention implementations against each other at the 2B shapes, forward + backward.

    python -m sail_dist.bench.attention [--impls aten_flash,triton,torch_varlen,flash_attn] [--sweep] [--json PATH]

Needs a CUDA GPU. Shapes of one 8192-token micro-batch: the LLM's causal GQA attention (16 query / 8 kv heads of
128, 4 samples of 2048 tokens; q / k fresh from RoPE, v a slice of the qkv projection) and the ViT's full
attention (12 heads of 128, 8 tiles of 1024 patches; q / k / v strided views of one projection), and the A3B
LLM's 32 query / 4 kv heads. Reported: median ms of triton.testing.do_bench for forward + backward at that shape,
and the wall time of one forward + backward call at 256 tokens, where the device's part is negligible: the host's
cost per call, which an eager step pays wherever the host is the bottleneck. Each implementation is first checked
against the fp32 reference (output and input gradients). `--sweep` also times each tile candidate of the Triton
kernel (sail_dist/kernels/triton/flash_attention.py): the forward per forward tile, the whole backward per dk / dv
tile and per dq tile (the other backward kernel at its first tile, the one in use). A table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sail_dist.bench.numerics import rel_err
from sail_dist.kernels import reference as ref


def _case(name: str, T: int = 8192):
    """-> (make(dtype) -> leaf [T, Hq + 2 Hkv, D], split(leaf) -> q, k, v views, cu_seqlens, max_seqlen, causal, Hq)."""
    if name == "llm":
        Hq, Hkv, D, n, causal = 16, 8, 128, 2048, True
    elif name == "a3b":  # the A3B LLM's 32 query / 4 kv heads
        Hq, Hkv, D, n, causal = 32, 4, 128, 2048, True
    else:
        Hq, Hkv, D, n, causal = 12, 12, 128, 1024, False
    n = min(n, T)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(T, Hq + 2 * Hkv, D, generator=g)
    cu = torch.arange(0, T + 1, n, dtype=torch.int32).cuda()

    def make(dtype):
        return base.cuda().to(dtype).requires_grad_()

    def split(x):
        return x[:, :Hq], x[:, Hq:Hq + Hkv], x[:, Hq + Hkv:]

    return make, split, cu, n, causal, Hq


def _sweep(do_bench, shapes: list[str]) -> list[dict]:
    """Each Triton tile candidate at each shape: median ms of the forward (forward tiles) or of the whole backward
    (dk / dv and dq tiles, the other backward kernel at its default)."""
    from sail_dist.kernels.triton import flash_attention as fa

    out = []
    print(f"{'shape':<6}{'kernel':<7}{'block_m':>8}{'block_n':>8}{'warps':>6}{'stages':>7}{'ms':>9}")
    for shape in shapes:
        make, split, cu, n, causal, Hq = _case(shape)
        q, k, v = split(make(torch.bfloat16).detach())
        o, lse = fa.forward(q, k, v, cu, n, causal)
        do = torch.randn_like(o)
        for kernel, table in (("fwd", fa.FWD_TILES), ("dkdv", fa.DKDV_TILES), ("dq", fa.DQ_TILES)):
            for t in table:
                if kernel == "fwd":
                    fn = lambda t=t: fa.forward(q, k, v, cu, n, causal, tiles=t)  # noqa: E731
                elif kernel == "dkdv":
                    fn = lambda t=t: fa.backward(do, q, k, v, o, lse, cu, n, causal, dkdv_tiles=t)  # noqa: E731
                else:
                    fn = lambda t=t: fa.backward(do, q, k, v, o, lse, cu, n, causal, dq_tiles=t)  # noqa: E731
                try:
                    ms = float(do_bench(fn, warmup=5, rep=30, return_mode="median"))
                except Exception as e:  # noqa: BLE001 - a candidate this GPU cannot run (shared memory): report it
                    print(f"{shape:<6}{kernel:<7}{t.block_m:>8}{t.block_n:>8}{t.num_warps:>6}{t.num_stages:>7}"
                          f"  failed: {str(e).splitlines()[0][:120]}")
                    continue
                out.append({"shape": shape, "kernel": kernel, **t.__dict__, "ms": ms})
                print(f"{shape:<6}{kernel:<7}{t.block_m:>8}{t.block_n:>8}{t.num_warps:>6}{t.num_stages:>7}{ms:>9.3f}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", default="aten_flash,triton,torch_varlen,flash_attn")
    ap.add_argument("--sweep", action="store_true", help="time the Triton kernel's tile candidates")
    ap.add_argument("--sweep-shapes", default="llm,a3b,vit")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.attention needs a CUDA GPU")
    from triton.testing import do_bench

    from sail_dist.kernels import gpu

    rows = []
    print(f"{'shape':<6}{'impl':<14}{'fwd+bwd ms':>11}{'host ms/call':>13}{'rel err out':>12}{'rel err grad':>13}")
    for shape in ("llm", "a3b", "vit"):
        make, split, cu, n, causal, Hq = _case(shape)
        dout = torch.randn(8192, Hq, 128, device="cuda", dtype=torch.bfloat16)
        x = make(torch.float32)
        ref.attention(*split(x), cu, n, causal).backward(dout.float())
        want_out, want_grad = ref.attention(*split(x.detach()), cu, n, causal), x.grad
        for impl in args.impls.split(","):
            try:
                attn = gpu.make_attention(impl)
            except ImportError as e:
                print(f"{shape:<6}{impl:<14} skipped: {e}")
                continue

            def run(x=make(torch.bfloat16), split=split, cu=cu, n=n, dout=dout):
                x.grad = None
                out = attn(*split(x), cu, n, causal)
                out.backward(dout[:x.shape[0]])
                return out, x.grad

            try:
                out, grad = run()
            except RuntimeError as e:  # an implementation this build cannot run: report it, time the rest
                print(f"{shape:<6}{impl:<14} failed: {str(e).splitlines()[0][:200]}")
                continue
            errs = (rel_err(out.float(), want_out), rel_err(grad.float(), want_grad))
            ms = float(do_bench(run, warmup=10, rep=50, return_mode="median"))
            # host cost of one call: the same op at 256 tokens, where the device's part is negligible
            make_s, split_s, cu_s, n_s, _, _ = _case(shape, T=256)
            small = lambda x=make_s(torch.bfloat16): run(x, split_s, cu_s, n_s)  # noqa: E731
            small()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                small()
            torch.cuda.synchronize()
            host_ms = (time.perf_counter() - t0) / 50 * 1e3
            rows.append({"shape": shape, "impl": impl, "fwdbwd_ms": ms, "host_ms": host_ms,
                         "rel_err_out": errs[0], "rel_err_grad": errs[1]})
            print(f"{shape:<6}{impl:<14}{ms:>11.3f}{host_ms:>13.3f}{errs[0]:>12.1e}{errs[1]:>13.1e}")
    result = {"device": torch.cuda.get_device_name(), "rows": rows}
    if args.sweep:
        result["sweep"] = _sweep(do_bench, args.sweep_shapes.split(","))
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if any(max(r["rel_err_out"], r["rel_err_grad"]) > 2e-2 for r in rows):
        sys.exit("bench.attention: an implementation is off the fp32 reference by more than 2e-2")
    return result


if __name__ == "__main__":
    main()
