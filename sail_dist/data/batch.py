"""PackedBatch: the one thing the data pipeline hands to a model (see docs/ARCHITECTURE.md).

A micro-batch is ONE packed token stream of several samples. No sample attends to another: every
attention in the model is variable-length over `cu_seqlens`.

Label convention: `labels[t]` is the target for the token AT position t (already shifted: the next
token of the same sample), -100 where there is no loss, always -100 at the last token of a sample,
so no target ever crosses a sample boundary.

Vision convention: images are given as flattened patches. Image i is a grid of `image_grid_hw[i]`
patches (rows, cols), its patches row-major in `pixel_values`; a fixed-resolution 448 tile is the
32 x 32 grid. After the 2 x 2 pixel-shuffle image i yields (rows/2)*(cols/2) vision tokens, which
replace the `<IMG_CONTEXT>` tokens of `input_ids` in order (image 0 first).

Objective inputs: `extras` carries whatever an objective needs beyond the labels, per token ([T, ...]) or per
sequence ([S, ...]): old log-probs, advantages, target masks. Engines move it with the batch and never read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto a CUDA `device` through page-locked memory, non-blocking: a copy from pageable memory
    makes the host wait until the device's queue has drained. Other devices: a plain `.to`."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, next-token targets, -100 = no loss
    position_ids: torch.Tensor  # [T] int64, reset to 0 at each sample
    cu_seqlens: torch.Tensor  # [S+1] int32, leading 0
    max_seqlen: int
    loss_weight: torch.Tensor  # [T] float32: per-token weight of the chosen reduction (token 1, sample 1/n, square 1/sqrt n); 0 where labels == -100
    pixel_values: torch.Tensor | None = None  # [P, C*patch*patch] float, channel-major patches
    image_grid_hw: torch.Tensor | None = None  # [n_images, 2] int64, patch rows and cols per image (host tensor)
    sample_ids: list = field(default_factory=list)  # one id per packed sample, in stream order
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # objective inputs, [T, ...] or [S, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_hw is None else int(self.image_grid_hw.shape[0])

    def n_vision_tokens(self, downsample: int = 2) -> int:
        if self.image_grid_hw is None:
            return 0
        g = self.image_grid_hw
        return int(((g[:, 0] // downsample) * (g[:, 1] // downsample)).sum())

    def seqlens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copies of the host tensors, so that `.to(cuda)` neither blocks the host nor waits for
        the device's queue to drain (a pageable host-to-device copy does both)."""
        def pin(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory() if t.device.type == "cpu" else t

        out = {f.name: pin(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **out, extras={k: pin(v) for k, v in self.extras.items()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PackedBatch":
        """Move tensors to `device`; `dtype` applies to pixel_values only. `image_grid_hw` stays on the host: it is
        metadata that the ViT and the adapter read on the host (from the device, every read would be a host sync)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and f.name != "image_grid_hw":
                v = v.to(device, non_blocking=True)
                if f.name == "pixel_values" and dtype is not None:
                    v = v.to(dtype)
            out[f.name] = v
        out["extras"] = {k: v.to(device, non_blocking=True) for k, v in self.extras.items()}
        return replace(self, **out)

    def validate(self, downsample: int = 2, img_context_id: int | None = None) -> None:
        """Check the contract; raises ValueError naming the violated invariant."""
        T = self.num_tokens
        for name in ("labels", "position_ids", "loss_weight"):
            if getattr(self, name).shape != (T,):
                raise ValueError(f"PackedBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected ({T},)")
        cu = self.cu_seqlens
        if cu.dtype != torch.int32 or cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != T:
            raise ValueError(f"PackedBatch.cu_seqlens must be int32 [S+1] from 0 to T={T}, got {cu.tolist()[:8]}...")
        lens = self.seqlens()
        if min(lens, default=1) <= 0:
            raise ValueError(f"PackedBatch has an empty sample: seqlens {lens}")
        if max(lens, default=0) != self.max_seqlen:
            raise ValueError(f"PackedBatch.max_seqlen={self.max_seqlen} but the longest sample has {max(lens)} tokens")
        expect_pos = torch.cat([torch.arange(n) for n in lens]) if lens else torch.zeros(0, dtype=torch.long)
        if not torch.equal(self.position_ids.cpu(), expect_pos):
            raise ValueError("PackedBatch.position_ids must restart at 0 for every sample")
        if bool((self.labels[cu[1:].long() - 1] != -100).any()):
            raise ValueError("PackedBatch.labels must be -100 at the last token of each sample (no cross-sample target)")
        for k, v in self.extras.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] not in (T, len(lens)):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"PackedBatch.extras[{k!r}] is {got}: expected a tensor per token [{T}, ...] or per "
                                 f"sequence [{len(lens)}, ...]")
        if len(self.sample_ids) not in (0, len(lens)):
            raise ValueError(f"PackedBatch.sample_ids has {len(self.sample_ids)} ids for {len(lens)} samples")
        if img_context_id is not None:
            n_ctx = int((self.input_ids == img_context_id).sum())
            n_vis = self.n_vision_tokens(downsample)
            if n_ctx != n_vis:
                raise ValueError(f"PackedBatch has {n_ctx} <IMG_CONTEXT> tokens but its images give {n_vis} vision tokens")
