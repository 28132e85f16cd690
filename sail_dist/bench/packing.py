"""Benchmark: stream packing + step balancing vs padded batching and naive concatenation.

    python -m sail_dist.bench.packing [--steps 24] [--quick]

Length mix (token counts after the chat template; one image tile = 256 vision tokens, SAIL-VL2's 448 tiles):
    35 % captions      1 image: 1 tile (25 %) or 2-10 tiles + thumbnail; text lognormal(median 60, s 0.8)
    20 % OCR / docs    1 image: 6-10 tiles + thumbnail; text lognormal(median 400, s 0.9)
    10 % multi-image   2-4 images of 1, 3 or 5 tiles; text lognormal(median 150, s 0.8)
    10 % video         8 / 16 / 32 frames (30/65/5 %), 1 tile each; text lognormal(median 80, s 0.8)
    15 % text only     lognormal(median 500, s 1.1), up to 40k tokens
    10 % long CoT      1 image of 1-7 tiles; text lognormal(median 1500, s 0.8), up to 20k tokens
  -> mean ~2.2k tokens, ~75 % of them vision tokens, ~0.9 % of samples over 8192 tokens, ~0.04 % over 16384.
Every method sees the same stream. Over-budget samples: ours includes them as lone micro-batches (up to
2 x pack_tokens, `long_sample_max_tokens`; longer ones are dropped and counted); the baselines give them a
micro-batch of their own.

Methods, per optimizer step of DP ranks x micro-batches:
    padded   consecutive samples batched while n x longest <= pack_tokens, padded to the longest
             (dynamic batch size); micro-batches dealt round-robin to ranks
    naive    consecutive samples concatenated until the next one does not fit (varlen, next-fit);
             micro-batches dealt round-robin
    ours     StreamPacker (best-fit decreasing over a 512-sample buffer, long samples grouped one per
             rank) + schedule_step (LPT + exchanges, LLM and ViT balanced, deferral for long-sample ranks)

Figures: utilisation = real tokens / (micro-batches x pack_tokens) (a lone long micro-batch counts its own
length): 1 - the share of the budget lost to padding or left empty. LLM imbalance = max/mean per-rank LLM
cost (2B model; padded batches pay for their padding, attention len^2 per sample), vision imbalance =
max/mean per-rank vision tokens; both averaged over steps (and the worst step). Packer throughput: lengths
only, one thread. The loader is measured on the demo data and on synthetic 1024x768 JPEGs at 448 tiles.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import tempfile
import time

import numpy as np

from sail_dist.config import ModelConfig, load_config
from sail_dist.data.balance import SampleCost, cost_model_from_config, imbalance, schedule_step
from sail_dist.data.packing import StreamPacker

TILE = (32, 32)  # patch grid of one 448 tile


def _ln(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def sample_mix(rng: random.Random) -> tuple[int, list[tuple[int, int]]]:
    """One sample of the documented mix: (tokens, ViT input grids)."""
    u = rng.random()

    def tiles() -> int:
        return 1 if rng.random() < 0.25 else rng.randint(2, 10) + 1

    if u < 0.35:
        per_image, text = [tiles()], _ln(rng, 60, 0.8, 5, 1500)
    elif u < 0.55:
        per_image, text = [rng.randint(6, 10) + 1], _ln(rng, 400, 0.9, 20, 6000)
    elif u < 0.65:
        per_image, text = [rng.choice([1, 3, 5]) for _ in range(rng.randint(2, 4))], _ln(rng, 150, 0.8, 10, 3000)
    elif u < 0.75:
        per_image, text = [1] * rng.choices([8, 16, 32], [0.3, 0.65, 0.05])[0], _ln(rng, 80, 0.8, 10, 2000)
    elif u < 0.90:
        per_image, text = [], _ln(rng, 500, 1.1, 10, 40000)
    else:
        per_image, text = [rng.randint(1, 6) + (0 if rng.random() < 0.3 else 1)], _ln(rng, 1500, 0.8, 100, 20000)
    n_tiles = sum(per_image)
    return text + 20 + 2 * len(per_image) + 256 * n_tiles, [TILE] * n_tiles


class Stream:
    """The shared sample stream: samples[i] = (tokens, grids); costs computed once."""

    def __init__(self, seed: int, cost):
        self.rng = random.Random(seed)
        self.cost = cost
        self.tokens: list[int] = []
        self.costs: list[SampleCost] = []

    def get(self, i: int) -> int:
        while len(self.tokens) <= i:
            n, grids = sample_mix(self.rng)
            self.tokens.append(n)
            self.costs.append(SampleCost.of(self.cost, n, grids))
        return self.tokens[i]


def _rank_metrics(rank_mbs, costs, cm, B, padded=False):
    """Per-rank LLM cost and vision tokens of micro-batches (lists of sample indices)."""
    llm, vis = [], []
    for mbs in rank_mbs:
        c, v = 0.0, 0
        for mb in mbs:
            if padded and mb:
                longest = max(costs[i].n_tokens for i in mb)
                c += cm.llm(len(mb) * longest, len(mb) * longest * longest)
            else:
                c += sum(costs[i].llm for i in mb)
            v += sum(costs[i].vision_tokens for i in mb)
        llm.append(c)
        vis.append(v)
    return imbalance(llm), imbalance(vis)


def run_baseline(kind: str, stream: Stream, R: int, M: int, B: int, steps: int) -> dict:
    """padded / naive: consecutive micro-batches, round-robin over ranks."""
    i, tok, cap = 0, 0, 0
    llm_i, vis_i = [], []
    for _ in range(steps):
        mbs = []
        while len(mbs) < R * M:
            mb, longest = [i], stream.get(i)
            i += 1
            if longest <= B:
                while True:
                    n = stream.get(i)
                    fits = ((len(mb) + 1) * max(longest, n) <= B) if kind == "padded" else \
                        (sum(stream.tokens[j] for j in mb) + n <= B)
                    if not fits:
                        break
                    mb.append(i)
                    longest = max(longest, n)
                    i += 1
            mbs.append(mb)
        for mb in mbs:
            n = sum(stream.tokens[j] for j in mb)
            tok += n
            cap += max(B, n)
        ranks = [mbs[r::R] for r in range(R)]
        li, vi = _rank_metrics(ranks, stream.costs, stream.cost, B, padded=(kind == "padded"))
        llm_i.append(li)
        vis_i.append(vi)
    return {"utilisation": tok / cap, "llm_imbalance": float(np.mean(llm_i)), "llm_imbalance_max": max(llm_i),
            "vision_imbalance": float(np.mean(vis_i)), "vision_imbalance_max": max(vis_i), "samples": i}


def run_ours(stream: Stream, R: int, M: int, B: int, steps: int, refine: bool = True) -> dict:
    packer = StreamPacker(B, 512, long_sample_max_tokens=2 * B)
    packer.set_step(R * M, R)
    i, tok, cap, dropped, deferred_total, longs = 0, 0, 0, 0, 0, 0
    llm_i, vis_i, plan_s = [], [], []
    deferred: list[int] = []
    for _ in range(steps):
        for s in deferred:
            packer.push(s, stream.tokens[s])
        packs = []
        while len(packs) < R * M:
            p = packer.pop()
            if p is None:
                packer.push(i, stream.get(i))
                i += 1
            else:
                packs.append(p)
        dropped += len(packer.take_dropped())
        t0 = time.perf_counter()
        sched = schedule_step([p.keys for p in packs], stream.costs, R, B, [p.long for p in packs], refine=refine)
        plan_s.append(time.perf_counter() - t0)
        deferred = sched.deferred
        deferred_total += len(deferred)
        longs += sum(p.long for p in packs)
        for r in sched.ranks:
            for mb in r:
                n = sum(stream.tokens[j] for j in mb)
                tok += n
                cap += max(B, n)
        llm_i.append(sched.llm_imbalance)
        vis_i.append(sched.vision_imbalance)
    return {"utilisation": tok / cap, "llm_imbalance": float(np.mean(llm_i)), "llm_imbalance_max": max(llm_i),
            "vision_imbalance": float(np.mean(vis_i)), "vision_imbalance_max": max(vis_i), "samples": i,
            "schedule_ms": 1000 * float(np.mean(plan_s)), "long_packs": longs, "deferred": deferred_total,
            "dropped_over_cap": dropped}


def packer_throughput(n: int = 200_000, B: int = 8192, seed: int = 0) -> float:
    """Samples per second through StreamPacker (push + pop) on lengths alone, one thread."""
    rng = random.Random(seed)
    lengths = [sample_mix(rng)[0] for _ in range(n)]
    packer = StreamPacker(B, 512, long_sample_max_tokens=2 * B)
    t0 = time.perf_counter()
    for k, n_tok in enumerate(lengths):
        packer.push(k, n_tok)
        while packer.pop() is not None:
            pass
    for _ in packer.flush():
        pass
    return n / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- loader
def _demo_overrides(demo_dir: str) -> list[str]:
    from sail_dist.data.demo import DEMO_TOKENS

    tok = [f"model.tokens.{k}={v}" for k, v in DEMO_TOKENS.__dict__.items()]
    return ["data.demo=true", f"data.demo_dir={demo_dir}", "model.vit.image_size=112", "model.llm.vocab_size=1000",
            "data.max_tiles=4", "data.pack_tokens=2048", "data.buffer_size=256", "train.micro_batches=4"] + tok


def _measure(loader, steps: int, warmup: int = 2) -> dict:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    samples = tokens = vis = 0
    for _ in range(steps):
        st = next(it)
        samples += sum(mb.num_samples for mb in st.micro_batches)
        tokens += sum(mb.num_tokens for mb in st.micro_batches)
        vis += sum(mb.n_vision_tokens() for mb in st.micro_batches)
    dt = time.perf_counter() - t0
    loader.close()
    return {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "vision_tokens_per_s": vis / dt}


def loader_demo(steps: int, workers: int) -> dict:
    from sail_dist.data.loader import StepLoader

    demo_dir = os.path.join(tempfile.gettempdir(), "sail_dist_bench_demo")
    cfg = load_config(None, _demo_overrides(demo_dir) + [f"data.num_workers={workers}"])
    return _measure(StepLoader(cfg, 0, 1), steps)


def _synthetic_photos(root: str, n_images: int = 48, n_records: int = 400, seed: int = 0) -> str:
    """JPEG photos of common sizes (1024x768, 768x1024, 1280x720, 640x480) with captions of varied length."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    sizes = [(1024, 768), (768, 1024), (1280, 720), (640, 480)]
    names = []
    for k in range(n_images):
        w, h = sizes[k % len(sizes)]
        arr = np.random.default_rng(k).integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)  # smooth, photo-like content
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, w // 2, h // 2), fill=(200, 30, 30))
        name = f"img/p{k}.jpg"
        img.save(os.path.join(root, name), quality=90)
        names.append(name)
    words = "the a photo of red circle over colourful noise on large small picture shows image".split()
    path = os.path.join(root, "photos.jsonl")
    with open(path, "w") as f:
        for _ in range(n_records):
            text = " ".join(rng.choice(words) for _ in range(_ln(rng, 60, 0.8, 5, 600)))
            f.write(json.dumps({"image": rng.choice(names), "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": text}]}) + "\n")
    return path


def _photos_path() -> str:
    base = os.path.join(tempfile.gettempdir(), "sail_dist_bench_photos")
    path = os.path.join(base, "photos.jsonl")
    if not os.path.exists(path):
        _synthetic_photos(base)
    return path


def loader_photos(steps: int, workers: int) -> dict:
    """Real-size images at 448 tiles (up to 12 + thumbnail), 8192-token packs, the demo tokenizer."""
    from sail_dist.data.demo import DEMO_TOKENS, ensure_demo
    from sail_dist.data.loader import StepLoader

    path = _photos_path()
    demo = ensure_demo(os.path.join(tempfile.gettempdir(), "sail_dist_bench_demo"))
    tok = [f"model.tokens.{k}={v}" for k, v in DEMO_TOKENS.__dict__.items()]
    cfg = load_config(None, tok + [f"data.sources=[{{path: {path}}}]", f"data.tokenizer={demo.tokenizer}",
                                   "model.llm.vocab_size=1000", "data.pack_tokens=8192", "data.buffer_size=64",
                                   "train.micro_batches=1", f"data.num_workers={workers}"])
    return _measure(StepLoader(cfg, 0, 1), steps, warmup=1)


def planning_throughput(n: int = 3000) -> dict:
    """describe() (header read + tokenize) rate: every rank plans the global stream, so this bounds the
    cluster-wide sample rate."""
    from sail_dist.config import DataSource
    from sail_dist.data.demo import DEMO_TOKENS, ensure_demo
    from sail_dist.data.records import JsonlSource
    from sail_dist.data.samples import SampleBuilder

    demo = ensure_demo(os.path.join(tempfile.gettempdir(), "sail_dist_bench_demo"))
    path = _photos_path()
    cfg = load_config(None, [f"model.tokens.{k}={v}" for k, v in DEMO_TOKENS.__dict__.items()]
                      + ["model.llm.vocab_size=1000", f"data.tokenizer={demo.tokenizer}", "data.demo=true"])
    b = SampleBuilder.from_config(cfg, demo.tokenizer)
    src = JsonlSource(DataSource(path=path), 0)
    rows = [i % len(src) for i in range(n)]
    t0 = time.perf_counter()
    tokens = 0
    for r in rows:
        tokens += b.describe(src.record(r)).n_tokens
    dt = time.perf_counter() - t0
    return {"samples_per_s": n / dt, "tokens_per_s": tokens / dt}


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps simulated per configuration")
    ap.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    args = ap.parse_args(argv)
    steps = 4 if args.quick else args.steps
    cm = cost_model_from_config(ModelConfig())  # SAIL-VL2-2B
    # global batch ~2M tokens per step: 8 ranks x 32 or 64 ranks x 4 micro-batches of 8192 tokens
    configs = [(8, 32, 8192), (64, 4, 8192), (8, 16, 16384), (64, 2, 16384)]
    results: dict = {"configs": {}}
    print(f"{'ranks x mb x budget':>22} {'method':>7} {'util':>7} {'LLM imb':>8} {'(worst)':>8} {'vis imb':>8} "
          f"{'(worst)':>8} {'sched ms':>8}")
    for R, M, B in configs:
        key = f"{R}x{M}x{B}"
        row = {}
        for method in ("padded", "naive", "lpt_only", "ours"):
            stream = Stream(seed=0, cost=cm)
            if method in ("padded", "naive"):
                res = run_baseline(method, stream, R, M, B, steps)
            else:
                res = run_ours(stream, R, M, B, steps, refine=(method == "ours"))
            row[method] = res
            print(f"{key:>22} {method:>7} {res['utilisation']:7.4f} {res['llm_imbalance']:8.4f} "
                  f"{res['llm_imbalance_max']:8.4f} {res['vision_imbalance']:8.4f} {res['vision_imbalance_max']:8.4f} "
                  f"{res.get('schedule_ms', float('nan')):8.1f}")
        results["configs"][key] = row
    sps = packer_throughput()
    print(f"\npacker throughput (lengths only, 1 thread): {sps:,.0f} samples/s")
    plan = planning_throughput()
    print(f"planning metadata (header + tokenize, 1 thread): {plan['samples_per_s']:,.0f} samples/s, "
          f"{plan['tokens_per_s']:,.0f} tokens/s")
    loaders = {}
    for name, fn in (("demo_w0", lambda: loader_demo(10 if args.quick else 30, 0)),
                     ("demo_w2", lambda: loader_demo(10 if args.quick else 30, 2)),
                     ("photos_w0", lambda: loader_photos(3 if args.quick else 12, 0)),
                     ("photos_w2", lambda: loader_photos(3 if args.quick else 12, 2))):
        loaders[name] = fn()
        r = loaders[name]
        print(f"loader {name:>10}: {r['samples_per_s']:8.1f} samples/s {r['tokens_per_s']:10,.0f} tokens/s "
              f"({r['vision_tokens_per_s']:,.0f} vision tokens/s)")
    need = 25_000
    print(f"\nassumed need: SAIL-VL2-2B at ~40 % MFU on an H100-class GPU ~ 989e12 * 0.4 / (6 * 2.6e9) ~ {need:,} "
          f"tokens/s per GPU; 8 GPUs = {8 * need:,} tokens/s, each rank materialising its own {need:,}")
    ours64 = results["configs"]["64x4x8192"]["ours"]
    summary = {
        "bench": "packing", "machine": f"{platform.machine()} {os.cpu_count()} cores", "steps": steps,
        "utilisation_8192": ours64["utilisation"], "llm_imbalance_64": ours64["llm_imbalance"],
        "llm_imbalance_64_worst": ours64["llm_imbalance_max"], "vision_imbalance_64": ours64["vision_imbalance"],
        "vision_imbalance_64_worst": ours64["vision_imbalance_max"],
        "padded_utilisation_8192": results["configs"]["64x4x8192"]["padded"]["utilisation"],
        "naive_utilisation_8192": results["configs"]["64x4x8192"]["naive"]["utilisation"],
        "naive_llm_imbalance_64": results["configs"]["64x4x8192"]["naive"]["llm_imbalance"],
        "naive_vision_imbalance_64": results["configs"]["64x4x8192"]["naive"]["vision_imbalance"],
        "packer_samples_per_s": sps, "planning_samples_per_s": plan["samples_per_s"],
        "planning_tokens_per_s": plan["tokens_per_s"],
        "loader_demo_w2_samples_per_s": loaders["demo_w2"]["samples_per_s"],
        "loader_demo_w2_tokens_per_s": loaders["demo_w2"]["tokens_per_s"],
        "loader_photos_w2_tokens_per_s": loaders["photos_w2"]["tokens_per_s"],
        "assumed_tokens_per_s_per_gpu": need,
        "table": {k: {m: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in r.items()}
                      for m, r in v.items()} for k, v in results["configs"].items()},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
