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

from conftest import ROOT, make_sample, pack, rel_err
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


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_compiled_decode_equals_eager_decode(model):
    """Sampler(compile=True) (compile_generation: each layer's pre- and post-attention pieces in prefill and
    decode, the sampling and bookkeeping) generates the eager sampler's tokens and log-probs: text and image prompts, greedy and sampled."""
    import torch

    from sail_dist.rollout.engine import SamplingParams
    from sail_dist.rollout.sampler import Sampler

    cfg = load_config(os.path.join(ROOT, "configs", "model", f"{model}.yaml"), ["data.demo=true"])
    eager = build_model(cfg.model, get_opset("reference"), seed=0).eval()
    compiled = copy.deepcopy(eager)
    g = cfg.model.vit.grid
    gen = torch.Generator().manual_seed(3)
    prompts = [pack([make_sample(cfg.model, n, grids, gen=gen)], sample_ids=[f"p{i}"])
               for i, (n, grids) in enumerate([(9, []), (14, [(g, g)]), (6, [])])]
    for params, n in ((SamplingParams(temperature=0.0, max_new_tokens=6), 1),
                      (SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=4), 2)):
        with torch.no_grad():
            ref = Sampler(eager, max_batch=4).generate(prompts, params, n=n)
            out = Sampler(compiled, max_batch=4, compile=True).generate(prompts, params, n=n)
        assert [[c.tokens for c in cs] for cs in out] == [[c.tokens for c in cs] for cs in ref]
        for cs, rs in zip(out, ref):
            for c, r in zip(cs, rs):
                assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(r.logprobs), atol=1e-5)
    assert getattr(compiled.llm.layers[0], "_sail_compiled_pre_attention", False)
