"""The thinking stages' supervised parts (report sections 4.2.1-4.2.2): LongCoT SFT on `<think>` + `\\boxed{}`
chains, and Think-Fusion SFT on a 90 % direct / 10 % CoT mix with the dual-target objective (Eq. 3).

Think-Fusion's 90 / 10 split is two data sources (direct answers, CoT from RL rejection sampling:
`sail-rl-harvest`) with weights 0.9 / 0.1; the loader's SourceMix realises it exactly by sample count and the
objective logs the realised CoT fraction per step."""
from __future__ import annotations

from sail_dist.stages.base import Stage

LONGCOT_SFT = Stage(
    name="longcot_sft",
    summary="LongCoT SFT: 400K CoT records in <think>...</think> + \\boxed{} format, peak lr 1e-6 cosine, "
            "bs 1024, seq 20480 (Table 4)",
    defaults={"train": {"train_modules": ["vit", "adapter", "llm"], "lr": 1.0e-6, "lr_schedule": "cosine",
                        "warmup_steps": 50, "global_batch_samples": 1024},
              "data": {"pack_tokens": 20480, "loss_reduction": "token", "think_format": "longcot"}},
)

THINK_FUSION_SFT = Stage(
    name="think_fusion_sft",
    summary="Think-Fusion SFT: 90 % direct answers / 10 % CoT; loss on thought + answer for CoT samples, on the "
            "answer only for direct ones (Eq. 3)",
    defaults={"train": {"train_modules": ["vit", "adapter", "llm"], "lr": 1.0e-6, "lr_schedule": "cosine",
                        "warmup_steps": 50, "objective": "think_fusion"},
              "data": {"pack_tokens": 20480, "loss_reduction": "token", "think_format": "fusion"}},
)
