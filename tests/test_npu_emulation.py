"""The torch_npu emulation (sail_dist/kernels/npu/emulation.py) and the NPU OpSet on top of it (sail_dist/kernels/npu/ops.py).

Part 1 encodes the documented examples, index conventions and round trips of shared/reference/npu.md
section 1 for the ops the NPU OpSet calls (section numbers in the test names' docstrings). Part 2 checks
that the `npu_emulated` OpSet matches the reference OpSet, outputs and gradients, in fp64 and fp32, the
tiled linear cross-entropy included. Part 3 checks the grouped-matmul autograd Function's backward structure
and the real-NPU guard. CPU only, a few seconds.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from sail_dist.kernels import get_opset
from sail_dist.kernels import linear_cross_entropy as lce
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
    # group_list must be int64 (an int32 cumsum is rejected, as on NPU)
    with pytest.raises(TypeError, match="int64"):
        npu.npu_grouped_matmul([x], [w], group_list=cumsum.to(I32), split_item=2, group_type=0)
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


def test_grouped_matmul_has_no_autograd():
    """1.0: grouped_matmul has no derivative on NPU: detached output and a warning (ops.py wraps it)."""
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(2, 3, 5, requires_grad=True)
    with pytest.warns(npu.NpuNoAutogradWarning, match="npu_grouped_matmul"):
        y = npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 4]), split_item=2, group_type=0)[0]
    assert not y.requires_grad


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
    # A gradient sums T (or V) products in the tiles' order, not the reference's: in fp32 that is a few ulps more
    # than the outputs' rounding (1.05e-6 seen on one machine); fp64 keeps the tight bound.
    tol = TOL if out_ref.dtype == torch.float64 else 4 * TOL
    for i, (a, b) in enumerate(zip(grads_npu, grads_ref)):
        assert rel_err(a, b) <= tol, f"gradient of input {i}: rel err {rel_err(a, b):.2e}"


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


# --- cross entropy: the lm head inside the op, in [token_chunk, vocab_chunk] tiles -----------------

CE_T, CE_D, CE_V = 13, 8, 30  # chunks of 3 / 4 tokens and 7 / 8 words divide neither


def _ce_inputs(dtype, labels="some_ignored", seed=23):
    g = _gen(seed)
    h = torch.randn(CE_T, CE_D, dtype=torch.float64, generator=g).to(dtype).requires_grad_()
    w = torch.randn(CE_V, CE_D, dtype=torch.float64, generator=g).to(dtype).requires_grad_()
    lab = torch.randint(0, CE_V, (CE_T,), generator=g)
    if labels == "some_ignored":
        lab[[1, 6, 12]] = -100
    elif labels == "all_ignored":
        lab[:] = -100
    return h, w, lab


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [(None, None), (7, None), (7, 3), (8, 4), (1, 1), (64, 100)],
                         ids=lambda c: f"vocab{c[0]}_tokens{c[1]}")
@pytest.mark.parametrize("labels", ["some_ignored", "none_ignored"])
def test_opset_cross_entropy_matches_reference(dtype, chunks, labels):
    """Loss and both gradients equal the reference (full logits) for tiles that divide neither T nor V."""
    ops = get_opset("npu_emulated", ce_vocab_chunk=chunks[0], ce_token_chunk=chunks[1])
    h, w, lab = _ce_inputs(dtype, labels)
    loss = ops.cross_entropy(h, w, lab)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == (CE_T,)
    assert bool((loss[lab == -100] == 0).all()) and bool((loss[lab != -100] > 0).all())
    _assert_same_outputs_and_grads(lambda a, b: REF.cross_entropy(a, b, lab),
                                   lambda a, b: ops.cross_entropy(a, b, lab), (h, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opset_cross_entropy_all_labels_ignored(dtype):
    """Every label -100: zero loss and zero gradients (no GEMM runs), as the reference gives."""
    ops = get_opset("npu_emulated", ce_vocab_chunk=7, ce_token_chunk=3)
    h, w, lab = _ce_inputs(dtype, "all_ignored")
    loss = ops.cross_entropy(h, w, lab)
    assert loss.dtype == REF.cross_entropy(h, w, lab).dtype and bool((loss == 0).all())
    dh, dw = torch.autograd.grad(loss, [h, w], torch.randn(CE_T, dtype=loss.dtype, generator=_gen(1)))
    assert dh.dtype == h.dtype and dw.dtype == w.dtype and not dh.any() and not dw.any()


def test_opset_cross_entropy_one_input_needs_grad():
    """A frozen lm head (w without grad) or frozen hidden states: the other gradient is still right."""
    ops = get_opset("npu_emulated", ce_vocab_chunk=7, ce_token_chunk=4)
    h, w, lab = _ce_inputs(torch.float64)
    for frozen in (h, w):
        frozen.requires_grad_(False)
        leaf = w if frozen is h else h
        (a,) = torch.autograd.grad(ops.cross_entropy(h, w, lab).sum(), [leaf])
        (b,) = torch.autograd.grad(REF.cross_entropy(h, w, lab).sum(), [leaf])
        assert rel_err(a, b) <= TOL
        frozen.requires_grad_(True)


def test_cross_entropy_gradcheck():
    h, w, lab = _ce_inputs(torch.float64, seed=24)
    torch.autograd.gradcheck(lambda a, b: lce.linear_cross_entropy(a, b, lab, vocab_chunk=7, token_chunk=3,
                                                                   skip_ignored=True), (h, w))


@pytest.mark.parametrize("chunks", [(None, None), (7, 3)], ids=["one_tile", "tiles"])
def test_opset_cross_entropy_bf16_computes_in_fp32(chunks):
    """bf16 h / w: fp32 loss, bf16 gradients, within bf16 rounding of the reference (bf16 GEMMs, fp32 math)."""
    ops = get_opset("npu_emulated", ce_vocab_chunk=chunks[0], ce_token_chunk=chunks[1])
    h, w, lab = _ce_inputs(torch.bfloat16)
    loss, ref = ops.cross_entropy(h, w, lab), REF.cross_entropy(h, w, lab)
    assert loss.dtype == torch.float32 and rel_err(loss, ref) <= 1e-6  # same bf16 logits, fp32 from there
    dloss = torch.randn(CE_T, generator=_gen(2))
    grads = torch.autograd.grad(loss, [h, w], dloss)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    exact = torch.autograd.grad(REF.cross_entropy(h64, w64, lab), [h64, w64], dloss.double())
    for got, want, ref_grad in zip(grads, exact, torch.autograd.grad(ref, [h, w], dloss)):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= 2 * max(rel_err(ref_grad, want), 4e-3)  # as close as the reference's


def test_cross_entropy_never_builds_more_than_a_tile(monkeypatch):
    """The logits exist one [token_chunk, vocab_chunk] tile at a time, and -100 rows are never projected."""
    shapes = []
    real = lce._project

    def recording(h_nD, w_CD):
        shapes.append((h_nD.shape[0], w_CD.shape[0]))
        return real(h_nD, w_CD)

    monkeypatch.setattr(lce, "_project", recording)
    ops = get_opset("npu_emulated", ce_vocab_chunk=7, ce_token_chunk=4)
    h, w, lab = _ce_inputs(torch.float32)  # 10 of 13 labels valid
    ops.cross_entropy(h, w, lab).sum().backward()
    per_pass = [(4, 7), (4, 7), (2, 7)] * 4 + [(4, 2), (4, 2), (2, 2)]  # tokens 4+4+2, words 7+7+7+7+2
    assert shapes == per_pass * 2  # forward, then backward recomputes the same tiles


def test_cross_entropy_default_tiles():
    """Automatic tiles: 512 MiB of fp32 logits, all tokens in one tile up to 32k, multiples of 128 words."""
    tiles = lce.tiles
    assert tiles(8192, 151936, 4, None, None) == (8192, 16384)
    assert tiles(4096, 151936, 4, None, None) == (4096, 32768)
    assert tiles(100_000, 151936, 4, None, None) == (32768, 4096)
    assert tiles(8192, 151936, 8, None, None) == (8192, 8192)  # fp64
    assert tiles(10, 30, 4, None, None) == (10, 30) and tiles(10, 30, 4, 7, 3) == (3, 7)
    assert tiles(0, 30, 4, None, None)[0] == 1  # no valid token: a harmless empty loop


def test_cross_entropy_same_code_on_any_op_provider():
    """The real OpSet runs the very same cross entropy (one method of _NpuOps, whatever the op provider), and it
    calls no torch_npu op: on an empty namespace it still equals the reference, outputs and gradients."""
    assert get_opset("npu_emulated").cross_entropy.__func__ is npu_ops._NpuOps.cross_entropy
    h, w, lab = _ce_inputs(torch.float64)
    ops = npu_ops._NpuOps(types.SimpleNamespace(), ce_vocab_chunk=7, ce_token_chunk=3)
    _assert_same_outputs_and_grads(lambda a, b: REF.cross_entropy(a, b, lab),
                                   lambda a, b: ops.cross_entropy(a, b, lab), (h, w))


def test_cross_entropy_rejects_bad_input():
    h, w, lab = _ce_inputs(torch.float32)
    ops = get_opset("npu_emulated")
    with pytest.raises(IndexError, match="-100 or in"):
        ops.cross_entropy(h, w, torch.full_like(lab, CE_V))
    with pytest.raises(TypeError, match="dtype"):
        ops.cross_entropy(h, w.double(), lab)
    with pytest.raises(ValueError, match="positive"):
        get_opset("npu_emulated", ce_vocab_chunk=0)


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


def test_host_ints_read_once_per_forward_and_decode_step(monkeypatch):
    """torch_npu's attention ops take host int lists: the NPU OpSet reads cu_seqlens once per forward and the decode
    lengths once per decode step (the layers share the tensor), not once per layer; results equal the reference's."""
    from conftest import make_sample, model_config, pack
    from sail_dist.model.sailvl import SailVL
    from sail_dist.rollout.kv_cache import KVCache

    reads = []
    call = npu_ops._HostInts.__call__

    def spy(self, t):
        before = self._ints
        out = call(self, t)
        if out is not before:
            reads.append(tuple(out))
        return out

    monkeypatch.setattr(npu_ops._HostInts, "__call__", spy)
    cfg = model_config("tiny")
    g = torch.Generator().manual_seed(0)
    batch = pack([make_sample(cfg, 9, [(4, 4)], gen=g), make_sample(cfg, 7, gen=g)])
    models = {}
    for name in ("npu_emulated", "reference"):
        models[name] = SailVL(cfg, get_opset(name))
        models[name].init_weights(generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = (models[n].logits(batch) for n in ("npu_emulated", "reference"))
    assert rel_err(got, want) < 1e-5
    assert len(reads) == 2, reads  # the ViT's cu_seqlens and the LLM's, each read once for all layers
    reads.clear()
    cache = KVCache(cfg.llm, 2, 16, torch.float32, torch.device("cpu"))
    ids, pos = torch.tensor([5, 6]), torch.tensor([3, 7])
    with torch.no_grad():
        step = models["npu_emulated"].decode_step(ids, pos, cache)
        ref_step = models["reference"].decode_step(ids, pos, KVCache(cfg.llm, 2, 16, torch.float32,
                                                                     torch.device("cpu")))
    assert reads == [(4, 8)]  # one read for the 4 layers: lengths = pos + 1
    assert rel_err(step, ref_step) < 1e-5
