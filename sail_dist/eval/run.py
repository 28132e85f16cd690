"""Generation-based evaluation: sample n answers per prompt, match them (answers_match), pass@k, summaries.

`sample_texts` is the one generation loop of `sail-eval`, `sail-rl-filter` and `sail-rl-harvest`: prompts go to
the RolloutEngine in chunks and every completion is decoded with the chat template (special tokens kept, so
`<think>` survives; everything from `<|im_end|>` on is ignored by the matchers).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sail_dist.data.answers import match_answer, strip_end
from sail_dist.rl.prompts import PromptItem
from sail_dist.rl.rewards import Reward
from sail_dist.rollout.engine import RolloutEngine, SamplingParams


@dataclass
class Samples:
    texts: list[list[str]]  # per prompt, n decoded completions
    finish: list[list[str]]  # per prompt, n finish reasons
    finish_counts: Counter = field(default_factory=Counter)


def sample_texts(engine: RolloutEngine, decode, items: list[PromptItem], params: SamplingParams, n: int,
                 chunk: int = 64) -> Samples:
    """n completions of every prompt, decoded by `decode(tokens) -> str`; `chunk` prompts per generate call.

    Each chunk gets its own seed (params.seed + chunk index), so results do not depend on what ran before."""
    out = Samples([], [])
    for c, start in enumerate(range(0, len(items), chunk)):
        part = items[start:start + chunk]
        p = dataclasses.replace(params, seed=params.seed + c)
        comps = engine.generate([it.prompt for it in part], p, n=n)
        if len(comps) != len(part) or any(len(cs) != n for cs in comps):
            raise RuntimeError(f"the rollout engine returned {[len(cs) for cs in comps]} completions for "
                               f"{len(part)} prompts x n={n}")
        for cs in comps:
            out.texts.append([decode(x.tokens) for x in cs])
            out.finish.append([x.finish_reason for x in cs])
            out.finish_counts.update(x.finish_reason for x in cs)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, "Evaluating Large Language Models Trained
    on Code"): 1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclass
class SampleResult:
    item: PromptItem
    texts: list[str]
    correct: list[bool | None]  # None: the judge failed on that sample (excluded from the figures)
    how: list[str]
    preds: list[str | None]
    finish: list[str]

    def record(self) -> dict:
        it = self.item
        scored = [c for c in self.correct if c is not None]
        return {"id": it.id, "record_id": it.meta.get("record_id"), "where": it.where, "source": it.meta.get("source"),
                "task": it.meta.get("task"), "kind": it.kind, "answer": it.answer, "predictions": self.preds,
                "correct": self.correct, "n_correct": sum(scored), "matched_by": self.how, "finish": self.finish,
                "texts": [strip_end(t) for t in self.texts]}


def judge_samples(items: list[PromptItem], samples: Samples, reward: Reward | None) -> list[SampleResult]:
    """Correctness of every sample: answers_match for verifiable prompts, the judge (score >= 0.5) for open ones."""
    open_idx = [i for i, it in enumerate(items) if it.kind == "open"]
    judged: dict[int, list] = {}
    if open_idx:  # one judge batch for every sample of every open prompt
        if reward is None:
            raise ValueError(f"{items[open_idx[0]].where}: an open prompt needs a judge (rl.reward.judge)")
        flat = reward.score([t for i in open_idx for t in samples.texts[i]],
                            [items[i] for i in open_idx for _ in samples.texts[i]])
        at = 0
        for i in open_idx:
            judged[i] = flat[at:at + len(samples.texts[i])]
            at += len(samples.texts[i])
    results = []
    for i, (it, texts, finish) in enumerate(zip(items, samples.texts, samples.finish, strict=True)):
        if i in judged:
            results.append(SampleResult(it, texts, [r.correct for r in judged[i]], ["judge"] * len(texts),
                                        [strip_end(t).strip() for t in texts], finish))
            continue
        ms = [match_answer(t, it.answer or "", it.meta.get("choices")) for t in texts]
        results.append(SampleResult(it, texts, [m.ok for m in ms], [m.how for m in ms], [m.pred for m in ms], finish))
    return results


def summarize(results: list[SampleResult], ks: list[int]) -> dict[str, dict]:
    """{"all" | "task:<t>" | "source:<s>": {"prompts", "samples", "accuracy", "pass@k"...}}; accuracy is the mean
    correctness over all scored samples, pass@k the mean over prompts of the unbiased estimator."""
    groups: dict[str, list[SampleResult]] = defaultdict(list)
    for r in results:
        groups["all"].append(r)
        if r.item.meta.get("task"):
            groups[f"task:{r.item.meta['task']}"].append(r)
        groups[f"source:{r.item.meta.get('source', '')}"].append(r)
    out = {}
    for name, rs in groups.items():
        row: dict = {"prompts": len(rs)}
        flat = [c for r in rs for c in r.correct if c is not None]
        row["samples"] = len(flat)
        row["unscored"] = sum(c is None for r in rs for c in r.correct)
        row["accuracy"] = sum(flat) / len(flat) if flat else float("nan")
        for k in ks:
            vals = []
            for r in rs:
                scored = [c for c in r.correct if c is not None]
                if len(scored) >= k:
                    vals.append(pass_at_k(len(scored), sum(scored), k))
            row[f"pass@{k}"] = sum(vals) / len(vals) if vals else float("nan")
        out[name] = row
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "all", kv[0])))


def format_table(summary: dict[str, dict], ks: list[int]) -> str:
    cols = ["prompts", "samples", "accuracy"] + [f"pass@{k}" for k in ks]
    width = max([12] + [len(k) for k in summary])
    lines = [f"{'group':<{width}} " + " ".join(f"{c:>9}" for c in cols)]
    for name, row in summary.items():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{v:>9d}" if isinstance(v, int) else ("      nan" if math.isnan(v) else f"{100 * v:>8.1f}%"))
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def write_results(path: str, results: list[SampleResult]) -> None:
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps(r.record()) + "\n")
