"""The RL stages of the thinking recipe (report sections 4.2.3 and 4.2.5; ../shared/reference/sailvl2.md table):
RL with verifiable rewards after LongCoT SFT, and RL with mixed rewards after Think-Fusion SFT. Both run the RL loop
(sail_dist/rl/loop.py). Report values: all modules trained, lr 1e-6 (constant), context 16384, generation 4096,
2048 rollouts per episode (here 128 prompts x 16), 8 updates per episode, DAPO clip 0.20 / 0.28; GSPO (MoE) with
EasyR1's 3e-4 / 4e-4. Rewards: answer (`\\boxed{}` checked) + format (`<think>` tags) for rl_verifiable; answer +
think + format, with an LVM judge for prompts that have no checkable answer (rl.reward.judge), for rl_mixed.

The policy loss follows the model kind: DAPO for dense models, GSPO for MoE ones. `train.objective` left at its
dataclass default (`sft`, which an RL stage never runs) is resolved that way by the stage's `check`; setting
`train.objective=dapo|gspo` overrides it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sail_dist.config import Config
from sail_dist.stages.base import Stage

POLICY_OBJECTIVES = ("dapo", "gspo")


def policy_objective(cfg: Config) -> str:
    """dapo for a dense model, gspo for an MoE one (the report's choice)."""
    return "gspo" if cfg.model.llm.num_experts > 0 else "dapo"


@dataclass(frozen=True)
class RLStage(Stage):
    def check(self, cfg: Config, err: Callable[[str, str], None]) -> None:
        super().check(cfg, err)
        if cfg.train.objective == "sft":  # the dataclass default: pick by model kind
            cfg.train.objective = policy_objective(cfg)
        if cfg.train.objective not in POLICY_OBJECTIVES:
            err("train.objective", f"stage {self.name!r} trains a policy loss: {cfg.train.objective!r} is not one of "
                f"{', '.join(POLICY_OBJECTIVES)} (leave it unset to pick by model kind: dense -> dapo, MoE -> gspo)")
        if not cfg.rl.prompts:
            err("rl.prompts", f"stage {self.name!r} needs prompt JSONL files with ground truth: set rl.prompts "
                "(docs/rl.md; `sail-rl-filter` keeps the prompts of useful difficulty)")


_COMMON = {
    "train": {"train_modules": ["vit", "adapter", "llm"], "lr": 1.0e-6, "lr_schedule": "constant", "warmup_steps": 0,
              "min_lr": 1.0e-6},
    "rl": {"prompts_per_episode": 128, "group_size": 16, "ppo_updates": 8,
           "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4096, "max_context": 16384},
           "loss": {"dapo_clip": [0.20, 0.28], "gspo_clip": [3.0e-4, 4.0e-4], "kl_coef": 0.0,
                    "dynamic_sampling": True}},
    "data": {"pack_tokens": 16384},
}


def _with(reward: dict) -> dict:
    return {**_COMMON, "rl": {**_COMMON["rl"], "reward": reward}}


RL_VERIFIABLE = RLStage(
    name="rl_verifiable",
    summary="RL with verifiable rewards: DAPO (dense) / GSPO (MoE), answer (\\boxed{}) + format rewards, ctx 16384, "
            "gen 4096, 2048 rollouts/episode, 8 updates, lr 1e-6, clip 0.20/0.28 (section 4.2.3)",
    defaults=_with({"weights": {"answer": 1.0, "format": 0.5}}),
    runner="sail_dist.rl.loop:train_rl",
)

RL_MIXED = RLStage(
    name="rl_mixed",
    summary="RL with mixed rewards after Think-Fusion: answer + think + format, an LVM judge (rl.reward.judge) for "
            "prompts without a checkable answer; same loss and shapes as rl_verifiable (section 4.2.5)",
    defaults=_with({"weights": {"answer": 1.0, "think": 0.5, "format": 0.5}}),
    runner="sail_dist.rl.loop:train_rl",
)
