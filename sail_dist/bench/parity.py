"""Backend parity: the same model on the same data, step by step, on the GPU and the NPU backend.

Users of NPU/GPU dual stacks report first-layer gradients off by 50-100 % between the two (Ascend/pytorch
#107); this is the check that ours agree. Both runs use the demo dataset through the real data loader
(two DP ranks on each side, so every DP rank gets the same micro-batches), the same seed and initial
weights, fp32 on CPU:

    GPU backend: DeepSpeed ZeRO-2, DP 2                        (2 processes)
    NPU backend: Megatron PP 2 x EP 2 (DP 2), distributed opt. (4 processes)

Compared: the global loss per step, and at step 1 every parameter's full reduced gradient (before clipping) as
a tensor: max |npu - gpu| / max |gpu| per tensor, reported per tensor and per layer (the first ViT and LLM
layers included). A norm alone would not see swapped experts or a flipped sign; the per-parameter norms are
printed beside it as the human-readable summary.

    launch/parity.sh [STEPS] [CONFIG] [--stage NAME] [key=value ...]   # both runs + the comparison

An RL stage (`--stage rl_verifiable`, `rl_mixed`: a DAPO / GSPO objective) is compared over one episode: the demo
counting prompts, the built-in sampler, a dense scripted reward (TokenParityReward: the update is compared, not the
task), STEPS updates; per-update losses and the first update's gradients as above.
    torchrun ... -m sail_dist.bench.parity run OUT.json CONFIG [key=value ...]
    python -m sail_dist.bench.parity compare GPU.json NPU.json [--loss-rtol 1e-5] [--grad-rtol 1e-5]

`run` writes OUT.json (losses, layout) and OUT.grads.pt (the step-1 gradients, {name: tensor}; rank 0).
`compare` prints a table of per-step losses, one of per-parameter gradient norms and tensor differences, one
per layer, then one JSON line; it exits 1 when a tolerance is exceeded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


def grads_file(out: str) -> str:
    """The step-1 gradients of the run whose JSON is `out`."""
    return (out[:-len(".json")] if out.endswith(".json") else out) + ".grads.pt"


class TokenParityReward:
    """The RL parity run's reward: the fraction of even token ids in a completion (texts are the ids, see
    `run_rl_updates`). Dense and deterministic, so that a tiny random-init policy gets groups with unequal rewards
    (non-zero advantages) and the updates have something to compare; what is compared is the update, not the task."""

    def score(self, texts: list[str], items: list) -> list:
        from sail_dist.rl.rewards import RewardResult

        out = []
        for t in texts:
            ids = [int(x) for x in t.split()]
            r = sum(x % 2 == 0 for x in ids) / len(ids) if ids else 0.0
            out.append(RewardResult(r, {"answer": r}, r > 0.5, True))
        return out


def run_rl_updates(cfg, backend, env) -> tuple[list[dict], dict, str]:
    """One RL episode of the configured stage (rl.* and the DAPO / GSPO objective as configured; prompts from
    rl.prompts, the built-in sampler), with TokenParityReward: the per-update stats and the first update's
    gradients (rank 0), and the engine's OpSet name."""
    from sail_dist.rl.loop import default_parts, run_rl

    parts = default_parts(cfg)
    parts.reward, parts.decode = TokenParityReward(), lambda ids: " ".join(str(i) for i in ids)
    steps, grads, opset = [], {}, ""

    def on_update(engine, step: int, s) -> None:
        nonlocal grads, opset
        opset = engine.ops.name
        if s is None:
            engine.track_layer_grads = step == 0
            return
        if step == 0:
            grads = engine.layer_grads()
        steps.append({"loss": s.loss, "grad_norm": s.grad_norm, "aux_loss": s.aux_loss, "skipped": s.skipped})

    run_rl(cfg, backend, env, parts, on_update=on_update)
    if not steps:
        raise RuntimeError("RL parity: the episode made no update (every group's rewards were equal); raise "
                           "rl.group_size or rl.sampling.max_new_tokens")
    return steps, grads, opset


def run(out: str, config: str, overrides: list[str]) -> None:
    """Train `train.steps` steps with the configured backend (an RL stage: one episode of `rl.ppo_updates`
    updates, `run_rl_updates`); rank 0 writes the losses (OUT.json) and the step-1 gradients (OUT.grads.pt)."""
    from sail_dist.backends.base import get_backend
    from sail_dist.config import load_config
    from sail_dist.data.loader import build_loader
    from sail_dist.train.lr import lr_at

    from sail_dist.train.batch_plan import resolve_batch

    from sail_dist.stages.rl import POLICY_OBJECTIVES

    cfg = load_config(config, overrides)
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    try:
        if cfg.train.objective in POLICY_OBJECTIVES:
            steps, grads, opset = run_rl_updates(cfg, backend, env)
        else:
            cfg, _ = resolve_batch(cfg, env.dp_size)  # a stage's batch in samples, as the trainer sizes it
            loader = build_loader(cfg, dp_rank=env.dp_rank, dp_size=env.dp_size)
            engine = backend.build(cfg, env)
            steps, grads = [], {}
            adalrs = None  # a stage with the online lr search (pretrain_basic): trials and rollbacks as the trainer
            if cfg.train.adalrs.enabled:
                from sail_dist.train.adalrs import AdaLRS

                adalrs = AdaLRS(cfg.train.adalrs, cfg.train, lambda k: lr_at(cfg.train, k), env.rank)
                adalrs.start_fresh()
            for step in range(cfg.train.steps):
                data = next(loader)
                engine.track_layer_grads = step == 0  # collective recording inside the step
                s = engine.train_step(data.micro_batches, adalrs.lr(step) if adalrs else lr_at(cfg.train, step))
                if step == 0:
                    grads = engine.layer_grads()  # rank 0; {} elsewhere
                steps.append({"loss": s.loss, "grad_norm": s.grad_norm, "aux_loss": s.aux_loss,
                              "skipped": s.skipped})
                if adalrs:
                    event = adalrs.after_step(step, s.loss, engine)
                    if event:
                        steps[-1]["adalrs"] = event
            loader.close()
            opset = engine.ops.name
        if env.rank == 0:
            p = cfg.parallel
            layout = ("ZeRO-%d DP %d" % (cfg.backend.zero_stage, env.dp_size) if cfg.backend.name == "gpu" else
                      f"PP {p.pp} x EP {p.ep} x DP {env.dp_size}" + (f" x VPP {p.vpp}" if p.vpp > 1 else ""))
            torch.save(grads, grads_file(out))
            with open(out, "w") as f:
                json.dump({"backend": cfg.backend.name, "layout": layout, "world": env.world_size,
                           "device": env.device_name, "opset": opset, "steps": steps,
                           "layer_grads": os.path.basename(grads_file(out))}, f)
    finally:
        backend.teardown()


def load_run(path: str) -> dict:
    """A run's JSON with its step-1 gradients loaded ({name: tensor} under "layer_grads")."""
    with open(path) as f:
        r = json.load(f)
    r["layer_grads"] = torch.load(os.path.join(os.path.dirname(os.path.abspath(path)), r["layer_grads"]))
    return r


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def tensor_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference: here the GPU backend), in float64; inf for different shapes."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _layer_order(name: str) -> tuple:
    """Model order: ViT, adapter, LLM (embeddings, layers by index, norm, head); parameters by name inside."""
    parts = name.split(".")
    top = {"vision": 0, "adapter": 1, "llm": 2}.get(parts[0], 3)
    idx = next((int(p) for p in parts if p.isdigit()), -1)
    sub = 0 if "embed" in name or "patch_embed" in name or "pos_embed" in name else (2 if idx < 0 else 1)
    return top, sub, idx, name


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: up to its block index (`llm.layers.3`, `vision.blocks.0`), else its
    module (`llm.embed_tokens`, `adapter.mlp`)."""
    parts = name.split(".")
    i = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[:i + 1] if i is not None else parts[:-1]) or name


def compare(gpu: dict, npu: dict, loss_rtol: float = 1e-5, grad_rtol: float = 1e-5) -> dict:
    """Print the side-by-side tables; return the summary (also printed as the last line, JSON). `gpu` / `npu` are
    `load_run` results: the step-1 gradients as tensors under "layer_grads"."""
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
    gg, ng = gpu["layer_grads"], npu["layer_grads"]
    missing = sorted(set(gg) ^ set(ng))
    names = sorted(set(gg) & set(ng), key=_layer_order)
    gn = {k: float(gg[k].double().norm()) for k in names}  # the summary: norms from the same tensors
    nn_ = {k: float(ng[k].double().norm()) for k in names}
    norm_rel = {k: _rel(gn[k], nn_[k]) for k in names}
    grad_rel = {k: tensor_rel(ng[k], gg[k]) for k in names}
    shape_mismatch = [k for k in names if gg[k].shape != ng[k].shape]
    width = max((len(k) for k in names), default=10)
    lines += ["", f"per-parameter gradients at step 1 (full reduced gradient, before clipping): {len(names)} tensors; "
                  f"norms, their rel. diff, and the tensors' max |npu - gpu| / max |gpu|",
              f"{'parameter':<{width}}  {'norm gpu':>12}  {'norm npu':>12}  {'norm rel':>9}  {'tensor rel':>10}"]
    for k in names:
        flag = "  <-- exceeds" if grad_rel[k] > grad_rtol else ""
        lines.append(f"{k:<{width}}  {gn[k]:>12.6e}  {nn_[k]:>12.6e}  {norm_rel[k]:>9.2e}  {grad_rel[k]:>10.2e}{flag}")
    if missing:
        lines.append(f"parameters on one side only: {missing}")
    if shape_mismatch:
        lines.append(f"different shapes: {[(k, tuple(gg[k].shape), tuple(ng[k].shape)) for k in shape_mismatch]}")
    layers: dict[str, list[str]] = {}
    for k in names:
        layers.setdefault(layer_of(k), []).append(k)
    layer_rel = {lay: max(grad_rel[k] for k in ks) for lay, ks in layers.items()}
    lw = max((len(k) for k in layers), default=10)
    lines += ["", "per layer: the largest tensor difference among its parameters",
              f"{'layer':<{lw}}  {'tensors':>7}  {'max tensor rel':>14}  worst"]
    for lay, ks in layers.items():
        w = max(ks, key=grad_rel.get)
        flag = "  <-- exceeds" if layer_rel[lay] > grad_rtol else ""
        lines.append(f"{lay:<{lw}}  {len(ks):>7}  {layer_rel[lay]:>14.2e}  {w[len(lay) + 1:] or w}{flag}")
    first_vit = "vision.blocks.0" if "vision.blocks.0" in layers else None
    first_llm = "llm.layers.0" if "llm.layers.0" in layers else None
    worst = max(grad_rel, key=grad_rel.get) if grad_rel else None
    worst_norm = max(norm_rel, key=norm_rel.get) if norm_rel else None
    summary = {
        "steps": len(loss_rel), "max_loss_rel": max(loss_rel, default=math.nan),
        "max_grad_rel": grad_rel[worst] if worst else math.nan, "worst_param": worst,
        "mean_grad_rel": sum(grad_rel.values()) / len(grad_rel) if grad_rel else math.nan,
        "n_params": len(names),
        "first_vit_layer_grad_rel": layer_rel[first_vit] if first_vit else math.nan,
        "first_llm_layer_grad_rel": layer_rel[first_llm] if first_llm else math.nan,
        "max_grad_norm_rel": norm_rel[worst_norm] if worst_norm else math.nan, "worst_norm_param": worst_norm,
        "layer_grad_rel": layer_rel,
        "loss_rtol": loss_rtol, "grad_rtol": grad_rtol, "missing": missing, "shape_mismatch": shape_mismatch,
        "gpu": gpu["layout"], "npu": npu["layout"],
    }
    # A module that trains must have its first layer compared; a frozen one (a stage's train_modules) has none.
    covered = all(first or not any(k.startswith(prefix) for k in names)
                  for first, prefix in ((first_vit, "vision."), (first_llm, "llm.")))
    # AdaLRS (pretrain_basic): the trials' decisions, step by step, must be the same on both sides
    trials = [[(i + 1, st["adalrs"].get("decision")) for i, st in enumerate(run["steps"]) if st.get("adalrs")]
              for run in (gpu, npu)]
    summary["adalrs_decisions"] = {"gpu": trials[0], "npu": trials[1]}
    if trials[0] or trials[1]:
        lines += ["", f"AdaLRS decisions (step, decision): gpu {trials[0]}, npu {trials[1]}"
                      f"{'' if trials[0] == trials[1] else '  <-- differ'}"]
    summary["ok"] = bool(loss_rel and names and not missing and not shape_mismatch and covered
                         and trials[0] == trials[1]
                         and summary["max_loss_rel"] <= loss_rtol and summary["max_grad_rel"] <= grad_rtol)
    lines += ["", f"max loss rel diff {summary['max_loss_rel']:.2e} (tol {loss_rtol:g}) over {len(loss_rel)} steps; "
                  f"max gradient tensor rel diff {summary['max_grad_rel']:.2e} (tol {grad_rtol:g}) at {worst} "
                  f"(mean over {len(names)} tensors {summary['mean_grad_rel']:.2e}); first ViT layer "
                  f"{summary['first_vit_layer_grad_rel']:.2e}, first LLM layer "
                  f"{summary['first_llm_layer_grad_rel']:.2e}; max norm rel diff {summary['max_grad_norm_rel']:.2e} "
                  f"-> {'PASS' if summary['ok'] else 'FAIL'}"]
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
    c.add_argument("--grad-rtol", type=float, default=1e-5)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.out, args.config, args.overrides)
        return 0
    return 0 if compare(load_run(args.gpu), load_run(args.npu), args.loss_rtol, args.grad_rtol)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
