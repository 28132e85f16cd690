"""train.compile (sail_dist/parallel/compile.py): the compiled model computes what the eager model computes.

Compiled with torch.compile on CPU (Inductor's C++ backend): loss and every parameter gradient equal the
eager model's to 1e-5 in fp32, for a dense model (whole layers compiled) and an MoE model (layers by parts),
across two micro-batches of different lengths and image counts (dynamic shapes, no recompile per length);
the MoE case also with activation checkpointing wrapped around the compiled blocks, as the GPU engine does.
"""
from __future__ import annotations

import copy
import os

import pytest

from conftest import ROOT, rel_err
from sail_dist.config import load_config
from sail_dist.data.synthetic import synthetic_batch
from sail_dist.kernels import get_opset
from sail_dist.model.build import build_model
from sail_dist.parallel.checkpointing import apply_activation_checkpointing
from sail_dist.parallel.compile import apply_compile


@pytest.mark.parametrize("model,checkpointing", [("tiny", False), ("tiny_moe", True)])
def test_compiled_model_equals_eager(model, checkpointing):
    cfg = load_config(os.path.join(ROOT, "configs", "model", f"{model}.yaml"), ["data.demo=true"])
    eager = build_model(cfg.model, get_opset("reference"), seed=0).train()
    compiled = copy.deepcopy(eager)
    n = apply_compile(compiled)
    if checkpointing:  # as the GPU engine orders them: the checkpoint wraps the compiled forward
        apply_activation_checkpointing(compiled, vit=True, llm=True)
    assert n >= cfg.model.llm.num_layers
    g = cfg.model.vit.grid
    batches = [synthetic_batch(cfg.model, [40, 23, 31], [[(g, g)], [], [(g, g), (g, g + 2)]], seed=1),
               synthetic_batch(cfg.model, [57, 12], [[], [(g, g)]], seed=2)]
    for b in batches:
        for m in (eager, compiled):
            m.zero_grad()
            out = m(b)
            loss = out.loss_T.sum() + (out.aux_loss if out.aux_loss is not None else 0.0)
            loss.backward()
            m._loss = loss.detach()
        assert rel_err(compiled._loss, eager._loss) <= 1e-5
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                assert rel_err(q.grad, p.grad) <= 1e-5, name
