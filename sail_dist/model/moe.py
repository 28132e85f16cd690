"""Qwen3-MoE block: softmax top-k router (norm_topk_prob), auxiliary load-balancing loss, per-expert load
statistics; the experts themselves are computed by the OpSet's `moe_experts`.

Parallelism is applied from outside: an expert-parallel backend swaps `MoE.experts` for a module that
dispatches tokens to the ranks holding their experts (sail_dist/parallel/expert.py) and back.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sail_dist.config import LLMConfig
from sail_dist.kernels.opset import OpSet


class AttachAuxLoss(torch.autograd.Function):
    """Identity on the activations whose backward also sends `grad_scale` into the aux loss.

    The aux loss then needs no path of its own to the final loss (Megatron's MoEAuxLossAutoScaler idea),
    which keeps pipeline stages and activation checkpointing oblivious to it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.grad_scale = grad_scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad_x, torch.full_like(aux, ctx.grad_scale), None


class Experts(nn.Module):
    """E SwiGLU experts stored fused: w_gate_up [E, D, 2F] (gate | up), w_down [E, F, D]."""

    def __init__(self, num_experts: int, dim: int, ffn: int, ops: OpSet) -> None:
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * ffn))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn, dim))
        self.ops = ops

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
        return self.ops.moe_experts(x_TD, topk_idx_TK, topk_w_TK, self.w_gate_up, self.w_down)


class MoE(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: OpSet) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.top_k, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_size, ops)
        # d(objective)/d(aux_loss) for this layer; the model sets coeff / n_moe_layers, a backend may rescale.
        self.aux_grad_scale = 0.0
        # Sums expert counts over the data-parallel group (set by a backend); None = this process only.
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.last_counts: torch.Tensor | None = None  # [E] token-slot counts of the last forward (global if reduced)
        self.last_aux: torch.Tensor | None = None

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (softmax probs [T,E] fp32, top-k expert ids [T,K], top-k weights [T,K] in x.dtype)."""
        probs_TE = F.softmax(self.router(x_TD), dim=-1, dtype=torch.float32)
        topk_w, topk_idx = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        return probs_TE, topk_idx, topk_w.to(x_TD.dtype)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE, topk_idx, topk_w = self.route(x_TD)
        y_TD = self.experts(x_TD, topk_idx, topk_w)
        with torch.no_grad():
            # (scatter_add, not bincount: bincount on CUDA reads the largest id back to the host to size its output;
            # and a fill, not torch.tensor(..., device=), which copies from pageable host memory: either makes the
            # host wait until the device's queue has drained, once per MoE layer)
            idx_S = topk_idx.reshape(-1)
            counts_E = x_TD.new_zeros(self.num_experts, dtype=torch.float32).scatter_add_(
                0, idx_S, torch.ones_like(idx_S, dtype=torch.float32))
            tokens = counts_E.new_full((1,), float(x_TD.shape[0]))
            if self.reduce_counts is not None:
                both = self.reduce_counts(torch.cat([counts_E, tokens]))
                counts_E, tokens = both[:-1], both[-1:]
            self.last_counts = counts_E
        # Switch/Qwen3-MoE load-balancing loss: E * sum_e f_e * P_e, f_e = share of token-slots routed to e
        # (from data-parallel-global counts when reduced), P_e = mean router probability of e (local, differentiable).
        aux = self.num_experts * (counts_E / tokens * probs_TE.mean(0)).sum()
        self.last_aux = aux.detach()
        if self.training and self.aux_grad_scale and torch.is_grad_enabled():
            y_TD = AttachAuxLoss.apply(y_TD, aux, self.aux_grad_scale)
        return y_TD
