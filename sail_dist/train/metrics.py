"""Training metrics: TensorBoard scalars, a JSON-lines log and a console progress line with ETA.

Throughput and MFU are global (summed over ranks) and per device; MFU = achieved training FLOPs
(model/flops.py, causal attention counted by its useful half) over the device's dense bf16 peak (`mfu: null`
where no peak is known, e.g. CPU). metrics.jsonl keeps each step's own figures; the progress line's tok/s and
MFU are over the window since the previous printed line (its wall time, data waits included), recorded on the
printed step as `tokens_per_s_window` / `mfu_window`. On resume at step k, metrics.jsonl is cut back to the
records with step <= k and TensorBoard purges the steps after k, so a replayed step is recorded once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from sail_dist.backends.base import DistEnv, TrainStepStats

log = logging.getLogger("sail_dist")

# Dense bf16 peak FLOP/s by device-name substring (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "B200": 2250e12, "Ascend910B": 313e12, "Ascend910_93": 376e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_name.replace(" ", "").lower():
            return value
    return None


def expert_load_entropy_per_layer(counts: torch.Tensor) -> list[float]:
    """Normalised entropy of expert load per MoE layer, counts [L, E] (or [E]) -> L values:
    H(p) / log E with p = counts / sum (1 = perfectly even, 0 = one expert takes every token-slot)."""
    c = counts.detach().double().cpu().reshape(-1, counts.shape[-1])
    p = c / c.sum(-1, keepdim=True).clamp_min(1)
    h = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(counts.shape[-1])
    return [float(x) for x in h]


def expert_load_entropy(counts: torch.Tensor) -> float:
    """Mean over MoE layers of the normalised entropy of expert load (1 = perfectly even, 0 = one expert)."""
    h = expert_load_entropy_per_layer(counts)
    return sum(h) / len(h)


def expert_load_imbalance_per_layer(counts: torch.Tensor) -> list[float]:
    """Load imbalance per MoE layer, counts [L, E] (or [E]) -> L values: max over experts / mean over experts
    (1 = even; E = one expert takes everything; 0 for a layer that saw no tokens)."""
    c = counts.detach().double().cpu().reshape(-1, counts.shape[-1])
    mean = c.mean(-1)
    return [float(m) / float(a) if float(a) > 0 else 0.0 for m, a in zip(c.max(-1).values, mean)]


def truncate_jsonl(path: str, step: int) -> None:
    """Keep the records of `path` with "step" <= `step` (atomically): a resumed run replays the steps after its
    checkpoint, and a killed run's records of them (and a torn last line) must not stay twice."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k tok/s" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f} tok/s"


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Metrics:
    def __init__(self, out_dir: str, env: DistEnv, total_steps: int, start_step: int, tensorboard: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`start_step`: the step this run starts after (the resume point): the out_dir's metrics.jsonl and
        TensorBoard logs are cut back to it (a run from step 0 starts them empty). `clock`: wall time in seconds
        (tests script it)."""
        self.env, self.total, self.start, self.clock = env, total_steps, start_step, clock
        self.t_start = clock()
        self.steps_timed = 0
        self._window = {"t0": self.t_start, "tokens": 0.0, "flops": 0.0}  # since the last printed line
        self._said_no_peak = False
        self.writer = None
        self.jsonl = None
        self.peak = peak_flops(env.device_name)
        keep_through = start_step if start_step > 0 else -1  # a run from step 0 starts the logs afresh
        if env.is_main:
            os.makedirs(out_dir, exist_ok=True)
            self.tb_dir = os.path.join(out_dir, "tensorboard")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # events of steps after the resume point (a killed run's replayed steps) are purged on read
                self.writer = SummaryWriter(self.tb_dir, purge_step=keep_through + 1)
            self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
            truncate_jsonl(self.jsonl_path, keep_through)
            self.jsonl = open(self.jsonl_path, "a")

    def _global(self, stats: TrainStepStats) -> tuple[float, float, float]:
        t = torch.tensor([stats.tokens, stats.samples, stats.flops], dtype=torch.float64)
        if dist.is_initialized() and self.env.world_size > 1:
            t = t.to(self.env.device) if self.env.device.type == "cuda" else t
            dist.all_reduce(t)
        return tuple(float(x) for x in t.cpu())

    def log_step(self, step: int, stats: TrainStepStats, data: dict, every: int = 1) -> dict:
        """Collective (sums tokens/FLOPs over ranks). `step` is 0-based; prints every `every` steps on rank 0."""
        tokens, samples, flops = self._global(stats)
        dt = max(stats.time_s, 1e-9)
        rec = {"step": step + 1, "loss": stats.loss, "aux_loss": stats.aux_loss, "lr": stats.lr,
               "grad_norm": stats.grad_norm, "skipped": stats.skipped, "tokens_per_s": tokens / dt,
               "samples_per_s": samples / dt, "tflops_per_device": flops / dt / self.env.world_size / 1e12,
               "step_time_s": stats.time_s}
        rec["mfu"] = flops / dt / self.env.world_size / self.peak if self.peak else None
        self._window["tokens"] += tokens
        self._window["flops"] += flops
        printed = self.env.is_main and ((step + 1) % every == 0 or step + 1 == self.total)
        if printed:  # the window since the previous printed line: its wall time, data waits included
            now = self.clock()
            wall = max(now - self._window["t0"], 1e-9)
            rec["tokens_per_s_window"] = self._window["tokens"] / wall
            rec["mfu_window"] = (self._window["flops"] / wall / self.env.world_size / self.peak if self.peak
                                 else None)
            self._window = {"t0": now, "tokens": 0.0, "flops": 0.0}
        per_layer: dict[str, list[float]] = {}
        if stats.expert_counts is not None:
            per_layer["expert_entropy"] = expert_load_entropy_per_layer(stats.expert_counts)
            per_layer["expert_imbalance"] = expert_load_imbalance_per_layer(stats.expert_counts)
            rec["expert_load_entropy"] = sum(per_layer["expert_entropy"]) / len(per_layer["expert_entropy"])
            rec["expert_load_imbalance"] = max(per_layer["expert_imbalance"])  # the worst MoE layer
            rec.update({f"{k}_per_layer": v for k, v in per_layer.items()})  # lists: JSON only
        rec.update({f"objective_{k}": v for k, v in stats.metrics.items()})
        rec.update({f"data_{k}": v for k, v in data.items() if isinstance(v, (int, float)) and k != "step"})
        # per-key counters (realised mix per source / modality, drops per reason): one scalar per entry
        rec.update({f"data_{k}.{sub}": n for k, v in data.items() if isinstance(v, dict)
                    for sub, n in v.items() if isinstance(n, (int, float))})
        self.steps_timed += 1
        if not self.env.is_main:
            return rec
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.writer:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.writer.add_scalar(f"train/{k}", v, step + 1)
            for k, values in per_layer.items():  # MoE layer i (i-th MoE layer of the model)
                for i, v in enumerate(values):
                    self.writer.add_scalar(f"{k}/moe_layer_{i:02d}", v, step + 1)
        if printed:
            elapsed = self.clock() - self.t_start
            eta = elapsed / self.steps_timed * (self.total - step - 1)
            parts = [f"step {step + 1}/{self.total}", f"loss {stats.loss:.4f}"]
            if stats.expert_counts is not None:
                parts.append(f"aux {stats.aux_loss:.4f}")
            parts += [f"{k} {v:.4g}" for k, v in stats.metrics.items()]
            parts += [f"lr {stats.lr:.2e}", f"gnorm {stats.grad_norm:.3f}",
                      _fmt_rate(rec["tokens_per_s_window"])]
            if rec["mfu_window"] is not None:
                parts.append(f"MFU {100 * rec['mfu_window']:.1f}%")
            elif not self._said_no_peak:  # once, not silently absent
                parts.append(f"MFU n/a: no peak FLOPs known for {self.env.device_name}")
                self._said_no_peak = True
            if "samples" in data:  # realised samples per step (train.global_batch_samples sizes it)
                parts.append(f"{data['samples']} samples")
            if "utilisation" in data:
                parts.append(f"pack {data['utilisation']:.3f}")
            if "llm_imbalance" in data:
                parts.append(f"imb {data['llm_imbalance']:.3f}")
            if stats.skipped:
                parts.append("SKIPPED (non-finite)")
            parts.append(f"ETA {_fmt_time(eta)}")
            log.info(" | ".join(parts))
        return rec

    def log_scalars(self, tag: str, values: dict, step: int) -> None:
        if self.env.is_main and self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{tag}/{k}", v, step)
        if self.env.is_main:
            self.jsonl.write(json.dumps({"step": step, tag: values}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
