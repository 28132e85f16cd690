"""The sampler's preallocated KV cache: one [L, B, S, Hkv, Hd] tensor each for K and V.

Slot b holds one sequence (prompt + generation) at rows [0, length); `k[i]` / `v[i]` are layer i's
[B, S, Hkv, Hd] views (BSND: the layout flash-attn's KV-cache kernel and torch_npu's incremental attention
take as is), which is all the model's prefill / decode paths read (sail_dist/model/qwen3.py).
"""
from __future__ import annotations

import torch

from sail_dist.config import LLMConfig


class KVCache:
    def __init__(self, cfg: LLMConfig, slots: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.num_layers, slots, seq_len, cfg.num_kv_heads, cfg.head_dim)
        # Zeros, not empty: rows past a slot's length are masked, but uninitialised memory could hold NaN/inf,
        # and an idle slot's garbage row must stay finite.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def matches(self, slots: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.slots, self.seq_len, self.k.dtype, self.k.device) == (slots, seq_len, dtype, device)

    def copy_slots(self, src_N: torch.Tensor, dst_N: torch.Tensor, length: int) -> None:
        """Rows [0, length) of slot src_N[i] into slot dst_N[i], every layer (a prompt's prefill shared by its
        rollouts)."""
        if src_N.numel():
            self.k[:, dst_N, :length] = self.k[:, src_N, :length]
            self.v[:, dst_N, :length] = self.v[:, src_N, :length]
