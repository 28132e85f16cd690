"""The training forward and backward of the model on CUDA make the host wait for the device at most once.

A host sync (`.item()`, `.tolist()` of a device tensor, a copy from pageable host memory, `nonzero`) drains the
device's queue: the kernels after it run only as fast as the host launches them. torch's sync debug mode warns at
each synchronising call; the test counts the warnings of one micro-batch's forward + backward of a model with images
(ViT, adapter) and MoE layers (router, Triton experts, load statistics) through the GPU OpSet. The one sync allowed
is `SailVL.embed` reading the `<IMG_CONTEXT>` positions (its count is checked against the images' there).
"""
from __future__ import annotations

import os
import traceback
import warnings

import pytest
import torch

from sail_dist.config import load_config
from sail_dist.data.synthetic import synthetic_batch
from sail_dist.kernels.opset import opset_for_backend
from sail_dist.model.build import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_training_forward_and_backward_sync_the_host_at_most_once(model):
    cfg = load_config(os.path.join(ROOT, "configs", "model", f"{model}.yaml"), ["data.demo=true"])
    ops = opset_for_backend("gpu", cfg.backend)
    net = build_model(cfg.model, ops).to("cuda", torch.bfloat16).train()
    g = cfg.model.vit.grid
    batch = synthetic_batch(cfg.model, [300, 200, 12], [[(g, g)], [(g, g), (g, g)], []], seed=3)
    batch = batch.pin_memory().to("cuda")
    for _ in range(2):  # the first pass: kernels compiled and autotuned, allocator warm
        out = net(batch)
        out.loss_T.sum().backward()
    with warnings.catch_warnings():  # the first switch to "warn" in a process warns about itself (torch 2.11, H200)
        warnings.simplefilter("ignore")
        torch.cuda.set_sync_debug_mode("warn")
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        # Named by the innermost frame of ours on the stack: the warning's own location is often a torch wrapper.
        if "synchroniz" in str(message):
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(os.path.join(ROOT, "sail_dist"))]
            syncs.append(f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno} ({ours[-1].name})" if ours
                         else f"{filename}:{lineno} (no sail_dist frame: the autograd engine or a library)")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = net(batch)
            loss = out.loss_T.sum() + (out.aux_loss if out.aux_loss is not None else 0.0)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(syncs) <= 1, f"host syncs in the training forward / backward: {syncs}"
    assert all(s.startswith("sail_dist/model/sailvl.py") for s in syncs), syncs
