"""Rewards of one rollout: answer correctness, format, think quality and an LVM judge, mixed by weight.

`answers_match(pred_text, truth)` is THE matching function: the RL answer reward, `sail-rl-filter`,
`sail-rl-harvest`, `sail-eval` and the demo's evaluation (sail_dist/data/demo.py is_correct) all call it.

Final-answer extraction, normalisation and matching live in sail_dist/data/answers.py (the data layer: the
demo's evaluation uses them too); `answers_match` is re-exported here.

Reward parts (`RewardConfig.weights` picks and weights them; REWARD_PARTS lists the names):
  answer  1.0 / 0.0 by `answers_match` for verifiable prompts; for `open` prompts the judge's score in [0, 1]
  format  1.0 when `format_ok`: the text starts with one `<think>`, has exactly one `</think>` after it, a
          non-empty thought, then a non-empty `\\boxed{}` after the thought; else 0.0
  think   the registered think reward named by `RewardConfig.think` (THINK_REWARDS), in [0, 1]; the default
          `structure` is a heuristic, not a judge: 0 without a well-formed think block, else
          min(1, words / think_min_words) x (distinct word 4-grams / word 4-grams of the thought)
A judge failure is never a silent 0: with `judge.on_failure: error` it raises `JudgeError` naming the prompt and
the reason; with `exclude` the result has `error` set, `total` and the answer part NaN (the loop must leave it out
of the advantage) and `Reward.counts["judge_failed"]` counts it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from sail_dist.config import RewardConfig
from sail_dist.data.answers import answers_match, final_answer, strip_end  # answers_match: re-exported (the API)
from sail_dist.data.template import extract_boxed, has_think_format, split_think
from sail_dist.registry import Registry

if TYPE_CHECKING:
    from sail_dist.rl.judge import Judge
    from sail_dist.rl.prompts import PromptItem

REWARD_PARTS = ("answer", "format", "think")


# ------------------------------------------------------------------------------------------- format / think
def format_ok(text: str) -> bool:
    """One well-formed `<think>...</think>` block first (non-empty, exactly one open and one close tag), then a
    non-empty `\\boxed{}` answer after it."""
    text = strip_end(text)
    if not has_think_format(text) or text.count("</think>") != 1:
        return False
    thought, rest = split_think(text)
    return bool(thought) and bool(extract_boxed(rest))


def think_structure(text: str, item: "PromptItem | None", cfg: RewardConfig) -> float:
    """Heuristic think quality in [0, 1]: min(1, words / think_min_words) x the distinct share of word 4-grams
    (a thought that loops on itself scores low); 0 without a well-formed think block."""
    if not format_ok(text):
        return 0.0
    thought, _ = split_think(strip_end(text))
    words = thought.split()
    length = min(1.0, len(words) / cfg.think_min_words)
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    return length * distinct


# name -> fn(text, item, cfg) -> float in [0, 1]; a new think reward is one function and one register line
THINK_REWARDS = Registry("rl.reward.think", {"structure": think_structure})


# ------------------------------------------------------------------------------------------- the reward
@dataclass
class RewardResult:
    total: float  # sum of weight x part; NaN when a part failed (see `error`)
    parts: dict[str, float]
    correct: bool | None  # verifiable: answers_match; open: judge score >= 0.5; None when the judge failed
    format_ok: bool
    error: str = ""  # non-empty: this rollout has no reward (judge_failed: ...) and must not enter the advantage


class JudgeError(RuntimeError):
    """A judge could not score an open prompt and rl.reward.judge.on_failure=error."""


@dataclass
class Reward:
    """The weighted reward of `RewardConfig`; `counts` accumulates judge_failed and scored rollouts."""

    cfg: RewardConfig
    judge: "Judge | None" = None
    think_fn: Callable | None = None
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.think_fn is None:
            self.think_fn = THINK_REWARDS.get(self.cfg.think)

    def score(self, texts: list[str], items: list["PromptItem"]) -> list[RewardResult]:
        """One result per (generation, prompt) pair; the judge is called once for all open prompts of the call."""
        if len(texts) != len(items):
            raise ValueError(f"{len(texts)} texts for {len(items)} prompt items")
        w = self.cfg.weights
        answer: list[float | None] = [None] * len(texts)
        errors = [""] * len(texts)
        open_idx = [i for i, it in enumerate(items) if it.kind == "open"]
        for i, (text, it) in enumerate(zip(texts, items)):
            if it.kind != "open":
                answer[i] = 1.0 if answers_match(text, it.answer or "", it.meta.get("choices")) else 0.0
        if open_idx:
            self._judge(texts, items, open_idx, answer, errors)
        out = []
        for i, (text, it) in enumerate(zip(texts, items)):
            fmt = format_ok(text)
            parts = {}
            if "answer" in w:
                parts["answer"] = math.nan if answer[i] is None else answer[i]
            if "format" in w:
                parts["format"] = 1.0 if fmt else 0.0
            if "think" in w:
                parts["think"] = float(self.think_fn(text, it, self.cfg))
            total = math.nan if errors[i] else sum(w[k] * v for k, v in parts.items())
            if it.kind == "open":
                correct = None if answer[i] is None else answer[i] >= 0.5
            else:
                correct = answer[i] == 1.0
            out.append(RewardResult(total, parts, correct, fmt, errors[i]))
            self.counts["scored"] += 1
        return out

    def _judge(self, texts, items, idx, answer, errors) -> None:
        from sail_dist.rl.judge import JudgeRequest

        if self.judge is None:
            it = items[idx[0]]
            raise JudgeError(f"{it.where}: prompt {it.id} is kind=open but no judge is configured: set "
                             "rl.reward.judge.kind=local|http (or give the prompt an `answer`)")
        reqs = [JudgeRequest(items[i].question, final_answer(texts[i]) or strip_end(texts[i]).strip(),
                             items[i].answer, list(items[i].meta.get("images") or []), items[i].id,
                             items[i].meta.get("video")) for i in idx]
        verdicts = self.judge.judge(reqs)
        for i, v in zip(idx, verdicts, strict=True):
            if v.score is not None:
                answer[i] = v.score
                continue
            self.counts["judge_failed"] += 1
            msg = f"judge_failed: {items[i].where} ({items[i].id}): {v.error}"
            if self.cfg.judge.on_failure == "error":
                raise JudgeError(msg + " (set rl.reward.judge.on_failure=exclude to count such rollouts and leave "
                                 "them out of the advantage)")
            errors[i] = msg


def build_reward(cfg: RewardConfig, judge: "Judge | None" = None) -> Reward:
    """The reward of `cfg` (rl.reward); `judge` scores open prompts (see sail_dist/rl/judge.py build_judge)."""
    return Reward(cfg, judge)
