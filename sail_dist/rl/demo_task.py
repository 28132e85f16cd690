"""The CPU RL demo: a verifiable task on the demo's pictures, and the run that RL-trains the demo SFT model on it.

    sail-train --config configs/demo/demo.yaml                 # the demo SFT (exports runs/demo/hf)
    python -m sail_dist.rl.demo_task --config configs/demo/rl.yaml [key=value ...]

The task: a picture of 1-5 circles (the demo's own drawing, sail_dist/data/demo.py) and "How many circles are
there? Think step by step."; the answer is checked from `\\boxed{}` (sail_dist/rl/rewards.py), the format from the
`<think>` tags. The demo SFT data has this question with a `<think>` chain in 5 % of its records, so the SFT model
answers it, often wrongly: room for RL. Optionally (`--arith`) text prompts "What is a plus b? Think step by
step." too. Prompts are generated deterministically into the directory of `rl.prompts[0].path` (train) and
`rl.eval_prompts[0].path` (held out), if missing. The run prints held-out accuracy before / after and writes
`<out_dir>/rl_curve.png`: reward and accuracy per episode (Pillow drawing: no plotting package needed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

from PIL import Image, ImageDraw

from sail_dist.data.demo import COLOURS, circles_picture, label_font

QUESTION = "How many circles are there? Think step by step."


def make_prompts(path: str, n: int, seed: int, image_size: int = 112, arith: float = 0.0) -> str:
    """Write `n` prompt records (JSONL with "answer") and their pictures beside `path`; deterministic in the args."""
    root = os.path.dirname(os.path.abspath(path))
    name = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(n):
            if rng.random() < arith:
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                rec = {"id": f"{name}_{i:05d}", "task": "arith", "answer": str(a + b),
                       "conversations": [{"from": "human", "value": f"What is {a} plus {b}? Think step by step."}]}
            else:
                k = rng.randint(1, 5)
                rel = f"images/{name}_{i:05d}.png"
                picture = circles_picture(rng, image_size, k, rng.choice(list(COLOURS)))
                picture.save(os.path.join(root, rel), compress_level=1)
                rec = {"id": f"{name}_{i:05d}", "task": "count", "answer": str(k), "image": rel,
                       "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}]}
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path


# The demo's two prompt sets: (prompts, seed) of the training and the held-out files.
TRAIN_SET, EVAL_SET = (512, 17), (100, 18)


def ensure_prompts(cfg, arith: float = 0.0) -> None:
    """The demo's train / held-out prompt files named by the config, generated when missing."""
    size = cfg.model.vit.image_size
    for sources, (n, seed) in ((cfg.rl.prompts, TRAIN_SET), (cfg.rl.eval_prompts, EVAL_SET)):
        for s in sources:
            if not os.path.exists(s.path):
                make_prompts(s.path, n, seed=seed, image_size=size, arith=arith)


def curve_range(history: list[dict]) -> tuple[float, float]:
    """The y range of the curve: [0, 1] widened to every finite mean reward (overlong shaping and judge
    penalties make rewards negative; the answer + format weights take them above 1)."""
    vals = [h["reward_mean"] for h in history if isinstance(h.get("reward_mean"), (int, float))
            and math.isfinite(h["reward_mean"])]
    return min([0.0, *vals]), max([1.0, *vals])


def draw_curve(history: list[dict], before: dict | None, after: dict | None, path: str) -> str:
    """PNG of mean reward, rollout accuracy (per episode) and held-out accuracy (before / after / eval_every),
    on one axis in their own units over `curve_range`."""
    W, H, L, B, T, R = 720, 420, 60, 50, 40, 170
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = label_font(12)
    n = max(len(history), 1)
    lo, hi = curve_range(history)
    x_of = lambda e: L + (W - L - R) * (e / n)  # noqa: E731  (episode e in 0..n)
    y_of = lambda v: H - B - (H - B - T) * (v - lo) / (hi - lo)  # noqa: E731  (values in [lo, hi])
    d.rectangle((L, T, W - R, H - B), outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        d.line((L - 4, y_of(v), L, y_of(v)), fill="black")
        d.text((L - 40, y_of(v) - 7), f"{v:.2f}", fill="black", font=font)
    if lo < 0:
        d.line((L, y_of(0.0), W - R, y_of(0.0)), fill=(160, 160, 160))
        d.text((L - 40, y_of(0.0) - 7), "0", fill="black", font=font)
    for e in range(0, n + 1, max(1, n // 10)):
        d.text((x_of(e) - 4, H - B + 6), str(e), fill="black", font=font)
    d.text(((W - R) // 2 - 20, H - B + 24), "episode", fill="black", font=font)
    series = [("reward_mean", "mean reward", (200, 40, 40)), ("accuracy", "rollout accuracy", (40, 80, 220))]
    held = [(0, before["accuracy"])] if before else []
    held += [(i + 1, h["eval_accuracy"]) for i, h in enumerate(history) if "eval_accuracy" in h]
    if after:
        held.append((len(history), after["accuracy"]))
    for k, (key, label, colour) in enumerate(series):
        pts = [(x_of(i + 1), y_of(h[key])) for i, h in enumerate(history)
               if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        d.line((W - R + 10, T + 20 * k + 7, W - R + 30, T + 20 * k + 7), fill=colour, width=2)
        d.text((W - R + 34, T + 20 * k), label, fill="black", font=font)
    if held:
        colour = (30, 150, 60)
        pts = [(x_of(e), y_of(v)) for e, v in held]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.rectangle((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.line((W - R + 10, T + 47, W - R + 30, T + 47), fill=colour, width=2)
        d.text((W - R + 34, T + 40), "held-out accuracy", fill="black", font=font)
    d.text((L, 12), "RL on the demo counting task (DAPO, tiny SAIL-VL, CPU)", fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sail_dist.rl.demo_task", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo/rl.yaml")
    p.add_argument("--arith", type=float, default=0.0, help="fraction of text arithmetic prompts (default 0)")
    p.add_argument("--prompts-only", action="store_true", help="write the prompt files (and the demo data with its "
                   "tokenizer) and stop: launch/parity.sh --stage rl_* uses them")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rl.episodes=4")
    args = p.parse_args(argv)
    from sail_dist.config import load_config
    from sail_dist.rl.loop import train_rl

    cfg = load_config(args.config, args.overrides)
    if args.prompts_only:
        from sail_dist.data.demo import ensure_demo

        ensure_demo(cfg.data.demo_dir)
        ensure_prompts(cfg, args.arith)
        print(f"demo RL prompts: {', '.join(s.path for s in (*cfg.rl.prompts, *cfg.rl.eval_prompts))}")
        return 0
    if cfg.train.init_from and not os.path.isdir(cfg.train.init_from):
        print(f"demo RL: train.init_from={cfg.train.init_from} does not exist: run the demo SFT first "
              "(sail-train --config configs/demo/demo.yaml), or set train.init_from", file=sys.stderr)
        return 2
    ensure_prompts(cfg, args.arith)
    summary = train_rl(cfg)
    if not summary["is_main"]:
        return 0
    before, after = summary["eval_before"], summary["eval_after"]
    png = draw_curve(summary["history"], before, after, os.path.join(cfg.train.out_dir, "rl_curve.png"))
    fmt = lambda ev: "n/a" if not ev else f"{100 * ev['accuracy']:.1f}% (format {100 * ev['format_rate']:.0f}%)"  # noqa: E731
    print(f"held-out accuracy before RL: {fmt(before)}  after {len(summary['history'])} episodes: {fmt(after)}")
    print(f"reward / accuracy per episode: {png}")
    print(json.dumps({"before": before, "after": after, "episodes": summary["episodes"], "png": png}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
