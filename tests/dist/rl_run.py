"""One RL update on either engine (run under torchrun), for the backend-parity test of the policy losses.

    torchrun --nproc_per_node N tests/dist/rl_run.py OUT.json CONFIG.yaml [overrides...]

The step's micro-batches are the same on both backends whatever the layout (global micro-batch k of the step goes
to DP rank k // train.micro_batches): synthetic prompt + response sequences (labels on the response half only).
Old log-probs come from `engine.token_logprobs` (the engine's forward-only pass: Megatron's schedule through the
pipeline on the NPU backend), shifted by a seeded per-token offset so that some ratios leave the clip range;
advantages are one seeded value per sequence. Writes, per step, loss / grad norm / the objective's metrics, the
token log-probs of every global micro-batch (OUT.logp.pt, from the ranks that hold them) and, with LAYER_GRADS=1,
every parameter's full reduced gradient at step 0 (OUT.grads.pt).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from dist.engine_run import grads_path
from sail_dist.config import Config, load_config
from sail_dist.data.synthetic import synthetic_batch
from sail_dist.train.lr import lr_at

WORLD_MICRO = 4  # global micro-batches per step


def rl_batch(cfg: Config, step: int, k: int):
    """Global micro-batch k of `step`, prompt labels masked, without the old log-probs (set from the engine)."""
    g = cfg.model.vit.grid
    j = (step % 2) * WORLD_MICRO + k
    seqlens = [18 + 5 * (j % 3), 11 + (j % 4), 25]
    images = [[(g, g)] if j % 2 == 0 else [], [], []]
    b = synthetic_batch(cfg.model, seqlens, images, seed=3000 + j)
    mask = torch.zeros(b.num_tokens)
    for a, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
        mask[(a + e) // 2:e - 1] = 1.0  # response: the second half (the last token of a sample has no label)
    b.labels = torch.where(mask > 0, b.labels, torch.full_like(b.labels, -100))
    b.loss_weight = mask.clone()
    gen = torch.Generator().manual_seed(4000 + j)
    adv_S = torch.randn(b.num_samples, generator=gen)
    seq = torch.repeat_interleave(torch.arange(b.num_samples), (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long())
    b.extras = {"response_mask": mask, "advantage": adv_S[seq] * mask}
    return b, torch.randn(b.num_tokens, generator=gen)


def main() -> None:
    out_path, config, *overrides = sys.argv[1:]
    cfg = load_config(config, ["data.demo=true", *overrides])
    from sail_dist.backends.base import get_backend

    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    engine = backend.build(cfg, env)
    M = cfg.train.micro_batches
    assert M * env.dp_size == WORLD_MICRO, (M, env.dp_size)
    # old-logp offset scale: DAPO ratios around its 0.2 / 0.28 clip, GSPO's mean log ratio around 3e-4 / 4e-4
    scale = 0.3 if cfg.train.objective == "dapo" else 2e-3
    rows, logps = [], {}
    for step in range(cfg.train.steps):
        ks = range(env.dp_rank * M, (env.dp_rank + 1) * M)
        made = [rl_batch(cfg, step, k) for k in ks]
        batches = [b for b, _ in made]
        lps = engine.token_logprobs(batches)
        for k, b, (_, noise), lp in zip(ks, batches, made, lps):
            m = b.extras["response_mask"]
            b.extras["old_logp"] = ((lp + scale * noise) * m) if lp is not None else torch.zeros_like(m)
            if lp is not None:
                logps[f"{step}:{k}"] = lp
        engine.track_layer_grads = step == 0 and os.environ.get("LAYER_GRADS") == "1"
        stats = engine.train_step(batches, lr_at(cfg.train, step))
        if engine.track_layer_grads and env.rank == 0:
            torch.save(engine.layer_grads(), grads_path(out_path))
        rows.append({"loss": stats.loss, "grad_norm": stats.grad_norm, "skipped": stats.skipped,
                     "metrics": stats.metrics})
    gathered = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(logps, gathered, dst=0)
    if env.rank == 0:
        torch.save({k: v for part in gathered for k, v in part.items()}, out_path + ".logp.pt")
        with open(out_path, "w") as f:
            json.dump({"steps": rows}, f)
    backend.teardown()


if __name__ == "__main__":
    main()
