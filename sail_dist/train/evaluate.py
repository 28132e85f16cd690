"""Exact-match evaluation by greedy generation (the demo's held-out questions), on the KV-cache Sampler
(sail_dist/rollout/sampler.py): temperature 0, so the answers are the argmax continuations of the training model.
"""
from __future__ import annotations

import logging

from sail_dist.config import Config
from sail_dist.model.sailvl import SailVL
from sail_dist.rollout.engine import SamplingParams
from sail_dist.rollout.sampler import Sampler

log = logging.getLogger("sail_dist")

EVAL_MAX_NEW_TOKENS = 24  # the demo's answers are a few tokens


def evaluate_demo(cfg: Config, model: SailVL) -> dict:
    """Generate answers to held-out demo questions with `model` and score them by exact match."""
    from sail_dist.data.demo import eval_items, score
    from sail_dist.data.samples import SampleBuilder, default_tokenizer_dir

    builder = SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg))
    items = eval_items(cfg, limit=cfg.train.eval_samples, builder=builder)
    params = SamplingParams(temperature=0.0, max_new_tokens=EVAL_MAX_NEW_TOKENS, stop_ids=(cfg.model.tokens.im_end,))
    gen = Sampler(model, max_batch=32).generate([it.prompt for it in items], params)
    texts = [builder.template.decode(c[0].tokens) for c in gen]
    acc = score(items, texts)
    for it, text in list(zip(items, texts))[:4]:
        log.info("eval example [%s] expected %r, generated %r", it.task, it.answer, text)
    log.info("held-out exact match: %.1f%% over %d questions (%s)", 100 * acc["all"], len(items),
             ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc.items() if k != "all"))
    return {"accuracy": acc["all"], "per_task": acc, "n": len(items)}
