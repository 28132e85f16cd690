"""Per-stage sources for the demo recipe (configs/recipe/demo.yaml), derived from the demo dataset (data/demo.py).

`python -m sail_dist.data.demo_recipe DIR` writes, deterministically:
  DIR/direct.jsonl   the demo's records without a thought (every stage's general mix; Think-Fusion's 90 %)
  DIR/think.jsonl    its `<think>...</think>` + `\\boxed{}` counting records (LongCoT; Think-Fusion's 10 %)
  DIR/image.jsonl    its single- and multi-image records (SFT phase 4's image half)
  DIR/video.jsonl    a generated video task: frame folders of a shape moving left or right, "Which way does
                     the <colour> <shape> move?" (SFT phase 4's video half)
  DIR/rl_train.jsonl, DIR/rl_eval.jsonl   the demo counting prompts with ground truth (sail_dist/rl/demo_task.py;
                     512 / 100 pictures of 1-5 circles) for the RL stages
The demo set itself (and its tokenizer) stays where data.demo_dir puts it.
"""
from __future__ import annotations

import json
import os
import random
import sys

from PIL import ImageDraw

from sail_dist.data.demo import COLOURS, SHAPES, background, draw_shape, ensure_demo

N_VIDEOS = 300
FRAMES = 4


def _moving(rng: random.Random, size: int, shape: str, colour: str, right: bool, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    bg = background(rng, size, size)
    s = size // 4
    y = rng.randint(0, size - s)
    for f in range(FRAMES):
        x = int((f / (FRAMES - 1)) * (size - s))
        img = bg.copy()
        x0 = x if right else size - s - x
        draw_shape(ImageDraw.Draw(img), shape, (x0, y, x0 + s, y + s), COLOURS[colour])
        img.save(os.path.join(out_dir, f"frame{f}.png"), compress_level=1)


def prepare(root: str, demo_dir: str = ".cache/sail_dist_demo", image_size: int = 112, seed: int = 0) -> str:
    """Write the demo recipe's sources under `root` (skipped when already there); returns `root`."""
    root = os.path.abspath(root)  # the records name their video folders by absolute path
    done = os.path.join(root, "DONE")
    if os.path.exists(done) and os.path.exists(os.path.join(root, "rl_eval.jsonl")):  # (older caches lack rl_*)
        return root
    paths = ensure_demo(demo_dir)
    os.makedirs(root, exist_ok=True)
    with open(paths.train) as f:
        records = [json.loads(line) for line in f]
    for r in records:  # absolute media paths: the derived files live elsewhere
        for key in ("image", "images"):
            if key in r:
                r[key] = (os.path.join(paths.root, r[key]) if isinstance(r[key], str)
                          else [os.path.join(paths.root, p) for p in r[key]])
    splits = {"direct": [r for r in records if r["task"] != "think"],
              "think": [r for r in records if r["task"] == "think"],
              "image": [r for r in records if "image" in r or "images" in r]}
    rng = random.Random(seed)
    videos = []
    for i in range(N_VIDEOS):
        shape, colour, right = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.random() < 0.5
        folder = os.path.join(root, "videos", f"v{i:04d}")
        _moving(rng, image_size, shape, colour, right, folder)
        videos.append({"id": f"video_{i:04d}", "task": "video", "video": folder, "conversations": [
            {"from": "human", "value": f"<video>\nWhich way does the {colour} {shape} move?"},
            {"from": "gpt", "value": "right" if right else "left"}]})
    splits["video"] = videos
    for name, recs in splits.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    # the RL stages' verifiable task (a demo of the rl package): its two prompt sets, as the RL demo writes them
    from sail_dist.rl.demo_task import EVAL_SET, TRAIN_SET, make_prompts

    counts = {name: len(recs) for name, recs in splits.items()}
    for name, (n, rl_seed) in (("rl_train", TRAIN_SET), ("rl_eval", EVAL_SET)):
        make_prompts(os.path.join(root, f"{name}.jsonl"), n, seed=rl_seed, image_size=image_size)
        counts[name] = n
    with open(done, "w") as f:
        json.dump(counts, f)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m sail_dist.data.demo_recipe OUT_DIR [DEMO_DIR]", file=sys.stderr)
        return 2
    root = prepare(*argv)
    with open(os.path.join(root, "DONE")) as f:
        print(f"demo recipe sources in {root}: {json.load(f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
