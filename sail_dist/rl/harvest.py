"""`sail-rl-harvest`: rejection sampling from a policy into Think-Fusion SFT records.

    sail-rl-harvest --config RUN.yaml --init-from HF_DIR --out cot.jsonl [-n 8] [--max-per-prompt 1]
                    [FILE.jsonl ...] [key.sub=value ...]

For each verifiable prompt (the files given, else rl.prompts) n samples are drawn with rl.sampling. A sample is
kept when its answer is correct (answers_match against the prompt's ground truth) AND its format is well formed
(rewards.format_ok: one `<think>...</think>` block, then a non-empty `\\boxed{}`); identical kept samples of a prompt
(after trimming whitespace) count once; at most --max-per-prompt are written per prompt. Each is written as a
messages-format SFT record: the prompt's turns, then the assistant answer in the canonical long-CoT form
`<think>\\n{thought}\\n</think>\\n\\n\\boxed{answer}` (template.format_think; text after the box is dropped), with
the prompt's images / video as absolute paths and `answer` = the boxed text (so data.think_format's checks
apply when the file is trained on). Open prompts have no verifiable answer and are skipped (counted).
Writes a report (--report, default <out>.report.json), prints it and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from sail_dist.data.answers import answers_match, strip_end
from sail_dist.data.template import extract_boxed, format_think, split_think
from sail_dist.eval.policy import (add_policy_args, config_from_args, load_policy, load_tool_prompts, prompt_sources,
                                   sampling_params, split_prompt_files)
from sail_dist.eval.run import sample_texts
from sail_dist.rl.prompts import PromptItem
from sail_dist.rl.rewards import format_ok


def harvest_record(item: PromptItem, text: str, index: int) -> dict:
    """The SFT record of one kept sample of `item`."""
    thought, rest = split_think(strip_end(text))
    boxed = extract_boxed(rest) or ""
    rid = item.meta.get("record_id") or item.id
    rec: dict = {"id": f"{rid}#harvest{index}", "source_prompt": item.where, "answer": boxed,
                 "messages": [*item.meta["turns"],
                              {"role": "assistant", "content": format_think(thought or "", boxed)}]}
    if item.meta.get("task"):
        rec["task"] = item.meta["task"]
    if item.meta.get("images"):
        rec["images"] = list(item.meta["images"])
    if item.meta.get("video"):
        rec["video"] = item.meta["video"]
    return rec


def harvest(items: list[PromptItem], texts: list[list[str]], max_per_prompt: int) -> tuple[list[dict], Counter]:
    """Kept records and the counts: samples, kept, wrong, bad_format (right answer, malformed), duplicate,
    over_cap, prompts_with_kept, open_skipped."""
    out, n = [], Counter()
    for it, samples in zip(items, texts, strict=True):
        if it.kind == "open":
            n["open_skipped"] += 1
            continue
        seen: set[str] = set()
        kept = 0
        for t in samples:
            n["samples"] += 1
            if not answers_match(t, it.answer or "", it.meta.get("choices")):
                n["wrong"] += 1
                continue
            if not format_ok(t):
                n["bad_format"] += 1
                continue
            key = strip_end(t).strip()
            if key in seen:
                n["duplicate"] += 1
                continue
            seen.add(key)
            if kept >= max_per_prompt:
                n["over_cap"] += 1
                continue
            out.append(harvest_record(it, t, kept))
            kept += 1
            n["kept"] += 1
        n["prompts_with_kept"] += kept > 0
    return out, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sail-rl-harvest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_args(p)
    p.add_argument("--out", "-o", required=True, help="Think-Fusion SFT JSONL to write")
    p.add_argument("--report", default="", help="report JSON (default: <out>.report.json)")
    p.add_argument("-n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-per-prompt", type=int, default=1, help="kept distinct CoTs per prompt at most")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    args = p.parse_intermixed_args(argv)  # FILE.jsonl and key=value may sit between options
    files = split_prompt_files(args)
    if args.n < 1 or args.max_per_prompt < 1:
        raise SystemExit("sail-rl-harvest: -n and --max-per-prompt must be >= 1")
    cfg = config_from_args(args, "sail-rl-harvest")
    sources = prompt_sources(files, cfg.rl.prompts, "sail-rl-harvest", "rl.prompts")
    policy = load_policy(cfg, args.init_from, args.tokenizer)
    cfg = policy.cfg
    items, bad = load_tool_prompts(cfg, sources, policy.builder, "sail-rl-harvest")
    params = sampling_params(cfg, cfg.model.tokens.im_end)
    samples = sample_texts(policy.engine, policy.builder.template.decode, items, params, args.n, args.batch)
    records, counts = harvest(items, samples.texts, args.max_per_prompt)
    with open(args.out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    report = {"prompts": len(items), "bad": bad.total, "bad_reasons": dict(bad.counts), "n": args.n,
              **{k: counts[k] for k in ("samples", "kept", "wrong", "bad_format", "duplicate", "over_cap",
                                        "prompts_with_kept", "open_skipped")},
              "finish": dict(samples.finish_counts), "out": args.out}
    path = args.report or args.out + ".report.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for k, v in report.items():
        if not isinstance(v, dict):
            print(f"{k:>18}: {v}")
    print(json.dumps({**report, "report": path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
