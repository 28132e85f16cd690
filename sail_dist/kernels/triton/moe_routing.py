"""Expert-sorted routing metadata for MoE kernels (pure torch, no host sync).

Shared by the Triton experts and the torch (loop / grouped_mm) implementations in sail_dist/kernels/gpu.py; kept
apart from moe.py so that using it never defines Triton kernels (whose interpret-or-compile mode is fixed
when they are defined). Few launches on purpose: at these sizes a routing call costs mostly launch time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Routing", "route", "sort_by_expert"]


@dataclass
class Routing:
    """The expert-sorted view of the M = T*K (token, slot) pairs. All on the routing's device.

    offsets_E1: int32 [E+1]  expert e owns sorted rows offsets[e]:offsets[e+1]
    pos_M:      int32 [M]    sorted row -> flat slot t*K + k (where its output goes in [T*K, H])
    tok_M:      int32 [M]    sorted row -> token t (where its input comes from in x[T, H])
    expert_M:   int32 [M]    sorted row -> expert (non-decreasing)
    perm_M:     int64 [M]    pos_M as int64 (torch indexing)
    """
    offsets_E1: torch.Tensor
    pos_M: torch.Tensor
    tok_M: torch.Tensor
    expert_M: torch.Tensor
    perm_M: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.numel() - 1

    @property
    def num_rows(self) -> int:
        return self.pos_M.numel()

    @property
    def counts_E(self) -> torch.Tensor:
        return self.offsets_E1[1:] - self.offsets_E1[:-1]


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flat (token, slot) pairs by expert -> (sorted expert ids in the narrowest key
    type, perm int64: sorted row -> flat slot). Stable: rows of one expert keep token order, so results
    are deterministic."""
    # A radix sort makes one pass per key byte: the narrowest key type is the fastest sort.
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2 ** 15 else torch.int32
    return torch.sort(topk_idx_TK.reshape(-1).to(key_dtype), stable=True)


def route(topk_idx_TK: torch.Tensor, num_experts: int) -> Routing:
    """Sort the (token, slot) pairs by expert. Expert ids must lie in [0, num_experts)."""
    K = topk_idx_TK.shape[1]
    expert_M, perm_M = sort_by_expert(topk_idx_TK, num_experts)
    expert_M = expert_M.to(torch.int32)
    bounds = torch.arange(num_experts + 1, dtype=torch.int32, device=expert_M.device)
    offsets_E1 = torch.searchsorted(expert_M, bounds, out_int32=True)
    pos_M = perm_M.to(torch.int32)
    return Routing(offsets_E1=offsets_E1, pos_M=pos_M, tok_M=torch.div(pos_M, K, rounding_mode="floor"),
                   expert_M=expert_M, perm_M=perm_M)
