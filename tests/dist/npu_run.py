"""NPU-backend scenarios under torchrun, writing JSON results for tests/test_npu_backend.py.

    torchrun --nproc_per_node N tests/dist/npu_run.py MODE OUT.json CONFIG.yaml [overrides...]

MODE:
  train      per-step loss / grad norm / aux; every parameter's full reduced gradient at step 1 (index 0), saved
             by rank 0 as a {name: tensor} dict in OUT.grads.pt beside OUT.json
  resume     train K = steps // 2 steps, save a dist checkpoint, train to the end; then a fresh engine
             loads the checkpoint and trains steps K.. again: both tails are reported
  nonfinite  engine A: steps 0, 1; engine B: step 0, a step with a NaN loss weight (must be skipped), step 1
  load       load the checkpoint written by a `resume` run (CKPT=dir env var), train steps K.. (another layout)
  full_state full_state_dict() before training and after `steps` steps, saved by rank 0 (OUT.pt beside OUT.json)
"""
from __future__ import annotations

import json
import os
import sys

import torch

from dist.engine_run import grads_path, step_batches
from sail_dist.config import load_config
from sail_dist.train.lr import lr_at


def main() -> None:
    mode, out_path, config, *overrides = sys.argv[1:]
    cfg = load_config(config, ["data.demo=true", "backend.name=npu", *overrides])
    from sail_dist.backends.base import get_backend

    backend = get_backend("npu")
    env = backend.setup(cfg)
    engine = backend.build(cfg, env)
    result: dict = {}

    def run(eng, steps) -> list[dict]:
        rows = []
        for step in steps:
            s = eng.train_step(step_batches(cfg, step, env.dp_rank, env.dp_size), lr_at(cfg.train, step))
            world_flops = torch.tensor([s.flops], dtype=torch.float64)
            torch.distributed.all_reduce(world_flops)  # every rank counts its own part: the sum is the step's
            rows.append({"loss": s.loss, "grad_norm": s.grad_norm, "aux": s.aux_loss, "skipped": s.skipped,
                         "metrics": s.metrics,
                         "tokens": s.tokens, "flops": s.flops, "world_flops": float(world_flops),
                         "counts": s.expert_counts.sum().item() if s.expert_counts is not None else None})
        return rows

    n = cfg.train.steps
    if mode == "train":
        engine.track_layer_grads = True
        result["steps"] = run(engine, [0])
        if env.rank == 0:
            torch.save(engine.layer_grads(), grads_path(out_path))
        engine.track_layer_grads = False
        result["steps"] += run(engine, range(1, n))
    elif mode == "resume":
        k = n // 2
        result["first"] = run(engine, range(k))
        ckpt = os.path.join(os.path.dirname(out_path), "ckpt")
        engine.save(ckpt)
        result["uninterrupted"] = run(engine, range(k, n))
        fresh = backend.build(cfg, env)
        fresh.load(ckpt)
        result["resumed"] = run(fresh, range(k, n))
    elif mode == "nonfinite":
        result["clean"] = run(engine, [0, 1])
        fresh = backend.build(cfg, env)
        result["with_bad_step"] = run(fresh, [0])
        bad = step_batches(cfg, 1, env.dp_rank, env.dp_size)
        bad[0].loss_weight[0] = float("nan")
        s = fresh.train_step(bad, lr_at(cfg.train, 1))
        result["bad"] = {"loss": s.loss, "grad_norm": s.grad_norm, "skipped": s.skipped}
        result["with_bad_step"] += run(fresh, [1])
    elif mode == "load":
        engine.load(os.environ["CKPT"])
        result["resumed"] = run(engine, range(n // 2, n))
    elif mode == "full_state":
        init = engine.full_state_dict()
        run(engine, range(n))
        sd = engine.full_state_dict()
        if env.rank == 0:
            torch.save({"init": init, "trained": sd}, out_path.replace(".json", ".pt"))
        result["keys"] = sorted(sd)
    else:
        raise SystemExit(f"unknown mode {mode}")
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    backend.teardown()


if __name__ == "__main__":
    main()
