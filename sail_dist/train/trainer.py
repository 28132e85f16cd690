"""The training loop, written once for both backends:

    loader (packed, balanced micro-batches) -> engine.train_step -> metrics -> checkpoints

Resume restores the engine (model + optimizer), the data-loader position and packer buffers and the
RNG states, so a resumed run continues exactly as the uninterrupted one would have.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from sail_dist.backends.base import get_backend
from sail_dist.config import Config, dump_config
from sail_dist.data.loader import build_loader
from sail_dist.train import out_of_memory
from sail_dist.train.batch_plan import resolve_batch
from sail_dist.train.checkpoint import (check_resume_config, load_checkpoint, resolve_resume, save_checkpoint,
                                       saved_dp_size)
from sail_dist.train.adalrs import AdaLRS
from sail_dist.train.lr import lr_at
from sail_dist.train.metrics import Metrics

log = logging.getLogger("sail_dist")


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_on_backend(cfg: Config, body: Callable[[Config, Any, Any], dict]) -> dict:
    """Set up the configured backend (process groups, per-rank logging and seeds), run `body(cfg, backend, env)`,
    and tear the backend down (cleanly only when `body` returned): the frame of every runner (SFT, RL)."""
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    setup_logging(env.rank)
    seed_everything(cfg.train.seed + env.rank)
    clean = False
    try:
        summary = body(cfg, backend, env)
        clean = True
        return summary
    finally:
        backend.teardown(clean=clean)


def train(cfg: Config) -> dict:
    """Run (or resume) the training job described by `cfg`; returns a summary (final loss, paths, eval)."""
    return run_on_backend(cfg, _train)


def _train(cfg: Config, backend, env) -> dict:
    cfg, _ = resolve_batch(cfg, env.dp_size)  # batches / epochs given in samples -> packed steps
    t = cfg.train
    start, nonfinite_run, skipped_total = 0, 0, 0
    resume = resolve_resume(cfg)
    # before anything is built or written; another DP size is an elastic resume (docs/checkpoints.md)
    meta = check_resume_config(resume, cfg, env.dp_size) if resume else None
    if meta is not None and meta["step"] >= t.steps:
        return _already_complete(cfg, env, resume, meta["step"])
    loader = build_loader(cfg, dp_rank=env.dp_rank, dp_size=env.dp_size)
    engine = backend.build(cfg, env)
    if resume:
        meta, rank_state = load_checkpoint(resume, engine, env.rank, env.world_size, cfg.backend.name)
        loader.load_state_dict(rank_state["loader"])
        start, skipped_total = meta["step"], meta.get("skipped_steps", 0)
        log.info("resumed from %s at step %d", resume, start)
        old_dp, old_m = saved_dp_size(meta), meta.get("config", {}).get("train", {}).get("micro_batches")
        if (old_dp, old_m) != (env.dp_size, t.micro_batches):
            log.info("elastic resume: DP %d x %s micro-batches per step -> DP %d x %d%s", old_dp, old_m, env.dp_size,
                     t.micro_batches, "" if old_m is None or old_dp * old_m == env.dp_size * t.micro_batches else
                     " (the global batch in packs changed: keep dp x train.micro_batches to continue the same run)")
    if env.is_main:  # the run is accepted: its config now describes the out_dir
        os.makedirs(t.out_dir, exist_ok=True)
        path = os.path.join(t.out_dir, "config.yaml")
        dump_config(cfg, path + ".tmp")
        os.replace(path + ".tmp", path)
    metrics = Metrics(t.out_dir, env, t.steps, start, tensorboard=t.tensorboard)
    adalrs = None  # online lr search (train.adalrs): lr = scale * lr_at(step); may roll the engine back
    if t.adalrs.enabled:
        adalrs = AdaLRS(t.adalrs, t, lambda s: lr_at(t, s), env.rank, t.out_dir, metrics, env.is_main)
        if resume:
            adalrs.load_state_dict(rank_state.get("adalrs"), resume)
        else:
            adalrs.start_fresh()
    log.info("training %d steps (%d micro-batches x %d DP ranks per step) on %s; logs: %s", t.steps,
             t.micro_batches, env.dp_size, env.device_name, t.out_dir)
    last_ckpt, losses, step = resume, [], start
    t0 = time.perf_counter()
    for step in range(start, t.steps):
        data = next(loader)
        data_stats = data.stats.as_dict()
        if data_stats["dropped"] and env.is_main:  # planning drops are global: report them once
            log.warning("step %d: skipped bad samples %s (data.on_bad_sample=skip); so far %s", step + 1,
                        data_stats["dropped"], loader.bad_samples().brief())
        if data_stats["decode_dropped"]:  # decode drops are this rank's own
            log.warning("step %d, rank %d: skipped samples at decode %s", step + 1, env.rank, data_stats["decode_dropped"])
        if step == start and t.compile and env.is_main:  # so that a silent first step does not look like a hang
            log.info("step %d compiles the model first (train.compile=true; cache %s): minutes on a cold cache at "
                     "the 2B shape, seconds on a warm one", step + 1,
                     os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"))
        t_step = time.perf_counter()
        with out_of_memory.explained(cfg, step + 1, env.rank, last_ckpt, env.device):
            stats = engine.train_step(data.micro_batches, adalrs.lr(step) if adalrs else lr_at(t, step))
        if step == start and t.compile and env.is_main:
            log.info("step %d (compilation included) took %.1f s", step + 1, time.perf_counter() - t_step)
        if stats.skipped:
            nonfinite_run += 1
            skipped_total += 1
            log.warning("step %d: non-finite loss %.4g / grad norm %.4g; update skipped (%d in a row)",
                        step + 1, stats.loss, stats.grad_norm, nonfinite_run)
            if nonfinite_run >= t.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{nonfinite_run} consecutive steps (last: {step + 1}) had a non-finite loss or gradient. "
                    "Lower train.lr, check the data for broken samples (bad-sample counts are in the log), or "
                    f"resume from the last good checkpoint ({last_ckpt or 'none written yet'}) with other settings.")
        else:
            nonfinite_run = 0
            losses.append(stats.loss)
        metrics.log_step(step, stats, {**data_stats, "skipped_total": skipped_total}, every=t.log_every)
        if adalrs:  # a trial's batches stay consumed: a rollback restores the weights, not the data position
            adalrs.after_step(step, stats.loss, engine)
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps:
            last_ckpt = _save(cfg, engine, loader, env, step + 1, skipped_total, adalrs)
    if t.steps > start or not last_ckpt:
        last_ckpt = _save(cfg, engine, loader, env, t.steps, skipped_total, adalrs)
    bad = loader.bad_samples()  # distinct records (file:line) and occurrences (a bad record recurs every pass)
    summary = {"steps": t.steps, "complete": True, "final_loss": losses[-1] if losses else None,
               "first_loss": losses[0] if losses else None, "checkpoint": last_ckpt,
               "tensorboard": os.path.join(t.out_dir, "tensorboard"), "metrics": os.path.join(t.out_dir, "metrics.jsonl"),
               "train_time_s": time.perf_counter() - t0, "skipped_steps": skipped_total,
               "bad_samples": bad.summary(), "bad_records": bad.distinct(), "bad_occurrences": bad.total,
               "is_main": env.is_main}
    if adalrs:
        summary["adalrs"] = adalrs.summary()
    want_eval = cfg.data.demo and t.eval_samples > 0
    if t.export_hf or want_eval:
        model = _gather_model(cfg, engine, env)  # collective; the full model on rank 0, None elsewhere
        if t.export_hf and model is not None:
            from sail_dist.model import hf

            summary["hf_export"] = os.path.join(t.out_dir, "hf")
            hf.save_sailvl(model, summary["hf_export"])
            log.info("HF export (SAIL-VL2 layout): %s", summary["hf_export"])
        if want_eval and model is not None:
            from sail_dist.train.evaluate import evaluate_demo

            summary["eval"] = evaluate_demo(cfg, model)
            metrics.log_scalars("eval", {"exact_match": summary["eval"]["accuracy"]}, t.steps)
    metrics.close()
    loader.close()
    if env.is_main:
        log.info("done: loss %s -> %s over %d steps; checkpoint %s; TensorBoard: tensorboard --logdir %s",
                 _fmt(summary["first_loss"]), _fmt(summary["final_loss"]), t.steps - start, last_ckpt,
                 summary["tensorboard"])
        if summary["bad_samples"]:
            log.info("bad samples (skipped and counted): %s", summary["bad_samples"])
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _already_complete(cfg: Config, env, checkpoint: str, step: int) -> dict:
    """A re-run of a finished run: nothing to train; say so, and how to train again."""
    t = cfg.train
    if env.is_main:
        log.info("%s is complete: its checkpoint %s is at step %d and train.steps=%d, so there is nothing to train. "
                 "To train further, raise train.steps (it resumes from step %d); to train again from scratch, set "
                 "train.resume=none or a new train.out_dir.", t.out_dir, checkpoint, step, t.steps, step)
    return {"steps": t.steps, "complete": True, "already_complete": True, "resumed_step": step,
            "final_loss": None, "first_loss": None, "checkpoint": checkpoint, "train_time_s": 0.0,
            "is_main": env.is_main}


def _gather_model(cfg: Config, engine, env):
    """Collective: the trained weights in a plain single-device SailVL (fp32, reference ops) on rank 0."""
    from sail_dist.kernels import get_opset
    from sail_dist.model.sailvl import SailVL

    state = engine.full_state_dict()
    if not env.is_main:
        return None
    model = SailVL(cfg.model, get_opset("reference"))
    model.load_state_dict(state)
    return model.float().eval()


def _save(cfg: Config, engine, loader, env, step: int, skipped_total: int, adalrs: AdaLRS | None = None) -> str:
    rank_state = {"loader": loader.state_dict()}
    if adalrs is not None:  # its state, and the snapshot of a trial in progress
        rank_state["adalrs"] = adalrs.state_dict()
    path = save_checkpoint(cfg, engine, step, env.rank, env.world_size, rank_state,
                           {"skipped_steps": skipped_total, "dp_size": env.dp_size},
                           write_extra=adalrs.write_snapshot if adalrs is not None else None)
    log.info("checkpoint written: %s", path)
    return path
