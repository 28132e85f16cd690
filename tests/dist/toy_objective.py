"""A second objective for the Objective-seam test (tests/test_objective_seam.py); registered as "toy" on import.

Unlike SFT it is sequence-level and reads per-token and per-sequence extras of the PackedBatch (what RL and
Think-Fusion objectives do). The step objective, over every sequence s of the step (all micro-batches, all ranks):

    sum_s seq_weight[s] * mean_{t in s, labelled} advantage[t] * ce[t]  /  sum_s seq_weight[s]

and its metric "weighted_ce" is the same with advantage = 1.
"""
from __future__ import annotations

import torch

from sail_dist.data.batch import PackedBatch
from sail_dist.model.sailvl import ModelOutput
from sail_dist.objectives import AllReduce, LossShare, Objective, register_objective


def add_toy_extras(batch: PackedBatch, seed: int) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    batch.extras = {"advantage": torch.randn(batch.num_tokens, generator=g),
                    "seq_weight": torch.rand(batch.num_samples, generator=g) + 0.5}
    return batch


class ToyObjective(Objective):
    name = "toy"
    metrics = ("weighted_ce",)

    def begin_step(self, micro_batches: list[PackedBatch], all_reduce: AllReduce) -> None:
        local = torch.tensor([sum(float(mb.extras["seq_weight"].double().sum()) for mb in micro_batches)],
                             dtype=torch.float64)
        self.total = float(all_reduce(local).item())

    def loss(self, out: ModelOutput, batch: PackedBatch) -> LossShare:
        ce_T = out.loss_T
        mask_T = (batch.labels != -100).to(ce_T.dtype)
        seq_T = torch.repeat_interleave(torch.arange(batch.num_samples, device=ce_T.device),
                                        (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long())

        def seq_mean(x_T: torch.Tensor) -> torch.Tensor:
            zeros = torch.zeros(batch.num_samples, dtype=ce_T.dtype, device=ce_T.device)
            return zeros.index_add(0, seq_T, x_T * mask_T) / zeros.index_add(0, seq_T, mask_T).clamp_min(1.0)

        w_S = batch.extras["seq_weight"].to(ce_T.dtype)
        loss = (w_S * seq_mean(batch.extras["advantage"].to(ce_T.dtype) * ce_T)).sum() / self.total
        return LossShare(loss, {"weighted_ce": (w_S * seq_mean(ce_T.detach())).sum() / self.total})


register_objective("toy", ToyObjective)
