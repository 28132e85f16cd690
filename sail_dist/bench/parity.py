"""Backend parity: the same model on the same data, step by step, on the GPU and the NPU backend.

Users of NPU/GPU dual stacks report first-layer gradients off by 50-100 % between the two (Ascend/pytorch
#107); this is the check that ours agree. Both runs use the demo dataset through the real data loader
(two DP ranks on each side, so every DP rank gets the same micro-batches), the same seed and initial
weights, fp32 on CPU:

    GPU backend: DeepSpeed ZeRO-2, DP 2                        (2 processes)
    NPU backend: Megatron PP 2 x EP 2 (DP 2), distributed opt. (4 processes)

Compared: the global loss per step, and at step 1 the norm of every parameter's full reduced gradient
(before clipping), the first ViT and LLM layers included.

    launch/parity.sh [STEPS] [CONFIG] [key=value ...]          # both runs + the comparison
    torchrun ... -m sail_dist.bench.parity run OUT.json CONFIG [key=value ...]
    python -m sail_dist.bench.parity compare GPU.json NPU.json [--loss-rtol 1e-5] [--grad-rtol 1e-4]

`compare` prints a table of per-step losses and per-layer gradient norms side by side with relative
differences, then one JSON line; it exits 1 when a tolerance is exceeded.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def run(out: str, config: str, overrides: list[str]) -> None:
    """Train `train.steps` steps with the configured backend; rank 0 writes losses and step-1 gradient norms."""
    from sail_dist.backends.base import get_backend
    from sail_dist.config import load_config
    from sail_dist.data.loader import build_loader
    from sail_dist.train.lr import lr_at

    cfg = load_config(config, overrides)
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    try:
        loader = build_loader(cfg, dp_rank=env.dp_rank, dp_size=env.dp_size)
        engine = backend.build(cfg, env)
        steps, norms = [], {}
        for step in range(cfg.train.steps):
            data = next(loader)
            engine.track_layer_grad_norms = step == 0
            s = engine.train_step(data.micro_batches, lr_at(cfg.train, step))
            if step == 0:
                norms = engine.layer_grad_norms()
            steps.append({"loss": s.loss, "grad_norm": s.grad_norm, "aux_loss": s.aux_loss, "skipped": s.skipped})
        loader.close()
        if env.rank == 0:
            p = cfg.parallel
            layout = ("ZeRO-%d DP %d" % (cfg.backend.zero_stage, env.dp_size) if cfg.backend.name == "gpu" else
                      f"PP {p.pp} x EP {p.ep} x DP {env.dp_size}" + (f" x VPP {p.vpp}" if p.vpp > 1 else ""))
            with open(out, "w") as f:
                json.dump({"backend": cfg.backend.name, "layout": layout, "world": env.world_size,
                           "device": env.device_name, "opset": engine.ops.name, "steps": steps,
                           "layer_grad_norms": norms}, f)
    finally:
        backend.teardown()


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _layer_order(name: str) -> tuple:
    """Model order: ViT, adapter, LLM (embeddings, layers by index, norm, head); parameters by name inside."""
    parts = name.split(".")
    top = {"vision": 0, "adapter": 1, "llm": 2}.get(parts[0], 3)
    idx = next((int(p) for p in parts if p.isdigit()), -1)
    sub = 0 if "embed" in name or "patch_embed" in name or "pos_embed" in name else (2 if idx < 0 else 1)
    return top, sub, idx, name


def compare(gpu: dict, npu: dict, loss_rtol: float = 1e-5, grad_rtol: float = 1e-4) -> dict:
    """Print the side-by-side tables; return the summary (also printed as the last line, JSON)."""
    lines = [f"parity: GPU backend ({gpu['layout']}, {gpu['opset']}) vs NPU backend ({npu['layout']}, {npu['opset']}) "
             f"on {gpu['device']}", "",
             f"{'step':>4}  {'loss gpu':>14}  {'loss npu':>14}  {'rel diff':>9}  {'gnorm gpu':>11}  {'gnorm npu':>11}  "
             f"{'rel diff':>9}"]
    loss_rel = []
    for i, (g, n) in enumerate(zip(gpu["steps"], npu["steps"])):
        r, rg = _rel(g["loss"], n["loss"]), _rel(g["grad_norm"], n["grad_norm"])
        loss_rel.append(r)
        lines.append(f"{i + 1:>4}  {g['loss']:>14.8f}  {n['loss']:>14.8f}  {r:>9.2e}  {g['grad_norm']:>11.6f}  "
                     f"{n['grad_norm']:>11.6f}  {rg:>9.2e}")
    gn, nn_ = gpu["layer_grad_norms"], npu["layer_grad_norms"]
    missing = sorted(set(gn) ^ set(nn_))
    names = sorted(set(gn) & set(nn_), key=_layer_order)
    grad_rel = {k: _rel(gn[k], nn_[k]) for k in names}
    width = max((len(k) for k in names), default=10)
    lines += ["", f"per-parameter gradient norms at step 1 (full reduced gradient, before clipping): "
                  f"{len(names)} tensors",
              f"{'parameter':<{width}}  {'gpu':>12}  {'npu':>12}  {'rel diff':>9}"]
    for k in names:
        flag = "  <-- exceeds" if grad_rel[k] > grad_rtol else ""
        lines.append(f"{k:<{width}}  {gn[k]:>12.6e}  {nn_[k]:>12.6e}  {grad_rel[k]:>9.2e}{flag}")
    if missing:
        lines.append(f"parameters on one side only: {missing}")
    first_vit = next((k for k in names if k.startswith("vision.blocks.0.")), None)
    first_llm = next((k for k in names if k.startswith("llm.layers.0.")), None)
    worst = max(grad_rel, key=grad_rel.get) if grad_rel else None
    summary = {
        "steps": len(loss_rel), "max_loss_rel": max(loss_rel, default=math.nan),
        "max_grad_rel": grad_rel[worst] if worst else math.nan, "worst_param": worst, "n_params": len(names),
        "first_vit_layer_grad_rel": max((v for k, v in grad_rel.items() if k.startswith("vision.blocks.0.")),
                                        default=math.nan),
        "first_llm_layer_grad_rel": max((v for k, v in grad_rel.items() if k.startswith("llm.layers.0.")),
                                        default=math.nan),
        "loss_rtol": loss_rtol, "grad_rtol": grad_rtol, "missing": missing,
        "gpu": gpu["layout"], "npu": npu["layout"],
    }
    summary["ok"] = bool(loss_rel and names and not missing and first_vit and first_llm
                         and summary["max_loss_rel"] <= loss_rtol and summary["max_grad_rel"] <= grad_rtol)
    lines += ["", f"max loss rel diff {summary['max_loss_rel']:.2e} (tol {loss_rtol:g}) over {len(loss_rel)} steps; "
                  f"max grad-norm rel diff {summary['max_grad_rel']:.2e} (tol {grad_rtol:g}) at {worst}; "
                  f"first ViT layer {summary['first_vit_layer_grad_rel']:.2e}, first LLM layer "
                  f"{summary['first_llm_layer_grad_rel']:.2e} -> {'PASS' if summary['ok'] else 'FAIL'}"]
    print("\n".join(lines))
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sail_dist.bench.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one backend's run (under torchrun)")
    r.add_argument("out")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    c = sub.add_parser("compare", help="compare two runs")
    c.add_argument("gpu")
    c.add_argument("npu")
    c.add_argument("--loss-rtol", type=float, default=1e-5)
    c.add_argument("--grad-rtol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.out, args.config, args.overrides)
        return 0
    with open(args.gpu) as f:
        gpu = json.load(f)
    with open(args.npu) as f:
        npu = json.load(f)
    return 0 if compare(gpu, npu, args.loss_rtol, args.grad_rtol)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
