"""Exact-match evaluation by greedy generation (the demo's held-out questions).

Generation re-runs the packed forward over all prompts at each new token (no KV cache): the evaluation
sets are small and the model is the training model itself, so there is no second model definition.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.model.sailvl import SailVL

log = logging.getLogger("sail_dist")


def pack_prompts(prompts: list[PackedBatch], continuations: list[list[int]]) -> PackedBatch:
    """One packed batch of single-sample prompts, each followed by its continuation tokens (images in order)."""
    seqs = [torch.cat([p.input_ids.cpu(), torch.tensor(c, dtype=torch.long)]) for p, c in zip(prompts, continuations)]
    lens = [len(s) for s in seqs]
    pix = [p.pixel_values for p in prompts if p.num_images]
    grids = [p.image_grid_hw for p in prompts if p.num_images]
    ids = torch.cat(seqs)
    return PackedBatch(input_ids=ids, labels=torch.full_like(ids, -100),
                       position_ids=torch.cat([torch.arange(n) for n in lens]),
                       cu_seqlens=F.pad(torch.cumsum(torch.tensor(lens), 0), (1, 0)).to(torch.int32),
                       max_seqlen=max(lens), loss_weight=torch.zeros(len(ids)),
                       pixel_values=torch.cat(pix) if pix else None, image_grid_hw=torch.cat(grids) if grids else None,
                       sample_ids=[s for p in prompts for s in p.sample_ids])


@torch.no_grad()
def greedy_generate(model: SailVL, prompts: list[PackedBatch], eos_id: int, max_new_tokens: int = 24,
                    batch_size: int = 32) -> list[list[int]]:
    """Greedy continuation of each single-sample prompt until `eos_id` or `max_new_tokens`."""
    model.eval()
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [p.to("cpu") for p in prompts[start:start + batch_size]]
        new = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            batch = pack_prompts(chunk, new).to(device)
            logits = model.logits(batch)
            last = batch.cu_seqlens[1:].long() - 1
            nxt = logits[last].argmax(-1).tolist()
            for i, t in enumerate(nxt):
                if not done[i]:
                    new[i].append(t)
                    done[i] = t == eos_id
            if all(done):
                break
        outputs += new
    return outputs


def evaluate_demo(cfg: Config, model: SailVL) -> dict:
    """Generate answers to held-out demo questions with `model` and score them by exact match."""
    from sail_dist.data.demo import eval_items, score
    from sail_dist.data.samples import SampleBuilder, default_tokenizer_dir

    builder = SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg))
    items = eval_items(cfg, limit=cfg.train.eval_samples, builder=builder)
    gen = greedy_generate(model, [it.prompt for it in items], eos_id=cfg.model.tokens.im_end)
    texts = [builder.template.decode(g) for g in gen]
    acc = score(items, texts)
    for it, text in list(zip(items, texts))[:4]:
        log.info("eval example [%s] expected %r, generated %r", it.task, it.answer, text)
    log.info("held-out exact match: %.1f%% over %d questions (%s)", 100 * acc["all"], len(items),
             ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc.items() if k != "all"))
    return {"accuracy": acc["all"], "per_task": acc, "n": len(items)}
