"""SAIL-VL2 pre-training (report section 3.2): basic multimodal pre-training with AdaLRS, then multi-task
pre-training without it."""
from __future__ import annotations

from sail_dist.stages.base import Stage

PRETRAIN_BASIC = Stage(
    name="pretrain_basic",
    summary="Pretrain 1, basic multimodal: the adapter trains on caption + OCR (128B tokens); the lr is searched "
            "online by AdaLRS from 2e-4 (report: found ~6.75e-4), bs 2048, seq 8192",
    defaults={"train": {"train_modules": ["adapter"], "lr": 2.0e-4, "lr_schedule": "cosine", "warmup_steps": 200,
                        "global_batch_samples": 2048, "adalrs": {"enabled": True}},
              "data": {"pack_tokens": 8192, "loss_reduction": "token"}},
)

PRETRAIN_MULTITASK = Stage(
    name="pretrain_multitask",
    summary="Pretrain 2, multi-task: everything trains on 180M samples (360B tokens), seq 8192, no AdaLRS "
            "(the report gives no lr for it: 1e-5 here)",
    defaults={"train": {"train_modules": ["vit", "adapter", "llm"], "lr": 1.0e-5, "lr_schedule": "cosine",
                        "warmup_steps": 200, "adalrs": {"enabled": False}},
              "data": {"pack_tokens": 8192, "loss_reduction": "token"}},
)
