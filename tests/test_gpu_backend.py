"""GPU backend (DeepSpeed ZeRO-2) on CPU over gloo, against a plain single-process PyTorch AdamW reference."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import ROOT, child_env, torchrun_cmd
from dist.engine_run import step_batches
from sail_dist.config import load_config
from sail_dist.kernels import get_opset
from sail_dist.model.build import build_model
from sail_dist.train.lr import lr_at

pytest.importorskip("deepspeed")
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
COMMON = ["train.steps=5", "train.micro_batches=2", "train.lr=2e-3", "train.warmup_steps=2", "train.weight_decay=0.1",
          "train.grad_clip=0.5"]


def torchrun(nproc: int, args: list[str], tmp_path, timeout: int = 600) -> list[dict]:
    out = tmp_path / "out.json"
    env = child_env()
    cmd = torchrun_cmd(nproc, os.path.join(ROOT, "tests", "dist", "engine_run.py"), str(out), *args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())["steps"]


def reference_losses(config: str, overrides: list[str], dp: int, grad_norms: list | None = None) -> list[float]:
    """Single process, plain torch AdamW, the same global batches (all ranks' micro-batches); appends each step's
    gradient norm (before clipping) to `grad_norms` when given."""
    cfg = load_config(config, ["data.demo=true", *overrides])
    t = cfg.train
    model = build_model(cfg.model, get_opset("reference"), seed=t.seed)
    moe = model.moe_layers()
    for m in moe:  # the aux objective's share of each of the dp * M micro-batches
        m.aux_grad_scale = cfg.model.llm.aux_loss_coeff / (len(moe) * t.micro_batches * dp)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    losses = []
    for step in range(t.steps):
        batches = [b for r in range(dp) for b in step_batches(cfg, step, r, dp)]
        W = sum(float(b.loss_weight.sum()) for b in batches)
        opt.zero_grad()
        total = 0.0
        for b in batches:
            loss = (model(b).loss_T * b.loss_weight).sum() / W  # sum(w * ce) / W, by hand
            loss.backward()
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if grad_norms is not None:
            grad_norms.append(float(norm))
        for g in opt.param_groups:
            g["lr"] = lr_at(t, step)
        opt.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("offload", ["none", "cpu_torch_adam", "cpu_adam"])
def test_zero2_two_ranks_equal_reference(tmp_path, offload):
    extra = {"none": [], "cpu_torch_adam": ["backend.offload_optimizer=cpu", "backend.torch_adam=true"],
             "cpu_adam": ["backend.offload_optimizer=cpu", "backend.torch_adam=false"]}[offload]
    got = torchrun(2, [TINY, *COMMON, *extra], tmp_path, timeout=900)
    ref = reference_losses(TINY, COMMON, dp=2)
    assert len(got) == 5 and not any(r["skipped"] for r in got)
    for step, (g, r) in enumerate(zip(got, ref)):
        assert abs(g["loss"] - r) <= 1e-6 * max(1.0, abs(r)), (step, g["loss"], r)
    assert ref[-1] < ref[0]  # it trains


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_bf16_fp32_grad_accumulation_tracks_fp32_reference(tmp_path, offload):
    """bf16 weights with fp32 gradient accumulation (DeepSpeed's device-side fp32 partition buffer, which with
    offload replaces the per-micro-batch host round trip): every micro-batch's gradient lands exactly once, so the
    step-0 gradient norm and the losses track the fp32 reference to bf16 precision."""
    extra = ["train.precision=bf16", "backend.grad_accum_dtype=fp32", "train.micro_batches=4"]
    if offload == "cpu":
        extra += ["backend.offload_optimizer=cpu", "backend.torch_adam=true"]
    got = torchrun(2, [TINY, *COMMON, *extra], tmp_path, timeout=900)
    norms: list[float] = []
    ref = reference_losses(TINY, [*COMMON, "train.micro_batches=4"], dp=2, grad_norms=norms)
    # A micro-batch dropped or counted twice moves the step-0 norm by far more than bf16 rounding does.
    assert abs(got[0]["grad_norm"] - norms[0]) <= 1e-2 * norms[0], (got[0]["grad_norm"], norms[0])
    for step, (g, r) in enumerate(zip(got, ref)):
        assert abs(g["loss"] - r) <= 1e-2 * abs(r), (step, g["loss"], r)


def test_more_ranks_than_devices_is_a_clear_error():
    """A node started with more ranks than devices fails naming the fix, not with set_device's bare ordinal error."""
    from sail_dist.backends.base import check_local_device

    check_local_device(1, 2, "CUDA")  # fits
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 .* 1 visible CUDA device.*nproc_per_node"):
        check_local_device(1, 1, "CUDA")
