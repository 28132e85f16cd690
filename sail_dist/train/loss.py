"""Loss reduction normalised over the whole optimizer step.

Each token carries a raw weight from the data pipeline (token: 1, sample: 1/n, square: 1/sqrt(n), 0 for
no label). The step's objective is sum(w * ce) / sum(w), both sums over EVERY micro-batch on EVERY
data-parallel rank, so the loss and its gradients do not depend on how the step is split into
micro-batches or ranks (the bug peers' users hit: transformers PR #34191, torchtune PR #1875).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sail_dist.data.batch import PackedBatch


def global_weight_sum(micro_batches: list[PackedBatch], group: dist.ProcessGroup | None = None,
                      device: torch.device | None = None) -> float:
    """sum(loss_weight) over this rank's micro-batches, all-reduced over the data-parallel `group`."""
    local = torch.tensor([sum(float(mb.loss_weight.double().sum()) for mb in micro_batches)], dtype=torch.float64,
                         device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local, group=group)
    total = float(local.item())
    if total <= 0:
        raise RuntimeError("this optimizer step has no supervised token on any rank (all labels are -100): "
                           "check the chat template / data (assistant turns carry the labels)")
    return total


def micro_batch_loss(loss_T: torch.Tensor, batch: PackedBatch, weight_sum: float) -> torch.Tensor:
    """This micro-batch's share of the step objective: sum(w * ce) / W_step."""
    return (loss_T * batch.loss_weight.to(loss_T.dtype)).sum() / weight_sum
