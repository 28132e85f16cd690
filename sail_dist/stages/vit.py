"""SAIL-ViT progressive training, stages I-III (report Table 4 / section 3.1): the vision encoder is aligned to the
LLM in three steps of widening trainable scope and data."""
from __future__ import annotations

from sail_dist.stages.base import Stage

VIT_WARMUP = Stage(
    name="vit_warmup",
    summary="SAIL-ViT I, warm-up: only the adapter trains, on caption + OCR data (Table 4: lr 2e-4, bs 1920)",
    defaults={"train": {"train_modules": ["adapter"], "lr": 2.0e-4, "lr_schedule": "cosine", "warmup_steps": 100,
                        "global_batch_samples": 1920},
              "data": {"pack_tokens": 8192, "loss_reduction": "token"}},
)

VIT_ALIGN = Stage(
    name="vit_align",
    summary="SAIL-ViT II, fine-grained alignment: ViT + adapter train on captions, OCR, video captions "
            "(Table 4: lr 2e-5, bs 512)",
    defaults={"train": {"train_modules": ["vit", "adapter"], "lr": 2.0e-5, "lr_schedule": "cosine",
                        "warmup_steps": 100, "global_batch_samples": 512},
              "data": {"pack_tokens": 8192, "loss_reduction": "token"}},
)

VIT_WORLD = Stage(
    name="vit_world",
    summary="SAIL-ViT III, world knowledge: everything trains, one epoch over caption/OCR/QA/math/text "
            "(Table 4: lr 1e-5, bs 512, 1 epoch)",
    defaults={"train": {"train_modules": ["vit", "adapter", "llm"], "lr": 1.0e-5, "lr_schedule": "cosine",
                        "warmup_steps": 100, "global_batch_samples": 512, "epochs": 1.0},
              "data": {"pack_tokens": 8192, "loss_reduction": "token"}},
)
