"""Synthetic packed batches of a given shape (benchmarks, engine tests): random tokens and patches, with
image spans laid out exactly as the chat template lays them out (`<img>` + `<IMG_CONTEXT>` x n + `</img>`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sail_dist.config import ModelConfig
from sail_dist.data.batch import PackedBatch


def synthetic_batch(cfg: ModelConfig, seqlens: list[int], images: list[list[tuple[int, int]]] | None = None,
                    seed: int = 0, sample_ids: list | None = None) -> PackedBatch:
    """One packed micro-batch. `seqlens[i]` = tokens of sample i (its image spans included); `images[i]` = patch
    grids of its images, e.g. [(32, 32)] * 3 for three 448 tiles. Every token but each sample's last has a label."""
    g = torch.Generator().manual_seed(seed)
    images = images or [[] for _ in seqlens]
    t, s = cfg.tokens, cfg.adapter.downsample
    low = max(t.img_context, t.img_end, t.im_end, t.pad) + 1 if cfg.llm.vocab_size > 200 else 16
    ids, patches, grids = [], [], []
    for n, grids_i in zip(seqlens, images):
        spans = [torch.tensor([t.img_start] + [t.img_context] * ((h // s) * (w // s)) + [t.img_end])
                 for h, w in grids_i]
        n_text = n - sum(len(x) for x in spans)
        if n_text < 1:
            raise ValueError(f"a sample of {n} tokens cannot hold images of {sum(len(x) for x in spans)} tokens")
        ids.append(torch.cat([torch.randint(low, cfg.llm.vocab_size, (1,), generator=g), *spans,
                              torch.randint(low, cfg.llm.vocab_size, (n_text - 1,), generator=g)]))
        for h, w in grids_i:
            patches.append(torch.randn(h * w, 3 * cfg.vit.patch_size ** 2, generator=g))
            grids.append((h, w))
    input_ids = torch.cat(ids)
    labels = torch.cat([torch.cat([x[1:], torch.tensor([-100])]) for x in ids])
    labels[input_ids == t.img_context] = -100
    labels[torch.roll(input_ids == t.img_context, -1)] = -100  # no target pointing into an image span
    return PackedBatch(
        input_ids=input_ids, labels=labels, position_ids=torch.cat([torch.arange(n) for n in seqlens]),
        cu_seqlens=F.pad(torch.cumsum(torch.tensor(seqlens), 0), (1, 0)).to(torch.int32), max_seqlen=max(seqlens),
        loss_weight=(labels != -100).to(torch.float32),
        pixel_values=torch.cat(patches) if patches else None,
        image_grid_hw=torch.tensor(grids, dtype=torch.long) if grids else None,
        sample_ids=list(sample_ids) if sample_ids is not None else list(range(len(seqlens))))
