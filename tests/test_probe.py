"""MoE expert-activation probe: entropy / imbalance against hand-computed values; the probe on tiny_moe counts what
an independent router forward counts, split text-only vs multimodal; the trainer's metrics log the same per layer
and the loader's realised mix."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from data_testutil import qa, save_png, write_jsonl
from sail_dist.backends.base import DistEnv, TrainStepStats
from sail_dist.config import DataSource, load_config
from sail_dist.data.demo import ensure_demo
from sail_dist.data.records import JsonlSource
from sail_dist.data.samples import SampleBuilder
from sail_dist.kernels import get_opset
from sail_dist.model.build import build_model
from sail_dist.probe.experts import main
from sail_dist.train.metrics import (Metrics, expert_load_entropy, expert_load_entropy_per_layer,
                                     expert_load_imbalance_per_layer)

TINY_MOE = os.path.join(ROOT, "configs", "model", "tiny_moe.yaml")


def test_entropy_and_imbalance_on_scripted_counts():
    counts = torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0], [2, 1, 1, 0], [0, 0, 0, 0]])
    h = expert_load_entropy_per_layer(counts)
    # by hand: uniform -> 1; one expert -> 0; p = (1/2, 1/4, 1/4, 0): (1/2 ln 2 + 2 * 1/4 ln 4) / ln 4 = 0.75
    assert h[:3] == pytest.approx([1.0, 0.0, 0.75], abs=1e-12)
    assert h[3] == 0.0  # a layer that saw no tokens
    assert expert_load_entropy(counts[:3]) == pytest.approx(1.75 / 3)
    assert expert_load_imbalance_per_layer(counts) == pytest.approx([1.0, 4.0, 2.0, 0.0])
    assert expert_load_entropy_per_layer(torch.tensor([3.0, 1.0])) == pytest.approx(
        [-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)])


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    demo = ensure_demo(str(root / "demo"), n_train=20, n_eval=2)
    img = save_png(str(root / "a.png"), size=(56, 56), colour=(10, 200, 30))
    recs = [qa(f"Tell me about number {i} and the word w{i}.", f"It is {i}, written w{i}.") for i in range(6)]
    recs += [qa(f"<image>\nWhat colour {i}?", "green", image=img) for i in range(5)]
    recs.insert(3, "{broken")
    return demo, write_jsonl(str(root / "calib.jsonl"), recs)


def _router_counts(model, batches) -> torch.Tensor:
    """Independent of MoE.last_counts: softmax + top-k of each router's logits, counted with bincount."""
    moe = model.moe_layers()
    got = [torch.zeros(m.num_experts) for m in moe]
    hooks = []
    for i, m in enumerate(moe):
        def hook(_mod, _inp, logits, i=i, m=m):
            idx = torch.topk(F.softmax(logits.float(), -1), m.top_k, dim=-1).indices
            got[i] += torch.bincount(idx.reshape(-1), minlength=m.num_experts).float()
        hooks.append(m.router.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return torch.stack(got)


def test_probe_counts_equal_a_manual_forward_per_group(calib, capsys):
    demo, path = calib
    argv = ["--data", path, "--config", TINY_MOE, f"data.tokenizer={demo.tokenizer}", "train.seed=7"]
    assert main(argv + ["--pack-tokens", "1"]) == 0  # one sample per forward
    out = capsys.readouterr()
    res = json.loads(out.out.strip().splitlines()[-1])
    assert "malformed_json" in out.err  # the broken line is skipped and counted
    assert res["skipped"] == 1 and res["moe_layers"] == [0, 1, 2, 3]
    assert res["text"]["samples"] == 6 and res["multimodal"]["samples"] == 5
    cfg = load_config(TINY_MOE, [f"data.tokenizer={demo.tokenizer}", "data.demo=true", "train.seed=7"])
    model = build_model(cfg.model, get_opset("reference"), seed=7).eval()
    builder = SampleBuilder.from_config(cfg, demo.tokenizer)
    src = JsonlSource(DataSource(path=path), 0)
    rows = {"text": [0, 1, 2, 4, 5, 6], "multimodal": [7, 8, 9, 10, 11]}  # row 3 is the broken line
    for group, rs in rows.items():
        batches = [builder.collate([builder.describe(src.record(r), (r,))]).batch for r in rs]
        ref = _router_counts(model, batches)
        assert res[group]["counts"] == ref.long().tolist(), group
        assert res[group]["entropy"] == pytest.approx(expert_load_entropy_per_layer(ref))
        assert res[group]["imbalance"] == pytest.approx(expert_load_imbalance_per_layer(ref))
        assert res[group]["tokens"] * cfg.model.llm.top_k == int(ref[0].sum())
    # packed forwards (the default): the same token-slots, the same routing (varlen attention: samples apart)
    assert main(argv) == 0
    packed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for group in rows:
        assert packed[group]["tokens"] == res[group]["tokens"]
        diff = (torch.tensor(packed[group]["counts"]) - torch.tensor(res[group]["counts"])).abs().sum()
        assert int(diff) <= 2  # at most one near-tie flipping (2 slots) under another summation order


def test_probe_refuses_a_dense_model(calib, capsys):
    demo, path = calib
    tiny = os.path.join(ROOT, "configs", "model", "tiny.yaml")
    assert main(["--data", path, "--config", tiny, f"data.tokenizer={demo.tokenizer}"]) == 2
    assert "no MoE layers" in capsys.readouterr().err


def test_trainer_metrics_log_per_layer_expert_figures_and_the_realised_mix(tmp_path):
    m = Metrics(str(tmp_path), DistEnv(), total_steps=1, start_step=0, tensorboard=False)
    counts = torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]])
    stats = TrainStepStats(loss=1.0, aux_loss=0.0, grad_norm=1.0, lr=1e-3, tokens=8, samples=2, expert_counts=counts,
                           time_s=1.0)
    data = {"samples": 2, "source_samples": {"img": 1, "vid": 1}, "modality_samples": {"image": 1, "video": 1}}
    m.log_step(0, stats, data)
    m.close()
    rec = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert rec["expert_entropy_per_layer"] == [1.0, 0.0] and rec["expert_imbalance_per_layer"] == [1.0, 4.0]
    assert rec["expert_load_entropy"] == 0.5 and rec["expert_load_imbalance"] == 4.0
    assert rec["data_source_samples.img"] == 1 and rec["data_modality_samples.video"] == 1
