"""Where a micro-batch's time goes: forward + backward of the whole model and of its parts, timed apart.

    python -m sail_dist.bench.model_parts [--model configs/model/sailvl2_2b.yaml] [--llm-layers 0] [--seq 8192]
        [--sample-len 2048] [--tiles-per-sample 2] [--repeats 8] [--warmup 2] [--profile PART] [key.sub=value ...]

The model is built as the engines build it (parallel/recipe.py: freeze, compile, checkpointing, MoE hooks), in
the training dtype, on one device, with the backend's OpSet; one packed micro-batch of `--seq` tokens (samples of
`--sample-len`, each with `--tiles-per-sample` 448 tiles) is the input. A forward of the whole model records the
inputs of each part (forward pre-hooks), then each part runs forward + backward on copies of them as leaves:

  whole       the model: embedding, ViT + adapter, decoder layers, norm + lm head + cross-entropy
  vision      ViT + adapter (`SailVL.vision_tokens`)
  llm_layers  every decoder layer, in sequence (`SailVL.decode`)
  head        final norm + lm head + cross-entropy (`Qwen3.loss`)
  rest        whole - vision - llm_layers - head: the embedding lookup, the vision tokens' scatter, the glue
  attention / mlp / experts   one decoder layer's attention block, MLP (dense or MoE: router, top-k, experts,
              load statistics, aux loss) and, in MoE layers, the experts op alone; per layer of the first of each
              kind, times the number of such layers

Each row: milliseconds per micro-batch (CUDA events around `--repeats` runs after `--warmup`), the training FLOPs
of that part (model/flops.py: the figures MFU is computed from), TFLOP/s and the fraction of the device's dense
bf16 peak. `device ms` repeats the timing with the runs queued behind a `torch.cuda._sleep`, so the host's launch
time is off the clock: where it is well below `ms`, the part is launch-bound; a part whose code waits on the
device (the embedding's one read of the image slots) refills the queue from empty and shows no difference.
Gradients are dropped between runs (no accumulation kernel in the figure), as the engine's ZeRO hooks take them.
With `train.compile=true` the rows run what the recipe compiled: dense layers are compiled whole, so their
attention / mlp rows (the sub-modules called alone) run eager there.

`--profile PART` runs that part under torch.profiler and prints its kernels and their split by kind (matmul /
attention / elementwise / copies / ...; bench.train_step's table). Ends with one JSON line. On CPU it runs the
reference OpSet (a check of the bench itself; its figures mean nothing there).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Callable

import torch

from sail_dist.backends.base import model_dtype
from sail_dist.backends.gpu.engine import resolve_opset
from sail_dist.bench.train_step import add_shape_args, micro_batch, report_profile, shape_overrides
from sail_dist.config import load_config
from sail_dist.model.flops import (batch_flops_by_part, llm_layer_attention, llm_layer_attn_proj_per_token,
                                   moe_experts_per_token)
from sail_dist.model.moe import MoE
from sail_dist.parallel.recipe import build_train_model
from sail_dist.train.metrics import peak_flops

PARTS = ("whole", "vision", "llm_layers", "head", "rest", "attention", "mlp", "experts")


def _inputs(args: tuple, grad_args: tuple[int, ...]) -> tuple:
    """A part's captured inputs as its own: copies, the positions in `grad_args` as leaves that take gradients
    (what flows in from the previous part in training; cos / sin, cu_seqlens, expert ids do not)."""
    out = []
    for i, x in enumerate(args):
        if isinstance(x, torch.Tensor):
            x = x.detach().clone().requires_grad_(i in grad_args and x.is_floating_point())
        out.append(x)
    return tuple(out)


def _backward(out) -> None:
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


class Capture:
    """Forward pre-hooks that keep the positional args of the first call of each named module."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.inputs: dict[str, tuple] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            if name not in self.inputs:
                self.inputs[name] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sublayer_index(model) -> int:
    """The decoder layer the attention / mlp / experts rows time: the first dense one, else the first MoE one."""
    layers = list(model.llm.layers)
    return next((i for i, layer in enumerate(layers) if not isinstance(layer.mlp, MoE)), 0)


def part_runners(model, batch) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    """{part: a closure running its forward + backward once}, {part: how many layers one run of it stands for}.
    The inputs come from one forward of the whole model."""
    layers = list(model.llm.layers)
    first = sublayer_index(model)
    layer = layers[first]
    moe = isinstance(layer.mlp, MoE)
    hooked = {"llm_layers": layers[0], "head": model.llm.norm, "attention": layer.attn, "mlp": layer.mlp}
    if moe:
        hooked["experts"] = layer.mlp.experts
    cap = Capture(hooked)
    with torch.no_grad():
        model(batch)
    cap.remove()
    inp = cap.inputs
    same_kind = sum(isinstance(m.mlp, MoE) == moe for m in layers)
    counts = {"attention": len(layers), "mlp": same_kind, "experts": same_kind if moe else 0}

    def call(fn, args: tuple, grad_args: tuple[int, ...] = (0,)):
        def run():
            _backward(fn(*_inputs(args, grad_args)))
        return run

    runners = {
        "whole": lambda: model(batch).loss_T.sum().backward(),
        "llm_layers": call(lambda h: model.decode(h, batch), inp["llm_layers"][:1]),
        # (the final norm's input; Qwen3.loss runs the norm, the lm head and the cross-entropy)
        "head": call(lambda h: model.llm.loss(h, batch.labels), inp["head"][:1]),
        "attention": call(layer.attn, inp["attention"]),
        "mlp": call(layer.mlp, inp["mlp"]),
    }
    if batch.num_images:
        runners["vision"] = call(lambda: model.vision_tokens(batch.pixel_values, batch.image_grid_hw), ())
    if moe:  # (x and the top-k weights take gradients: the router trains through the weights)
        runners["experts"] = call(layer.mlp.experts, inp["experts"], grad_args=(0, 2))
    return runners, counts


def part_flops(cfg, batch, layer_index: int, counts: dict[str, int]) -> dict[str, float]:
    """Training FLOPs per part of `batch` (model/flops.py); the attention / mlp / experts rows for all layers of
    their kind (each layer trains its weights and passes input gradients on: 3x its forward)."""
    by = batch_flops_by_part(cfg.model, batch, cfg.train.train_modules).train
    llm = cfg.model.llm
    tokens = sum(batch.seqlens())
    attn = 3.0 * (tokens * llm_layer_attn_proj_per_token(llm) + sum(llm_layer_attention(llm, n)
                                                                      for n in batch.seqlens()))
    experts = 3.0 * tokens * moe_experts_per_token(llm) if llm.is_moe_layer(layer_index) else 0.0
    return {"whole": by.total, "vision": by.vision, "llm_layers": sum(by.layers), "head": by.head,
            "rest": by.total - by.vision - sum(by.layers) - by.head, "attention": attn * counts["attention"],
            "mlp": (by.layers[layer_index] - attn) * counts["mlp"], "experts": experts * counts["experts"]}


def time_part(run: Callable[[], None], model, repeats: int, warmup: int, cuda: bool, queued: bool = False) -> float:
    """Milliseconds per run: wall time (events around the runs), or with `queued` the device's time for runs
    queued behind a sleep kernel long enough to cover their launch."""
    for _ in range(warmup):
        run()
        model.zero_grad(set_to_none=True)
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
            model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1e3 / repeats
    torch.cuda.synchronize()
    if queued:  # a sleep longer than the host takes to queue the runs (their wall time, measured just before)
        wall_ms = time_part(run, model, max(repeats // 2, 1), 0, cuda)
        torch.cuda._sleep(int(2.0 * wall_ms * repeats * 1e-3 * _clock_hz()))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
        model.zero_grad(set_to_none=True)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _clock_hz() -> float:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return float(getattr(props, "clock_rate", 1_980_000)) * 1e3  # (kHz; the H200's 1.98 GHz where unknown)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--no-device-time", action="store_true", help="skip the queued (device-only) timing")
    p.add_argument("--profile", default="", choices=("",) + PARTS, help="profile this part's forward + backward")
    p.add_argument("--label", default="")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    wanted = [x for x in a.parts.split(",") if x]
    if unknown := sorted(set(wanted) - set(PARTS)):
        p.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    cfg = load_config(a.model, [*shape_overrides(a), *a.overrides])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    ops = resolve_opset(cfg, device)  # (the GPU engine's choice: backend.opset, `auto` by device)
    t0 = time.perf_counter()
    model, _ = build_train_model(cfg, ops, aux_loss_weight=cfg.model.llm.aux_loss_coeff, reduce_counts=None)
    model.to(device=device, dtype=model_dtype(cfg, device)).train()
    build_s = time.perf_counter() - t0
    batch = micro_batch(cfg, a.seq, a.sample_len, a.tiles_per_sample, seed=0)
    batch = (batch.pin_memory() if cuda else batch).to(device)
    runners, counts = part_runners(model, batch)
    flops = part_flops(cfg, batch, sublayer_index(model), counts)
    peak = peak_flops(torch.cuda.get_device_name() if cuda else "cpu")

    ms, device_ms = {}, {}
    for name in wanted:
        if name in runners:
            ms[name] = time_part(runners[name], model, a.repeats, a.warmup, cuda)
            if cuda and not a.no_device_time:
                device_ms[name] = time_part(runners[name], model, a.repeats, 0, cuda, queued=True)
    for t in (ms, device_ms) if "rest" in wanted else ():  # (vision: absent without images)
        if {"whole", "llm_layers", "head"} <= set(t):
            t["rest"] = t["whole"] - t.get("vision", 0.0) - t["llm_layers"] - t["head"]

    rows = []
    print(f"{'part':<12}{'x':>4}{'ms':>10}{'device ms':>11}{'TFLOP':>9}{'TFLOP/s':>9}{'of peak':>9}")
    for name in wanted:
        if name not in ms:
            continue
        scale = counts.get(name, 1)
        t = ms[name] * scale
        dev = device_ms[name] * scale if name in device_ms else None
        rate = flops[name] / (t * 1e-3) if t > 0 else 0.0
        row = {"part": name, "layers": scale, "ms": round(t, 3), "device_ms": None if dev is None else round(dev, 3),
               "train_tflop": float(f"{flops[name] / 1e12:.4g}"), "tflops": float(f"{rate / 1e12:.4g}"),
               "of_peak": round(rate / peak, 4) if peak else None}
        rows.append(row)
        frac = f"{100 * row['of_peak']:.1f}%" if peak else "-"
        dev_s = f"{dev:.2f}" if dev is not None else "-"
        print(f"{name:<12}{scale:>4}{t:>10.2f}{dev_s:>11}{flops[name] / 1e12:>9.3f}{rate / 1e12:>9.1f}{frac:>9}")

    profile_split = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        run = runners[a.profile]
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(2):
                run()
                model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        print(f"profile of `{a.profile}`, 2 runs:")
        profile_split = report_profile(prof, wall, cuda)

    res = {"label": a.label or a.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "llm_layers": cfg.model.llm.num_layers, "seq": a.seq, "sample_len": a.sample_len,
           "tiles_per_sample": a.tiles_per_sample, "images": batch.num_images, "compile": cfg.train.compile,
           "build_s": round(build_s, 1), "parts": rows,
           **({"profile": a.profile, "profile_split_ms": profile_split} if profile_split else {})}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
