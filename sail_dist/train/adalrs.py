"""AdaLRS: online learning-rate search on the training-loss descent velocity.

Method: Dong et al., "AdaLRS: Loss-Guided Adaptive Learning Rate Search for Efficient Foundation Model Pretraining"
(arXiv 2506.13274, NeurIPS 2025; Algorithm 1), as used by the SAIL-VL2 report (section 3.2.3, Eq. 1) in basic
multimodal pre-training (2e-4 start, found ~6.75e-4). The paper's premise (its sec. 3): both the training loss and
its descent velocity are convex in the lr and share the optimum, so maximising the descent velocity online finds it.

What this controller does (docs/adalrs.md has the knobs and where each default comes from):

- descent velocity: the least-squares slope of the last k = `window` step losses against the step index
  (`loss_slope`); more negative = faster descent.
- an observation window (k steps at the current lr) gives the baseline slope v0. Then a TRIAL: every rank
  snapshots its own state (engine.snapshot(): parameters, optimizer partition / shard, Adam moments and step),
  the lr multiplier becomes scale * alpha, and k steps give the trial slope v1.
- v1 < v0 (faster descent): ACCEPTED, the raised lr stays; the trial window is the next baseline, so accepted
  trials chain. Otherwise ROLLED BACK: engine.restore() puts parameters AND optimizer state back to the snapshot,
  the multiplier becomes scale_before / beta, and alpha, beta decay toward 1
  (alpha <- 1 + (alpha - 1) * decay); a fresh observation window at the new lr follows.
  A non-finite loss during a trial rolls it back at once.
- `trigger=deceleration` starts a trial only when the observed slope is less negative than the previous window's
  (the loss descent slowed down), `every_window` (default) after every observation window.
- composition with the base schedule (cosine / linear / WSD-like constant): lr(step) = scale * lr_at(step), a
  multiplicative scale on sail_dist/train/lr.py, which keeps its warmup and decay shape. The search starts after
  the warmup (`start_step=-1`), starts no trial that would not finish before train.steps or after
  `search_fraction` of the run, keeps the scale within [min_scale, max_scale] and ends once alpha < min_factor.
- data: the trial's batches are consumed whatever the decision: after a rollback the data stream continues with
  the next batch (only the weights and optimizer go back), so the run sees each batch at most once.

Checkpointing: `state_dict()` (phase, window losses, scales, factors, the trial in progress, the log) rides in the
trainer's rank state; a checkpoint written during a trial also holds each rank's snapshot
(`<ckpt>/adalrs/snapshot_rank_XXXXX.pt`), so a run killed mid-trial resumes into the same trial and reproduces the
uninterrupted run. Every decision is logged: TensorBoard (`adalrs/*`), a JSON line in <out_dir>/adalrs.jsonl, and a
log line.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable

from sail_dist.config import AdaLRSConfig, TrainConfig

log = logging.getLogger("sail_dist")

SNAPSHOT_DIR = "adalrs"  # inside a checkpoint directory, and under out_dir for on-disk working snapshots


def loss_slope(losses: list[float]) -> float:
    """Least-squares slope of `losses` against 0..n-1 (per optimizer step), in float64."""
    n = len(losses)
    if n < 2:
        raise ValueError(f"a slope needs at least 2 losses, got {n}")
    xm = (n - 1) / 2.0
    ym = math.fsum(losses) / n
    sxy = math.fsum((i - xm) * (y - ym) for i, y in enumerate(losses))
    sxx = math.fsum((i - xm) ** 2 for i in range(n))
    return sxy / sxx


class AdaLRS:
    """The lr-search controller. The trainer asks `lr(step)` before a step and calls `after_step(step, loss, engine)`
    after it, on every rank (the step loss is global, so every rank takes the same decisions)."""

    def __init__(self, cfg: AdaLRSConfig, train: TrainConfig, base_lr: Callable[[int], float], rank: int = 0,
                 out_dir: str | None = None, metrics=None, is_main: bool = True) -> None:
        self.cfg, self.base_lr, self.rank = cfg, base_lr, rank
        self.total_steps = train.steps
        self.start = cfg.start_step if cfg.start_step >= 0 else train.warmup_steps
        self.last_start = self.start + cfg.search_fraction * (train.steps - self.start)
        self.out_dir, self.metrics, self.is_main = out_dir, metrics, is_main
        self.phase = "observe"  # observe | trial | done
        self.scale, self.alpha, self.beta = 1.0, cfg.alpha, cfg.beta
        self.window: list[float] = []
        self.last_slope: float | None = None  # of the last completed window at the current lr
        self.trial: dict | None = None  # the trial in progress
        self.trials: list[dict] = []  # every decision made
        self.snapshot = None  # the engine snapshot of the trial in progress (sail_dist/backends/snapshot.py)
        self.done_reason = ""

    # ------------------------------------------------------------------------------------------ the search
    def lr(self, step: int) -> float:
        """The lr of optimizer step `step` (0-based): the base schedule times the searched scale."""
        return self.base_lr(step) * self.scale

    def after_step(self, step: int, loss: float, engine) -> dict | None:
        """Feed step `step`'s loss; may snapshot or restore `engine`. Returns the decision record when a trial ended."""
        if self.phase == "done" or step < self.start:
            return None
        if not math.isfinite(loss):
            # an update was skipped: a trial whose lr makes the loss blow up has failed; elsewhere wait for finite ones
            return self._decide(step, math.nan, engine, reason="non-finite loss") if self.phase == "trial" else None
        self.window.append(float(loss))
        if len(self.window) < self.cfg.window:
            return None
        slope = loss_slope(self.window)
        self.window = []
        rec = None
        if self.phase == "trial":
            rec = self._decide(step, slope, engine)
            if rec["decision"] != "accepted":
                return rec
        self._observed(step, slope, engine)
        return rec

    def _can_start(self, step: int) -> str:
        """Why no trial may start after step `step` ('' if one may)."""
        if self.alpha < self.cfg.min_factor:
            return f"alpha decayed below train.adalrs.min_factor={self.cfg.min_factor}"
        if step + 1 > self.last_start:
            return f"past train.adalrs.search_fraction={self.cfg.search_fraction} of the run"
        if step + 1 + self.cfg.window > self.total_steps:
            return "a trial would not finish before train.steps"
        if self.scale * self.alpha > self.cfg.max_scale:
            return f"the trial lr would exceed train.adalrs.max_scale={self.cfg.max_scale} x the schedule"
        return ""

    def _observed(self, step: int, slope: float, engine) -> None:
        prev, self.last_slope = self.last_slope, slope
        why = self._can_start(step)
        if why:  # none of these changes without a trial: the search is over
            self._finish(step, why)
            return
        if self.cfg.trigger == "deceleration" and (prev is None or slope <= prev):
            return  # the descent did not slow down: keep observing at this lr
        self.snapshot = engine.snapshot(**self._snapshot_args())
        self.trial = {"start_step": step + 1, "scale_before": self.scale, "scale_trial": self.scale * self.alpha,
                      "base_slope": slope, "alpha": self.alpha, "beta": self.beta,
                      "snapshot_on_disk": self.snapshot.on_disk, "snapshot_nbytes": self.snapshot.nbytes}
        self.scale = self.trial["scale_trial"]
        self.phase = "trial"
        if self.is_main:
            log.info("AdaLRS: trial from step %d: lr x%.4g (scale %.4g -> %.4g), baseline slope %.4g/step; snapshot "
                     "%.1f MiB %s", step + 2, self.alpha, self.trial["scale_before"], self.scale, slope,
                     self.snapshot.nbytes / 2 ** 20, "on disk" if self.snapshot.on_disk else "in memory")

    def _decide(self, step: int, slope: float, engine, reason: str = "") -> dict:
        tr = self.trial
        accepted = math.isfinite(slope) and slope < tr["base_slope"]
        lr_before, lr_trial = self.base_lr(step) * tr["scale_before"], self.base_lr(step) * tr["scale_trial"]
        if accepted:
            new_scale = tr["scale_trial"]
        else:
            engine.restore(self.snapshot)
            new_scale = max(tr["scale_before"] / self.beta, self.cfg.min_scale)
            self.alpha = 1.0 + (self.alpha - 1.0) * self.cfg.decay
            self.beta = 1.0 + (self.beta - 1.0) * self.cfg.decay
            self.last_slope = None  # the baseline was measured at another lr
        self.snapshot.discard()
        self.snapshot, self.trial, self.window, self.phase = None, None, [], "observe"
        self.scale = new_scale
        rec = {"step": step + 1, "trial_start": tr["start_step"], "decision": "accepted" if accepted else "rolled_back",
               "reason": reason or ("faster descent" if accepted else "no faster descent"),
               "base_slope": tr["base_slope"], "trial_slope": slope, "lr_before": lr_before, "lr_trial": lr_trial,
               "lr_after": self.base_lr(step) * new_scale, "scale_before": tr["scale_before"],
               "scale_trial": tr["scale_trial"], "scale_after": new_scale, "alpha": self.alpha, "beta": self.beta}
        self.trials.append(rec)
        self._log(rec)
        if not accepted and self.alpha < self.cfg.min_factor:
            self._finish(step, f"alpha decayed below train.adalrs.min_factor={self.cfg.min_factor}")
        return rec

    def _finish(self, step: int, why: str) -> None:
        self.phase, self.done_reason = "done", why
        if self.is_main:
            log.info("AdaLRS: search ended after step %d (%s); lr scale stays %.4g", step + 1, why, self.scale)

    def _log(self, rec: dict) -> None:
        if not self.is_main:
            return
        log.info("AdaLRS: trial of steps %d-%d %s (%s): slope %.4g -> %.4g per step; lr %.4g -> trial %.4g -> %.4g",
                 rec["trial_start"] + 1, rec["step"], rec["decision"].replace("_", " "), rec["reason"],
                 rec["base_slope"], rec["trial_slope"], rec["lr_before"], rec["lr_trial"], rec["lr_after"])
        if self.metrics is not None:
            self.metrics.log_scalars("adalrs", {
                "accepted": float(rec["decision"] == "accepted"), "scale": rec["scale_after"], "lr": rec["lr_after"],
                "base_slope": rec["base_slope"], "trial_slope": rec["trial_slope"],
                "alpha": rec["alpha"], "beta": rec["beta"]}, rec["step"])
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "adalrs.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------ snapshots
    def _working_path(self) -> str:
        return os.path.join(self.out_dir or ".", SNAPSHOT_DIR, f"snapshot_rank_{self.rank:05d}.pt")

    def _snapshot_args(self) -> dict:
        mode = self.cfg.snapshot
        if mode == "memory":
            return {"path": None, "memory_limit_bytes": math.inf}
        limit = 0 if mode == "disk" else self.cfg.memory_budget_gb * 2 ** 30
        return {"path": self._working_path(), "memory_limit_bytes": limit}

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything but the snapshot (plain values; identical on every rank)."""
        return {"phase": self.phase, "scale": self.scale, "alpha": self.alpha, "beta": self.beta,
                "window": list(self.window), "last_slope": self.last_slope,
                "trial": dict(self.trial) if self.trial else None, "trials": [dict(r) for r in self.trials],
                "done_reason": self.done_reason}

    def write_snapshot(self, checkpoint_dir: str) -> None:
        """Called by every rank while its checkpoint is written: the snapshot of a trial in progress goes with it."""
        if self.snapshot is not None:
            os.makedirs(os.path.join(checkpoint_dir, SNAPSHOT_DIR), exist_ok=True)
            self.snapshot.save_to(self._checkpoint_path(checkpoint_dir))

    def _checkpoint_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, SNAPSHOT_DIR, f"snapshot_rank_{self.rank:05d}.pt")

    def load_state_dict(self, state: dict | None, checkpoint_dir: str) -> None:
        """Resume: the controller state of `checkpoint_dir` and, mid-trial, this rank's snapshot from it."""
        if state is None:
            raise RuntimeError(f"checkpoint {checkpoint_dir} holds no AdaLRS state: it was written with "
                               "train.adalrs.enabled=false, so this run cannot resume it with AdaLRS on")
        self.phase, self.scale, self.alpha, self.beta = state["phase"], state["scale"], state["alpha"], state["beta"]
        self.window, self.last_slope = list(state["window"]), state["last_slope"]
        self.trial, self.trials = state["trial"], list(state["trials"])
        self.done_reason = state["done_reason"]
        if self.trial is not None:
            from sail_dist.backends.snapshot import Snapshot

            path = self._checkpoint_path(checkpoint_dir)
            if not os.path.isfile(path):
                raise RuntimeError(f"checkpoint {checkpoint_dir} was written during an AdaLRS trial but lacks {path}; "
                                   "resume from an earlier checkpoint (train.resume=<its step_* directory>)")
            args = self._snapshot_args()
            on_disk = self.trial["snapshot_nbytes"] > args["memory_limit_bytes"]
            self.snapshot = Snapshot.read(path, self.trial["snapshot_nbytes"],
                                          keep_on_disk_at=args["path"] if on_disk else None)
        if self.is_main and self.out_dir:  # the decision log as of the checkpoint (a killed run may have logged more)
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "adalrs.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.trials)

    def start_fresh(self) -> None:
        """A run from step 0: an old decision log in out_dir is not this run's."""
        if self.is_main and self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            open(os.path.join(self.out_dir, "adalrs.jsonl"), "w").close()

    def summary(self) -> dict:
        acc = sum(r["decision"] == "accepted" for r in self.trials)
        return {"scale": self.scale, "trials": len(self.trials), "accepted": acc,
                "rolled_back": len(self.trials) - acc, "phase": self.phase, "done_reason": self.done_reason}
