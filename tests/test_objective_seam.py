"""The Objective seam (sail_dist/objectives): a second objective, registered by the test (tests/dist/toy_objective.py),
runs unchanged on both engines and gives the same loss, metric and gradients, and its step-0 value is the one
computed by hand. It reads per-token and per-sequence extras of the PackedBatch and normalises per sequence over
the whole step, so a wrong normaliser, a dropped extra or a stage that loses them fails here.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import ROOT, child_env, rel_err, require, torchrun_cmd
from dist.engine_run import grads_path, step_batches
from dist.toy_objective import ToyObjective  # noqa: F401  (registers "toy")
from sail_dist.config import ConfigError, load_config
from sail_dist.kernels import get_opset
from sail_dist.model.build import build_model

TINY_MOE = os.path.join(ROOT, "configs", "model", "tiny_moe.yaml")
TRAIN = ["train.objective=toy", "train.steps=3", "train.micro_batches=2", "train.lr=5e-4", "train.warmup_steps=1",
         "train.grad_clip=0.5"]


# Per gradient tensor, GPU vs NPU backend: max |npu - gpu| / max |gpu|. Measured 1.2e-6 (CPU fp32, 2026-12-01).
GRAD_RTOL = 1e-5


def _run(nproc: int, script: str, mode: list[str], args: list[str], tmp_path, name: str) -> dict:
    """One engine's run; its JSON with the step-0 gradients ({name: tensor}) under "grads"."""
    out = tmp_path / name
    cmd = torchrun_cmd(nproc, os.path.join(ROOT, "tests", "dist", script), *mode, str(out), *args)
    r = subprocess.run(cmd, env=child_env(LAYER_GRADS="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return {**json.loads(out.read_text()), "grads": torch.load(grads_path(str(out)))}


def _by_hand_step0(dp: int) -> tuple[float, float]:
    """The toy objective and its metric at step 0 (initial weights), one sequence at a time in float64."""
    cfg = load_config(TINY_MOE, ["data.demo=true", *TRAIN])
    model = build_model(cfg.model, get_opset("reference"), seed=cfg.train.seed).eval()
    batches = [b for r in range(dp) for b in step_batches(cfg, 0, r, dp)]
    num = metric = total = 0.0
    with torch.no_grad():
        for b in batches:
            ce = model(b).loss_T.double()
            for s, (a, e) in enumerate(zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist())):
                lab = b.labels[a:e] != -100
                w = float(b.extras["seq_weight"][s])
                num += w * float((b.extras["advantage"][a:e].double() * ce[a:e])[lab].mean())
                metric += w * float(ce[a:e][lab].mean())
                total += w
    return num / total, metric / total


@pytest.mark.slow
def test_toy_objective_same_loss_and_gradients_on_both_backends(tmp_path):
    require("deepspeed", "megatron.core")  # the engines run in the children
    gpu = _run(2, "engine_run.py", [], [TINY_MOE, "backend.name=gpu", *TRAIN], tmp_path, "gpu.json")
    npu = _run(4, "npu_run.py", ["train"], [TINY_MOE, *TRAIN, "parallel.pp=2", "parallel.ep=2"], tmp_path, "npu.json")
    loss0, metric0 = _by_hand_step0(dp=2)
    g, n = gpu["steps"], npu["steps"]
    assert len(g) == len(n) == 3 and not any(r["skipped"] for r in g + n)
    for engine in (g, n):
        assert abs(engine[0]["loss"] - loss0) <= 1e-5 * abs(loss0), (engine[0]["loss"], loss0)
        assert abs(engine[0]["metrics"]["weighted_ce"] - metric0) <= 1e-5 * metric0
    for step, (a, b) in enumerate(zip(g, n)):  # later steps depend on the gradients of the earlier ones
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (step, a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (step, a, b)
    assert g[0]["loss"] != g[2]["loss"]  # it trains
    # Step-0 gradients tensor by tensor (GPU ZeRO-2 gathered vs NPU shards, experts and stages placed by name):
    # a norm would not see swapped experts or a flipped sign.
    gg, ng = gpu["grads"], npu["grads"]
    assert set(gg) == set(ng) and len(gg) > 10
    assert all(gg[k].shape == ng[k].shape for k in gg)
    errs = {k: rel_err(ng[k], gg[k]) for k in gg}
    worst = max(errs, key=errs.get)
    print(f"seam: {len(errs)} tensors, max grad rel {errs[worst]:.2e} at {worst}")
    assert errs[worst] <= GRAD_RTOL, (worst, errs[worst], sorted(errs.items(), key=lambda kv: -kv[1])[:5])


def test_objective_is_validated_at_parse_time():
    with pytest.raises(ConfigError, match=r"train.objective.*'dpo' is not registered; available: .*toy"):
        load_config(TINY_MOE, ["data.demo=true", "train.objective=dpo"])


def test_extras_travel_with_the_batch_and_are_checked():
    cfg = load_config(TINY_MOE, ["data.demo=true"])
    b = step_batches(cfg, 0, 0, 1)[0]
    b.validate()
    moved = b.to("cpu")
    assert set(moved.extras) == {"advantage", "seq_weight"}
    assert torch.equal(moved.extras["seq_weight"], b.extras["seq_weight"])
    b.extras["bad"] = torch.zeros(b.num_tokens + 1)
    with pytest.raises(ValueError, match=r"extras\['bad'\] is \(\d+,\): expected a tensor per token"):
        b.validate()
    assert rel_err(moved.extras["advantage"], b.extras["advantage"]) == 0.0
