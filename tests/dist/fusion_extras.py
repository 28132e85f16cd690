"""Synthetic Think-Fusion marks for the engine runs (tests/dist/engine_run.py, npu_run.py) under
train.objective=think_fusion: what SampleBuilder.collate builds under data.think_format=fusion, on synthetic batches.

Per sample: is_cot_S alternates (seeded start, so every step has both kinds); thought_T marks the first ~40 % of the
sample's labelled positions (the think block comes first in an answer)."""
from __future__ import annotations

import torch

from sail_dist.data.batch import PackedBatch


def add_fusion_extras(batch: PackedBatch, seed: int) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(0, 2, (1,), generator=g))
    is_cot_S = torch.tensor([float((first + s) % 2) for s in range(batch.num_samples)])
    thought_T = torch.zeros(batch.num_tokens)
    cu = batch.cu_seqlens.tolist()
    for a, e in zip(cu[:-1], cu[1:]):
        labelled = (batch.labels[a:e] != -100).nonzero().flatten() + a
        thought_T[labelled[:max(1, int(0.4 * len(labelled)))]] = 1.0
    batch.extras = {**batch.extras, "thought_T": thought_T, "is_cot_S": is_cot_S}
    return batch
