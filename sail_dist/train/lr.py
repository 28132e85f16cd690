"""Learning-rate schedules as pure functions of the step (so resuming needs no scheduler state)."""
from __future__ import annotations

import math

from sail_dist.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to cfg.lr, then cosine / linear / constant to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * t
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))
