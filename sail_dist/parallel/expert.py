"""Expert parallelism: expert placement and all-to-all token dispatch around the OpSet's experts.

Placement: EP rank r of an expert-parallel group of size ep holds the contiguous block of experts
[r * E/ep, (r + 1) * E/ep) (Megatron-core's layout), as slices of the fused weights w_gate_up
[E_local, D, 2F] and w_down [E_local, F, D].

Dispatch, per MoE layer and micro-batch (what Megatron's alltoall token dispatcher does, on our
process group and our kernels):
  1. token-slot rows (token t, slot j) sorted by expert (stable: ascending token within an expert), so
     rows bound for each EP rank are contiguous;
  2. per-expert counts exchanged (all-to-all) -> send/receive split sizes (a host sync, as on Megatron);
  3. all-to-all of the rows (autograd: its backward is the reverse all-to-all);
  4. local experts on the received rows through the OpSet's `moe_experts` (each row routed to its local
     expert with K = 1 and weight 1: the fused permute -> grouped GEMM -> unpermute path);
  5. all-to-all back, rows restored to (token, slot) order, combined with the routing weights
     (sum_j w[t, j] * y[t, j]), so the gradient reaches the router through the weights.
The result equals the unsharded `Experts` (up to float summation order).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The experts EP rank `ep_rank` holds: a contiguous block of num_experts / ep_size."""
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts cannot be split evenly over ep={ep_size} ranks")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} outside [0, {ep_size})")
    n = num_experts // ep_size
    return range(ep_rank * n, (ep_rank + 1) * n)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((sum(ctx.in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out, output_split_sizes=ctx.in_splits,
                               input_split_sizes=ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows: send `in_splits[r]` rows of x to rank r, receive `out_splits[r]` from r."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """Drop-in replacement for `model.moe.Experts` that holds only this EP rank's experts.

    Parameter names stay `w_gate_up` / `w_down` (local slices); they are marked `allreduce = False` so
    data-parallel gradient reduction runs over the expert-data-parallel group only (Megatron DDP).
    """

    def __init__(self, experts: nn.Module, group, ep_rank: int | None = None, ep_size: int | None = None) -> None:
        super().__init__()
        self.group = group
        self.ep_size = ep_size if ep_size is not None else dist.get_world_size(group)
        self.ep_rank = ep_rank if ep_rank is not None else dist.get_rank(group)
        self.num_experts = experts.w_gate_up.shape[0]
        self.local = expert_range(self.num_experts, self.ep_size, self.ep_rank)
        sl = slice(self.local.start, self.local.stop)
        self.w_gate_up = nn.Parameter(experts.w_gate_up.detach()[sl].clone(),
                                      requires_grad=experts.w_gate_up.requires_grad)
        self.w_down = nn.Parameter(experts.w_down.detach()[sl].clone(), requires_grad=experts.w_down.requires_grad)
        for p in (self.w_gate_up, self.w_down):
            p.allreduce = False  # Megatron DDP: expert-parallel parameter (reduced over expert-DP only)
            p.expert_parallel = (self.ep_rank, self.ep_size)  # for checkpoints: slice ep_rank of ep_size on dim 0
        self.ops = experts.ops

    def extra_repr(self) -> str:
        return (f"experts {self.local.start}-{self.local.stop - 1} of {self.num_experts} "
                f"(ep rank {self.ep_rank}/{self.ep_size})")

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        D = x_TD.shape[-1]
        E, ep, E_local = self.num_experts, self.ep_size, len(self.local)
        flat_idx = topk_idx_TK.reshape(-1)
        # 1. slots sorted by expert: rows for EP rank r are the contiguous block of experts r*E_local...
        order = torch.argsort(flat_idx, stable=True)
        x_sorted = x_TD[order // K]
        counts_E = torch.bincount(flat_idx, minlength=E)
        # 2. how many rows each rank sends me for each of my experts: recv_counts[src, local expert]
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_counts = recv_counts.view(ep, E_local)
        in_splits = counts_E.view(ep, E_local).sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        # 3. rows out to the ranks holding their experts
        recv_x = all_to_all(x_sorted, out_splits, in_splits, self.group)
        # 4. local experts; received rows are ordered (source rank, local expert)
        local_ids = torch.repeat_interleave(torch.arange(E_local, device=x_TD.device).repeat(ep),
                                            recv_counts.reshape(-1))
        ones = torch.ones(recv_x.shape[0], 1, dtype=topk_w_TK.dtype, device=x_TD.device)
        y_recv = self.ops.moe_experts(recv_x, local_ids[:, None], ones, self.w_gate_up, self.w_down)
        # 5. back to the senders, back to (token, slot) order, weighted sum over the K slots
        y_sorted = all_to_all(y_recv, in_splits, out_splits, self.group)
        y_slots = y_sorted[torch.argsort(order)].view(T, K, D)
        return (y_slots * topk_w_TK.unsqueeze(-1).to(y_slots.dtype)).sum(1)


def apply_expert_parallel(model: nn.Module, group, ep_rank: int | None = None, ep_size: int | None = None) -> int:
    """Swap every MoE layer's `experts` for this rank's `ExpertParallelExperts`; returns the number swapped."""
    n = 0
    for m in model.modules():
        if hasattr(m, "experts") and hasattr(m, "aux_grad_scale") and not isinstance(m.experts, ExpertParallelExperts):
            m.experts = ExpertParallelExperts(m.experts, group, ep_rank, ep_size)
            n += 1
    return n
