"""RMSNorm through the OpSet (shared by the ViT and the LLM)."""
from __future__ import annotations

import torch
from torch import nn

from sail_dist.kernels.opset import OpSet


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: OpSet) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
