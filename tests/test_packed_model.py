"""Real loader output through the real model: every packed sample gets exactly the loss it gets alone."""
from __future__ import annotations

import torch

import os

from conftest import ROOT, rel_err
from sail_dist.config import load_config
from sail_dist.data.batch import PackedBatch
from sail_dist.data.demo import DEMO_TOKENS, ensure_demo
from sail_dist.data.loader import build_loader
from sail_dist.kernels import get_opset
from sail_dist.model.sailvl import SailVL


def split_samples(mb: PackedBatch, downsample: int = 2) -> list[PackedBatch]:
    """Cut a packed batch back into single-sample batches (images assigned by their <IMG_CONTEXT> counts)."""
    cu = mb.cu_seqlens.tolist()
    grids = mb.image_grid_hw.tolist() if mb.num_images else []
    tokens_per_image = [(h // downsample) * (w // downsample) for h, w in grids]
    patch_start = [0]
    for h, w in grids:
        patch_start.append(patch_start[-1] + h * w)
    out, img = [], 0
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        need = int((mb.input_ids[a:b] == DEMO_TOKENS.img_context).sum())
        first = img
        while need > 0:
            need -= tokens_per_image[img]
            img += 1
        assert need == 0
        mine = grids[first:img]
        out.append(PackedBatch(
            input_ids=mb.input_ids[a:b], labels=mb.labels[a:b], position_ids=mb.position_ids[a:b],
            cu_seqlens=torch.tensor([0, b - a], dtype=torch.int32), max_seqlen=b - a, loss_weight=mb.loss_weight[a:b],
            pixel_values=mb.pixel_values[patch_start[first]:patch_start[img]] if mine else None,
            image_grid_hw=torch.tensor(mine) if mine else None, sample_ids=[mb.sample_ids[i]]))
    return out


def test_loader_batches_give_every_sample_its_unpacked_loss(tmp_path):
    demo = ensure_demo(str(tmp_path / "demo")).root
    cfg = load_config(os.path.join(ROOT, "configs", "model", "tiny.yaml"),
                      ["data.demo=true", f"data.demo_dir={demo}", "data.max_tiles=4", "data.pack_tokens=512",
                       "data.num_workers=0", "train.micro_batches=2"])
    model = SailVL(cfg.model, get_opset("reference"))
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    model.eval()
    checked = 0
    with build_loader(cfg, 0, 1) as loader, torch.no_grad():
        for mb in next(loader).micro_batches:
            packed = model(mb).loss_T
            samples = split_samples(mb)
            assert len(samples) > 1 and any(s.num_images for s in samples)
            for s, a, b in zip(samples, mb.cu_seqlens[:-1].tolist(), mb.cu_seqlens[1:].tolist()):
                alone = model(s).loss_T
                assert rel_err(packed[a:b], alone) <= 1e-5
                w = s.loss_weight
                assert abs(float((packed[a:b] * w).sum()) - float((alone * w).sum())) <= 1e-5 * float((alone * w).sum())
                checked += 1
    assert checked >= 4


def test_vision_tokens_fill_the_slots_in_order_with_their_gradients(monkeypatch):
    """embed puts the i-th vision token into the i-th <IMG_CONTEXT> slot (index_copy over the slots' positions) and
    both gradients come back: the vision tokens get the slots' rows, the text embeddings everything else."""
    from conftest import make_sample, model_config, pack

    cfg = model_config("tiny")
    g = torch.Generator().manual_seed(0)
    batch = pack([make_sample(cfg, 6, [(4, 4)], gen=g), make_sample(cfg, 5, [(4, 8)], gen=g)])
    model = SailVL(cfg, get_opset("reference"))
    model.init_weights(generator=torch.Generator().manual_seed(1))
    vis = torch.randn(batch.n_vision_tokens(cfg.adapter.downsample), cfg.llm.hidden_size, generator=g,
                      requires_grad=True)
    monkeypatch.setattr(model, "vision_tokens", lambda *a: vis)
    h = model.embed(batch)
    slots = batch.input_ids == cfg.tokens.img_context
    text = model.llm.embed_tokens(batch.input_ids)
    assert torch.equal(h[slots], vis.detach()) and torch.equal(h[~slots], text[~slots].detach())
    dh = torch.randn(h.shape, generator=g)
    h.backward(dh)
    assert torch.equal(vis.grad, dh[slots])
    emb_grad = torch.zeros_like(model.llm.embed_tokens.weight).index_add_(0, batch.input_ids[~slots], dh[~slots])
    assert rel_err(model.llm.embed_tokens.weight.grad, emb_grad) < 1e-6
