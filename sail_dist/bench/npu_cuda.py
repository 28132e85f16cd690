"""The NPU backend's Megatron path on CUDA vs the GPU backend: loss curves and tokens/s.

A reduced SAIL-VL2-A3B (the real widths: hidden 2048, 32/4 heads, 128 experts top-8, expert FFN 768,
vocab 151936, SAIL-ViT-Huge blocks; only a few layers) trains on synthetic packed batches, bf16, on 2
devices in three layouts with the SAME global batch per step (G micro-batches of T tokens):

    gpu  GPU backend, DeepSpeed ZeRO-2, DP 2                       (G/2 micro-batches per rank)
    pp2  NPU backend, Megatron 1F1B pipeline, PP 2 (DP 1)           (G micro-batches)
    ep2  NPU backend, expert parallel EP 2 (DP 2, experts sharded)  (G/2 micro-batches per rank)

Each run writes per-step losses, step times and peak memory; `report` prints the curves' max relative
gap to the GPU run (the Ascend teams' acceptance bar: 2 %) and tokens/s, then one JSON line.

    bash launch/npu_cuda_bench.sh [STEPS] [SIZE]               # all three + report (SIZE: a3b | tiny)
    torchrun --nproc_per_node 2 -m sail_dist.bench.npu_cuda run OUT.json --layout pp2 [--size a3b] [--steps 50]
    python -m sail_dist.bench.npu_cuda report GPU.json PP2.json EP2.json

On a machine without CUDA the same runs go over gloo in fp32 (CI runs `--size tiny` that way).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    # A3B widths, 4 LLM layers (all MoE) and 2 ViT blocks: ~3.2B parameters, 2.4B of them experts.
    "a3b": {"config": "configs/model/sailvl2_a3b.yaml", "tokens": 8192, "seqlens": [2048, 2048, 1024, 3072],
            "tiles": 2, "overrides": ["model.llm.num_layers=4", "model.vit.num_layers=2"]},
    "tiny": {"config": "configs/model/tiny_moe.yaml", "tokens": 96, "seqlens": [40, 24, 32], "tiles": 1,
             "overrides": []},
}
LAYOUTS = {
    "gpu": ["backend.name=gpu", "parallel.pp=1", "parallel.ep=1"],
    "pp2": ["backend.name=npu", "parallel.pp=2", "parallel.ep=1", "parallel.split.llm=[2,2]"],  # 2 layers a stage
    "ep2": ["backend.name=npu", "parallel.pp=1", "parallel.ep=2"],
    # the 4- and 8-device layouts of the scale runs (issue 7)
    "pp2ep2": ["backend.name=npu", "parallel.pp=2", "parallel.ep=2"],
    "pp2ep4": ["backend.name=npu", "parallel.pp=2", "parallel.ep=4"],
    "pp4ep2": ["backend.name=npu", "parallel.pp=4", "parallel.ep=2"],
    "ep4": ["backend.name=npu", "parallel.pp=1", "parallel.ep=4"],  # pp2ep4's no-pipeline reference
}


def _degree(layout: str, key: str) -> int:
    return int(next((o for o in LAYOUTS[layout] if o.startswith(f"parallel.{key}=")), "=1").split("=")[1])


def _pp(layout: str) -> int:
    return _degree(layout, "pp")


def global_batches(cfg, size: dict, step: int, n_global: int) -> list:
    """The step's G micro-batches (the same for every layout). Four distinct steps cycle, so the loss falls."""
    from sail_dist.data.synthetic import synthetic_batch

    g = cfg.model.vit.grid
    out = []
    for m in range(n_global):
        k = (step % 4) * n_global + m
        images = [[(g, g)] * size["tiles"]] + [[] for _ in size["seqlens"][1:]]
        out.append(synthetic_batch(cfg.model, size["seqlens"], images, seed=7000 + k))
    return out


def run(out: str, layout: str, size_name: str, steps: int, n_global: int, npu_opset: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from sail_dist.backends.base import get_backend
    from sail_dist.config import load_config
    from sail_dist.train.lr import lr_at

    size = SIZES[size_name]
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // _pp(layout)
    if n_global % dp:
        raise SystemExit(f"--global-micro-batches {n_global} is not divisible by DP {dp}")
    cfg = load_config(os.path.join(ROOT, size["config"]), [
        "data.demo=true", *size["overrides"], *LAYOUTS[layout], f"train.steps={steps}",
        f"train.micro_batches={n_global // dp}", f"train.precision={'bf16' if cuda else 'fp32'}",
        "train.lr=3e-4", "train.min_lr=3e-5", "train.warmup_steps=5", "train.weight_decay=0.01", "train.grad_clip=1.0",
        f"data.pack_tokens={sum(size['seqlens'])}", *(["backend.opset=" + npu_opset] if layout != "gpu" else []),
        *overrides])
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    try:
        engine = backend.build(cfg, env)
        rows = []
        for step in range(steps):
            batches = global_batches(cfg, size, step, n_global)
            M = cfg.train.micro_batches
            mine = batches[env.dp_rank * M:(env.dp_rank + 1) * M]
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            s = engine.train_step(mine, lr_at(cfg.train, step))
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            rows.append({"loss": s.loss, "grad_norm": s.grad_norm, "aux_loss": s.aux_loss, "skipped": s.skipped,
                         "time_s": time.perf_counter() - t0})
            if env.rank == 0 and (step % 10 == 0 or step == steps - 1):
                print(f"[{layout}] step {step + 1}/{steps} loss {s.loss:.4f} gnorm {s.grad_norm:.3f} "
                      f"{rows[-1]['time_s'] * 1e3:.0f} ms", flush=True)
        mem = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0],
                           device=env.device)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        if env.rank == 0:
            tokens = n_global * sum(size["seqlens"])
            with open(out, "w") as f:
                json.dump({"layout": layout, "size": size_name, "world": env.world_size, "device": env.device_name,
                           "pp": _pp(layout), "ep": _degree(layout, "ep"), "micro_batches": cfg.train.micro_batches,
                           "dtype": cfg.train.precision, "opset": engine.ops.name, "tokens_per_step": tokens,
                           "peak_mem_gib": float(mem), "steps": rows}, f)
    finally:
        backend.teardown()


def pipeline_bubbles(runs: list[dict], figures: dict) -> dict:
    """Each pipelined run's idle share against a run of the same world and EP degree without a pipeline (the GPU
    backend's run when there is none): that run does the same work per device with no stage waiting on another,
    so the difference is the bubble plus the stages' imbalance and their point-to-point sends."""
    out = {}
    for r in runs:
        p = r.get("pp", _pp(r["layout"]))
        if p == 1:
            continue
        ep = r.get("ep", _degree(r["layout"], "ep"))
        same_world = [q for q in runs if q["world"] == r["world"] and q.get("pp", _pp(q["layout"])) == 1]
        ref = next((q for q in same_world if q["layout"] != "gpu" and q.get("ep", _degree(q["layout"], "ep")) == ep),
                   next((q for q in same_world if q["layout"] == "gpu"), None))
        if ref is None:
            continue
        m = r.get("micro_batches") or r["tokens_per_step"] // sum(SIZES[r["size"]]["seqlens"]) // (r["world"] // p)
        out[r["layout"]] = {"p": p, "m": m, "reference": ref["layout"],
                            "idle_share": 1 - figures[ref["layout"]]["ms_per_step"] / figures[r["layout"]]["ms_per_step"],
                            "theory": (p - 1) / (m + p - 1)}
    return out


def report(runs: list[dict], warmup: int = 5, bar: float = 0.02) -> dict:
    ref = next(r for r in runs if r["layout"] == "gpu")
    lines = [f"NPU backend (Megatron path) vs GPU backend on {ref['device']} x {ref['world']}, {ref['size']} model, "
             f"{ref['dtype']}, {len(ref['steps'])} steps, {ref['tokens_per_step']} tokens/step", "",
             f"{'layout':<6} {'opset':<13} {'tokens/s':>10} {'ms/step':>9} {'peak GiB':>9} {'first loss':>11} "
             f"{'last loss':>10} {'max rel gap':>12} {'mean rel gap':>13}"]
    summary = {"device": ref["device"], "size": ref["size"], "dtype": ref["dtype"], "steps": len(ref["steps"]),
               "bar": bar, "layouts": {}}
    for r in runs:
        times = [s["time_s"] for s in r["steps"][warmup:]] or [s["time_s"] for s in r["steps"]]
        ms = statistics.median(times) * 1e3
        tps = r["tokens_per_step"] / (ms / 1e3)
        gaps = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(r["steps"], ref["steps"])]
        max_gap = max(gaps) if gaps else math.nan
        mean_gap = statistics.fmean(gaps) if gaps else math.nan
        lines.append(f"{r['layout']:<6} {r['opset']:<13} {tps:>10.0f} {ms:>9.1f} {r['peak_mem_gib']:>9.1f} "
                     f"{r['steps'][0]['loss']:>11.4f} {r['steps'][-1]['loss']:>10.4f} {max_gap:>12.2e} "
                     f"{mean_gap:>13.2e}")
        summary["layouts"][r["layout"]] = {"tokens_per_s": tps, "ms_per_step": ms, "peak_mem_gib": r["peak_mem_gib"],
                                           "opset": r["opset"], "first_loss": r["steps"][0]["loss"],
                                           "last_loss": r["steps"][-1]["loss"], "max_rel_gap": max_gap,
                                           "mean_rel_gap": mean_gap,
                                           "skipped": sum(s["skipped"] for s in r["steps"])}
    bubble = pipeline_bubbles(runs, summary["layouts"])
    if bubble:
        lines += ["", "pipeline idle share: 1 - (step time of the same work without a pipeline) / (step time with it),",
                  "against the 1F1B bubble (p-1)/(m+p-1) for p stages and m micro-batches per pipeline", "",
                  f"{'layout':<7} {'p':>2} {'m':>3} {'reference':>9} {'measured':>9} {'1F1B theory':>12}"]
        for name, b in bubble.items():
            lines.append(f"{name:<7} {b['p']:>2} {b['m']:>3} {b['reference']:>9} {b['idle_share']:>9.1%} "
                         f"{b['theory']:>12.1%}")
            summary["layouts"][name]["bubble"] = b
    summary["ok"] = all(v["max_rel_gap"] <= bar and not v["skipped"] for v in summary["layouts"].values())
    lines += ["", f"loss curves within {bar:.0%} of the GPU backend at every step: {'yes' if summary['ok'] else 'NO'} "
                  f"(tokens/s: median step time after {warmup} warm-up steps)"]
    print("\n".join(lines))
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sail_dist.bench.npu_cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one layout (under torchrun, 2 processes)")
    r.add_argument("out")
    r.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    r.add_argument("--size", choices=sorted(SIZES), default="a3b")
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--global-micro-batches", type=int, default=4, help="G: micro-batches per step over all DP ranks")
    r.add_argument("--npu-opset", default="npu_emulated",
                   help="OpSet of the NPU-backend runs off Ascend: npu_emulated (torch_npu semantics) or gpu")
    c = sub.add_parser("report", help="compare runs (the gpu layout is the reference)")
    c.add_argument("runs", nargs="+")
    c.add_argument("--warmup", type=int, default=5)
    c.add_argument("--bar", type=float, default=0.02)
    args, extra = p.parse_known_args(argv)
    if args.cmd == "run":  # anything else on the line: config overrides (key.sub=value)
        bad = [a for a in extra if "=" not in a or a.startswith("-")]
        if bad:
            p.error(f"unrecognized arguments: {' '.join(bad)}")
        run(args.out, args.layout, args.size, args.steps, args.global_micro_batches, args.npu_opset, extra)
        return 0
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    return 0 if report(runs, args.warmup, args.bar)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
