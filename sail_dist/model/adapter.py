"""The vision-language adapter (`mlp1`): pixel shuffle then LayerNorm -> Linear -> GELU -> Linear."""
from __future__ import annotations

import torch
from torch import nn

from sail_dist.config import AdapterConfig
from sail_dist.data.batch import host_to_device


def pixel_shuffle_index(grid_hw: torch.Tensor, s: int) -> torch.Tensor:
    """Gather index that turns row-major patches of each image into merged tokens.

    InternVL's "v2" pixel shuffle (downsample 0.5) maps the s x s block at token (i, j) to one token
    whose channels are the block's patches in row-major order: [(2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)].
    Merged tokens are row-major over (i, j), image after image. Returns [P] indices into the patch stream.
    """
    pieces, offset = [], 0
    for h, w in grid_hw.tolist():
        if h % s or w % s:
            raise ValueError(f"image patch grid {h}x{w} is not divisible by the pixel-shuffle factor {s}")
        idx = torch.arange(h * w).view(h // s, s, w // s, s).permute(0, 2, 1, 3).reshape(-1)
        pieces.append(idx + offset)
        offset += h * w
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class Adapter(nn.Module):
    def __init__(self, cfg: AdapterConfig, vit_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.s = cfg.downsample
        merged = vit_dim * self.s ** 2
        hidden = cfg.hidden_size or llm_dim
        self.norm = nn.LayerNorm(merged, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(merged, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_dim)

    def forward(self, feats_PD: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """ViT features [P, Dv] -> LLM vision tokens [P / s^2, D_llm]."""
        idx = host_to_device(pixel_shuffle_index(grid_hw.cpu(), self.s), feats_PD.device)
        return self.project(feats_PD[idx].reshape(-1, feats_PD.shape[1] * self.s ** 2))

    def project(self, merged_NC: torch.Tensor) -> torch.Tensor:
        """The MLP on merged tokens (what train.compile compiles: the index above is host work over the grids)."""
        return self.fc2(self.act(self.fc1(self.norm(merged_NC))))
