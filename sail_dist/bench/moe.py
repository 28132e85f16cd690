"""MoE experts benchmark (issue 6): per-expert loop vs torch._grouped_mm vs the fused Triton kernels.

    python -m sail_dist.bench.moe [--shapes a3b_8k,a3b_16k,few_8k] [--impls loop,grouped_mm,triton]
                                  [--kernels moe_grouped_mm=false,...] [--no-breakdown] [--json PATH]

Needs a CUDA GPU. For each shape: forward and forward+backward time (median, triton.testing.do_bench)
and TFLOP/s (forward = 2*T*K*H*3F; forward+backward counted as 3x that), the correctness of each fast
implementation in bf16 against an fp32 reference (relative Frobenius error of the output and of all four
gradients, with every kernel-written buffer NaN-poisoned first so an unwritten element fails), a per-kernel
breakdown of ours (the torch._grouped_mm GEMMs inside ours beside our Triton kernels for the same steps),
two plain bf16 matmul ceilings (an 8192^3 matmul, and dense matmuls doing the layer's six GEMMs at its
aggregate shape: "the ceiling on that shape"), and `grouped_mm_bare` (torch._grouped_mm's two GEMMs + SwiGLU
alone on rows already sorted by expert, exactly T*K of them as ours does: the bar "ours >= 1.0x grouped_mm";
`grouped_mm_bare_pad16` is the same with each group padded to 16 rows, the bar as timed before 2026-12-01, kept
for continuity; `rows` in the JSON counts each), all measured in the same run;
ours and the bars are timed against each other in --rounds paired rounds (each round runs both once,
so clock drift hits both alike) and those medians are their reported times. `--kernels` sets ours' switches
(`backend.kernels`, docs/gpu.md); the breakdown also times the path each switch turned off takes for the same
stage. A table, then one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import time

import torch

from sail_dist.bench.numerics import rel_err
from sail_dist.config import KernelConfig

SHAPES = {
    # name: (T, H, F, E, K)
    "a3b_8k": (8192, 2048, 768, 128, 8),
    "a3b_16k": (16384, 2048, 768, 128, 8),
    "few_8k": (8192, 4096, 14336, 8, 2),
    "tiny": (64, 32, 16, 8, 2),  # --cpu-smoke only
}
DEVICE = "cuda"
REL_TOL_BF16 = 1e-2


def _bench(fn, grad_to_none=None) -> float:
    if DEVICE == "cpu":  # --cpu-smoke: exercise the script, not the timings (one call: the interpreter is slow)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _inputs(T, H, F, E, K, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(T, H, device=DEVICE, generator=g).to(dtype)
    logits = torch.randn(T, E, device=DEVICE, generator=g)
    w, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)  # norm_topk_prob, in x.dtype as the model's router gives
    wgu = (torch.randn(E, H, 2 * F, device=DEVICE, generator=g) / math.sqrt(H)).to(dtype)
    wd = (torch.randn(E, F, H, device=DEVICE, generator=g) / math.sqrt(F)).to(dtype)
    dy = torch.randn(T, H, device=DEVICE, generator=g).to(dtype)
    return x, idx, w, wgu, wd, dy


def _fwd_bwd(fn, x, idx, w, wgu, wd, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, wgu, wd)]
    y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def _colmajor(w_EKN: torch.Tensor) -> torch.Tensor:
    """Same values and logical shape [E, K, N], stored with K contiguous."""
    return w_EKN.transpose(1, 2).contiguous().transpose(1, 2)


def matmul_ceiling() -> float:
    n = 8192 if DEVICE == "cuda" else 256
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


def shape_ceiling(T: int, H: int, F: int, K: int) -> float:
    """TFLOP/s of plain dense bf16 matmuls doing the layer's six GEMMs at its aggregate shape (M = T*K rows,
    no groups): forward X @ W1 [H, 2F] and act @ W2 [F, H]; backward the two dgrads and the two weight
    gradients in the layouts autograd uses. The issue's "bf16 matmul ceiling on that shape"."""
    M = T * K
    g = torch.Generator(device=DEVICE).manual_seed(2)

    def r(*shape):
        return torch.randn(*shape, device=DEVICE, generator=g).to(torch.bfloat16)

    x, act, dy, dh = r(M, H), r(M, F), r(M, H), r(M, 2 * F)
    w1, w2 = r(H, 2 * F), r(F, H)

    def six():
        x @ w1, act @ w2, dy @ w2.t(), dh @ w1.t(), x.t() @ dh, act.t() @ dy

    ms = _bench(six)
    return 3 * 2 * M * H * 3 * F / ms / 1e9


def _check(fn, inputs, ref_outs, poison) -> dict:
    import contextlib

    from sail_dist.kernels.triton import moe as tmoe

    ctx = tmoe.poison_outputs() if poison else contextlib.nullcontext()
    with ctx:
        outs = _fwd_bwd(fn, *inputs)
    errs = {k: rel_err(o, r) for k, o, r in zip(("y", "dx", "dw_topk", "dw_gate_up", "dw_down"), outs, ref_outs)}
    # Triton's CPU interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest): --cpu-smoke
    # checks the plumbing with a looser bound.
    tol = REL_TOL_BF16 if DEVICE == "cuda" else 3e-2
    errs["ok"] = all(e <= tol for e in errs.values())  # NaN compares False
    return errs


def _breakdown(x, idx, w, wgu, wd, dy, opts: KernelConfig) -> dict:
    """Time each stage of ours on its own (ms, TFLOP/s) with the routing precomputed; the indented rows time
    the same stage on the path a switch turned off takes."""
    from sail_dist.kernels.triton import moe as tmoe

    T, K = idx.shape
    E, H, F2 = wgu.shape
    F, M = F2 // 2, T * K
    torch_route = dataclasses.replace(opts, moe_fused_route=False)
    index_select = dataclasses.replace(opts, moe_gather_kernel=False)
    triton_gemms = dataclasses.replace(opts, moe_grouped_mm=False)
    r, scale, _ = tmoe.route_weights(idx, w, E, opts)
    tok = r.tok_M
    h, act = tmoe.gate_up_fwd(x, wgu, r, opts)
    dy_MH = dy.index_select(0, tok)
    dh, act_s, _ = tmoe.down_dgrad(dy, wd, h, scale, r, opts, dy_MH)
    x_MH = x.index_select(0, tok)
    stages = {
        "route": (lambda: tmoe.route_weights(idx, w, E, opts), 0),
        "  route: torch ops": (lambda: tmoe.route_weights(idx, w, E, torch_route), 0),
        "fwd_gate_up_swiglu": (lambda: tmoe.gate_up_fwd(x, wgu, r, opts), 2 * M * H * F2),
        "fwd_down+combine": (lambda: tmoe.down_fwd(act, wd, r, scale, w, T, K, opts), 2 * M * F * H),
        "bwd_gather_dy": (lambda: tmoe.gather_rows(dy, tok, opts), 0),
        "  gather: index_select": (lambda: tmoe.gather_rows(dy, tok, index_select), 0),
        "bwd_down_dgrad": (lambda: tmoe.down_dgrad(dy, wd, h, scale, r, opts, dy_MH), 2 * M * H * F),
        "  dgrad: gemm only": (lambda: torch._grouped_mm(dy_MH, wd.transpose(1, 2), offs=r.offsets_E1[1:]),
                               2 * M * H * F),
        "bwd_gate_up_dgrad+combine": (lambda: tmoe.gate_up_dgrad(dh, wgu, r, T, K, opts), 2 * M * F2 * H),
        "bwd_gather_x": (lambda: tmoe.gather_rows(x, tok, opts), 0),
        "bwd_wgrad_gate_up": (lambda: tmoe.wgrad(x_MH, dh, r, wgu.dtype, opts), 2 * M * H * F2),
        "bwd_wgrad_down": (lambda: tmoe.wgrad(act_s, dy_MH, r, wd.dtype, opts), 2 * M * F * H),
        # Our Triton kernels for the GEMMs that go to torch._grouped_mm (for comparison; gathers included).
        "  triton fwd_down+combine": (lambda: tmoe.down_fwd(act, wd, r, scale, w, T, K, triton_gemms),
                                      2 * M * F * H),
        "  triton gate_up_dgrad+comb": (lambda: tmoe.gate_up_dgrad(dh, wgu, r, T, K, triton_gemms), 2 * M * F2 * H),
        "  triton wgrad_gate_up": (lambda: tmoe.wgrad(x, dh, r, wgu.dtype, triton_gemms, a_rows=tok),
                                   2 * M * H * F2),
        "  triton wgrad_down": (lambda: tmoe.wgrad(act_s, dy, r, wd.dtype, triton_gemms, b_rows=tok), 2 * M * F * H),
    }
    out = {}
    for name, (fn, flops) in stages.items():
        ms = _bench(fn)
        out[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1) if flops else None}
    # The same GEMM through torch._grouped_mm (no gather, no epilogue), for comparison.
    offs = r.offsets_E1[1:].contiguous()
    ms = _bench(lambda: torch._grouped_mm(x_MH, wgu, offs=offs))
    out["grouped_mm_gate_up_only"] = {"ms": round(ms, 4), "tflops": round(2 * M * H * F2 / ms / 1e9, 1)}
    return out


_KERNELS = ("_gate_up_swiglu_fwd_kernel", "_grouped_gemm_kernel", "_grouped_wgrad_kernel")


def _record_autotuning(log: list) -> None:
    """Append (kernel, config, ms) for every config the autotuners benchmark (tuning evidence)."""
    from sail_dist.kernels.triton import moe as tmoe

    for name in _KERNELS:
        tuner = getattr(tmoe, name).autotuned
        bench = getattr(tuner, "_bench", None)
        if bench is None:
            continue

        def logged(*args, config, _bench=bench, _name=name, **meta):
            t = _bench(*args, config=config, **meta)
            log.append([_name, str(config), [round(float(v), 4) for v in (t if isinstance(t, (list, tuple)) else [t])]])
            return t

        tuner._bench = logged


def _best_configs() -> dict:
    from sail_dist.kernels.triton import moe as tmoe

    out = {}
    for name in _KERNELS:
        cache = getattr(getattr(tmoe, name).autotuned, "cache", {})
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


def _measure(fn, inputs, fwd_flops, ref_outs, poison) -> dict:
    """Check (when ref_outs) and time one implementation; an exception is reported, not raised, so the
    other implementations still get measured."""
    r = {}
    try:
        if ref_outs is not None:
            r["rel_err"] = _check(fn, inputs, ref_outs, poison)
        fwd, step, leaves = _step_fns(fn, inputs)
        ms = _bench(fwd)
        r["fwd_ms"], r["fwd_tflops"] = round(ms, 4), round(fwd_flops / ms / 1e9, 1)
        ms = _bench(step, grad_to_none=leaves)
        r["fwdbwd_ms"], r["fwdbwd_tflops"] = round(ms, 4), round(3 * fwd_flops / ms / 1e9, 1)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        r["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return r


def _step_fns(fn, inputs):
    """-> (forward under no_grad, forward+backward, the leaves whose grads a step fills)."""
    x, idx, w, wgu, wd, dy = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, wgu, wd)]

    def fwd():
        with torch.no_grad():
            fn(x, idx, w, wgu, wd)

    def step():
        fn(leaves[0], idx, leaves[1], leaves[2], leaves[3]).backward(dy)

    return fwd, step, leaves


def bar_offsets(idx: torch.Tensor, num_experts: int, pad: int = 1) -> torch.Tensor:
    """The bar's group ends: this routing's per-expert row counts, each rounded up to a multiple of `pad`. pad 1
    is equal work with ours (exactly T*K rows); pad 16 is how the bar was timed before 2026-12-01 (~1.4 % more
    rows at 8k tokens, which flattered ours by as much)."""
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts)
    return torch.cumsum((counts + pad - 1) // pad * pad, 0).to(torch.int32)


def _bare_fns(inputs, pad: int = 1):
    """The bar of issue 6: torch._grouped_mm's two GEMMs (+ SwiGLU) alone, forward and forward+backward into
    (rows, both weights), on rows already sorted by expert (`bar_offsets`): no routing, gather or combine,
    which every real implementation must add. -> like _step_fns."""
    x, idx, w, wgu, wd, dy = inputs
    offs = bar_offsets(idx, wgu.shape[0], pad)
    M = int(offs[-1])
    g = torch.Generator(device=DEVICE).manual_seed(1)
    xs = torch.randn(M, x.shape[1], device=DEVICE, generator=g).to(x.dtype)
    dys = torch.randn(M, x.shape[1], device=DEVICE, generator=g).to(x.dtype)

    def layer(a, w1, w2):
        h = torch._grouped_mm(a, w1, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2, offs=offs)

    leaves = [t.detach().clone().requires_grad_() for t in (xs, wgu, wd)]

    def fwd():
        with torch.no_grad():
            layer(xs, wgu, wd)

    def step():
        layer(*leaves).backward(dys)

    return fwd, step, leaves


def _paired(fns: dict, rounds: int) -> dict:
    """Round-robin timing of {name: (fn, leaves)}: each round calls every fn once (grads cleared and L2
    flushed first, outside the timed span), rounds back to back, all queued before one sync. Separate
    do_bench runs of one fn moved by up to +-5 % on an H200 (the clock and power state drift between
    them); timed in the same rounds, the fns meet the same drift. -> {name: per-round ms}."""
    if DEVICE == "cpu":  # (no warm-up: nothing is compiled or autotuned in the interpreter)
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, (fn, leaves) in fns.items():
                for t in leaves:
                    t.grad = None
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        return times
    for fn, _ in fns.values():  # compile / autotune / warm up
        fn(), fn()
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=DEVICE)
    events = {name: [] for name in fns}
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, (fn, leaves) in fns.items():
            for t in leaves:
                t.grad = None
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) for s, e in evs] for name, evs in events.items()}


def _time_against_bar(ours_fn, inputs, rounds: int) -> dict:
    """Ours and grouped_mm_bare in paired rounds -> {impl: {fwd_ms, fwdbwd_ms (medians), *_iqr}}."""
    sides = {"grouped_mm_bare": _bare_fns(inputs), "grouped_mm_bare_pad16": _bare_fns(inputs, pad=16)}
    if ours_fn is not None:
        sides = {"triton": _step_fns(ours_fn, inputs), **sides}
    out = {name: {"timing": f"paired, {rounds} rounds"} for name in sides}
    for key, pick in (("fwd", lambda f: (f[0], [])), ("fwdbwd", lambda f: (f[1], f[2]))):
        times = _paired({name: pick(f) for name, f in sides.items()}, rounds)
        for name, t in times.items():
            q = statistics.quantiles(t, n=4) if len(t) > 1 else t * 3
            out[name][f"{key}_ms"] = round(q[1], 4)
            out[name][f"{key}_iqr"] = [round(q[0], 4), round(q[2], 4)]
    return out


def _kernel_options(spec: str) -> KernelConfig:
    """"moe_grouped_mm=false,moe_fused_route=false" -> KernelConfig (unnamed switches keep their defaults)."""
    names = [f.name for f in dataclasses.fields(KernelConfig)]
    values = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name not in names or value not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=true|false, NAME one of {', '.join(names)}")
        values[name] = value == "true"
    return KernelConfig(**values)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="a3b_8k,a3b_16k,few_8k")
    p.add_argument("--impls", default="loop,grouped_mm,grouped_mm_cm,triton")
    p.add_argument("--kernels", default="", type=_kernel_options,
                   help="ours' switches as NAME=true|false[,...] (backend.kernels, docs/gpu.md)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--rounds", type=int, default=100,
                   help="paired rounds timing ours against grouped_mm_bare (each round runs both once); their "
                        "medians are the headline times (separate do_bench runs move by up to +-5 %% on an H200)")
    p.add_argument("--json", default=None, help="also write the result JSON here")
    p.add_argument("--autotune-log", default=None, help="write every autotuned config's time here (JSON)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the whole script at a tiny shape on CPU with TRITON_INTERPRET=1 (no timings)")
    args = p.parse_args(argv)
    global DEVICE
    if args.cpu_smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are defined (imported)
        DEVICE, args.shapes, args.rounds = "cpu", "tiny", min(args.rounds, 3)
    elif not torch.cuda.is_available():
        raise SystemExit("python -m sail_dist.bench.moe needs a CUDA GPU")

    from sail_dist.kernels import gpu, reference

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    impls = {"loop": gpu.moe_experts_loop, "grouped_mm": gpu.moe_experts_grouped_mm,
             "grouped_mm_cm": gpu.moe_experts_grouped_mm,
             "triton": functools.partial(gpu.moe_experts_triton, opts=args.kernels)}
    impls = {k: impls[k] for k in args.impls.split(",")}
    tune_log: list = []
    if "triton" in impls:
        _record_autotuning(tune_log)
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run, TRITON_INTERPRET=1)"
    result = {"bench": "moe_experts", "device": dev, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
              "kernels": dataclasses.asdict(args.kernels), "shapes": {}}
    t0 = time.time()
    ceiling = matmul_ceiling()
    result["matmul_bf16_8192_tflops"] = round(ceiling, 1)
    print(f"[moe bench] {dev}; bf16 8192^3 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)

    for shape in args.shapes.split(","):
        T, H, F, E, K = SHAPES[shape]
        inputs = _inputs(T, H, F, E, K, torch.bfloat16)
        x, idx, w, wgu, wd, dy = inputs
        fwd_flops = 2 * T * K * H * 3 * F
        res = {"T": T, "H": H, "F": F, "E": E, "K": K, "fwd_gflop": round(fwd_flops / 1e9, 1), "impls": {}}
        if not args.no_check:
            ref_outs = _fwd_bwd(reference.moe_experts, *(t.float() if t.is_floating_point() else t for t in inputs))
        for name, fn in impls.items():
            if name.endswith("_cm"):
                # Same op with the expert weights stored column-major (what CUTLASS grouped GEMMs prefer;
                # torchtitan keeps [E, out, in] and passes transposed views): the stronger baseline.
                args_i = (x, idx, w, _colmajor(wgu), _colmajor(wd), dy)
            else:
                args_i = inputs
            r = _measure(fn, args_i, fwd_flops, None if args.no_check or name == "loop" else ref_outs,
                         poison=(name == "triton"))
            res["impls"][name] = r
            print(f"[moe bench] {shape} {name}: {r}  ({time.time() - t0:.0f}s)", flush=True)
        if "triton" in impls and not args.no_breakdown:
            res["triton_breakdown"] = _breakdown(*inputs, args.kernels)
        # Headline times of ours and the bar: paired rounds (also under --cpu-smoke, to exercise the code;
        # its timings mean nothing there). Ours' do_bench times stay beside them.
        ours = res["impls"].get("triton", {})
        paired = _time_against_bar(impls["triton"] if "fwd_ms" in ours else None, inputs, args.rounds)
        for name, p in paired.items():
            r = res["impls"].setdefault(name, {})
            if "fwd_ms" in r:
                r["do_bench_fwd_ms"], r["do_bench_fwdbwd_ms"] = r["fwd_ms"], r["fwdbwd_ms"]
            r.update(p)
            r["fwd_tflops"] = round(fwd_flops / r["fwd_ms"] / 1e9, 1)
            r["fwdbwd_tflops"] = round(3 * fwd_flops / r["fwdbwd_ms"] / 1e9, 1)
        print(f"[moe bench] {shape} grouped_mm_bare: {res['impls']['grouped_mm_bare']}", flush=True)
        idx = inputs[1]
        res["rows"] = {"ours": idx.numel(), "grouped_mm_bare": int(bar_offsets(idx, E)[-1]),
                       "grouped_mm_bare_pad16": int(bar_offsets(idx, E, 16)[-1])}
        res["shape_ceiling_tflops"] = round(shape_ceiling(T, H, F, K), 1)
        for base in ("grouped_mm_bare", "grouped_mm_bare_pad16", "grouped_mm", "grouped_mm_cm", "loop"):
            if ours and "fwd_ms" in ours and "fwd_ms" in res["impls"].get(base, {}):
                # Like against like: the bar's paired times against ours' paired times, the others' do_bench
                # times against ours' do_bench times.
                b, pre = res["impls"][base], "" if base.startswith("grouped_mm_bare") else "do_bench_"
                res[f"speedup_vs_{base}"] = {k: round(b[f"{k}_ms"] / ours[f"{pre}{k}_ms"], 3 if not pre else 2)
                                             for k in ("fwd", "fwdbwd")}
        if ours and "fwdbwd_tflops" in ours:
            res["triton_fwdbwd_frac_of_ceiling"] = round(ours["fwdbwd_tflops"] / ceiling, 3) if ceiling else None
            if res.get("shape_ceiling_tflops"):
                res["triton_fwdbwd_frac_of_shape_ceiling"] = round(ours["fwdbwd_tflops"] / res["shape_ceiling_tflops"], 3)
        result["shapes"][shape] = res
        del inputs, x, w, wgu, wd, dy
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if "triton" in impls:
        result["triton_configs"] = _best_configs()

    # Table, then ONE JSON line.
    print()
    print(f"MoE experts on {dev} (bf16; fwd+bwd TFLOP/s count 3x fwd FLOPs); matmul ceiling {ceiling:.0f} TFLOP/s")
    print(f"{'shape':8} {'impl':14} {'fwd ms':>8} {'TFLOP/s':>8} {'f+b ms':>8} {'TFLOP/s':>8} {'max rel err':>11}")
    for shape, res in result["shapes"].items():
        for name, r in res["impls"].items():
            if "error" in r:
                print(f"{shape:8} {name:14} ERROR {r['error'][:200]}")
                continue
            err = r.get("rel_err")
            e = "-" if err is None else f"{max(v for k, v in err.items() if k != 'ok'):.1e}" + ("" if err["ok"] else " FAIL")
            print(f"{shape:8} {name:14} {r['fwd_ms']:8.3f} {r['fwd_tflops']:8.0f} {r['fwdbwd_ms']:8.3f} "
                  f"{r['fwdbwd_tflops']:8.0f} {e:>11}")
        for k in ("rows", "speedup_vs_grouped_mm_bare", "speedup_vs_grouped_mm_bare_pad16", "speedup_vs_grouped_mm",
                  "speedup_vs_loop", "shape_ceiling_tflops",
                  "triton_fwdbwd_frac_of_ceiling", "triton_fwdbwd_frac_of_shape_ceiling"):
            if k in res:
                print(f"{'':8} {k}: {res[k]}")
        for k, v in res.get("triton_breakdown", {}).items():
            rate = "" if v["tflops"] is None else f"{v['tflops']:6.0f} TFLOP/s"
            print(f"{'':8}   {k:26} {v['ms']:8.3f} ms {rate}")
    if args.autotune_log:
        with open(args.autotune_log, "w") as f:
            json.dump(tune_log, f, indent=0)
    line = json.dumps(result, separators=(",", ":"))
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
