"""model/flops.py against torch.utils.flop_counter on the real model (tiny configs)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_sample, model_config, pack
from sail_dist.kernels import get_opset
from sail_dist.model.flops import batch_flops_by_part, sample_flops
from sail_dist.model.sailvl import SailVL

TRAINABLE = [("vit", "adapter", "llm"), ("adapter", "llm"), ("llm",)]


def _count(cfg, trainable, batch) -> FlopCounterMode:
    """Forward + backward of the loss with only `trainable` parts requiring grads, under the flop counter."""
    model = SailVL(cfg, get_opset("reference"))
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
def test_parts_match_flop_counter_per_module(name, trainable):
    """Each part against the counter's per-module totals (backward included) on a pack of an image sample and
    a text-only one: ViT + adapter, every decoder layer, and the rest (the lm head, inside the loss)."""
    cfg = model_config(name)
    gen = torch.Generator().manual_seed(1)
    batch = pack([make_sample(cfg, 37, [(4, 4), (4, 6)], gen=gen), make_sample(cfg, 20, gen=gen)])
    fc = _count(cfg, trainable, batch)
    by_module = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    layers = [by_module[f"SailVL.llm.layers.{i}"] for i in range(cfg.llm.num_layers)]
    vision = by_module["SailVL.vision"] + by_module["SailVL.adapter"]
    got = batch_flops_by_part(cfg, batch, trainable, causal_half=False).train
    assert got.vision == pytest.approx(vision, rel=1e-9)
    assert got.layers == pytest.approx(layers, rel=1e-9)
    assert got.head == pytest.approx(fc.get_total_flops() - vision - sum(layers), rel=1e-9)


def test_forward_only_and_causal_half():
    cfg = model_config("tiny")
    f_full = sample_flops(cfg, 100, causal_half=False)
    f_half = sample_flops(cfg, 100, causal_half=True)
    assert f_half.forward < f_full.forward and f_full.train == pytest.approx(3 * f_full.forward)
