"""The SFT objective (objectives/sft.py): the step objective does not depend on how the step is split into
micro-batches (every reduction mode), and equals sum(w * ce) / sum(w) computed by hand."""
from __future__ import annotations

import pytest
import torch

from conftest import make_sample, model_config, pack, rel_err
from sail_dist.kernels import get_opset
from sail_dist.model.sailvl import SailVL
from sail_dist.objectives import build_objective


def _weights(batch, reduction: str) -> torch.Tensor:
    w = (batch.labels != -100).double()
    for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
        n = float(w[s:e].sum())
        if reduction == "sample":
            w[s:e] /= n
        elif reduction == "square":
            w[s:e] /= n ** 0.5
    return w.float()


def _objective(model, batches):
    model.zero_grad()
    obj = build_objective("sft")
    obj.begin_step(batches, lambda t: t)  # one process: the all-reduce is the identity
    total = 0.0
    for b in batches:
        loss = obj.loss(model(b), b).loss
        loss.backward()
        total += float(loss.detach())
    return total, [p.grad.clone() for p in model.parameters()]


def test_sft_share_is_the_weighted_ce_over_the_step_weight():
    cfg = model_config("tiny")
    model = SailVL(cfg, get_opset("reference"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    batches = [pack([make_sample(cfg, n, gen=g)]) for n in (11, 17)]
    batches[1].loss_weight = _weights(batches[1], "square")
    W = float(sum(b.loss_weight.double().sum() for b in batches))
    obj = build_objective("sft")
    obj.begin_step(batches, lambda t: t * 3)  # the reduction's result is what counts: 3 identical ranks
    for b in batches:
        out = model(b)
        expect = float((out.loss_T.detach().double() * b.loss_weight.double()).sum()) / (3 * W)
        assert abs(float(obj.loss(out, b).loss.detach()) - expect) <= 1e-6 * expect


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_one_by_four_equals_four_by_one(reduction):
    cfg = model_config("tiny")
    model = SailVL(cfg, get_opset("reference"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    samples = [make_sample(cfg, n, grids, gen=g) for n, grids in ((30, [(4, 4)]), (7, []), (19, [(4, 6)]), (3, []))]
    one = pack(samples)
    four = [pack([s], [i]) for i, s in enumerate(samples)]
    one.loss_weight = _weights(one, reduction)
    for b in four:
        b.loss_weight = _weights(b, reduction)
    loss_a, grads_a = _objective(model, [one])
    loss_b, grads_b = _objective(model, four)
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
    for ga, gb in zip(grads_a, grads_b):
        assert rel_err(gb, ga) <= 1e-5
    if reduction != "token":  # the reductions really differ
        assert abs(loss_a - _objective(model, [pack(samples)])[0]) > 1e-4


def test_all_unlabelled_step_is_an_error():
    cfg = model_config("tiny")
    b = pack([make_sample(cfg, 5)])
    b.loss_weight.zero_()
    with pytest.raises(RuntimeError, match="no supervised token"):
        build_objective("sft").begin_step([b], lambda t: t)


def test_unknown_objective_names_the_registered_ones():
    with pytest.raises(KeyError, match="train.objective 'dpo' is not registered; available: .*sft"):
        build_objective("dpo")
