"""SAIL-ViT (AIMv2-style ViT): the vision encoder.

Input is a packed stream of images given as flattened patches plus each image's patch grid, so the
fixed-resolution path (448 tiles = 32 x 32 grids) and AnyRes (any grid, position embedding
interpolated bicubically from the learned 32 x 32 table) are the same code. Attention is
variable-length per image: patches of one image never attend to another image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sail_dist.config import ViTConfig
from sail_dist.data.batch import host_to_device
from sail_dist.kernels.opset import OpSet
from sail_dist.model.norm import RMSNorm


class ViTBlock(nn.Module):
    """Pre-norm block: x + attn(norm_1(x)); x + SwiGLU(norm_2(x)). No biases (AIMv2 `use_bias: false`)."""

    def __init__(self, cfg: ViTConfig, ops: OpSet) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm_1 = RMSNorm(D, cfg.rms_norm_eps, ops)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.norm_2 = RMSNorm(D, cfg.rms_norm_eps, ops)
        self.mlp_in = nn.Linear(D, 2 * cfg.ffn_size, bias=False)  # [gate (fc1); up (fc3)]
        self.mlp_out = nn.Linear(cfg.ffn_size, D, bias=False)  # fc2
        self.ops = ops

    def forward(self, x_PD: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        P, D = x_PD.shape
        # unbind: one backward node stacks dq, dk, dv (three selects would zero-fill and add into the qkv gradient)
        q_PHd, k_PHd, v_PHd = self.qkv(self.norm_1(x_PD)).view(P, 3, self.num_heads, D // self.num_heads).unbind(1)
        o_PHd = self.ops.attention(q_PHd, k_PHd, v_PHd, cu_seqlens, max_seqlen, causal=False)
        x_PD = x_PD + self.proj(o_PHd.reshape(P, D))
        return x_PD + self.mlp_out(self.ops.swiglu(self.mlp_in(self.norm_2(x_PD))))


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch) as a Linear on flattened channel-major patches, then RMSNorm."""

    def __init__(self, cfg: ViTConfig, ops: OpSet) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, patches_PC: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(patches_PC))


class SailViT(nn.Module):
    def __init__(self, cfg: ViTConfig, ops: OpSet) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, ops)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, cfg.hidden_size))
        self.blocks = nn.ModuleList(ViTBlock(cfg, ops) for _ in range(cfg.num_layers))
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def position_embedding(self, grid_hw: torch.Tensor) -> torch.Tensor:
        """[sum(h*w), D]: the learned table as is for the native grid, bicubically resized for any other."""
        g = self.cfg.grid
        table = self.pos_embed[0]
        pieces = []
        for h, w in grid_hw.tolist():
            if (h, w) == (g, g):
                pieces.append(table)
            else:
                grid_1DGG = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)
                resized = F.interpolate(grid_1DGG.float(), size=(h, w), mode="bicubic", align_corners=False)
                pieces.append(resized.to(table.dtype)[0].flatten(1).t())
        return torch.cat(pieces, 0)

    def forward(self, patches_PC: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """patches [P, 3*ps*ps] (image after image, row-major) and grids [n, 2] -> features [P, D]."""
        grid_hw = grid_hw.cpu()  # (host metadata: PackedBatch.to keeps it there)
        lens = (grid_hw[:, 0] * grid_hw[:, 1]).to(torch.int32)
        if int(lens.sum()) != patches_PC.shape[0]:
            raise ValueError(f"image grids cover {int(lens.sum())} patches but pixel_values has {patches_PC.shape[0]}")
        cu_seqlens = host_to_device(F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0)), patches_PC.device)
        max_seqlen = int(lens.max())
        x_PD = self.patch_embed(patches_PC) + self.position_embedding(grid_hw)
        for block in self.blocks:
            x_PD = block(x_PD, cu_seqlens, max_seqlen)
        return self.post_norm(x_PD)
