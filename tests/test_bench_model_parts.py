"""bench.model_parts: each part's runner trains exactly that part, and the parts' FLOPs add up to the model's."""
from __future__ import annotations

import pytest
import torch

from sail_dist.bench.model_parts import main, part_flops, part_runners, sublayer_index
from sail_dist.bench.train_step import micro_batch
from sail_dist.config import load_config
from sail_dist.kernels import get_opset
from sail_dist.parallel.recipe import build_train_model


def _model(config: str, *overrides: str):
    cfg = load_config(config, ["data.demo=true", *overrides])
    model, _ = build_train_model(cfg, get_opset("reference"), aux_loss_weight=0.01, reduce_counts=None)
    return cfg, model.train(), micro_batch(cfg, 128, 64, 1, seed=0)


def _with_grad(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("config", ["configs/model/tiny.yaml", "configs/model/tiny_moe.yaml"])
def test_each_runner_trains_its_part_only(config):
    cfg, model, batch = _model(config)
    runners, counts = part_runners(model, batch)
    first = sublayer_index(model)
    moe = cfg.model.llm.num_experts > 0
    assert set(runners) == {"whole", "vision", "llm_layers", "head", "attention", "mlp"} | ({"experts"} if moe else set())
    all_params = {n for n, _ in model.named_parameters()}
    expected = {
        "whole": all_params,
        "vision": {n for n in all_params if n.startswith(("vision.", "adapter."))},
        "llm_layers": {n for n in all_params if n.startswith("llm.layers.")},
        # (a tied lm head is listed once, as the embedding)
        "head": {"llm.norm.weight"} | {n for n, p in model.named_parameters() if p is model.llm.lm_head.weight},
        "attention": {n for n in all_params if n.startswith(f"llm.layers.{first}.attn.")},
        "mlp": {n for n in all_params if n.startswith(f"llm.layers.{first}.mlp.")},
        "experts": {n for n in all_params if n.startswith(f"llm.layers.{first}.mlp.experts.")},
    }
    for name, run in runners.items():
        model.zero_grad(set_to_none=True)
        run()
        assert _with_grad(model) == expected[name], name
    assert counts["attention"] == cfg.model.llm.num_layers
    assert counts["experts"] == (cfg.model.llm.num_layers if moe else 0)


@pytest.mark.parametrize("config", ["configs/model/tiny.yaml", "configs/model/tiny_moe.yaml"])
def test_part_flops_add_up(config):
    cfg, model, batch = _model(config)
    _, counts = part_runners(model, batch)
    f = part_flops(cfg, batch, sublayer_index(model), counts)
    assert f["vision"] + f["llm_layers"] + f["head"] + f["rest"] == pytest.approx(f["whole"])
    assert f["rest"] == pytest.approx(0.0, abs=1e-6 * f["whole"])  # (the embedding lookup has no matmul)
    # every layer of one kind: a layer's attention block and MLP are its whole
    assert f["attention"] + f["mlp"] == pytest.approx(f["llm_layers"])
    if counts["experts"]:
        assert 0 < f["experts"] < f["mlp"]  # (the MLP row also holds the router)


def test_main_prints_a_row_per_part(capsys):
    res = main(["--model", "configs/model/tiny_moe.yaml", "--seq", "128", "--sample-len", "64", "--repeats", "1",
                "--warmup", "0", "--tiles-per-sample", "1"])
    parts = {r["part"]: r for r in res["parts"]}
    assert set(parts) == {"whole", "vision", "llm_layers", "head", "rest", "attention", "mlp", "experts"}
    assert all(r["ms"] > 0 for n, r in parts.items() if n != "rest")
    assert parts["mlp"]["layers"] == 4 and parts["whole"]["layers"] == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    assert torch.isfinite(torch.tensor(parts["whole"]["train_tflop"]))
