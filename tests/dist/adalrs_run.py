"""An engine's AdaLRS rollback on deterministic synthetic batches (run under torchrun; tests/test_adalrs.py).

    torchrun --nproc_per_node N tests/dist/adalrs_run.py OUT_DIR CONFIG.yaml [overrides...]

Engine 1 ("trial"): 2 steps; engine.save(OUT_DIR/before); snapshot (env SNAPSHOT=memory|disk); 2 trial steps at 3x
the lr on the batches of steps 2-3; restore; engine.save(OUT_DIR/after); steps 4-5.
Engine 2 ("reference", built alike): steps 0-1, then steps 4-5: what engine 1 must equal once rolled back.
Rank 0 writes OUT_DIR/result.json: {"trial": {...}, "reference": {...}} with the losses of steps 4-5.
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from dist.engine_run import step_batches
from sail_dist.backends.base import get_backend
from sail_dist.config import load_config
from sail_dist.train.lr import lr_at


def run(cfg, env, engine, out_dir: str, trial: bool) -> dict:
    def step(i: int, lr_mult: float = 1.0) -> float:
        return engine.train_step(step_batches(cfg, i, env.dp_rank, env.dp_size), lr_at(cfg.train, i) * lr_mult).loss

    for i in range(2):
        step(i)
    info: dict = {}
    if trial:
        engine.save(os.path.join(out_dir, "before"))
        disk = os.environ.get("SNAPSHOT", "memory") == "disk"
        snap = engine.snapshot(path=os.path.join(out_dir, f"snap_rank{env.rank}.pt") if disk else None,
                               memory_limit_bytes=0 if disk else float("inf"))
        info = {"on_disk": snap.on_disk, "file_exists": bool(snap.path and os.path.exists(snap.path)),
                "nbytes": snap.nbytes, "trial_losses": [step(i, 3.0) for i in (2, 3)]}
        engine.restore(snap)
        snap.discard()
        engine.save(os.path.join(out_dir, "after"))
    info["losses"] = [step(i) for i in (4, 5)]  # the data stream continues past the trial's batches
    return info


def main() -> None:
    out_dir, config, *overrides = sys.argv[1:]
    cfg = load_config(config, ["data.demo=true", *overrides])
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    result = {"trial": run(cfg, env, backend.build(cfg, env), out_dir, trial=True),
              # a second engine, built alike (same seed): the run that never made the trial
              "reference": run(cfg, env, backend.build(cfg, env), out_dir, trial=False)}
    if dist.is_initialized():
        dist.barrier()
    if env.rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    backend.teardown()


if __name__ == "__main__":
    main()
