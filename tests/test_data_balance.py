"""Step scheduler: complete, within budget, and much better balanced than round robin."""
from __future__ import annotations

import random

import pytest

from conftest import model_config
from sail_dist.bench.packing import sample_mix
from sail_dist.config import ModelConfig, load_config
from sail_dist.data.balance import (CostModel, SampleCost, cost_model_from_config, imbalance, round_robin,
                                    schedule_step)
from sail_dist.data.packing import StreamPacker
from sail_dist.model.flops import flops_by_part

CM = cost_model_from_config(ModelConfig())


def _step(R, M, B, seed=0, long_max=0):
    """Packs for one step of the benchmark's realistic mix, as the loader would see them."""
    rng = random.Random(seed)
    packer = StreamPacker(B, 256, long_sample_max_tokens=long_max or 2 * B)
    packer.set_step(R * M, R)
    samples, packs = [], []
    while len(packs) < R * M:
        p = packer.pop()
        if p is None:
            n, grids = sample_mix(rng)
            samples.append(SampleCost.of(CM, n, grids))
            packer.push(len(samples) - 1, n)
        else:
            packs.append(p)
    return samples, packs


def _check_complete(sched, packs, samples, R, M, B):
    placed = [s for r in sched.ranks for mb in r for s in mb]
    assert sorted(placed + sched.deferred) == sorted(k for p in packs for k in p.keys)
    assert all(len(r) == M for r in sched.ranks)
    long_keys = {p.keys[0] for p in packs if p.long}
    for r in sched.ranks:
        for mb in r:
            if any(s in long_keys for s in mb):
                assert len(mb) == 1  # a lone long sample stays alone
            else:
                assert sum(samples[s].n_tokens for s in mb) <= B


@pytest.mark.parametrize("R,M", [(8, 8), (32, 4)])
def test_schedule_beats_round_robin_and_stays_valid(R, M):
    B = 8192
    samples, packs = _step(R, M, B)
    keys = [p.keys for p in packs]
    sched = schedule_step(keys, samples, R, B, [p.long for p in packs])
    rr = round_robin(keys, samples, R)
    _check_complete(sched, packs, samples, R, M, B)
    assert sched.llm_imbalance < 1.02 < rr.llm_imbalance
    assert sched.vision_imbalance < 1.05 < rr.vision_imbalance


def test_rank_holding_a_long_sample_sheds_work_to_a_later_step():
    # Every rank but one gets three full packs; rank 0 would also get a 2-budget sample alone.
    B, R, M = 1000, 4, 3
    samples = [SampleCost.of(CM, 2000)] + [SampleCost.of(CM, 250) for _ in range(4 * (R * M - 1))]
    packs = [[0]] + [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(R * M - 1)]
    long = [True] + [False] * (R * M - 1)
    stiff = schedule_step(packs, samples, R, B, long, defer_above=-1)
    sched = schedule_step(packs, samples, R, B, long)
    assert stiff.deferred == [] and stiff.llm_imbalance > 1.2
    assert sched.deferred and sched.llm_imbalance < 1.05
    _check_complete(sched, [type("P", (), {"keys": p, "long": l})() for p, l in zip(packs, long)], samples, R, M, B)


def test_micro_batches_are_ordered_heaviest_first():
    samples, packs = _step(8, 6, 8192, seed=3)
    sched = schedule_step([p.keys for p in packs], samples, 8, 8192, [p.long for p in packs])
    for r in sched.ranks:
        costs = [sum(samples[s].llm + samples[s].vit for s in mb) for mb in r]
        assert costs == sorted(costs, reverse=True)


def test_cost_model_from_config_is_roughly_six_times_params():
    cm = cost_model_from_config(ModelConfig())  # SAIL-VL2-2B: ~1.7B LLM params incl. embeddings
    assert 0.9e10 < cm.llm_token < 1.3e10
    assert cm.llm_attn_per_len2 == pytest.approx(6 * 16 * 128 * 28)
    moe = load_config(None, ["model.llm.num_experts=128", "model.llm.top_k=8", "model.llm.moe_ffn_size=768",
                             "model.llm.num_layers=48", "model.llm.num_heads=32", "model.llm.num_kv_heads=4",
                             "data.demo=true"]).model
    cm_moe = cost_model_from_config(moe)  # A3B: ~3B active parameters, not 30B
    assert 1.2e10 < cm_moe.llm_token < 2.5e10
    assert cm.vit_per_patch > 0 and cm.vit_attn_per_patch2 > 0


@pytest.mark.parametrize("name", ["sailvl2_2b", "sailvl2_a3b"])
def test_cost_model_is_flops_py(name):
    """A sample's scheduling costs are model/flops.py's training FLOPs of it: LLM (layers + head) and vision."""
    cfg = model_config(name)
    cm = cost_model_from_config(cfg)
    rng = random.Random(0)
    cases = [sample_mix(rng) for _ in range(50)] + [(1, []), (40000, []), (300, [(16, 24), (32, 32), (8, 8)])]
    for n, grids in cases:
        parts = flops_by_part(cfg, [n], [r * c for r, c in grids]).train
        cost = SampleCost.of(cm, n, grids)
        assert cost.llm == pytest.approx(parts.select(range(cfg.llm.num_layers), head=True), rel=1e-9)
        assert cost.vit == pytest.approx(parts.vision, rel=1e-9)


def test_imbalance_and_sample_cost():
    assert imbalance([1, 1, 1]) == 1.0 and imbalance([0, 0]) == 1.0
    assert imbalance([2, 1, 1, 0]) == 2.0
    c = SampleCost.of(CostModel(1.0, 0.5, 2.0, 1.0), 10, [(4, 4), (2, 2)], merge=2)
    assert (c.n_tokens, c.llm, c.vit, c.vision_tokens) == (10, 10 + 50, 2 * 20 + (256 + 16), 5)
