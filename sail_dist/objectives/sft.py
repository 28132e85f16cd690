"""Supervised next-token loss with the data pipeline's reduction (token / sample / square), normalised over the step.

The reduction is carried per token by `PackedBatch.loss_weight` (token: 1, sample: 1/n, square: 1/sqrt(n), 0 where
there is no label; set by `data.loss_reduction`). The step objective is sum(w * ce) / sum(w), both sums over every
micro-batch on every data-parallel rank.
"""
from __future__ import annotations

import torch

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.model.sailvl import ModelOutput
from sail_dist.objectives.base import AllReduce, LossShare, Objective


class SFTObjective(Objective):
    name = "sft"

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        self.weight_sum = float("nan")

    def begin_step(self, micro_batches: list[PackedBatch], all_reduce: AllReduce) -> None:
        local = torch.tensor([sum(float(mb.loss_weight.double().sum()) for mb in micro_batches)], dtype=torch.float64)
        self.weight_sum = float(all_reduce(local).item())
        if self.weight_sum <= 0:
            raise RuntimeError("this optimizer step has no supervised token on any rank (all labels are -100): "
                               "check the chat template / data (assistant turns carry the labels)")

    def loss(self, out: ModelOutput, batch: PackedBatch) -> LossShare:
        return LossShare((out.loss_T * batch.loss_weight.to(out.loss_T.dtype)).sum() / self.weight_sum)
