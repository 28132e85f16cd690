"""AdaLRS benchmark (issue 17): the tiny demo model started at 10x too small an lr, with and without the search.

    python -m sail_dist.bench.adalrs [--steps 200] [--lr 2e-4] [--window 15] [--alpha 2] [--out runs/bench_adalrs]

Two runs of the real trainer (`python -m sail_dist`, GPU backend = DeepSpeed ZeRO-2 on CPU, one rank each, side
by side) on the same embedded demo data in the same order: the demo config (configs/demo/demo.yaml, whose tuned peak lr is 2e-3) at
`--lr` (10x smaller) with its cosine schedule, once fixed and once with `train.adalrs.enabled=true`. The data stream
does not depend on the lr, so both runs see the same batches. Prints a table of the loss at a few steps, the
trials, and the final figures (last-step loss and the mean over the last 20 steps), writes a PNG of the two loss
curves with every trial marked (accepted / rolled back) and the lr of each run, and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")


def start(name: str, out_root: str, args, extra: list[str]) -> dict:
    """Launch one training run (a subprocess); `finish` waits for it and reads its logs."""
    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: its metrics.jsonl is appended to
    cmd = [sys.executable, "-m", "sail_dist", "--config", DEMO, f"train.out_dir={out}", "train.resume=none",
           f"data.demo_dir={os.path.join(out_root, 'demo_data')}", f"train.steps={args.steps}", f"train.lr={args.lr}",
           f"train.min_lr={args.lr * 0.05}", f"train.warmup_steps={args.warmup}", "train.save_every=0",
           "train.eval_samples=0", "train.export_hf=false", "train.tensorboard=true", f"train.log_every={args.steps}",
           f"data.pack_tokens={args.pack_tokens}", *extra]
    # one thread per process: on a small shared CPU more threads thrash (measured 20x slower steps)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log_file = open(os.path.join(out_root, f"{name}.log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    return {"name": name, "out": out, "cmd": cmd, "proc": proc, "log": log_file, "t0": time.perf_counter()}


def finish(run: dict) -> dict:
    rc = run["proc"].wait()
    run["log"].close()
    if rc != 0:
        tail = open(run["log"].name).read()[-4000:]
        raise SystemExit(f"{run['name']} run failed ({' '.join(run['cmd'])}):\n{tail}")
    out = run["out"]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = {row["step"]: row for row in rows if "loss" in row}
    trials_path = os.path.join(out, "adalrs.jsonl")
    trials = [json.loads(x) for x in open(trials_path)] if os.path.exists(trials_path) else []
    return {"loss": [steps[s]["loss"] for s in sorted(steps)], "lr": [steps[s]["lr"] for s in sorted(steps)],
            "trials": trials, "wall_s": time.perf_counter() - run["t0"], "out_dir": out}


def tail_mean(xs: list[float], n: int = 20) -> float:
    return sum(xs[-n:]) / len(xs[-n:])


def plot(path: str, fixed: dict, ada: dict, title: str) -> None:
    """Two panels drawn with Pillow (no matplotlib here): loss per step of both runs, trials marked; lr (log)."""
    from PIL import Image, ImageDraw

    W, H, L, R = 1000, 720, 70, 20
    panels = [(40, 430), (480, 680)]  # (top, bottom) pixel rows of the loss and lr panels
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    n = len(fixed["loss"])
    colours = {"fixed": (40, 90, 200), "adalrs": (220, 110, 20)}

    def xpix(step: int) -> float:  # step is 1-based
        return L + (step - 1) / max(n - 1, 1) * (W - L - R)

    def axes(top: int, bottom: int, lo: float, hi: float, label: str, fmt) -> callable:
        d.rectangle([L, top, W - R, bottom], outline="black")
        for i in range(5):
            v = lo + (hi - lo) * i / 4
            y = bottom - (v - lo) / (hi - lo) * (bottom - top)
            d.line([L - 4, y, L, y], fill="black")
            d.text((4, y - 6), fmt(v), fill="black")
        for i in range(6):
            s = 1 + round((n - 1) * i / 5)
            d.line([xpix(s), bottom, xpix(s), bottom + 4], fill="black")
            d.text((xpix(s) - 10, bottom + 6), str(s), fill="black")
        d.text((L + 5, top + 4), label, fill="black")
        return lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)

    losses = fixed["loss"] + ada["loss"]
    ypix = axes(*panels[0], min(losses), max(losses), "training loss per step", lambda v: f"{v:.2f}")
    for name, r in (("fixed", fixed), ("adalrs", ada)):
        pts = [(xpix(i + 1), ypix(v)) for i, v in enumerate(r["loss"])]
        d.line(pts, fill=colours[name], width=2)
    for tr in ada["trials"]:
        x, y = xpix(tr["step"]), ypix(ada["loss"][tr["step"] - 1])
        if tr["decision"] == "accepted":
            d.polygon([(x, y - 9), (x - 7, y + 5), (x + 7, y + 5)], fill=(30, 160, 60))
        else:
            d.line([x - 7, y - 7, x + 7, y + 7], fill=(200, 20, 20), width=3)
            d.line([x - 7, y + 7, x + 7, y - 7], fill=(200, 20, 20), width=3)
    lrs = [math.log10(v) for v in fixed["lr"] + ada["lr"] if v > 0]
    ylr = axes(*panels[1], min(lrs), max(lrs) + 1e-9, "lr (log10)", lambda v: f"{10 ** v:.1e}")
    for name, r in (("fixed", fixed), ("adalrs", ada)):
        d.line([(xpix(i + 1), ylr(math.log10(v))) for i, v in enumerate(r["lr"])], fill=colours[name], width=2)
    d.text((L, 8), title, fill="black")
    lx = W - R - 330
    d.line([lx, 20, lx + 25, 20], fill=colours["fixed"], width=3)
    d.text((lx + 30, 14), "fixed lr", fill="black")
    d.line([lx + 95, 20, lx + 120, 20], fill=colours["adalrs"], width=3)
    d.text((lx + 125, 14), "AdaLRS", fill="black")
    d.polygon([(lx + 185, 14), (lx + 179, 25), (lx + 191, 25)], fill=(30, 160, 60))
    d.text((lx + 196, 14), "accepted", fill="black")
    d.line([lx + 255, 14, lx + 265, 25], fill=(200, 20, 20), width=3)
    d.line([lx + 255, 25, lx + 265, 14], fill=(200, 20, 20), width=3)
    d.text((lx + 270, 14), "rolled back", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-4, help="start lr (the demo's tuned peak is 2e-3)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--window", type=int, default=15, help="train.adalrs.window (k)")
    p.add_argument("--alpha", type=float, default=2.0, help="train.adalrs.alpha (the default 1.5 needs more trials "
                   "to climb 10x than this short run holds)")
    p.add_argument("--pack-tokens", type=int, default=256)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_adalrs"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # The demo data is generated once, by a 1-step run, so that the two runs (side by side, one thread each) share it.
    finish(start("data", args.out, argparse.Namespace(**{**vars(args), "steps": 1}), []))
    runs = [start("fixed", args.out, args, []),
            start("adalrs", args.out, args, ["train.adalrs.enabled=true", f"train.adalrs.window={args.window}",
                                             f"train.adalrs.alpha={args.alpha}"])]
    fixed, ada = (finish(r) for r in runs)

    print(f"{'step':>6} {'fixed loss':>11} {'AdaLRS loss':>12} {'fixed lr':>10} {'AdaLRS lr':>10}")
    for s in sorted({1, *range(args.steps // 8, args.steps + 1, args.steps // 8)}):
        print(f"{s:>6} {fixed['loss'][s - 1]:>11.4f} {ada['loss'][s - 1]:>12.4f} {fixed['lr'][s - 1]:>10.2e} "
              f"{ada['lr'][s - 1]:>10.2e}")
    print(f"\n{'trial':>6} {'steps':>9} {'decision':>12} {'slope before':>13} {'slope trial':>12} {'lr before':>10} "
          f"{'lr after':>10}")
    for i, tr in enumerate(ada["trials"]):
        print(f"{i + 1:>6} {tr['trial_start'] + 1:>4}-{tr['step']:<4} {tr['decision']:>12} {tr['base_slope']:>13.4g} "
              f"{tr['trial_slope']:>12.4g} {tr['lr_before']:>10.2e} {tr['lr_after']:>10.2e}")
    png = os.path.join(args.out, "adalrs_loss.png")
    scale = ada["lr"][-1] / fixed["lr"][-1]
    plot(png, fixed, ada, f"tiny demo model, start lr {args.lr:g} (10x below the demo's 2e-3), {args.steps} steps, "
                          f"window {args.window}, alpha {args.alpha:g}: final lr scale {scale:.3g}")
    res = {"bench": "adalrs", "machine": f"{platform.machine()} {os.cpu_count()} cores", "steps": args.steps,
           "start_lr": args.lr, "window": args.window, "alpha": args.alpha,
           "fixed_final_loss": fixed["loss"][-1], "adalrs_final_loss": ada["loss"][-1],
           "fixed_last20_mean": tail_mean(fixed["loss"]), "adalrs_last20_mean": tail_mean(ada["loss"]),
           "final_scale": scale, "peak_lr_fixed": max(fixed["lr"]), "peak_lr_adalrs": max(ada["lr"]),
           "trials": len(ada["trials"]), "accepted": sum(t["decision"] == "accepted" for t in ada["trials"]),
           "rolled_back": sum(t["decision"] == "rolled_back" for t in ada["trials"]),
           "wall_s_fixed": fixed["wall_s"], "wall_s_adalrs": ada["wall_s"], "png": png,
           "adalrs_lower": tail_mean(ada["loss"]) < tail_mean(fixed["loss"])}
    print(f"\nlast-20-step mean loss: fixed {res['fixed_last20_mean']:.4f}, AdaLRS {res['adalrs_last20_mean']:.4f}; "
          f"final step: {res['fixed_final_loss']:.4f} vs {res['adalrs_final_loss']:.4f}; lr scale found "
          f"{scale:.3g} ({res['accepted']} accepted, {res['rolled_back']} rolled back); plot: {png}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
