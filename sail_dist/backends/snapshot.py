"""Engine state snapshots for AdaLRS rollback (sail_dist/train/adalrs.py): `engine.snapshot()` / `engine.restore()`.

Each engine names the tensors (and the few non-tensor values, e.g. an optimizer step counter) that make up THIS
rank's training state: its own optimizer partition or shard with the Adam moments, and its local module parameters.
Nothing is gathered across ranks. A snapshot holds copies of them on the host, or, past a memory limit, streams
them to a per-rank file (torch.save of the live tensors: at most one tensor at a time is staged on the host).
`restore` copies the values back into the SAME live tensors (in place), so every view, buffer and optimizer
reference the engine holds stays valid.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import dataclass

import torch


@dataclass
class Snapshot:
    """One rank's saved training state: `values` ({key: tensor or plain value}) in memory, or the file at `path`
    (torch.save of the same dict)."""

    nbytes: int
    values: dict | None = None
    path: str | None = None

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def discard(self) -> None:
        """Free the memory or delete the file."""
        self.values = None
        if self.path and os.path.exists(self.path):
            os.remove(self.path)

    def save_to(self, path: str) -> None:
        """Write this snapshot to `path` (a checkpoint's copy of a trial in progress): a file copy when on disk."""
        if self.path is not None:
            shutil.copyfile(self.path, path)
        else:
            torch.save(self.values, path)

    def load_values(self) -> dict:
        if self.values is not None:
            return self.values
        # mmap: `put_back` copies tensor by tensor from the file's pages, so a restore does not stage the whole
        # snapshot in host memory either (it went to disk because it exceeded the memory limit).
        return torch.load(self.path, weights_only=False, map_location="cpu", mmap=True)

    @staticmethod
    def read(path: str, nbytes: int, keep_on_disk_at: str | None = None) -> "Snapshot":
        """A snapshot written by `save_to`: into memory, or copied to `keep_on_disk_at` and used from there."""
        if keep_on_disk_at is None:
            return Snapshot(nbytes=nbytes, values=torch.load(path, weights_only=False, map_location="cpu"))
        os.makedirs(os.path.dirname(keep_on_disk_at) or ".", exist_ok=True)
        shutil.copyfile(path, keep_on_disk_at)
        return Snapshot(nbytes=nbytes, path=keep_on_disk_at)


def state_nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def take(state: dict, path: str | None = None, memory_limit_bytes: float = math.inf) -> Snapshot:
    """Copy `state` ({key: live tensor or plain value}): into host memory when it fits `memory_limit_bytes`, else
    into `path` (required then)."""
    nbytes = state_nbytes(state)
    if nbytes <= memory_limit_bytes:
        values = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                  for k, v in state.items()}
        return Snapshot(nbytes=nbytes, values=values)
    if path is None:
        raise ValueError(f"the snapshot ({nbytes / 2**30:.2f} GiB) exceeds the memory limit "
                         f"({memory_limit_bytes / 2**30:.2f} GiB) and no file was given")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return Snapshot(nbytes=nbytes, path=path)


def put_back(state: dict, snap: Snapshot) -> dict:
    """Copy `snap` into the live tensors of `state` (same keys); returns the plain (non-tensor) values by key, which
    the engine assigns itself."""
    values = snap.load_values()
    if list(state) != list(values):
        missing = sorted(set(values) ^ set(state))
        raise RuntimeError(f"the snapshot does not match this engine's state (keys differ: {missing[:8]}); it was "
                           "taken from another model, layout or optimizer")
    plain = {}
    with torch.no_grad():
        for k, live in state.items():
            v = values[k]
            if isinstance(live, torch.Tensor):
                if live.shape != v.shape or live.dtype != v.dtype:
                    raise RuntimeError(f"snapshot tensor {k}: {tuple(v.shape)} {v.dtype}, engine has "
                                       f"{tuple(live.shape)} {live.dtype}")
                live.copy_(v)
            else:
                plain[k] = copy.deepcopy(v)
    return plain


def set_optimizer_plain(prefix: str, opt: torch.optim.Optimizer, plain: dict) -> None:
    """Assign the plain (non-tensor) values `put_back` returned (an int per-parameter or per-group `step`)."""
    for gi, group in enumerate(opt.param_groups):
        if f"{prefix}.g{gi}.group.step" in plain:
            group["step"] = plain[f"{prefix}.g{gi}.group.step"]
        for pi, p in enumerate(group["params"]):
            key = f"{prefix}.g{gi}.p{pi}.state."
            for k, v in plain.items():
                if k.startswith(key):
                    opt.state[p][k[len(key):]] = v


def optimizer_state(prefix: str, opt: torch.optim.Optimizer) -> dict:
    """A torch optimizer's parameters (here: the fp32 master partition / shard it updates), per-parameter state and a
    per-group step count where the optimizer keeps one, keyed by (group, index) position: live tensors, plain
    values as they are."""
    out: dict = {}
    for gi, group in enumerate(opt.param_groups):
        if "step" in group:  # optimizers that count steps per group (apex / Transformer Engine FusedAdam)
            out[f"{prefix}.g{gi}.group.step"] = group["step"]
        for pi, p in enumerate(group["params"]):
            key = f"{prefix}.g{gi}.p{pi}"
            out[f"{key}.param"] = p.data
            for name, v in sorted(opt.state.get(p, {}).items()):
                out[f"{key}.state.{name}"] = v
    return out
