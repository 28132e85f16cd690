"""Atomic training checkpoints and exact resume.

Layout of `<out_dir>/checkpoints/step_00000100/`:
  engine/           the backend's own state (DeepSpeed ZeRO partitions, or Megatron dist_checkpointing)
  rank_00000.pt     per-rank state: data-loader position and packer buffers, RNG states
  trainer.json      step, world size, DP size, backend, counters, the resolved config
  COMPLETE          written last; a directory without it is never loaded

Writes go to `step_XXXXXXXX.tmp`, which is renamed only after every rank finished, so a crash mid-save
leaves at most a `.tmp` directory that resume ignores (and the next save replaces). The last
`keep_last` complete checkpoints are kept. A checkpoint resumes on another world size (elastic resume,
docs/checkpoints.md): the engines reshard their state, the global rank state is rank 0's.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from sail_dist.config import Config, config_to_dict, flatten_dict

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
    "train.tensorboard", "data.num_workers", "data.prefetch", "data.demo_dir", "backend.dist_timeout_min",
    "rl.episodes", "rl.eval_every", "rl.save_every"})

# Keys that lay the same training out over the devices (elastic resume, docs/checkpoints.md): a resume may change
# them (the engines reshard their state). `train.micro_batches` splits the global batch over the DP ranks, so it
# may change together with the DP size (keep dp x micro_batches to continue the same run), not on its own.
LAYOUT_PREFIXES = ("parallel.",)
ELASTIC_KEYS = frozenset({"train.micro_batches"})

# Keys that trade device memory for step time without changing the update (train/out_of_memory.py offers them
# after an out-of-memory error): where the offloaded optimizer's state lives and how its host step is chunked (the
# checkpoint holds the whole state on the host: the engine writes the device share back before a save), and
# activation checkpointing (the same forward, recomputed in the backward).
MEMORY_KEYS = frozenset({"backend.offload_ratio", "backend.offload_chunk", "train.activation_checkpointing.llm",
                         "train.activation_checkpointing.vit"})


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
                    trainer_state: dict[str, Any], write_extra: Callable[[str], None] | None = None) -> str:
    """Collective. `step` = number of optimizer steps done. Returns the final directory. `write_extra(dir)`, when
    given, writes this rank's further files into the checkpoint directory (e.g. the AdaLRS trial snapshot)."""
    root = checkpoint_root(cfg)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    _barrier()
    engine.save(os.path.join(tmp, "engine"))
    if write_extra is not None:
        write_extra(tmp)
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


def may_change_on_resume(key: str, elastic: bool = False) -> bool:
    """Whether a resume accepts another value of the dotted config `key`: RUN_CONTROL_KEYS, MEMORY_KEYS and the
    layout keys (`parallel.*`); with `elastic` (the DP size changes) also ELASTIC_KEYS."""
    return (key in RUN_CONTROL_KEYS or key in MEMORY_KEYS or key.startswith(LAYOUT_PREFIXES)
            or (elastic and key in ELASTIC_KEYS))


def config_differences(saved: dict, cfg: Config, elastic: bool = False) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every dotted key whose value changed and that a resume does not accept
    changed (`may_change_on_resume`)."""
    old, new = flatten_dict(saved), flatten_dict(config_to_dict(cfg))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<absent>") != new.get(k, "<absent>") and not may_change_on_resume(k, elastic)]


def saved_dp_size(meta: dict) -> int:
    """The data-parallel size a checkpoint was written at (trainer.json `dp_size`; older checkpoints: world size /
    pipeline stages of the config they were written under)."""
    if "dp_size" in meta:
        return int(meta["dp_size"])
    pp = int(meta.get("config", {}).get("parallel", {}).get("pp", 1) or 1)
    return int(meta.get("world_size", 1)) // pp


def read_meta(path: str) -> dict:
    """The checkpoint's trainer.json (step, layout, counters, the config it was written under)."""
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read trainer.json ({e}); remove {path} (or set "
                              "train.resume to an earlier step_* directory, or train.resume=none)") from None


def check_resume_config(path: str, cfg: Config, dp_size: int | None = None) -> dict:
    """trainer.json of `path`, after checking it was written under this config (run-control and layout keys aside;
    with this run's `dp_size` given and different from the checkpoint's, train.micro_batches too)."""
    meta = read_meta(path)
    elastic = dp_size is not None and dp_size != saved_dp_size(meta)
    diffs = config_differences(meta.get("config", {}), cfg, elastic=elastic)
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
    """Collective. Restores the engine and this rank's RNG; returns (trainer.json content, rank state).

    Elastic resume (another world size): the engine reshards its own state (`engine.load`); the rank state is
    rank 0's (the loader state and the trainer's are global), its `loader.decode_bad` counters (the only per-rank
    part) are kept per old rank where that rank still exists and added to new rank 0 for the ranks that do not;
    rank r keeps old rank r's RNG state, a new rank its fresh seed (train.seed + rank)."""
    fix = f"remove {path} (or set train.resume to an earlier step_* directory, or train.resume=none)"
    meta = read_meta(path)
    if meta.get("backend") != backend:
        raise CheckpointError(f"checkpoint {path} was written by backend={meta.get('backend')}; this run is "
                              f"backend={backend}, which cannot read its engine state. Resume with "
                              f"backend.name={meta.get('backend')}, or export it to HF and start from it with "
                              "train.init_from.")
    old_world = int(meta.get("world_size", world_size))

    def read_rank(r: int) -> dict:
        rank_file = os.path.join(path, f"rank_{r:05d}.pt")
        try:
            return torch.load(rank_file, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
            raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {rank_file} ({type(e).__name__}: "
                                  f"{e}); {fix}") from None

    if old_world == world_size:
        rank_state = read_rank(rank)
    else:
        rank_state = _elastic_rank_state(path, read_rank, rank, old_world, world_size)
    try:
        engine.load(os.path.join(path, "engine"))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt: the {backend} engine state under "
                              f"{os.path.join(path, 'engine')} failed to load ({type(e).__name__}: {e}); {fix}") from e
    rng = rank_state.pop("rng")
    if rng is not None:
        set_rng_state(rng)
    return meta, rank_state


def _elastic_rank_state(path: str, read_rank: Callable[[int], dict], rank: int, old_world: int,
                        world_size: int) -> dict:
    """This rank's state when resuming a checkpoint of `old_world` ranks on `world_size` ranks (load_checkpoint)."""
    state = read_rank(0)
    adalrs = state.get("adalrs")
    if adalrs and adalrs.get("trial"):
        raise CheckpointError(
            f"cannot resume {path} on {world_size} ranks: it was written on {old_world} ranks during an AdaLRS trial, "
            "whose rollback snapshots are per-rank engine state of that layout (adalrs/snapshot_rank_*.pt) and do not "
            f"reshard. Resume it on {old_world} ranks, or from an earlier checkpoint written outside a trial "
            "(train.resume=<its step_* directory>).")
    own = read_rank(rank) if rank < old_world else None
    state["rng"] = own["rng"] if own is not None else None
    loader = state.get("loader")
    if isinstance(loader, dict):
        from sail_dist.data.records import BadSampleLog

        bad = BadSampleLog()
        if own is not None:
            bad.load_state_dict(own["loader"].get("decode_bad", {}))
        if rank == 0:  # the decode-time counts of old ranks that no longer exist
            for r in range(world_size, old_world):
                gone = BadSampleLog()
                gone.load_state_dict(read_rank(r)["loader"].get("decode_bad", {}))
                bad.merge(gone)  # distinct records stay distinct, occurrences add up
        loader["decode_bad"] = bad.state_dict()
    log.info("elastic resume of %s: written on %d ranks, resumed on %d (rank %d: global state of rank 0, %s)",
             path, old_world, world_size, rank, "its own RNG" if own is not None else "a fresh RNG seed")
    return state
