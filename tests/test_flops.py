"""model/flops.py against torch.utils.flop_counter on the real model (tiny configs).

The causal count (n(n+1)/2 query-key pairs, what MFU and balancing use) is pinned against the counter too: the
model then runs an explicit causal attention that computes, for each query, only its scores with the keys up to
it (`_causal_rows_attention`), so the counter sees exactly the pairs a causal kernel computes."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_sample, model_config, pack
from sail_dist.kernels import get_opset
from sail_dist.kernels import reference as ref
from sail_dist.model.flops import batch_flops_by_part, llm_layer_attention, sample_flops
from sail_dist.model.sailvl import SailVL

TRAINABLE = [("vit", "adapter", "llm"), ("adapter", "llm"), ("llm",)]


def _causal_rows_attention(q, k, v, cu_seqlens, max_seqlen, causal):
    """The OpSet's attention, causal by construction: query i of a sample scores only keys 0..i (2*(i+1)*D
    FLOPs per head for the scores, as many for the values), so a flop counter sees the n(n+1)/2 pairs. Non-causal
    attention (the ViT) is the reference's dense one."""
    if not causal:
        return ref.attention(q, k, v, cu_seqlens, max_seqlen, causal)
    rep = q.shape[1] // k.shape[1]
    out = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)  # [H, n, D]
        ks, vs = ks.repeat_interleave(rep, dim=0), vs.repeat_interleave(rep, dim=0)
        for i in range(e - s):
            scores = qs[:, i:i + 1] @ ks[:, :i + 1].transpose(1, 2) / q.shape[-1] ** 0.5  # [H, 1, i+1]
            out.append((scores.softmax(-1) @ vs[:, :i + 1]).transpose(0, 1))  # [1, H, D]
    return torch.cat(out)


CAUSAL_ROWS = get_opset("reference").replace(name="reference+causal_rows", attention=_causal_rows_attention)


def test_causal_rows_attention_is_causal_attention():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 1, 8, 20], dtype=torch.int32)
    q, k, v = torch.randn(20, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    torch.testing.assert_close(_causal_rows_attention(q, k, v, cu, 12, True), ref.attention(q, k, v, cu, 12, True))


def _count(cfg, trainable, batch, ops=None) -> FlopCounterMode:
    """Forward + backward of the loss with only `trainable` parts requiring grads, under the flop counter."""
    model = SailVL(cfg, ops or get_opset("reference"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    for part in ("vision", "adapter", "llm"):
        want = {"vision": "vit"}.get(part, part) in trainable
        for p in getattr(model, part).parameters():
            p.requires_grad_(want)
    with FlopCounterMode(display=False) as fc:
        model(batch).loss_T.sum().backward()
    return fc


@pytest.mark.parametrize("name", ["tiny", "tiny_moe"])
@pytest.mark.parametrize("trainable", TRAINABLE)
def test_flops_match_flop_counter(name, trainable):
    cfg = model_config(name)
    grids = [(4, 4), (4, 6)]
    ids, labels, patches, grids = make_sample(cfg, 37, grids, gen=torch.Generator().manual_seed(1))
    measured = _count(cfg, trainable, pack([(ids, labels, patches, grids)])).get_total_flops()
    expect = sample_flops(cfg, len(ids), [h * w for h, w in grids], trainable, causal_half=False).train
    assert abs(measured - expect) / measured <= 0.02, (measured, expect)


@pytest.mark.parametrize("name", ["tiny", "tiny_moe"])
@pytest.mark.parametrize("trainable", TRAINABLE)
@pytest.mark.parametrize("causal_half", [False, True], ids=["dense", "causal"])
def test_parts_match_flop_counter_per_module(name, trainable, causal_half):
    """Each part against the counter's per-module totals (backward included) on a pack of an image sample and
    a text-only one: ViT + adapter, every decoder layer, and the rest (the lm head, inside the loss). `causal`: the
    decoder's attention computes only the causal pairs (_causal_rows_attention) and the count is causal_half's."""
    cfg = model_config(name)
    gen = torch.Generator().manual_seed(1)
    batch = pack([make_sample(cfg, 37, [(4, 4), (4, 6)], gen=gen), make_sample(cfg, 20, gen=gen)])
    fc = _count(cfg, trainable, batch, CAUSAL_ROWS if causal_half else None)
    by_module = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    layers = [by_module[f"SailVL.llm.layers.{i}"] for i in range(cfg.llm.num_layers)]
    vision = by_module["SailVL.vision"] + by_module["SailVL.adapter"]
    got = batch_flops_by_part(cfg, batch, trainable, causal_half=causal_half).train
    assert got.vision == pytest.approx(vision, rel=1e-9)
    assert got.layers == pytest.approx(layers, rel=1e-9)
    assert got.head == pytest.approx(fc.get_total_flops() - vision - sum(layers), rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_forward_only_and_causal_half(n):
    """The causal count of one decoder layer is the counter's on the causal attention (n(n+1)/2 pairs), the dense
    one the counter's on the reference's dense attention (n^2), for one sample of n tokens; the whole model's
    counts differ by exactly that per layer (3x in training: backward takes both inputs' gradients)."""
    cfg = model_config("tiny")
    llm = cfg.llm
    g = torch.Generator().manual_seed(n)
    q = torch.randn(n, llm.num_heads, llm.head_dim, generator=g)
    k, v = (torch.randn(n, llm.num_kv_heads, llm.head_dim, generator=g) for _ in range(2))
    cu = torch.tensor([0, n], dtype=torch.int32)
    measured = {}
    for causal_half, attention in ((True, _causal_rows_attention), (False, ref.attention)):
        with FlopCounterMode(display=False) as fc:
            attention(q, k, v, cu, n, True)
        measured[causal_half] = fc.get_total_flops()
        assert llm_layer_attention(llm, n, causal_half) == measured[causal_half]
    f_full = sample_flops(cfg, n, causal_half=False)
    f_half = sample_flops(cfg, n, causal_half=True)
    diff = llm.num_layers * (measured[False] - measured[True])
    assert f_full.forward - f_half.forward == pytest.approx(diff, rel=1e-12)
    assert f_full.train - f_half.train == pytest.approx(3 * diff, rel=1e-12)
    assert f_full.train == pytest.approx(3 * f_full.forward) and f_half.train == pytest.approx(3 * f_half.forward)
