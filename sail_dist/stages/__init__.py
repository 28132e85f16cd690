"""The stages of the SAIL-VL2 recipe, picked by `sail-train --stage NAME` or `train.stage` (docs/recipe.md).

A new stage is one `Stage` (stages/base.py) in a file plus one line in `STAGES`.
"""
from __future__ import annotations

from sail_dist.registry import Registry
from sail_dist.stages.base import Stage

STAGES = Registry("stage", {
    "vit_warmup": "sail_dist.stages.vit:VIT_WARMUP",
    "vit_align": "sail_dist.stages.vit:VIT_ALIGN",
    "vit_world": "sail_dist.stages.vit:VIT_WORLD",
    "pretrain_basic": "sail_dist.stages.pretrain:PRETRAIN_BASIC",
    "pretrain_multitask": "sail_dist.stages.pretrain:PRETRAIN_MULTITASK",
    "sft_phase1": "sail_dist.stages.sft:SFT_PHASE1",
    "sft_phase2": "sail_dist.stages.sft:SFT_PHASE2",
    "sft_phase3": "sail_dist.stages.sft:SFT_PHASE3",
    "sft_phase4": "sail_dist.stages.sft:SFT_PHASE4",
    "longcot_sft": "sail_dist.stages.reasoning:LONGCOT_SFT",
    "think_fusion_sft": "sail_dist.stages.reasoning:THINK_FUSION_SFT",
    "rl_verifiable": "sail_dist.stages.rl:RL_VERIFIABLE",
    "rl_mixed": "sail_dist.stages.rl:RL_MIXED",
})


def get_stage(name: str) -> Stage:
    return STAGES.get(name)


def available_stages() -> list[str]:
    """The stage names in recipe order."""
    return STAGES.in_order()


__all__ = ["STAGES", "Stage", "available_stages", "get_stage"]
