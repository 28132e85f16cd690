"""The Objective seam: what a training step minimises, written once for both engines.

An objective turns the model's outputs on one packed micro-batch into that micro-batch's SHARE of the step
objective: the step objective is the sum of the shares over every micro-batch on every data-parallel rank.
Step-global quantities a share needs (the step's total loss weight, the number of sequences, ...) are computed
in `begin_step` from all of this rank's micro-batches and summed over the data-parallel ranks with the
`all_reduce` the engine hands in, so the loss and its gradients do not depend on how the step is split into
micro-batches or ranks (the bug peers' users hit: transformers PR #34191, torchtune PR #1875).

Each engine back-propagates the shares and undoes its framework's own averaging (DeepSpeed's 1/M per
micro-batch and DP mean; Megatron's division by the summed per-micro-batch counts), and reports the sums.
Whatever else an objective needs per token ([T]) or per sequence ([S]) rides on `PackedBatch.extras`
(old log-probs, advantages, target masks), so a new objective needs no engine change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.model.sailvl import ModelOutput

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # in-place sum over the data-parallel ranks; returns its input


@dataclass
class LossShare:
    """One micro-batch's share of the step objective (with grad) and of each step metric (detached).

    Every metric is a share too: its step value is the sum over micro-batches and ranks (engines add them up)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """Base class: override `begin_step` and `loss`; list the metric names `loss` returns in `metrics`.

    Built once per engine with the run's Config (`build_objective(name, cfg)`), from which an objective reads
    its own knobs (e.g. `cfg.rl.loss`); `cfg` is None in unit tests of objectives that take no knobs."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()  # the same names on every rank, in this order (they are all-reduced)

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg

    def begin_step(self, micro_batches: list[PackedBatch], all_reduce: AllReduce) -> None:
        """Compute the step-global normalisation from this rank's micro-batches (collective over DP)."""
        raise NotImplementedError

    def loss(self, out: ModelOutput, batch: PackedBatch) -> LossShare:
        """This micro-batch's share of the step objective; called after `begin_step` for the same step."""
        raise NotImplementedError

