"""model/flops.py against torch.utils.flop_counter on the real model (tiny configs)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_sample, model_config, pack
from sail_dist.kernels import get_opset
from sail_dist.model.flops import sample_flops
from sail_dist.model.sailvl import SailVL


@pytest.mark.parametrize("name", ["tiny", "tiny_moe"])
@pytest.mark.parametrize("trainable", [("vit", "adapter", "llm"), ("adapter", "llm"), ("llm",)])
def test_flops_match_flop_counter(name, trainable):
    cfg = model_config(name)
    model = SailVL(cfg, get_opset("reference"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    for part in ("vision", "adapter", "llm"):
        want = {"vision": "vit"}.get(part, part) in trainable
        for p in getattr(model, part).parameters():
            p.requires_grad_(want)
    grids = [(4, 4), (4, 6)]
    ids, labels, patches, grids = make_sample(cfg, 37, grids, gen=torch.Generator().manual_seed(1))
    batch = pack([(ids, labels, patches, grids)])
    with FlopCounterMode(display=False) as fc:
        model(batch).loss_T.sum().backward()
    measured = fc.get_total_flops()
    expect = sample_flops(cfg, len(ids), [h * w for h, w in grids], trainable, causal_half=False).train
    assert abs(measured - expect) / measured <= 0.02, (measured, expect)


def test_forward_only_and_causal_half():
    cfg = model_config("tiny")
    f_full = sample_flops(cfg, 100, causal_half=False)
    f_half = sample_flops(cfg, 100, causal_half=True)
    assert f_half.forward < f_full.forward and f_full.train == pytest.approx(3 * f_full.forward)
