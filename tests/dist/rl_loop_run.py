"""The RL loop on the tiny model with the real built-in Sampler and a scripted reward (for tests/test_rl_loop.py).

    python tests/dist/rl_loop_run.py OUT.json CONFIG.yaml [--prompt-len=N] [overrides...]     (or under torchrun)

Prompts are synthetic token sequences (one with an image); the "text" of a rollout is its token ids and the
reward is 1 when most of its tokens are even ids (so the policy can learn it and groups are sometimes all equal,
which exercises dynamic sampling). Writes the loop's summary as JSON (rank 0) and, per rank, every generate call
of its sampler (prompt ids, tokens, log-probs) to OUT.json.rank<R>.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from sail_dist.config import load_config
from sail_dist.data.samples import PAD_SAMPLE_ID
from sail_dist.data.batch import PackedBatch
from sail_dist.data.synthetic import synthetic_batch
from sail_dist.rl.loop import RLParts, train_rl
from sail_dist.rl.prompts import PromptItem
from sail_dist.rl.rewards import RewardResult
from sail_dist.rollout.sampler import Sampler


def prompt_items(cfg, n: int, seed: int, prefix: str, length: int = 0) -> list[PromptItem]:
    """n prompts of 8-14 tokens (or all of `length` tokens; the first holds an image)."""
    g = cfg.model.vit.grid
    out = []
    for i in range(n):
        L = length or 8 + (i * 3) % 7
        b = synthetic_batch(cfg.model, [L], [[(g, g)]] if i == 0 else [[]], seed=seed + i)
        b.labels = torch.full_like(b.labels, -100)
        b.loss_weight = torch.zeros(b.num_tokens)
        b.sample_ids = [f"{prefix}{i}"]
        out.append(PromptItem(f"{prefix}{i}", f"synthetic:{i}", b, "even", "q", "verifiable", {}))
    return out


class EvenReward:
    def score(self, texts, items):
        out = []
        for t in texts:
            toks = [int(x) for x in t.split()]
            ok = bool(toks) and sum(x % 2 == 0 for x in toks) * 2 > len(toks)
            out.append(RewardResult(1.0 if ok else 0.0, {"answer": 1.0 if ok else 0.0}, ok, True))
        return out


def padding() -> PackedBatch:
    return PackedBatch(input_ids=torch.zeros(1, dtype=torch.long), labels=torch.full((1,), -100),
                       position_ids=torch.zeros(1, dtype=torch.long), cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                       max_seqlen=1, loss_weight=torch.zeros(1), sample_ids=[PAD_SAMPLE_ID])


class RecordingSampler(Sampler):
    """The built-in Sampler, recording each call's prompt ids and completions (what this rank generated)."""

    calls: list[dict] = []

    def generate(self, prompts, params, n=1, prompt_ids=None):
        out = super().generate(prompts, params, n, prompt_ids)
        RecordingSampler.calls.append({"ids": list(prompt_ids if prompt_ids is not None else range(len(prompts))),
                                       "tokens": [[c.tokens for c in cs] for cs in out],
                                       "logprobs": [[c.logprobs for c in cs] for cs in out]})
        return out


def run(config: str, overrides: list[str]) -> dict:
    plen = [int(o.split("=")[1]) for o in overrides if o.startswith("--prompt-len=")]
    overrides = [o for o in overrides if not o.startswith("--prompt-len=")]
    cfg = load_config(config, ["data.demo=true", *overrides])
    parts = RLParts(items=prompt_items(cfg, 6, 100, "p", *plen), eval_items=prompt_items(cfg, 3, 900, "e", *plen),
                    reward=EvenReward(), decode=lambda toks: " ".join(str(t) for t in toks),
                    make_rollout=lambda model: RecordingSampler(model, max_batch=cfg.rl.rollout_batch), padding_batch=padding)
    return train_rl(cfg, parts)


def main() -> None:
    out_path, config, *overrides = sys.argv[1:]
    result = run(config, overrides)
    with open(f"{out_path}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(RecordingSampler.calls, f)
    if result["is_main"]:
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
