"""The torch_npu emulation (kernels/npu/emulation.py) and the NPU OpSet on top of it (kernels/npu/ops.py).

Part 1 encodes every documented example, index convention and round trip of shared/reference/npu.md
section 1 (section numbers in the test names' docstrings). Part 2 checks that the `npu_emulated` OpSet
matches the reference OpSet, outputs and gradients, in fp64 and fp32. Part 3 checks the grouped-matmul
autograd Function's backward structure and the real-NPU guard. CPU only, a few seconds.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from sail_dist.kernels import get_opset
from sail_dist.kernels.npu import emulation as npu
from sail_dist.kernels.npu import ops as npu_ops

REF = get_opset("reference")
I32 = torch.int32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ===================================================================================================
# Part 1: documented semantics
# ===================================================================================================

# --- 1.6 token permute / unpermute -----------------------------------------------------------------

DOC_TOKENS = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
DOC_INDICES = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_token_permute_doc_example(index_dtype):
    """1.6 doc example: permuted [1,2,3,4,1,2,3,4], sorted_indices [0,4,5,1,2,6,7,3] (int32)."""
    permuted, sorted_indices = npu.npu_moe_token_permute(DOC_TOKENS, DOC_INDICES.to(index_dtype))
    assert permuted.tolist() == [[v, v] for v in [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]]
    assert sorted_indices.tolist() == [0, 4, 5, 1, 2, 6, 7, 3]
    assert sorted_indices.dtype == I32 and permuted.dtype == DOC_TOKENS.dtype


def test_token_permute_sorted_indices_is_inverse_of_megatron():
    """1.6: rows expert-major / token-ascending; sorted_indices[t*K+j] = row of (t, j) = inverse of argsort."""
    g = _gen(0)
    tokens = torch.randn(11, 3, generator=g)
    indices = torch.rand(11, 4, generator=g).topk(3).indices  # distinct experts per token, as a router gives
    permuted, sorted_indices = npu.npu_moe_token_permute(tokens, indices)
    megatron_order = torch.argsort(indices.reshape(-1), stable=True)  # dst row -> src flat index
    assert torch.equal(sorted_indices[megatron_order].long(), torch.arange(33))
    for t in range(11):
        for j in range(3):
            assert torch.equal(permuted[sorted_indices[t * 3 + j]], tokens[t])
    experts_of_rows = indices.reshape(-1)[megatron_order]
    assert bool((experts_of_rows[1:] >= experts_of_rows[:-1]).all())  # expert-major
    tokens_of_rows = megatron_order // 3
    same_expert = experts_of_rows[1:] == experts_of_rows[:-1]
    assert bool((tokens_of_rows[1:][same_expert] > tokens_of_rows[:-1][same_expert]).all())  # ascending token


def test_token_permute_num_out_tokens():
    """1.6: None/0 keep N*K rows; >0 keeps the first min(n, N*K); <0 keeps N*K + n; sorted_indices full."""
    for num_out, rows in [(None, 8), (0, 8), (5, 5), (100, 8), (-3, 5)]:
        permuted, sorted_indices = npu.npu_moe_token_permute(DOC_TOKENS, DOC_INDICES, num_out_tokens=num_out)
        assert permuted.shape == (rows, 2) and sorted_indices.numel() == 8


def test_token_permute_unpermute_round_trip():
    """1.6 round trip: probs = ones gives K*x; probs None with [N] indices (K = 1) gives x; general probs."""
    permuted, sorted_indices = npu.npu_moe_token_permute(DOC_TOKENS, DOC_INDICES)
    assert torch.equal(npu.npu_moe_token_unpermute(permuted, sorted_indices, probs=torch.ones(4, 2)), 2 * DOC_TOKENS)
    g = _gen(1)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 6, (9, 3), generator=g)
    probs = torch.rand(9, 3, dtype=torch.float64, generator=g)
    permuted, sorted_indices = npu.npu_moe_token_permute(x, idx)
    out = npu.npu_moe_token_unpermute(permuted, sorted_indices, probs=probs)
    torch.testing.assert_close(out, x * probs.sum(1, keepdim=True))
    permuted1, sorted1 = npu.npu_moe_token_permute(x, idx[:, 0])
    assert torch.equal(npu.npu_moe_token_unpermute(permuted1, sorted1), x)
    out = npu.npu_moe_token_unpermute(permuted, sorted_indices, probs=probs, restore_shape=(3, 3, 5))
    assert out.shape == (3, 3, 5)


def test_token_unpermute_truncated_copies_contribute_zero():
    """1.6: copies cut by num_out_tokens (destination row past the end) add nothing."""
    permuted, sorted_indices = npu.npu_moe_token_permute(DOC_TOKENS, DOC_INDICES, num_out_tokens=5)
    out = npu.npu_moe_token_unpermute(permuted, sorted_indices, probs=torch.ones(4, 2))
    kept = (sorted_indices < 5).view(4, 2).sum(1, keepdim=True).float()
    assert torch.equal(out, DOC_TOKENS * kept)


def test_token_permute_unpermute_gradients():
    """1.0: permute is differentiable w.r.t. tokens, unpermute w.r.t. permuted_tokens and probs."""
    g = _gen(2)
    x = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(0, 3, (7, 2), generator=g)
    probs = torch.rand(7, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, generator=g)
    permuted, sorted_indices = npu.npu_moe_token_permute(x, idx)
    experts = idx.reshape(-1)[torch.argsort(idx.reshape(-1), stable=True)]
    y = permuted * w[experts]  # an expert-dependent op between the two
    out = npu.npu_moe_token_unpermute(y, sorted_indices, probs=probs)
    naive = sum(probs[:, j:j + 1] * x * w[idx[:, j]] for j in range(2))
    torch.testing.assert_close(out, naive)
    dout = torch.randn(7, 4, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, [x, probs], dout), torch.autograd.grad(naive, [x, probs], dout)):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda t, p: npu.npu_moe_token_unpermute(
        npu.npu_moe_token_permute(t, idx)[0], sorted_indices, probs=p), (x, probs))


# --- 1.7 compute_expert_tokens -----------------------------------------------------------------------


def test_compute_expert_tokens_doc_example():
    """1.7 doc example: [0,0,0,1,1,2], 3 -> [3,5,6] int32; empty experts repeat the offset."""
    out = npu.npu_moe_compute_expert_tokens(torch.tensor([0, 0, 0, 1, 1, 2], dtype=I32), 3)
    assert out.tolist() == [3, 5, 6] and out.dtype == I32
    assert npu.npu_moe_compute_expert_tokens(torch.tensor([1, 1, 3], dtype=I32), 5).tolist() == [0, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="sorted"):
        npu.npu_moe_compute_expert_tokens(torch.tensor([1, 0], dtype=I32), 2)


# --- 1.1 gating ----------------------------------------------------------------------------------


def _golden_gating(x: torch.Tensor, finished, k: int):
    """op-plugin golden (test_npu_moe_gating_top_k_softmax.py) in torch."""
    softmax = torch.softmax(x.float(), -1)
    expert_idx = torch.argsort(-softmax, dim=-1, stable=True)[:, :k]
    y = softmax.gather(-1, expert_idx)
    if finished is not None:
        expert_idx = torch.where(finished[:, None], x.shape[-1], expert_idx)
    row_idx = torch.arange(x.shape[0] * k).reshape(k, x.shape[0]).t()
    return y.to(x.dtype), expert_idx.to(I32), row_idx.to(I32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gating_top_k_softmax_matches_golden(dtype):
    """1.1: fp32 softmax -> top-k desc; y in x's dtype; int32 ids; finished => id E; row_idx = j*N + i."""
    g = _gen(3)
    x = torch.randn(10, 7, generator=g).to(dtype)
    finished = torch.rand(10, generator=g) > 0.6
    y, expert_idx, row_idx = npu.npu_moe_gating_top_k_softmax(x, finished, k=3)
    y_gold, idx_gold, row_gold = _golden_gating(x, finished, 3)
    assert y.dtype == dtype and expert_idx.dtype == I32 and row_idx.dtype == I32
    assert torch.equal(y, y_gold) and torch.equal(expert_idx, idx_gold) and torch.equal(row_idx, row_gold)
    assert bool((expert_idx[finished] == 7).all()) and bool((y[:, :-1] >= y[:, 1:]).all())
    assert all(row_idx[i, j] == j * 10 + i for i in range(10) for j in range(3))


def test_gating_ties_go_to_lower_expert_id():
    """1.1: equal probabilities -> the lower expert id first."""
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 1.0]])
    _, expert_idx, _ = npu.npu_moe_gating_top_k_softmax(x, k=3)
    assert expert_idx.tolist() == [[0, 1, 2], [1, 2, 0]]


def test_gating_3d_and_no_autograd():
    """1.1 shapes for [B, S, E]; 1.0: no autograd on NPU -> detached outputs and a warning."""
    x = torch.randn(2, 3, 5, requires_grad=True)
    with pytest.warns(npu.NpuNoAutogradWarning):
        y, expert_idx, row_idx = npu.npu_moe_gating_top_k_softmax(x, k=2)
    assert y.shape == expert_idx.shape == row_idx.shape == (2, 3, 2)
    assert not y.requires_grad and y.grad_fn is None
    assert row_idx.reshape(6, 2).tolist() == [[i, 6 + i] for i in range(6)]


# --- 1.2 / 1.3 init_routing, 1.5 finalize_routing ----------------------------------------------------

N, K, E, H = 6, 2, 4, 3


def _routing_inputs(seed=4, num_experts=E):
    g = _gen(seed)
    x = torch.randn(N, H, generator=g)
    _, expert_idx, row_idx = npu.npu_moe_gating_top_k_softmax(torch.randn(N, num_experts, generator=g), k=K)
    return x, expert_idx, row_idx


def test_init_routing_v1_golden_and_slot_major():
    """1.2: stable sort by expert; expanded_row_idx indexed by row_idx value = j*N + i (slot-major)."""
    x, expert_idx, row_idx = _routing_inputs()
    expanded_x, eri, expanded_expert = npu.npu_moe_init_routing(x, row_idx, expert_idx, N)
    order = torch.argsort(expert_idx.reshape(-1), stable=True)  # golden
    dst_to_src = row_idx.reshape(-1)[order].long()
    assert torch.equal(expanded_expert, expert_idx.reshape(-1)[order])
    assert torch.equal(eri.long()[dst_to_src], torch.arange(N * K))
    assert torch.equal(expanded_x, x[dst_to_src % N])
    assert eri.dtype == expanded_expert.dtype == I32 and expanded_x.shape == (N * K, H)
    for i in range(N):
        for j in range(K):
            dst = eri[j * N + i]  # slot-major
            assert torch.equal(expanded_x[dst], x[i]) and expanded_expert[dst] == expert_idx[i, j]
    assert npu.npu_moe_init_routing(x, row_idx, expert_idx, 2)[0].shape == (2 * K, H)  # active_num cut


def test_init_routing_v2_dropless_token_major():
    """1.3: token-major eri (src flat -> dst row), rows x[flat // K], int64 counts (types 0 / 1 / 2)."""
    x, expert_idx, _ = _routing_inputs()
    counts = torch.bincount(expert_idx.reshape(-1).long(), minlength=E)
    outs = {t: npu.npu_moe_init_routing_v2(x, expert_idx, expert_num=E, expert_tokens_num_flag=True,
                                           expert_tokens_num_type=t) for t in (0, 1, 2)}
    expanded_x, eri, cumsum, scale = outs[0]
    assert eri.dtype == I32 and cumsum.dtype == torch.int64 and scale.dtype == torch.float32
    for i in range(N):
        for j in range(K):
            assert torch.equal(expanded_x[eri[i * K + j]], x[i])  # token-major
    assert torch.equal(cumsum, torch.cumsum(counts, 0)) and torch.equal(outs[1][2], counts)
    pairs = outs[2][2]
    nonempty = torch.nonzero(counts).squeeze(1)
    assert pairs.shape == (E, 2) and pairs[: len(nonempty)].tolist() == [[int(e), int(counts[e])] for e in nonempty]
    assert pairs[len(nonempty):].abs().sum() == 0  # (0, 0) terminator, then nothing
    # row_idx_type 1 is the other direction: destination row -> source flat index.
    eri_dst_to_src = npu.npu_moe_init_routing_v2(x, expert_idx, row_idx_type=1)[1]
    assert torch.equal(eri_dst_to_src.long()[eri.long()], torch.arange(N * K))


def test_init_routing_v2_equals_token_permute():
    """1.3 vs 1.6: the dropless V2 row map is exactly permute's sorted_indices, rows identical."""
    x, expert_idx, _ = _routing_inputs(5)
    expanded_x, eri, _, _ = npu.npu_moe_init_routing_v2(x, expert_idx)
    permuted, sorted_indices = npu.npu_moe_token_permute(x, expert_idx)
    assert torch.equal(eri, sorted_indices) and torch.equal(expanded_x, permuted)


def test_init_routing_v1_slot_major_vs_v2_token_major():
    """1.12: V1 is slot-major (j*N+i), V2 token-major (i*K+j): eri_v1 == eri_v2.view(N,K).t().reshape(-1)."""
    x, expert_idx, row_idx = _routing_inputs(6)
    x1, eri_v1, _ = npu.npu_moe_init_routing(x, row_idx, expert_idx, N)
    x2, eri_v2, _, _ = npu.npu_moe_init_routing_v2(x, expert_idx)
    assert torch.equal(x1, x2)
    assert torch.equal(eri_v1, eri_v2.view(N, K).t().reshape(-1))
    assert not torch.equal(eri_v1, eri_v2)  # the conventions genuinely differ


def test_init_routing_v2_active_expert_range_and_active_num():
    """1.3: ids outside [s, e) -> -1 and sorted last; counts length e - s; active_num cuts rows."""
    x = torch.randn(4, 2)
    expert_idx = torch.tensor([[0, 3], [1, 2], [3, 1], [2, 0]], dtype=I32)
    expanded_x, eri, counts, _ = npu.npu_moe_init_routing_v2(
        x, expert_idx, active_expert_range=[1, 3], expert_tokens_num_flag=True, expert_tokens_num_type=1)
    excluded = (expert_idx.reshape(-1) < 1) | (expert_idx.reshape(-1) >= 3)
    assert bool((eri[excluded] == -1).all()) and sorted(eri[~excluded].tolist()) == [0, 1, 2, 3]
    assert counts.tolist() == [2, 2] and expanded_x.shape == (8, 2) and expanded_x[4:].abs().sum() == 0
    # golden sort key: ids below the range go after everything (INT32_MAX), ids >= end after valid ones
    dst_to_src = npu.npu_moe_init_routing_v2(x, expert_idx, active_expert_range=[1, 3], row_idx_type=1)[1]
    assert expert_idx.reshape(-1)[dst_to_src.long()].tolist() == [1, 1, 2, 2, 3, 3, 0, 0]
    assert npu.npu_moe_init_routing_v2(x, expert_idx, active_num=3)[0].shape == (3, 2)


def test_init_routing_v2_drop_pad():
    """1.3 drop/pad: [E, C, H]; each expert keeps its first C copies (stable order); eri = e*C + pos."""
    x = torch.arange(1.0, 6.0).unsqueeze(1).repeat(1, 2)  # token t has value t + 1
    expert_idx = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0], [1, 1]], dtype=I32)
    expanded_x, eri, counts, _ = npu.npu_moe_init_routing_v2(
        x, expert_idx, expert_num=3, expert_capacity=2, drop_pad_mode=1,
        expert_tokens_num_flag=True, expert_tokens_num_type=1)
    assert expanded_x.shape == (3, 2, 2)
    assert expanded_x[..., 0].tolist() == [[1.0, 2.0], [1.0, 3.0], [2.0, 4.0]]
    # copies in token-major order: (0,0)->e0 pos0, (0,1)->e1 pos0, (1,0)->e0 pos1, (1,1)->e2 pos0,
    # (2,0)->e0 dropped, (2,1)->e1 pos1, (3,0)->e2 pos1, (3,1)->e0 dropped, (4,*)->e1 dropped
    assert eri.tolist() == [0, 2, 1, 4, -1, 3, 5, -1, -1, -1]
    assert counts.tolist() == [4, 4, 2]  # before the capacity cut (golden)
    padded = npu.npu_moe_init_routing_v2(x[:2], expert_idx[:2], expert_num=3, expert_capacity=2, drop_pad_mode=1)[0]
    assert padded[1, 1].abs().sum() == 0 and padded[2, 1].abs().sum() == 0  # padding rows are 0


def _golden_finalize(rows, skip1, skip2, bias, scales, src_to_dst, expert_ids, slot_major: bool):
    """op-plugin golden (test_npu_moe_finalize_routing_v2.py), with the token-major variant for 2/3."""
    topk = scales.shape[1]
    num_rows = src_to_dst.numel() // topk
    rows = rows.reshape(-1, rows.shape[-1])
    out = skip1 + skip2
    for i in range(num_rows):
        for j in range(topk):
            dst = int(src_to_dst[j * num_rows + i] if slot_major else src_to_dst[i * topk + j])
            row = 0 if dst == -1 else rows[dst]
            out[i] += scales[i, j] * (row + bias[expert_ids[i, j]])
    return out


def test_finalize_routing_modes_0_and_2_agree_after_index_conversion():
    """1.5: mode 0 (slot-major, V1) and mode 2 (token-major, V2) agree after eri.view(N,K).t().reshape(-1)."""
    g = _gen(7)
    x, expert_idx, row_idx = _routing_inputs(7)
    expanded_x, eri_v2, _, _ = npu.npu_moe_init_routing_v2(x, expert_idx)
    rows = expanded_x * 3.0 + 1.0  # some per-row work
    skip1, skip2 = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    bias, scales = torch.randn(E, H, generator=g), torch.rand(N, K, generator=g)
    eri_slot_major = eri_v2.view(N, K).t().reshape(-1)
    out0 = npu.npu_moe_finalize_routing(rows, skip1, skip2, bias, scales, eri_slot_major, expert_idx, drop_pad_mode=0)
    out2 = npu.npu_moe_finalize_routing(rows, skip1, skip2, bias, scales, eri_v2, expert_idx, drop_pad_mode=2)
    torch.testing.assert_close(out0, out2)
    golden = _golden_finalize(rows, skip1, skip2, bias, scales, eri_slot_major, expert_idx, slot_major=True)
    torch.testing.assert_close(out0, golden)
    # the V1 pipeline: gating -> init_routing -> per-row op -> finalize(mode 0) = weighted combine
    x1, eri_v1, _ = npu.npu_moe_init_routing(x, row_idx, expert_idx, N)
    combined = npu.npu_moe_finalize_routing(x1 * 3.0 + 1.0, None, None, None, scales, eri_v1, None)
    torch.testing.assert_close(combined, (x * 3.0 + 1.0) * scales.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="skip2 requires skip1"):
        npu.npu_moe_finalize_routing(rows, None, skip2, None, scales, eri_v2, None, drop_pad_mode=2)


def test_finalize_routing_drop_pad_modes():
    """1.5 modes 1 (slot-major) and 3 (token-major) on [E, C, H] rows; -1 adds a zero row (bias kept)."""
    g = _gen(8)
    x = torch.randn(5, 2, generator=g)
    expert_idx = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0], [1, 1]], dtype=I32)
    expanded_x, eri, _, _ = npu.npu_moe_init_routing_v2(x, expert_idx, expert_num=3, expert_capacity=2, drop_pad_mode=1)
    skip1, skip2 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    bias, scales = torch.randn(3, 2, generator=g), torch.rand(5, 2, generator=g)
    out3 = npu.npu_moe_finalize_routing(expanded_x, skip1, skip2, bias, scales, eri, expert_idx, drop_pad_mode=3)
    golden = _golden_finalize(expanded_x, skip1, skip2, bias, scales, eri, expert_idx, slot_major=False)
    torch.testing.assert_close(out3, golden)
    out1 = npu.npu_moe_finalize_routing(expanded_x, skip1, skip2, bias, scales, eri.view(5, 2).t().reshape(-1),
                                        expert_idx, drop_pad_mode=1)
    torch.testing.assert_close(out1, out3)


# --- 1.4 grouped matmul --------------------------------------------------------------------------


def test_grouped_matmul_forward_forms():
    """1.4: group_type 0 (rows), cumsum (type 0) == counts (type 1), empty groups, split_item 0 vs 2."""
    g = _gen(9)
    counts = [3, 0, 4, 1]
    x = torch.randn(8, 5, generator=g)
    w = torch.randn(4, 5, 6, generator=g)
    expected = torch.cat([x[s:s + c] @ w[e] for e, (s, c) in enumerate(zip([0, 3, 3, 7], counts))])
    cumsum = torch.tensor(counts).cumsum(0)
    y0 = npu.npu_grouped_matmul([x], [w], group_list=cumsum, split_item=2, group_type=0, group_list_type=0)
    y1 = npu.npu_grouped_matmul([x], [w], group_list=torch.tensor(counts), split_item=2, group_type=0,
                                group_list_type=1)
    assert len(y0) == 1 and y0[0].shape == (8, 6)
    torch.testing.assert_close(y0[0], expected)
    torch.testing.assert_close(y1[0], expected)
    per_group = npu.npu_grouped_matmul([x], list(w), group_list=cumsum.tolist(), split_item=0, group_type=0)
    assert [t.shape[0] for t in per_group] == counts
    torch.testing.assert_close(torch.cat(per_group), expected)
    # dx form: the weight may be a transposed view
    dy = torch.randn(8, 6, generator=g)
    dx = npu.npu_grouped_matmul([dy], [w.transpose(1, 2)], group_list=cumsum, split_item=2, group_type=0)[0]
    torch.testing.assert_close(dx, torch.cat([dy[s:s + c] @ w[e].t() for e, (s, c) in
                                              enumerate(zip([0, 3, 3, 7], counts))]))
    # compute_expert_tokens output (int32 cumsum) is a group_list after .to(int64)
    ends = npu.npu_moe_compute_expert_tokens(torch.tensor([0, 0, 0, 2, 2, 2, 2, 3], dtype=I32), 4)
    torch.testing.assert_close(npu.npu_grouped_matmul([x], [w], group_list=ends.to(torch.int64), split_item=2,
                                                      group_type=0)[0], expected)
    with pytest.raises(TypeError, match="int64"):
        npu.npu_grouped_matmul([x], [w], group_list=ends, split_item=2, group_type=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 2, 7, 8]), split_item=2, group_type=0)
    # group_type -1: independent matmuls
    a, b = torch.randn(2, 3, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(npu.npu_grouped_matmul([a, a], [b, b])[1], a @ b)


def test_grouped_matmul_weight_gradient_form():
    """1.4 dW: gmm([x.T], [dy], group_type=2, split_item=3) -> [E, K, N], zeros for an empty group."""
    g = _gen(10)
    counts = torch.tensor([2, 0, 3])
    x, dy = torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)
    dW = npu.npu_grouped_matmul([x.t()], [dy], group_list=counts.cumsum(0), split_item=3, group_type=2)[0]
    assert dW.shape == (3, 4, 6)
    torch.testing.assert_close(dW[0], x[:2].t() @ dy[:2])
    torch.testing.assert_close(dW[2], x[2:].t() @ dy[2:])
    assert dW[1].abs().sum() == 0
    dW1 = npu.npu_grouped_matmul([x.t()], [dy], group_list=counts, split_item=3, group_type=2, group_list_type=1)[0]
    torch.testing.assert_close(dW1, dW)


def test_no_autograd_ops_are_detached():
    """1.0: grouped_matmul, init_routing, finalize, compute_expert_tokens give no autograd on NPU."""
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(2, 3, 5, requires_grad=True)
    with pytest.warns(npu.NpuNoAutogradWarning, match="npu_grouped_matmul"):
        y = npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 4]), split_item=2, group_type=0)[0]
    assert not y.requires_grad
    _, expert_idx, row_idx = npu.npu_moe_gating_top_k_softmax(torch.randn(4, 2), k=1)
    with pytest.warns(npu.NpuNoAutogradWarning):
        expanded_x = npu.npu_moe_init_routing(x, row_idx, expert_idx, 4)[0]
    assert not expanded_x.requires_grad
    with pytest.warns(npu.NpuNoAutogradWarning):
        out = npu.npu_moe_init_routing_v2(x, expert_idx)[0]
    assert not out.requires_grad


# --- 1.8 swiglu, 1.9 rms_norm, 1.10 rotary_mul -------------------------------------------------------


def test_swiglu_first_half_is_gate():
    """1.8: silu(first half) * second half, along `dim`; output halves that dim, keeps dtype."""
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(npu.npu_swiglu(x), F.silu(x[:, :4]) * x[:, 4:])
    x6 = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(npu.npu_swiglu(x6, dim=0), F.silu(x6[:3]) * x6[3:])
    assert npu.npu_swiglu(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even"):
        npu.npu_swiglu(torch.randn(3, 5))


def test_rms_norm_golden():
    """1.9: (y, rstd); rstd fp32 [..., 1], not differentiable; y = (x32 * rstd * gamma32).to(x.dtype)."""
    g = _gen(11)
    x = torch.randn(2, 3, 16, generator=g).to(torch.bfloat16)
    gamma = torch.randn(16, generator=g)  # fp32 gamma with bf16 x is allowed
    y, rstd = npu.npu_rms_norm(x, gamma, epsilon=1e-5)
    rstd_gold = 1.0 / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and rstd.shape == (2, 3, 1)
    torch.testing.assert_close(rstd, rstd_gold)
    torch.testing.assert_close(y, (x.float() * rstd_gold * gamma).to(torch.bfloat16), rtol=0, atol=0)
    # vs the reference OpSet (casts before the weight): equal up to bf16 rounding
    assert rel_err(y, REF.rms_norm(x, gamma.to(torch.bfloat16), 1e-5)) < 2e-2
    xr = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    gr = torch.randn(16, dtype=torch.float64, requires_grad=True)
    y, rstd = npu.npu_rms_norm(xr, gr)
    assert y.requires_grad and not rstd.requires_grad


def test_rotary_mul_half_and_interleave():
    """1.10: r1*x + r2*rotate(x); half = cat(-x2, x1); interleave rotates pairs; 4-D only."""
    g = _gen(12)
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64, generator=g)
    cos, sin = (torch.randn(1, 5, 1, 8, dtype=torch.float64, generator=g) for _ in range(2))
    half = torch.cat((-x[..., 4:], x[..., :4]), -1)
    torch.testing.assert_close(npu.npu_rotary_mul(x, cos, sin), cos * x + sin * half)
    inter = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    torch.testing.assert_close(npu.npu_rotary_mul(x, cos, sin, rotary_mode="interleave"), cos * x + sin * inter)
    with pytest.raises(ValueError, match="4-D"):
        npu.npu_rotary_mul(x[0], cos[0], sin[0])
    with pytest.raises(TypeError):
        npu.npu_rotary_mul(x, cos.float(), sin.float())


# --- 1.11 fusion attention -------------------------------------------------------------------------

CAUSAL_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def _sdpa_BNSD(q, k, v, scale, masked=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if masked is None else ~masked, scale=scale)


def test_fusion_attention_tnd_doc_lengths():
    """1.11 doc: lengths 2 2 2 2 2 -> actual_seq_qlen 2 4 6 8 10 (= our cu_seqlens[1:].tolist())."""
    g = _gen(13)
    q, k, v = (torch.randn(10, 2, 4, dtype=torch.float64, generator=g) for _ in range(3))
    cu_seqlens = torch.tensor([0, 2, 4, 6, 8, 10], dtype=I32)
    ends = cu_seqlens[1:].tolist()
    assert ends == [2, 4, 6, 8, 10]
    out = npu.npu_fusion_attention(q, k, v, 2, "TND", scale=0.5, actual_seq_qlen=ends, actual_seq_kvlen=ends)[0]
    for s in range(0, 10, 2):
        seq = [t[s:s + 2].transpose(0, 1)[None] for t in (q, k, v)]
        torch.testing.assert_close(out[s:s + 2], _sdpa_BNSD(*seq, 0.5)[0].transpose(0, 1))
    # trailing zeros skip trailing batches; a tensor or a non-cumulative list is rejected
    padded = npu.npu_fusion_attention(q, k, v, 2, "TND", scale=0.5, actual_seq_qlen=ends + [0, 0],
                                      actual_seq_kvlen=ends + [0, 0])[0]
    torch.testing.assert_close(padded, out)
    with pytest.raises(TypeError, match="host list"):
        npu.npu_fusion_attention(q, k, v, 2, "TND", actual_seq_qlen=cu_seqlens[1:], actual_seq_kvlen=ends)
    with pytest.raises(ValueError, match="cumulative"):
        npu.npu_fusion_attention(q, k, v, 2, "TND", actual_seq_qlen=[4, 2, 4], actual_seq_kvlen=[4, 2, 4])


def test_fusion_attention_outputs_and_default_scale():
    """1.11: 7-tuple; scale defaults to 1.0; softmax_max/sum fp32 [T, N, 8] = row max / sum exp(s - max)."""
    g = _gen(14)
    q, k, v = (torch.randn(7, 3, 4, dtype=torch.float64, generator=g) for _ in range(3))
    result = npu.npu_fusion_attention(q, k, v, 3, "TND", actual_seq_qlen=[3, 7], actual_seq_kvlen=[3, 7])
    assert len(result) == 7 and result[4:] == (0, 0, 0)
    out, softmax_max, softmax_sum = result[:3]
    assert softmax_max.shape == softmax_sum.shape == (7, 3, 8) and softmax_max.dtype == torch.float32
    for s, e in [(0, 3), (3, 7)]:
        scores = torch.einsum("snd,tnd->nst", q[s:e], k[s:e])  # scale 1.0
        torch.testing.assert_close(out[s:e], torch.einsum("nst,tnd->snd", scores.softmax(-1), v[s:e]))
        row_max = scores.amax(-1)
        torch.testing.assert_close(softmax_max[s:e], row_max.t()[..., None].expand(-1, -1, 8).float())
        torch.testing.assert_close(softmax_sum[s:e], (scores - row_max[..., None]).exp().sum(-1).t()[..., None]
                                   .expand(-1, -1, 8).float())
    bnsd = npu.npu_fusion_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2), 3,
                                    "BNSD")
    assert bnsd[1].shape == (1, 3, 7, 8)  # [B, N, S, 8] outside TND


def test_fusion_attention_layouts_agree():
    """1.11: BSND, BNSD, BSH, SBH and TND compute the same attention (GQA 4 query heads / 2 kv heads)."""
    g = _gen(15)
    B, S, D = 2, 5, 4
    q = torch.randn(B, 4, S, D, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, 2, S, D, dtype=torch.float64, generator=g) for _ in range(2))
    expected = _sdpa_BNSD(q, k, v, 0.3)
    bnsd = npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.3)[0]
    bsnd = npu.npu_fusion_attention(*(t.transpose(1, 2) for t in (q, k, v)), 4, "BSND", scale=0.3)[0]
    bsh = npu.npu_fusion_attention(*(t.transpose(1, 2).flatten(2) for t in (q, k, v)), 4, "BSH", scale=0.3)[0]
    sbh = npu.npu_fusion_attention(*(t.permute(2, 0, 1, 3).flatten(2) for t in (q, k, v)), 4, "SBH", scale=0.3)[0]
    tnd = npu.npu_fusion_attention(*(t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)), 4, "TND", scale=0.3,
                                   actual_seq_qlen=[5, 10], actual_seq_kvlen=[5, 10])[0]
    torch.testing.assert_close(bnsd, expected)
    torch.testing.assert_close(bsnd, expected.transpose(1, 2))
    torch.testing.assert_close(bsh, expected.transpose(1, 2).flatten(2))
    torch.testing.assert_close(sbh, expected.permute(2, 0, 1, 3).flatten(2))
    torch.testing.assert_close(tnd, expected.transpose(1, 2).flatten(0, 1))


def test_fusion_attention_masks_and_sparse_modes():
    """1.11: atten_mask True = masked; sparse_mode 2 = causal top-left, 3 = bottom-right (2048 triu mask)."""
    g = _gen(16)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=g) for _ in range(2))
    row, col = torch.arange(3)[:, None], torch.arange(5)[None]
    explicit = torch.rand(3, 5, generator=g) > 0.5
    explicit[:, 0] = False  # no fully-masked row
    torch.testing.assert_close(npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=explicit, scale=0.5)[0],
                               _sdpa_BNSD(q, k, v, 0.5, explicit))
    left_up = npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=CAUSAL_2048, scale=0.5, sparse_mode=2)[0]
    right_down = npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=CAUSAL_2048, scale=0.5, sparse_mode=3)[0]
    torch.testing.assert_close(left_up, _sdpa_BNSD(q, k, v, 0.5, col > row))
    torch.testing.assert_close(right_down, _sdpa_BNSD(q, k, v, 0.5, col > row + 2))
    # mode 0 with a mask also applies the pre/next_tockens band: -pre <= j - i <= next
    no_mask = torch.zeros(3, 5, dtype=torch.bool)
    band = npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=no_mask, scale=0.5, pre_tockens=1, next_tockens=0)[0]
    torch.testing.assert_close(band, _sdpa_BNSD(q, k, v, 0.5, (col > row) | (row - col > 1)))
    with pytest.raises(ValueError, match="2048"):
        npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=CAUSAL_2048[:5, :5], sparse_mode=2)
    with pytest.raises(ValueError, match="triu"):
        npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=~CAUSAL_2048, sparse_mode=3)
    with pytest.raises(NotImplementedError, match="dropout"):
        npu.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.9)


def test_fusion_attention_gradients_and_stats_not_differentiable():
    """1.0: differentiable w.r.t. q, k, v; softmax_max / softmax_sum carry no gradient."""
    q, k, v = (torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, softmax_max, softmax_sum = npu.npu_fusion_attention(
        q, k, v, 2, "TND", atten_mask=CAUSAL_2048, scale=0.5, actual_seq_qlen=[2, 6], actual_seq_kvlen=[2, 6],
        sparse_mode=2)[:3]
    assert not softmax_max.requires_grad and not softmax_sum.requires_grad
    torch.autograd.gradcheck(lambda a, b, c: npu.npu_fusion_attention(
        a, b, c, 2, "TND", atten_mask=CAUSAL_2048, scale=0.5, actual_seq_qlen=[2, 6], actual_seq_kvlen=[2, 6],
        sparse_mode=2)[0], (q, k, v))


# ===================================================================================================
# Part 2: the npu_emulated OpSet equals the reference OpSet (outputs and gradients)
# ===================================================================================================

TOL = 1e-6  # relative to each tensor's scale (conftest.rel_err)
DTYPES = [torch.float64, torch.float32]


def _assert_same_outputs_and_grads(ref_fn, npu_fn, inputs, seed=0):
    out_ref, out_npu = ref_fn(*inputs), npu_fn(*inputs)
    assert out_npu.dtype == out_ref.dtype and out_npu.shape == out_ref.shape
    assert rel_err(out_npu, out_ref) <= TOL
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    dout = torch.randn(out_ref.shape, dtype=out_ref.dtype, generator=_gen(seed))
    grads_ref = torch.autograd.grad(out_ref, leaves, dout)
    grads_npu = torch.autograd.grad(out_npu, leaves, dout)
    for i, (a, b) in enumerate(zip(grads_npu, grads_ref)):
        assert rel_err(a, b) <= TOL, f"gradient of input {i}: rel err {rel_err(a, b):.2e}"


@pytest.fixture(scope="module")
def emulated():
    return get_opset("npu_emulated")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_opset_attention_matches_reference(emulated, dtype, causal, heads):
    n_q, n_kv = heads
    lens = [5, 1, 9, 3]  # several packed sequences, one of length 1
    cu_seqlens = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(I32)
    g = _gen(20)
    q = torch.randn(sum(lens), n_q, 8, dtype=dtype, generator=g, requires_grad=True)
    k, v = (torch.randn(sum(lens), n_kv, 8, dtype=dtype, generator=g, requires_grad=True) for _ in range(2))
    _assert_same_outputs_and_grads(lambda *a: REF.attention(*a, cu_seqlens, max(lens), causal),
                                   lambda *a: emulated.attention(*a, cu_seqlens, max(lens), causal), (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opset_rms_norm_rope_swiglu_match_reference(emulated, dtype):
    g = _gen(21)
    x = torch.randn(7, 3, 16, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(16, dtype=dtype, generator=g, requires_grad=True)
    _assert_same_outputs_and_grads(lambda a, b: REF.rms_norm(a, b, 1e-6), lambda a, b: emulated.rms_norm(a, b, 1e-6),
                                   (x, w))
    angle = torch.randn(7, 8, dtype=dtype, generator=g)
    cos = torch.cat([angle.cos()] * 2, -1).requires_grad_()
    sin = torch.cat([angle.sin()] * 2, -1).requires_grad_()
    _assert_same_outputs_and_grads(REF.rope, emulated.rope, (x, cos, sin))
    _assert_same_outputs_and_grads(REF.swiglu, emulated.swiglu, (x,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_list_type", [0, 1])
def test_opset_moe_experts_matches_reference(dtype, group_list_type):
    """Random routing with an empty expert and a hot expert; grads w.r.t. x, both weights, topk_weight."""
    ops = get_opset("npu_emulated", group_list_type=group_list_type)
    T, Hd, Fd, num_experts, topk = 24, 8, 6, 6, 2
    g = _gen(22)
    scores = torch.rand(T, num_experts, generator=g)
    scores[:, 0] += 1.0  # expert 0 is hot: every token picks it
    scores[:, 4] = -1.0  # expert 4 is never picked
    topk_weight, topk_idx = torch.topk(scores, topk, dim=-1)
    topk_weight = topk_weight.to(dtype).softmax(-1).requires_grad_()
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts)
    assert counts[4] == 0 and counts[0] == T
    x = torch.randn(T, Hd, dtype=dtype, generator=g, requires_grad=True)
    w_gate_up = (torch.randn(num_experts, Hd, 2 * Fd, dtype=dtype, generator=g) / math.sqrt(Hd)).requires_grad_()
    w_down = (torch.randn(num_experts, Fd, Hd, dtype=dtype, generator=g) / math.sqrt(Fd)).requires_grad_()
    _assert_same_outputs_and_grads(lambda a, w1, w2, p: REF.moe_experts(a, topk_idx, p, w1, w2),
                                   lambda a, w1, w2, p: ops.moe_experts(a, topk_idx, p, w1, w2),
                                   (x, w_gate_up, w_down, topk_weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opset_cross_entropy_matches_reference(emulated, dtype):
    g = _gen(23)
    h = torch.randn(10, 8, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(30, 8, dtype=dtype, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (10,), generator=g)
    labels[[1, 6]] = -100
    loss = emulated.cross_entropy(h, w, labels)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss[1] == 0
    _assert_same_outputs_and_grads(lambda a, b: REF.cross_entropy(a, b, labels),
                                   lambda a, b: emulated.cross_entropy(a, b, labels), (h, w))


# ===================================================================================================
# Part 3: the grouped-matmul autograd Function and the real-NPU guard
# ===================================================================================================


def test_grouped_matmul_backward_uses_group_type_0_for_dx_and_2_for_dw(monkeypatch):
    """1.4: forward group_type 0; backward dx = group_type 0 on the transposed weight view, dW = group_type 2
    on x.T with split_item 3; the same int64 group_list throughout."""
    calls = []
    real = npu.npu_grouped_matmul

    def recording(x, weight, **kwargs):
        calls.append(dict(kwargs, x_shape=tuple(x[0].shape), x_contiguous=x[0].is_contiguous(),
                          w_shape=tuple(weight[0].shape), w_contiguous=weight[0].is_contiguous()))
        return real(x, weight, **kwargs)

    monkeypatch.setattr(npu, "npu_grouped_matmul", recording)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    group_list = torch.tensor([2, 2, 7])  # cumulative, expert 1 empty
    y = npu_ops.GroupedMatmul.apply(x, w, group_list, 0, npu)
    assert [c["group_type"] for c in calls] == [0] and calls[0]["split_item"] == 2
    y.backward(torch.randn_like(y))
    fwd, dx_call, dw_call = calls
    assert dx_call["group_type"] == 0 and dx_call["w_shape"] == (3, 5, 4) and not dx_call["w_contiguous"]
    assert dx_call["x_shape"] == (7, 5) and dx_call["x_contiguous"]
    assert dw_call["group_type"] == 2 and dw_call["split_item"] == 3
    assert dw_call["x_shape"] == (4, 7) and not dw_call["x_contiguous"]  # x.T
    assert all(c["group_list"] is group_list and c["group_list_type"] == 0 for c in calls)
    # and the same structure runs inside the OpSet's moe_experts (2 forward + 4 backward calls)
    calls.clear()
    ops = get_opset("npu_emulated", group_list_type=1)
    xe = torch.randn(5, 4, requires_grad=True)
    out = ops.moe_experts(xe, torch.randint(0, 3, (5, 2)), torch.rand(5, 2), torch.randn(3, 4, 6, requires_grad=True),
                          torch.randn(3, 3, 4, requires_grad=True))
    out.sum().backward()
    assert [c["group_type"] for c in calls] == [0, 0, 0, 2, 0, 2]
    assert all(c["group_list_type"] == 1 and c["group_list"].dtype == torch.int64 for c in calls)


@pytest.mark.parametrize("group_list_type", [0, 1])
def test_grouped_matmul_function_gradcheck(group_list_type):
    counts = torch.tensor([3, 0, 2, 1])
    group_list = counts if group_list_type == 1 else counts.cumsum(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: npu_ops.GroupedMatmul.apply(a, b, group_list, group_list_type, npu), (x, w))


def test_real_npu_opset_is_guarded():
    """`npu` needs torch_npu (an Ascend machine); without it the error says so and points at docs/npu.md."""
    assert get_opset("npu_emulated").name == "npu_emulated"
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    with pytest.raises(npu_ops.NpuUnavailableError, match="docs/npu.md") as err:
        get_opset("npu")
    assert isinstance(err.value, ImportError) and "npu_emulated" in str(err.value)


def test_torch_npu_is_imported_only_in_ops_py():
    kernels = pathlib.Path(npu_ops.__file__).resolve().parents[1]
    importers = sorted(p.relative_to(kernels).as_posix() for p in kernels.rglob("*.py")
                       if any(line.strip().startswith(("import torch_npu", "from torch_npu"))
                              for line in p.read_text().splitlines()))
    assert importers == ["npu/ops.py"]
