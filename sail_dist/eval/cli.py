"""`sail-eval --config RUN.yaml --init-from HF_DIR [--out DIR] [-n N] [-k 1,4] FILE.jsonl ... [key.sub=value ...]`

Generation-based evaluation on any prompt JSONL with answers (the files given, else rl.eval_prompts;
sail_dist/rl/prompts.py format: SFT records plus `answer` / `choices` / `task`; images and `data.video_frames`-frame
video as in training). Every prompt is sampled n times with the built-in sampler (greedy when n = 1 unless
--temperature is given; else rl.sampling); answers are matched by sail_dist/data/answers.py answers_match (boxed
extraction, numbers, multiple-choice letters, text).
Writes <out>/results.jsonl (one line per prompt: id, where, predictions, correct, ...) and <out>/summary.json,
prints a table (overall, per task, per source) and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from sail_dist.cli import finite
from sail_dist.eval.policy import (add_policy_args, config_from_args, load_policy, load_tool_prompts, prompt_sources,
                                   sampling_params, split_prompt_files)
from sail_dist.eval.run import format_table, judge_samples, sample_texts, summarize, write_results


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"sail-eval: -k {text!r}: give comma-separated integers, e.g. 1,4") from None
    if not ks or ks[0] < 1:
        raise SystemExit(f"sail-eval: -k {text!r}: every k must be >= 1")
    return ks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sail-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_args(p)
    p.add_argument("--data", "-d", action="append", default=[], metavar="FILE.jsonl",
                   help="prompt JSONL with answers (repeatable; each file is one source); a positional argument "
                   "without '=' is taken as one too")
    p.add_argument("--out", "-o", default="eval_out", help="output directory (results.jsonl, summary.json)")
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("-k", default="", help="pass@k values, comma-separated (default: 1 and n)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0 when n = 1, else rl.sampling.temperature)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (0 = all)")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    args = p.parse_intermixed_args(argv)  # FILE.jsonl and key=value may sit between options
    args.data += split_prompt_files(args)
    if args.n < 1:
        raise SystemExit("sail-eval: -n must be >= 1")
    ks = _ks(args.k) if args.k else sorted({1, args.n})
    if ks[-1] > args.n:
        raise SystemExit(f"sail-eval: pass@{ks[-1]} needs at least {ks[-1]} samples per prompt: raise -n")
    cfg = config_from_args(args, "sail-eval")
    sources = prompt_sources(args.data, cfg.rl.eval_prompts, "sail-eval", "rl.eval_prompts")
    policy = load_policy(cfg, args.init_from, args.tokenizer)
    cfg = policy.cfg
    items, bad = load_tool_prompts(cfg, sources, policy.builder, "sail-eval")
    if args.limit:
        items = items[:args.limit]
    reward = None
    if any(it.kind == "open" for it in items):
        from sail_dist.rl.judge import build_judge
        from sail_dist.rl.rewards import build_reward

        reward = build_reward(cfg.rl.reward, build_judge(cfg.rl.reward.judge, cfg))
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else None)
    params = sampling_params(cfg, cfg.model.tokens.im_end, temperature)
    samples = sample_texts(policy.engine, policy.builder.template.decode, items, params, args.n, args.batch)
    results = judge_samples(items, samples, reward)
    summary = summarize(results, ks)
    os.makedirs(args.out, exist_ok=True)
    write_results(os.path.join(args.out, "results.jsonl"), results)
    report = {"summary": summary, "n": args.n, "ks": ks, "temperature": params.temperature,
              "bad_samples": bad.state_dict(), "finish": dict(samples.finish_counts), "init_from": args.init_from,
              "data": [s.path for s in sources]}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(finite(report), f, indent=1)
    print(format_table(summary, ks))
    if bad.total:
        print(f"bad prompts: {bad.summary()}")
    print(json.dumps(finite({"accuracy": summary["all"]["accuracy"] if items else None,
                             **{f"pass@{k}": summary["all"][f"pass@{k}"] for k in ks if items},
                             "prompts": len(items), "bad": bad.total,
                             "results": os.path.join(args.out, "results.jsonl")})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
