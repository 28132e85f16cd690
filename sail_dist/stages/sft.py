"""SFT phases 1-4 (report section 4.1): everything trains; the phases differ in their data mix
(general -> SAIL-Instruction2 -> reasoning -> image:video 1:1) and phase 4's longer sequences. The report gives
no SFT learning rate or batch: 1e-5 and the square-root loss reduction (InternVL's choice) are ours.

Phase 4's image:video 1:1 is by sample count, through the loader's source mix: the stage requires every source to
declare `modality: image|video` with equal total weight on each side (SourceMix realises every source's share
exactly over any window), and the loader logs the realised split per step.
"""
from __future__ import annotations

from typing import Callable

from sail_dist.config import Config
from sail_dist.stages.base import Stage

_SFT = {"train_modules": ["vit", "adapter", "llm"], "lr": 1.0e-5, "lr_schedule": "cosine", "warmup_steps": 100}


def _sft(pack_tokens: int = 8192) -> dict:
    return {"train": dict(_SFT), "data": {"pack_tokens": pack_tokens, "loss_reduction": "square"}}


SFT_PHASE1 = Stage("sft_phase1", "SFT phase 1: general instruction data, seq 8192", _sft())
SFT_PHASE2 = Stage("sft_phase2", "SFT phase 2: SAIL-Instruction2, seq 8192", _sft())
SFT_PHASE3 = Stage("sft_phase3", "SFT phase 3: reasoning data, seq 8192", _sft())


class VideoBalancedStage(Stage):
    """A stage whose mix must be image:video 1:1 by sample count."""

    def check(self, cfg: Config, err: Callable[[str, str], None]) -> None:
        super().check(cfg, err)
        if cfg.data.demo:
            err("data.demo", f"stage {self.name!r} mixes image and video sources 1:1; the demo dataset has one "
                "image source: list data.sources with `modality: image` and `modality: video`")
        side = {"image": 0.0, "video": 0.0}
        for i, s in enumerate(cfg.data.sources):
            if s.modality not in side:
                err(f"data.sources[{i}].modality", f"stage {self.name!r} balances image:video 1:1 by sample "
                    f"count: declare each source `modality: image` or `modality: video` (got {s.modality!r})")
                continue
            side[s.modality] += s.weight
        if side["image"] <= 0 or side["video"] <= 0:
            err("data.sources", f"stage {self.name!r} needs at least one image and one video source")
        if abs(side["image"] - side["video"]) > 1e-9 * max(side.values()):
            err("data.sources", f"stage {self.name!r} mixes image:video 1:1 by sample count, but the image sources' "
                f"weights sum to {side['image']:g} and the video sources' to {side['video']:g}: make them equal")


SFT_PHASE4 = VideoBalancedStage("sft_phase4", "SFT phase 4: image:video 1:1 by sample count, seq 16384",
                                _sft(pack_tokens=16384))
