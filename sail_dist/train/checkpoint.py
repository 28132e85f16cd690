"""Atomic training checkpoints and exact resume.

Layout of `<out_dir>/checkpoints/step_00000100/`:
  engine/           the backend's own state (DeepSpeed ZeRO partitions, or Megatron dist_checkpointing)
  rank_00000.pt     per-rank state: data-loader position and packer buffers, RNG states
  trainer.json      step, world size, backend, counters, the resolved config
  COMPLETE          written last; a directory without it is never loaded

Writes go to `step_XXXXXXXX.tmp`, which is renamed only after every rank finished, so a crash mid-save
leaves at most a `.tmp` directory that resume ignores (and the next save replaces). The last
`keep_last` complete checkpoints are kept.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sail_dist.config import Config, config_to_dict

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message says which file and what to do."""


class ResumeConfigError(CheckpointError):
    """The checkpoint to resume was written under another config; the message lists the keys and the ways on."""


# Keys that steer the run without changing what is trained or how: a resumed run may change them (train longer,
# save or log more often, resume a checkpoint into another out_dir). Any other difference refuses the resume.
RUN_CONTROL_KEYS = frozenset({
    "train.steps", "train.resume", "train.out_dir", "train.init_from", "train.log_every", "train.save_every",
    "train.keep_last", "train.max_consecutive_nonfinite", "train.export_hf", "train.eval_samples",
    "train.tensorboard", "data.num_workers", "data.prefetch", "data.demo_dir", "backend.dist_timeout_min"})


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_root(cfg: Config) -> str:
    return os.path.join(cfg.train.out_dir, "checkpoints")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, "COMPLETE")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def save_checkpoint(cfg: Config, engine, step: int, rank: int, world_size: int, rank_state: dict,
                    trainer_state: dict[str, Any]) -> str:
    """Collective. `step` = number of optimizer steps done. Returns the final directory."""
    root = checkpoint_root(cfg)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    _barrier()
    engine.save(os.path.join(tmp, "engine"))
    torch.save({**rank_state, "rng": rng_state()}, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump({"step": step, "world_size": world_size, "backend": cfg.backend.name, **trainer_state,
                       "config": config_to_dict(cfg)}, f, indent=1)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write("ok\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every dotted key outside RUN_CONTROL_KEYS whose value changed."""
    old, new = _flatten(saved), _flatten(config_to_dict(cfg))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if k not in RUN_CONTROL_KEYS and old.get(k, "<absent>") != new.get(k, "<absent>")]


def read_meta(path: str) -> dict:
    """The checkpoint's trainer.json (step, layout, counters, the config it was written under)."""
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read trainer.json ({e}); remove {path} (or set "
                              "train.resume to an earlier step_* directory, or train.resume=none)") from None


def check_resume_config(path: str, cfg: Config) -> dict:
    """trainer.json of `path`, after checking it was written under this config (run-control keys aside)."""
    meta = read_meta(path)
    diffs = config_differences(meta.get("config", {}), cfg)
    if diffs:
        out = cfg.train.out_dir
        shown = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise ResumeConfigError(
            f"cannot resume {path}: it was written under another config ({len(diffs)} key(s) differ, "
            f"checkpoint -> this run):\n{shown}{more}\nThree ways on: a new train.out_dir (a fresh run); "
            f"train.resume=none (start over in {out}); or "
            f"train.init_from={os.path.join(out, 'hf')} with a new train.out_dir (a new run from that run's exported "
            "weights, written at its end when train.export_hf=true).")
    return meta


def resolve_resume(cfg: Config) -> str | None:
    """The checkpoint directory to resume from, or None for a fresh start."""
    r = cfg.train.resume
    if r in ("none", ""):
        return None
    if r == "auto":
        found = list_checkpoints(checkpoint_root(cfg))
        return found[-1][1] if found else None
    if not os.path.isdir(r):
        raise CheckpointError(f"train.resume={r}: no such directory")
    if not os.path.exists(os.path.join(r, "COMPLETE")):
        raise CheckpointError(f"train.resume={r}: not a complete checkpoint (no COMPLETE marker: the save was "
                              "interrupted). Pick an earlier step_* directory.")
    return r


def load_checkpoint(path: str, engine, rank: int, world_size: int, backend: str) -> tuple[dict, dict]:
    """Collective. Restores the engine and this rank's RNG; returns (trainer.json content, rank state)."""
    fix = f"remove {path} (or set train.resume to an earlier step_* directory, or train.resume=none)"
    meta = read_meta(path)
    if meta.get("world_size") != world_size or meta.get("backend") != backend:
        raise CheckpointError(f"checkpoint {path} was written by backend={meta.get('backend')} with "
                              f"world_size={meta.get('world_size')}; this run is backend={backend} with "
                              f"world_size={world_size}. Resume with the same layout, or export it to HF and start "
                              "from it with train.init_from.")
    rank_file = os.path.join(path, f"rank_{rank:05d}.pt")
    try:
        rank_state = torch.load(rank_file, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {rank_file} ({type(e).__name__}: {e}); "
                              f"{fix}") from None
    try:
        engine.load(os.path.join(path, "engine"))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt: the {backend} engine state under "
                              f"{os.path.join(path, 'engine')} failed to load ({type(e).__name__}: {e}); {fix}") from e
    set_rng_state(rank_state.pop("rng"))
    return meta, rank_state
