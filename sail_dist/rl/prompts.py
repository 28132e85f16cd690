"""RL / evaluation prompts with ground truth: JSONL records -> one-sample prompt PackedBatches + references.

A prompt record is an SFT record (sail_dist/data/records.py: `conversations` or `messages`, `image`/`images`,
`video`) plus, optionally:
  "answer":  the ground truth (string or number), compared by sail_dist/data/answers.py answers_match;
             without it, a record that ends with an assistant turn uses that turn as the reference
             (e.g. "<think>...</think>\\n\\n\\boxed{42}"), and the prompt is everything before it
  "kind":    "verifiable" (default) or "open" (no checkable answer: scored by the judge, rl.reward.judge)
  "choices": multiple-choice options, a list (letters A, B, ... in order) or a {"A": text, ...} mapping
  "task":    a label for per-task summaries (sail-eval)
The prompt ends with `<|im_start|>assistant\\n` (SampleBuilder.prompt); images and video frames
(data.video_frames) are encoded as in SFT.

A verifiable record with no ground truth, an `open` one while no judge is configured, a bad `answer`/`kind`/`choices`
field, a prompt at or over rl.sampling.max_context, or any SFT-record problem is a bad sample with its file:line and
reason: raised or counted per data.on_bad_sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from sail_dist.config import Config, DataSource
from sail_dist.data.batch import PackedBatch
from sail_dist.data.records import (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, BadSample, BadSampleLog, JsonlSource,
                                    handle_bad, parse_record)
from sail_dist.data.samples import SampleBuilder
from sail_dist.data.answers import final_answer

KINDS = ("verifiable", "open")


@dataclass
class PromptItem:
    id: str  # unique in a run: "<source name>:<line>"
    where: str  # "<path>:<line>"
    prompt: PackedBatch  # one sample ending in "<|im_start|>assistant\n"; no loss
    answer: str | None  # the ground truth text; None only for an open prompt judged without a reference
    question: str  # the last user message, media placeholders removed (what a judge reads)
    kind: str  # "verifiable" | "open"
    meta: dict = field(default_factory=dict)  # source, task, choices, images, video, turns, raw, record_id


def _answer_field(obj: dict, where: str) -> str | None:
    if "answer" not in obj:
        return None
    a = obj["answer"]
    if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
        raise BadSample("bad_prompt_field", where, f"`answer` is {a!r}")
    return str(a)


def _choices_field(obj: dict, where: str):
    c = obj.get("choices")
    if c is None:
        return None
    ok_value = lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)  # noqa: E731
    if isinstance(c, list) and c and all(ok_value(v) for v in c):
        return [str(v) for v in c]
    if isinstance(c, dict) and c and all(isinstance(k, str) and len(k.strip()) == 1 and k.strip().isalpha()
                                         and ok_value(v) for k, v in c.items()):
        return {k.strip(): str(v) for k, v in c.items()}
    raise BadSample("bad_prompt_field", where, f"`choices` is {str(c)[:80]!r}")


def prompt_item(line: str, where: str, sample_id: str, media_root: str, builder: SampleBuilder,
                judge_available: bool, max_context: int = 0, source: str = "") -> PromptItem:
    """One JSONL line -> a PromptItem. Raises BadSample."""
    rec = parse_record(line, where, sample_id, media_root, require_answer=False)
    obj = json.loads(line)
    answer = _answer_field(obj, where)
    kind = obj.get("kind", "verifiable")
    if kind not in KINDS:
        raise BadSample("bad_prompt_field", where, f"`kind` is {kind!r}, expected one of {', '.join(KINDS)}")
    choices = _choices_field(obj, where)
    prompt, reference = builder.prompt(rec)
    truth = answer if answer is not None else (reference or None)
    if kind == "open" and not judge_available:
        raise BadSample("no_ground_truth", where, "kind=open is scored by a judge, but rl.reward.judge.kind=none")
    if truth is None and kind == "verifiable":
        raise BadSample("no_ground_truth", where,
                        "no `answer` field and the record does not end with an assistant (reference) turn")
    if truth is not None and kind == "verifiable" and final_answer(truth) is None:
        raise BadSample("no_ground_truth", where, f"the reference {truth[:60]!r} has no final answer "
                        "(an empty or unclosed \\boxed{}, or an unclosed <think>)")
    n = len(prompt.input_ids)
    if max_context and n >= max_context:
        raise BadSample("too_long", where, f"the prompt has {n} tokens, rl.sampling.max_context={max_context} "
                        "leaves no room to generate")
    turns = rec.turns[:-1] if rec.turns[-1].role == "assistant" else rec.turns
    users = [t.text for t in turns if t.role == "user"]
    question = users[-1] if users else ""
    question = question.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").strip()
    meta = {"source": source, "task": str(obj.get("task", "")), "choices": choices, "images": list(rec.images),
            "video": rec.video, "turns": [{"role": t.role, "content": t.text} for t in turns],
            "raw": line.rstrip("\r\n"), "record_id": rec.record_id}
    return PromptItem(rec.sample_id, where, prompt, truth, question, kind, meta)


def load_prompts(cfg: Config, sources: list[DataSource], builder: SampleBuilder) -> tuple[list[PromptItem],
                                                                                            BadSampleLog]:
    """Every usable prompt of `sources` in file order, and the log of the bad ones (data.on_bad_sample=skip;
    with `error` the first bad record raises a BadSampleError naming its file:line, reason and fix)."""
    log = BadSampleLog()
    items: list[PromptItem] = []
    judge = cfg.rl.reward.judge.kind != "none"
    seen: dict[str, str] = {}  # source name -> path: names make the prompt ids, which must be unique in a run
    for i, spec in enumerate(sources):
        src = JsonlSource(spec, i)
        if src.name in seen and seen[src.name] != src.path:
            raise ValueError(f"prompt sources {seen[src.name]} and {src.path} are both named {src.name!r} (the file "
                             "name without .jsonl), so their prompt ids would collide: give one of them `name:`")
        seen[src.name] = src.path
        for row in range(len(src)):
            try:
                text, lineno = src.read(row)
                where = f"{src.path}:{lineno}"
                items.append(prompt_item(text, where, f"{src.name}:{lineno}", src.media_root, builder, judge,
                                         cfg.rl.sampling.max_context, src.name))
            except BadSample as e:
                handle_bad(e, cfg.data.on_bad_sample, log)
    return items, log
