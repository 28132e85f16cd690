"""The model recipe both engines call (torchtitan's `parallelize_fn`): one build order for every backend.

    build (seeded init / train.init_from) -> freeze -> compile -> activation checkpointing -> MoE hooks

Each step is an `apply_*` function applied from outside the model (the model is never forked). Compile comes
before checkpointing so that the checkpoint wraps the compiled forward (the recompute then runs compiled code).
What happens after the recipe is the engine's own: the GPU engine hands the model to DeepSpeed; the NPU engine
swaps in this rank's expert shard (parallel/expert.py) and cuts pipeline stages (parallel/pipeline.py).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from sail_dist.config import Config
from sail_dist.kernels.opset import OpSet
from sail_dist.model.build import build_model
from sail_dist.model.sailvl import SailVL
from sail_dist.parallel.checkpointing import apply_activation_checkpointing
from sail_dist.parallel.compile import apply_compile, start_compile_workers, use_compile_cache
from sail_dist.parallel.freeze import apply_freeze

log = logging.getLogger(__name__)


def apply_moe_hooks(model: nn.Module, aux_loss_weight: float,
                    reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None) -> int:
    """Give every MoE layer the gradient scale of its aux loss and the expert-count reduction over DP.

    `aux_loss_weight` is d(step objective)/d(aux loss averaged over the MoE layers) per micro-batch and rank, as
    the engine's framework will scale it (each engine derives it in its docstring); each layer gets its share of
    the average. Returns the number of MoE layers."""
    moe = model.moe_layers()
    for m in moe:
        m.aux_grad_scale = aux_loss_weight / len(moe)
        m.reduce_counts = reduce_counts
    return len(moe)


def build_train_model(cfg: Config, ops: OpSet, *, aux_loss_weight: float,
                      reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[SailVL, dict[str, int]]:
    """The model as every engine trains it; returns it with its trainable parameter counts per part
    (`aux_loss_weight`, `reduce_counts`: see `apply_moe_hooks`)."""
    t = cfg.train
    model = build_model(cfg.model, ops, seed=t.seed, init_from=t.init_from)
    trainable = apply_freeze(model, t.train_modules)
    if t.compile:
        use_compile_cache(t.compile_cache)
        start_compile_workers()
        apply_compile(model)
    ac = t.activation_checkpointing
    if n := apply_activation_checkpointing(model, ac.vit, ac.llm):
        log.info("activation checkpointing: %d blocks (vit=%s, llm=%s) recompute their forward in the backward",
                 n, ac.vit, ac.llm)
    apply_moe_hooks(model, aux_loss_weight, reduce_counts)
    return model, trainable
