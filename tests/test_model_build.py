"""build_model's seeded init: the meta-device build plus init_weights gives exactly the weights of a model built
the plain way and initialised from the same seed, with tied embeddings still one tensor."""
from __future__ import annotations

import pytest
import torch

from conftest import model_config
from sail_dist.kernels import get_opset
from sail_dist.model.build import build_model
from sail_dist.model.sailvl import SailVL


@pytest.mark.parametrize("name,tie", [("tiny", "true"), ("tiny", "false"), ("tiny_moe", "false")])
def test_build_equals_plain_construction_and_init(name, tie):
    cfg = model_config(name, f"model.llm.tie_embeddings={tie}")
    ops = get_opset("reference")
    got = build_model(cfg, ops, seed=7)
    want = SailVL(cfg, ops)
    want.init_weights(generator=torch.Generator().manual_seed(7))
    got_p, want_p = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_p.keys() == want_p.keys()
    for k, p in want_p.items():
        assert got_p[k].device.type == "cpu" and torch.equal(got_p[k], p), k
    assert (got.llm.lm_head.weight is got.llm.embed_tokens.weight) == (tie == "true")
    assert torch.__future__.get_swap_module_params_on_conversion() is False  # the global switch is restored
