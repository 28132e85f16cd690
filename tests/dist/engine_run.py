"""Run an engine on deterministic synthetic micro-batches and write per-step stats (run under torchrun).

    torchrun --nproc_per_node 2 tests/dist/engine_run.py OUT.json CONFIG.yaml [overrides...]

Writes {"steps": [per-step stats]} to OUT.json and, with LAYER_GRADS=1, every parameter's full reduced gradient at
step 0 ({name: tensor}, `engine.layer_grads()`) to OUT.grads.pt (`grads_path`).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from dist.fusion_extras import add_fusion_extras
from dist.toy_objective import add_toy_extras  # also registers train.objective=toy
from sail_dist.config import Config, load_config
from sail_dist.data.synthetic import synthetic_batch
from sail_dist.train.lr import lr_at


def grads_path(out_json: str) -> str:
    """Where a run writing `out_json` saves its step-0 gradients (torch.save of {name: tensor})."""
    return out_json[:-len(".json")] + ".grads.pt" if out_json.endswith(".json") else out_json + ".grads.pt"


def step_batches(cfg: Config, step: int, dp_rank: int, dp_size: int) -> list:
    """The micro-batches of `dp_rank` at `step`: lengths and images differ per rank and micro-batch; steps alternate
    between two sets of batches so that a few steps visibly fit them. Each carries the toy objective's extras
    (the SFT objective ignores them)."""
    out = []
    g = cfg.model.vit.grid
    for m in range(cfg.train.micro_batches):
        k = ((step % 2) * dp_size + dp_rank) * cfg.train.micro_batches + m
        seqlens = [20 + 7 * (k % 5), 9 + (k % 3), 31]
        images = [[(g, g)] if k % 2 == 0 else [], [], [(g, g), (g, g + 2)] if k % 3 == 0 else []]
        out.append(add_toy_extras(synthetic_batch(cfg.model, seqlens, images, seed=1000 + k), seed=2000 + k))
        if cfg.train.objective == "think_fusion":  # its marks only then: other objectives' batches are unchanged
            add_fusion_extras(out[-1], seed=3000 + k)
    return out


def main() -> None:
    out_path, config, *overrides = sys.argv[1:]
    cfg = load_config(config, ["data.demo=true", *overrides])
    from sail_dist.backends.base import get_backend

    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    engine = backend.build(cfg, env)
    rows = []
    for step in range(cfg.train.steps):
        engine.track_layer_grads = step == 0 and os.environ.get("LAYER_GRADS") == "1"
        stats = engine.train_step(step_batches(cfg, step, env.dp_rank, env.dp_size), lr_at(cfg.train, step))
        if engine.track_layer_grads and env.rank == 0:
            torch.save(engine.layer_grads(), grads_path(out_path))
        rows.append({"loss": stats.loss, "grad_norm": stats.grad_norm, "aux": stats.aux_loss, "skipped": stats.skipped,
                     "metrics": stats.metrics})
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump({"steps": rows}, f)
    backend.teardown()


if __name__ == "__main__":
    main()
