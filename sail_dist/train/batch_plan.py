"""Batch and epoch semantics in samples: `train.global_batch_samples` and `train.epochs` (docs/recipe.md).

The report states batches in samples (1920, 512, 2048, 1024) and stages in epochs; our steps are packed token
streams (train.micro_batches packs of data.pack_tokens per rank). A sample batch maps onto packs through the mean
number of samples a pack holds, which depends on the data: we plan the first `PROBE_STEPS` steps of the run's own
stream (headers only, no pixels decoded, the same deterministic plan every rank makes) and derive

    micro_batches = max(1, round(global_batch_samples / (dp_size * samples_per_pack)))
    steps         = ceil(epochs * records_in_sources / (micro_batches * dp_size * samples_per_pack))

The realised samples of every step are logged (metrics.jsonl `data_samples`), so the figure a stage trained with is on
record, not only the estimate.
"""
from __future__ import annotations

import dataclasses
import logging
import math

from sail_dist.config import Config

log = logging.getLogger("sail_dist")

PROBE_STEPS = 8


@dataclasses.dataclass
class BatchPlan:
    samples_per_pack: float
    micro_batches: int
    steps: int
    samples_per_step: float  # the estimate: micro_batches * dp_size * samples_per_pack
    records: int


def resolve_batch(cfg: Config, dp_size: int) -> tuple[Config, BatchPlan | None]:
    """`cfg` with train.micro_batches / train.steps derived from global_batch_samples / epochs (None: neither set)."""
    t = cfg.train
    if t.global_batch_samples <= 0 and t.epochs <= 0:
        return cfg, None
    from sail_dist.data.loader import StepLoader

    probe = StepLoader(cfg, dp_rank=0, dp_size=dp_size, micro_batches=1)
    try:
        stats = probe.plan_steps(PROBE_STEPS)
        records = probe.mix.total_rows
    finally:
        probe.close()
    per_pack = sum(s.samples for s in stats) / (PROBE_STEPS * dp_size)
    micro = t.micro_batches
    if t.global_batch_samples > 0:
        micro = max(1, round(t.global_batch_samples / (dp_size * per_pack)))
    per_step = micro * dp_size * per_pack
    steps = math.ceil(t.epochs * records / per_step) if t.epochs > 0 else t.steps
    plan = BatchPlan(per_pack, micro, steps, per_step, records)
    log.info("batch plan: %.1f samples per %d-token pack -> train.micro_batches=%d (%s), train.steps=%d (%s); "
             "realised samples per step are logged", per_pack, cfg.data.pack_tokens, micro,
             f"{t.global_batch_samples} samples asked, ~{per_step:.0f} per step" if t.global_batch_samples > 0
             else "as given", steps, f"{t.epochs:g} epochs of {records} records" if t.epochs > 0 else "as given")
    train = dataclasses.replace(t, micro_batches=micro, steps=steps)
    return dataclasses.replace(cfg, train=train), plan
