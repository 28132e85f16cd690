"""The GPU OpSet's Triton RMSNorm, RoPE and SwiGLU against torch eager and torch.compile, per op, at the 2B shapes.

    python -m sail_dist.bench.elementwise [--tokens 8192] [--dtype bf16] [--json PATH]

Needs a CUDA GPU. Each op runs forward + backward at SAIL-VL2-2B's widths on one micro-batch of `--tokens` tokens
(8 x 1024 ViT patches for the ViT rows): the LLM's RMSNorm [T, 2048], QK-norm and RoPE on q [T, 16, 128] as a
slice of the fused qkv output, SwiGLU [T, 2 x 6144], the ViT's RMSNorm [P, 1536] and SwiGLU [P, 2 x 4096]. Columns:
`torch` = the reference's eager ops (what `backend.kernels.elementwise: false` runs), `triton` = the kernels,
`compiled` = the reference under torch.compile (what a compiled block fuses it into, neighbours aside), as
median ms of triton.testing.do_bench, with the bytes the op must move (inputs read + outputs written, both
directions) over the time as GB/s. The Triton results are checked against the fp32 reference first. A table,
then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from sail_dist.bench.numerics import rel_err
from sail_dist.kernels import reference as ref


def _cases(T: int, P: int, dtype: torch.dtype):
    """name -> (reference fn, triton fn, inputs, which inputs take a gradient)."""
    from sail_dist.kernels.triton.rms_norm import rms_norm
    from sail_dist.kernels.triton.rope import rope
    from sail_dist.kernels.triton.swiglu import swiglu
    from sail_dist.model.qwen3 import rope_cos_sin

    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    ones = lambda n: (1 + 0.1 * torch.randn(n, generator=g, device="cuda")).to(dtype)  # noqa: E731
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda") % 2048, 128, 1e6, dtype)
    qkv = rnd(T, (16 + 2 * 8) * 128)
    q_of = lambda t: t[:, :2048].view(T, 16, 128)  # noqa: E731
    return {
        "llm rms_norm [T,2048]": (lambda x, w: ref.rms_norm(x, w, 1e-6), lambda x, w: rms_norm(x, w, 1e-6),
                                  [rnd(T, 2048), ones(2048)], [True, True]),
        "qk_norm q [T,16,128] (slice)": (lambda x, w: ref.rms_norm(q_of(x), w, 1e-6),
                                         lambda x, w: rms_norm(q_of(x), w, 1e-6), [qkv, ones(128)], [True, True]),
        "rope q [T,16,128]": (lambda x: ref.rope(x, cos, sin), lambda x: rope(x, cos, sin), [rnd(T, 16, 128)], [True]),
        "llm swiglu [T,2x6144]": (ref.swiglu, swiglu, [rnd(T, 2 * 6144)], [True]),
        "vit rms_norm [P,1536]": (lambda x, w: ref.rms_norm(x, w, 1e-5), lambda x, w: rms_norm(x, w, 1e-5),
                                  [rnd(P, 1536), ones(1536)], [True, True]),
        "vit swiglu [P,2x4096]": (ref.swiglu, swiglu, [rnd(P, 2 * 4096)], [True]),
    }


def _fwd_bwd(fn, inputs, grads):
    """fn's forward + backward on fresh leaves of `inputs`, as one timed callable."""
    leaves = [t.detach().requires_grad_(m) for t, m in zip(inputs, grads)]
    dout = torch.randn_like(fn(*leaves))

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(dout)

    return run


def _bytes(inputs, out) -> int:
    """Bytes an ideal fused op moves forward + backward: read inputs, write out; read inputs + dout, write grads."""
    moved_in = sum(t.numel() * t.element_size() for t in inputs)
    o = out.numel() * out.element_size()
    return (moved_in + o) + (moved_in + o + moved_in)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--patches", type=int, default=8192)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.elementwise needs a CUDA GPU")
    from triton.testing import do_bench

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    print(f"{'op (fwd+bwd)':<30}{'torch ms':>9}{'triton ms':>10}{'compiled ms':>12}{'x torch':>8}{'x compiled':>11}"
          f"{'triton GB/s':>12}{'max rel err':>12}")
    for name, (ref_fn, tri_fn, inputs, grads) in _cases(args.tokens, args.patches, dtype).items():
        # correctness first: the kernels against the fp32 reference on the same inputs
        leaves_t = [t.detach().requires_grad_(m) for t, m in zip(inputs, grads)]
        leaves_r = [t.detach().float().requires_grad_(m) for t, m in zip(inputs, grads)]
        out_t, out_r = tri_fn(*leaves_t), ref_fn(*leaves_r)
        d = torch.randn(out_r.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
        out_t.backward(d.to(out_t.dtype))
        out_r.backward(d)
        err = max([rel_err(out_t.float(), out_r)] + [rel_err(a.grad, b.grad) for a, b, m in zip(leaves_t, leaves_r, grads) if m])
        times = {}
        for impl, fn in (("torch", ref_fn), ("triton", tri_fn), ("compiled", torch.compile(ref_fn, dynamic=False))):
            run = _fwd_bwd(fn, inputs, grads)
            run()  # (compile outside the timing)
            times[impl] = float(do_bench(run, warmup=25, rep=100, return_mode="median"))
        gbs = _bytes(inputs, out_t) / (times["triton"] * 1e-3) / 1e9
        rows.append({"op": name, **{f"{k}_ms": v for k, v in times.items()}, "triton_gb_s": gbs, "max_rel_err": err})
        print(f"{name:<30}{times['torch']:>9.3f}{times['triton']:>10.3f}{times['compiled']:>12.3f}"
              f"{times['torch'] / times['triton']:>7.2f}x{times['compiled'] / times['triton']:>10.2f}x{gbs:>12.0f}"
              f"{err:>12.1e}")
    total = {k: sum(r[f"{k}_ms"] for r in rows) for k in ("torch", "triton", "compiled")}
    result = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "tokens": args.tokens, "rows": rows,
              "speedup_vs_torch": total["torch"] / total["triton"], "speedup_vs_compiled": total["compiled"] / total["triton"]}
    print(f"sum: torch {total['torch']:.3f} ms, triton {total['triton']:.3f} ms, compiled {total['compiled']:.3f} ms")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    bad = [r["op"] for r in rows if r["max_rel_err"] > 2e-2]
    if bad:
        sys.exit(f"bench.elementwise: the Triton result of {bad} is off the fp32 reference by more than 2e-2")
    return result


if __name__ == "__main__":
    main()
