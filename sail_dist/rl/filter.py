"""`sail-rl-filter`: the pass@k difficulty filter for RL prompts.

    sail-rl-filter --config RUN.yaml --init-from HF_DIR --out kept.jsonl [-k 4] [FILE.jsonl ...] [key.sub=value ...]

Every prompt (the files given, else rl.prompts) is sampled k times from the policy with rl.sampling (temperature
1 by default: the filter measures what RL will see). A prompt with 0 < correct < k is kept: its ORIGINAL JSONL
line is written to --out, in input order. All-correct prompts teach nothing, all-wrong ones give no signal to a
group-normalised advantage (DAPO's dynamic sampling would drop them anyway). Correctness: answers_match for
verifiable prompts, the judge (score >= 0.5) for open ones. A prompt where the judge failed on a sample
(on_failure=exclude) is neither kept nor classified: it is counted `judge_failed`. Bad records are counted per
data.on_bad_sample (with `error` the first one stops the run with its file:line).
Writes a report (--report, default <out>.report.json: per source kept / all_correct / all_wrong / judge_failed /
bad with reasons, and the correct count of every prompt), prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from sail_dist.data.records import BadSampleError, JsonlSource
from sail_dist.eval.policy import (add_policy_args, config_from_args, load_policy, prompt_sources, sampling_params,
                                   split_prompt_files)
from sail_dist.eval.run import sample_texts
from sail_dist.rl.prompts import PromptItem, load_prompts
from sail_dist.rl.rewards import JudgeError, Reward

CATEGORIES = ("kept", "all_correct", "all_wrong", "judge_failed", "bad")


def classify(correct: list[bool | None]) -> str:
    """kept (0 < c < k), all_correct, all_wrong, or judge_failed (a sample could not be scored)."""
    if any(c is None for c in correct):
        return "judge_failed"
    c = sum(correct)
    return "all_wrong" if c == 0 else "all_correct" if c == len(correct) else "kept"


def filter_prompts(items: list[PromptItem], engine, decode, reward: Reward, params, k: int,
                   chunk: int = 64) -> list[list[bool | None]]:
    """k samples per prompt -> per prompt, the correctness of each sample."""
    samples = sample_texts(engine, decode, items, params, k, chunk)
    flat = reward.score([t for ts in samples.texts for t in ts], [it for it in items for _ in range(k)])
    return [[r.correct for r in flat[i * k:(i + 1) * k]] for i in range(len(items))]  # one judge batch for all


def table(report: dict) -> str:
    rows = [("source", "prompts", *CATEGORIES)]
    for name, r in {**report["sources"], "all": report["total"]}.items():
        rows.append((name, str(r["prompts"]), *(str(r[c]) for c in CATEGORIES)))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w[i]) if i else cell.ljust(w[i]) for i, cell in enumerate(row))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sail-rl-filter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_args(p)
    p.add_argument("--out", "-o", required=True, help="the kept prompts (JSONL: the original lines)")
    p.add_argument("--report", default="", help="report JSON (default: <out>.report.json)")
    p.add_argument("-k", type=int, default=4, help="samples per prompt (keep 0 < correct < k)")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    args = p.parse_intermixed_args(argv)  # FILE.jsonl and key=value may sit between options
    files = split_prompt_files(args)
    if args.k < 2:
        raise SystemExit("sail-rl-filter: -k must be >= 2 (0 < correct < k needs two samples)")
    cfg = config_from_args(args, "sail-rl-filter")
    sources = prompt_sources(files, cfg.rl.prompts, "sail-rl-filter", "rl.prompts")
    policy = load_policy(cfg, args.init_from, args.tokenizer)
    cfg = policy.cfg
    from sail_dist.rl.judge import build_judge
    from sail_dist.rl.rewards import build_reward

    reward = build_reward(cfg.rl.reward, build_judge(cfg.rl.reward.judge, cfg))
    params = sampling_params(cfg, cfg.model.tokens.im_end)
    report: dict = {"k": args.k, "init_from": args.init_from, "sources": {}, "prompts": []}
    total: Counter = Counter()
    kept_lines = []
    names = [spec.name or JsonlSource(spec, i).name for i, spec in enumerate(sources)]
    if len(set(names)) < len(names):  # the report is keyed by source name: one would overwrite the other
        dup = next(n for n in names if names.count(n) > 1)
        raise SystemExit(f"sail-rl-filter: several prompt files are named {dup!r} (the file name without .jsonl): "
                         "pass files of distinct names, or set `name:` in rl.prompts")
    for i, spec in enumerate(sources):
        try:
            name = names[i]
            items, bad = load_prompts(cfg, [spec], policy.builder)
            correct = filter_prompts(items, policy.engine, policy.builder.template.decode, reward, params, args.k,
                                     args.batch)
        except (BadSampleError, FileNotFoundError, ValueError, JudgeError) as e:
            print(f"sail-rl-filter: {e}", file=sys.stderr)
            return 1
        row = Counter({c: 0 for c in CATEGORIES})
        for it, cs in zip(items, correct):
            cat = classify(cs)
            row[cat] += 1
            if cat == "kept":
                kept_lines.append(it.meta["raw"])
            report["prompts"].append({"id": it.id, "where": it.where, "correct": sum(c for c in cs if c),
                                      "category": cat})
        row["bad"] = bad.total
        row["prompts"] = len(items) + bad.total
        report["sources"][name] = {**row, "bad_reasons": dict(bad.counts)}
        total.update(row)
    report["total"] = {"prompts": total["prompts"], **{c: total[c] for c in CATEGORIES}}
    report["judge"] = dict(getattr(reward.judge, "counts", {}) or {})
    with open(args.out, "w") as f:
        f.writelines(line + "\n" for line in kept_lines)
    path = args.report or args.out + ".report.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(table(report))
    print(json.dumps({**report["total"], "out": args.out, "report": path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
