"""Training metrics: TensorBoard scalars, a JSON-lines log and a console progress line with ETA.

Throughput and MFU are global (summed over ranks) and per device; MFU = achieved training FLOPs
(model/flops.py, causal attention counted by its useful half) over the device's dense bf16 peak.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

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


def expert_load_entropy(counts: torch.Tensor) -> float:
    """Mean over MoE layers of the normalised entropy of expert load (1 = perfectly even, 0 = one expert)."""
    p = counts.double() / counts.double().sum(-1, keepdim=True).clamp_min(1)
    h = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(counts.shape[-1])
    return float(h.mean())


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Metrics:
    def __init__(self, out_dir: str, env: DistEnv, total_steps: int, start_step: int, tensorboard: bool = True) -> None:
        self.env, self.total, self.start = env, total_steps, start_step
        self.t_start = time.perf_counter()
        self.steps_timed = 0
        self.writer = None
        self.jsonl = None
        self.peak = peak_flops(env.device_name)
        if env.is_main:
            os.makedirs(out_dir, exist_ok=True)
            self.tb_dir = os.path.join(out_dir, "tensorboard")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.tb_dir)
            self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
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
        if self.peak:
            rec["mfu"] = flops / dt / self.env.world_size / self.peak
        if stats.expert_counts is not None:
            rec["expert_load_entropy"] = expert_load_entropy(stats.expert_counts)
        rec.update({f"objective_{k}": v for k, v in stats.metrics.items()})
        rec.update({f"data_{k}": v for k, v in data.items() if isinstance(v, (int, float)) and k != "step"})
        self.steps_timed += 1
        if not self.env.is_main:
            return rec
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.writer:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.writer.add_scalar(f"train/{k}", v, step + 1)
        if (step + 1) % every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.t_start
            eta = elapsed / self.steps_timed * (self.total - step - 1)
            parts = [f"step {step + 1}/{self.total}", f"loss {stats.loss:.4f}"]
            if stats.expert_counts is not None:
                parts.append(f"aux {stats.aux_loss:.4f}")
            parts += [f"{k} {v:.4g}" for k, v in stats.metrics.items()]
            parts += [f"lr {stats.lr:.2e}", f"gnorm {stats.grad_norm:.3f}", f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s"]
            if "mfu" in rec:
                parts.append(f"MFU {100 * rec['mfu']:.1f}%")
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
