"""AdaLRS (sail_dist/train/adalrs.py): the slope fit, the controller's decisions on scripted losses, config errors,
engine snapshot / restore on both backends (bit for bit, through each framework's own checkpoint files), and a
kill during a trial (after a mid-trial checkpoint) whose resume reproduces the uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, child_env, kill_tree, require, require_mcore_checkpoints, torchrun_cmd
from sail_dist.backends import snapshot as snap
from sail_dist.config import AdaLRSConfig, ConfigError, TrainConfig, load_config
from sail_dist.train.adalrs import AdaLRS, loss_slope

TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")


# ------------------------------------------------------------------------------------------------ slope
@pytest.mark.parametrize("n", [3, 7, 50])
def test_slope_matches_numpy_polyfit(n):
    rng = np.random.default_rng(n)
    y = list(5.0 - 0.03 * np.arange(n) + rng.normal(0, 0.1, n))
    assert loss_slope(y) == pytest.approx(np.polyfit(np.arange(n), y, 1)[0], rel=1e-12, abs=1e-15)
    assert loss_slope([2.0] * n) == 0.0
    assert loss_slope([1.0 + 0.5 * i for i in range(n)]) == pytest.approx(0.5, rel=1e-13)


# ------------------------------------------------------------------------------------------------ controller
class TensorEngine:
    """An engine whose whole state is a few tensors and a step counter: snapshot / restore go through the same
    helpers (sail_dist/backends/snapshot.py) as the real engines."""

    def __init__(self, tmp_path=None):
        self.w = torch.arange(6, dtype=torch.float32)
        self.m = torch.zeros(6, dtype=torch.float64)
        self.steps = 0
        self.snapshots = self.restores = 0

    def state(self):
        return {"w": self.w, "m": self.m, "steps": self.steps}

    def train(self):  # what a step does to the state
        self.w += 1.0
        self.m += 0.5
        self.steps += 1

    def snapshot(self, path=None, memory_limit_bytes=math.inf):
        self.snapshots += 1
        return snap.take(self.state(), path, memory_limit_bytes)

    def restore(self, s):
        self.restores += 1
        self.steps = snap.put_back(self.state(), s)["steps"]


def controller(tmp_path, **knobs) -> AdaLRS:
    steps = knobs.pop("steps", 100)
    cfg = AdaLRSConfig(enabled=True, **{"window": 3, "start_step": 0, **knobs})
    train = TrainConfig(steps=steps, lr=1e-3)
    return AdaLRS(cfg, train, lambda s: 1e-3, out_dir=str(tmp_path))


def feed(ctl: AdaLRS, engine: TensorEngine, losses, start: int = 0) -> list[dict]:
    recs = []
    for i, loss in enumerate(losses):
        engine.train()
        r = ctl.after_step(start + i, loss, engine)
        if r:
            recs.append(r)
    return recs


def line(start: float, slope: float, n: int = 3) -> list[float]:
    return [start + slope * i for i in range(n)]


def test_faster_descent_is_accepted_and_trials_chain(tmp_path):
    ctl, eng = controller(tmp_path), TensorEngine()
    feed(ctl, eng, line(5.0, -0.1))  # observation window: baseline -0.1 / step
    assert ctl.phase == "trial" and ctl.scale == 1.5 and eng.snapshots == 1
    assert ctl.lr(7) == pytest.approx(1.5e-3)
    (rec,) = feed(ctl, eng, line(4.7, -0.2), start=3)  # faster at 1.5x: kept
    assert rec["decision"] == "accepted" and rec["base_slope"] == pytest.approx(-0.1)
    assert rec["trial_slope"] == pytest.approx(-0.2) and rec["scale_after"] == 1.5
    assert rec["lr_before"] == pytest.approx(1e-3) and rec["lr_after"] == pytest.approx(1.5e-3)
    assert eng.restores == 0 and (ctl.alpha, ctl.beta) == (1.5, 1.25)  # no decay on acceptance
    # the accepted window is the next baseline: a second trial started at once, at 1.5 * 1.5
    assert ctl.phase == "trial" and ctl.scale == pytest.approx(2.25) and eng.snapshots == 2
    rows = [json.loads(x) for x in open(tmp_path / "adalrs.jsonl")]
    assert rows == [rec]


def test_slower_descent_rolls_back_weights_and_scales_down(tmp_path):
    ctl, eng = controller(tmp_path), TensorEngine()
    feed(ctl, eng, line(5.0, -0.2))
    w_at_snapshot, m_at_snapshot, steps_at_snapshot = eng.w.clone(), eng.m.clone(), eng.steps
    (rec,) = feed(ctl, eng, line(4.4, -0.1), start=3)  # slower at 1.5x: back
    assert rec["decision"] == "rolled_back" and eng.restores == 1
    assert torch.equal(eng.w, w_at_snapshot) and torch.equal(eng.m, m_at_snapshot) and eng.steps == steps_at_snapshot
    assert rec["scale_after"] == pytest.approx(1.0 / 1.25) and ctl.scale == pytest.approx(0.8)
    assert (ctl.alpha, ctl.beta) == (pytest.approx(1.25), pytest.approx(1.125))  # 1 + (f - 1) * 0.5
    assert ctl.phase == "observe" and ctl.window == []  # a fresh baseline at the new lr comes next
    feed(ctl, eng, line(4.4, -0.1), start=6)
    assert ctl.phase == "trial" and ctl.scale == pytest.approx(0.8 * 1.25)


def test_equal_slope_is_not_an_improvement(tmp_path):
    ctl, eng = controller(tmp_path), TensorEngine()
    feed(ctl, eng, line(5.0, -0.1))
    (rec,) = feed(ctl, eng, line(4.0, -0.1), start=3)
    assert rec["decision"] == "rolled_back"


def test_non_finite_loss_in_a_trial_rolls_back_at_once(tmp_path):
    ctl, eng = controller(tmp_path), TensorEngine()
    feed(ctl, eng, line(5.0, -0.1))
    (rec,) = feed(ctl, eng, [4.6, float("nan")], start=3)
    assert rec["decision"] == "rolled_back" and rec["reason"] == "non-finite loss" and eng.restores == 1
    # outside a trial a non-finite loss (a skipped update) is not fed to the window
    feed(ctl, eng, [float("inf"), 4.0, 3.9], start=5)
    assert ctl.window == [4.0, 3.9]


def test_factors_decay_until_the_search_ends(tmp_path):
    ctl, eng = controller(tmp_path, alpha=1.5, beta=1.5, decay=0.5, min_factor=1.1), TensorEngine()
    start = 0
    for _ in range(3):  # three rolled-back trials: alpha 1.5 -> 1.25 -> 1.125 -> 1.0625 < 1.1
        feed(ctl, eng, line(5.0, -0.2), start)
        feed(ctl, eng, line(5.0, -0.1), start + 3)
        start += 6
    assert [r["alpha"] for r in ctl.trials] == pytest.approx([1.25, 1.125, 1.0625])
    assert [r["scale_after"] for r in ctl.trials] == pytest.approx([1 / 1.5, 1 / 1.5 / 1.25, 1 / 1.5 / 1.25 / 1.125])
    assert ctl.phase == "done" and "min_factor" in ctl.done_reason
    n = eng.snapshots
    feed(ctl, eng, line(4.0, -0.1, 9), start)
    assert eng.snapshots == n and ctl.phase == "done"


def test_bounds(tmp_path):
    # max_scale: no trial whose lr would pass it
    ctl, eng = controller(tmp_path, max_scale=2.0), TensorEngine()
    feed(ctl, eng, line(5.0, -0.1))
    feed(ctl, eng, line(4.7, -0.2), start=3)  # accepted: 1.5; the next trial would be 2.25 > 2
    assert ctl.scale == 1.5 and ctl.phase == "done" and "max_scale" in ctl.done_reason
    # min_scale: a rollback never goes below it
    ctl, eng = controller(tmp_path, min_scale=0.9, beta=2.0), TensorEngine()
    feed(ctl, eng, line(5.0, -0.2))
    feed(ctl, eng, line(5.0, -0.1), start=3)
    assert ctl.scale == 0.9
    # start_step (here: after the warmup) and the end of the run
    cfg = AdaLRSConfig(enabled=True, window=3)
    late = AdaLRS(cfg, TrainConfig(steps=8, warmup_steps=4), lambda s: 1.0)
    eng = TensorEngine()
    feed(late, eng, line(5.0, -0.1, 4))
    assert late.window == []  # warmup steps are not fed
    feed(late, eng, line(4.0, -0.1), start=4)  # steps 4-6 observed; a 3-step trial would end past step 8
    assert late.phase == "done" and "train.steps" in late.done_reason and eng.snapshots == 0


def test_deceleration_trigger(tmp_path):
    ctl, eng = controller(tmp_path, trigger="deceleration"), TensorEngine()
    feed(ctl, eng, line(5.0, -0.3))  # first window: nothing to compare with
    feed(ctl, eng, line(4.0, -0.4), start=3)  # faster than before: no trial
    assert ctl.phase == "observe" and eng.snapshots == 0
    feed(ctl, eng, line(3.0, -0.2), start=6)  # the descent slowed down: trial
    assert ctl.phase == "trial" and eng.snapshots == 1


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_state_dict_and_snapshot_survive_a_checkpoint_mid_trial(tmp_path, mode):
    ctl, eng = controller(tmp_path / "run", snapshot=mode), TensorEngine()
    feed(ctl, eng, line(5.0, -0.1) + [4.6])  # 1 step into a trial
    assert ctl.phase == "trial" and ctl.snapshot.on_disk == (mode == "disk")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = json.loads(json.dumps(ctl.state_dict()))  # plain values only
    ctl.write_snapshot(str(ckpt))
    w_snap = torch.arange(6, dtype=torch.float32) + 3  # the state after the 3 observed steps

    # "killed": a new controller and engine resume from the checkpoint (the engine as the checkpoint left it)
    eng2 = TensorEngine()
    eng2.w, eng2.m, eng2.steps = eng.w.clone(), eng.m.clone(), eng.steps
    ctl2 = controller(tmp_path / "run2", snapshot=mode)
    ctl2.load_state_dict(state, str(ckpt))
    for c, e in ((ctl, eng), (ctl2, eng2)):
        (rec,) = feed(c, e, [4.55, 4.5], start=4)  # slower: both roll back to the same snapshot
        assert rec["decision"] == "rolled_back"
        assert torch.equal(e.w, w_snap) and e.steps == 3
    assert ctl.state_dict() == ctl2.state_dict()
    if mode == "disk":  # the working snapshot file is gone once the trial is decided
        assert not os.listdir(tmp_path / "run" / "adalrs")


def test_missing_snapshot_in_a_mid_trial_checkpoint_is_an_error(tmp_path):
    ctl, eng = controller(tmp_path), TensorEngine()
    feed(ctl, eng, line(5.0, -0.1))
    with pytest.raises(RuntimeError, match="lacks .*snapshot_rank_00000.pt"):
        controller(tmp_path).load_state_dict(ctl.state_dict(), str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="adalrs.enabled=false"):
        controller(tmp_path).load_state_dict(None, str(tmp_path))


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_snapshot_helpers_put_a_torch_optimizer_back_in_place(tmp_path, where):
    """sail_dist/backends/snapshot.py on a real AdamW: parameters, exp_avg, exp_avg_sq, the step tensor and a
    per-group step (FusedAdam keeps one there) come back bit for bit, into the same memory."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=1e-2)

    def step():
        opt.zero_grad()
        (w ** 3).sum().backward()
        opt.step()

    step()
    opt.param_groups[0]["step"] = 7
    state = snap.optimizer_state("opt", opt)
    assert set(state) == {"opt.g0.group.step", "opt.g0.p0.param", "opt.g0.p0.state.exp_avg",
                          "opt.g0.p0.state.exp_avg_sq", "opt.g0.p0.state.step"}
    want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    live = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    s = snap.take(state, str(tmp_path / "s.pt"), 0 if where == "disk" else math.inf)
    assert s.on_disk == (where == "disk") and s.nbytes == sum(v.numel() * 4 for v in live.values())
    for _ in range(3):
        step()
    opt.param_groups[0]["step"] = 10
    assert not torch.equal(w.data, want["opt.g0.p0.param"])
    snap.set_optimizer_plain("opt", opt, snap.put_back(snap.optimizer_state("opt", opt), s))
    after = snap.optimizer_state("opt", opt)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):  # equal values, in the same memory as before
            assert torch.equal(after[k], v) and after[k].data_ptr() == live[k].data_ptr(), k
        else:
            assert after[k] == v, k


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, key, says", [
    ("window=2", "train.adalrs.window", ">= 3"),
    ("alpha=1.0", "train.adalrs.alpha", "(1, 10]"),
    ("alpha=11", "train.adalrs.alpha", "(1, 10]"),
    ("beta=0.8", "train.adalrs.beta", "(1, 10]"),
    ("decay=0", "train.adalrs.decay", "(0, 1]"),
    ("decay=1.5", "train.adalrs.decay", "(0, 1]"),
    ("start_step=-2", "train.adalrs.start_step", "-1"),
    ("search_fraction=0", "train.adalrs.search_fraction", "(0, 1]"),
    ("min_scale=0", "train.adalrs.min_scale", "(0, 1]"),
    ("max_scale=0.5", "train.adalrs.max_scale", ">= 1"),
    ("min_factor=1.6", "train.adalrs.min_factor", "(1, alpha=1.5)"),
    ("memory_budget_gb=-1", "train.adalrs.memory_budget_gb", ">= 0"),
    ("snapshot=ram", "train.adalrs.snapshot", "memory"),
    ("trigger=often", "train.adalrs.trigger", "every_window"),
])
def test_bad_knobs_name_the_key_and_the_range(override, key, says):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.demo=true", "train.adalrs.enabled=true", f"train.adalrs.{override}"])
    msg = str(e.value)
    assert key in msg and says in msg and "command line" in msg, msg


def test_pretrain_basic_stage_turns_it_on():
    cfg = load_config(TINY, ["data.demo=true"], stage="pretrain_basic")
    assert cfg.train.adalrs.enabled and cfg.train.lr == 2e-4


# ------------------------------------------------------------------------------------------------ engines
def _tensors_equal(a, b, path="") -> int:
    """Every tensor and number in two checkpoint objects equal (bit for bit); the lr in param groups (set by the
    trainer before every step) aside. Returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        return sum(_tensors_equal(a[k], b[k], f"{path}.{k}") for k in a if k != "lr")
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(_tensors_equal(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, (int, float, str, bool)) or a is None:
        assert a == b, (path, a, b)
    elif hasattr(a, "__dict__"):
        assert vars(a) == vars(b), path
    return 0


def _checkpoint_tensors(path: str, backend: str) -> list[tuple[str, dict]]:
    """The framework's own files for an engine.save directory, loaded: DeepSpeed's per-rank .pt files, or the
    Megatron torch_dist directory converted to one state dict (torch.distributed.checkpoint)."""
    if backend == "gpu":
        d = os.path.join(path, "deepspeed")
        return [(f, torch.load(os.path.join(d, f), weights_only=False)) for f in sorted(os.listdir(d))]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, path + ".pt")
    return [("torch_dist", torch.load(path + ".pt", weights_only=False))]


ENGINE_CASES = {
    # (nproc, config, overrides, SNAPSHOT)
    "gpu_offload_torch_adam_2ranks": (2, TINY, ["backend.offload_optimizer=cpu", "backend.torch_adam=true"], "memory"),
    # half of each partition kept and updated on the device (backends/gpu/offload_step.py DeviceShare)
    "gpu_offload_ratio_2ranks": (2, TINY, ["backend.offload_optimizer=cpu", "backend.torch_adam=false",
                                           "backend.offload_chunk=4096", "backend.offload_ratio=0.5"], "memory"),
    "gpu_zero2_1rank_disk": (1, TINY, [], "disk"),
    "npu_dist_optimizer_dp2": (2, TINY, ["backend.name=npu"], "memory"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_rollback_restores_parameters_and_adam_state_bit_for_bit(tmp_path, case):
    nproc, config, extra, mode = ENGINE_CASES[case]
    backend = "npu" if "backend.name=npu" in extra else "gpu"
    if backend == "npu":
        require_mcore_checkpoints()  # (the comparison reads the engine's own checkpoints)
    else:
        require("deepspeed")
    cmd = torchrun_cmd(nproc, os.path.join(ROOT, "tests", "dist", "adalrs_run.py"), str(tmp_path), config,
                       "train.steps=6", "train.micro_batches=2", "train.lr=2e-3", "train.warmup_steps=2",
                       "train.weight_decay=0.1", *extra)
    r = subprocess.run(cmd, env=child_env(SNAPSHOT=mode), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads((tmp_path / "result.json").read_text())
    trial = res["trial"]
    assert trial["on_disk"] == (mode == "disk") and trial["file_exists"] == (mode == "disk") and trial["nbytes"] > 0
    # the trial changed the weights (its second loss is not the rolled-back run's) ...
    assert trial["trial_losses"][1] != trial["losses"][1]
    # ... and the framework's own checkpoint after the rollback equals the one before the trial, bit for bit:
    # module parameters, the fp32 master partition / shard, exp_avg, exp_avg_sq, step
    before, after = _checkpoint_tensors(str(tmp_path / "before"), backend), _checkpoint_tensors(
        str(tmp_path / "after"), backend)
    assert [n for n, _ in before] == [n for n, _ in after]
    n = sum(_tensors_equal(a, b, name) for (name, a), (_, b) in zip(before, after))
    assert n > 20
    if backend == "npu":
        keys = before[0][1]
        assert any("exp_avg_sq" in k for k in keys) and any(k.startswith("optimizer.") for k in keys)
    # and training on from the rollback is exactly the run that never made the trial
    assert trial["losses"] == res["reference"]["losses"]


# ------------------------------------------------------------------------------------------------ trainer
def _trainer_cmd(out_dir: str, demo_dir: str, *extra: str) -> list[str]:
    require("deepspeed")
    return torchrun_cmd(1, "-m", "sail_dist", "--config", DEMO, f"train.out_dir={out_dir}", f"data.demo_dir={demo_dir}",
                        "train.eval_samples=0", "train.export_hf=false", "data.pack_tokens=512", "train.steps=14",
                        "train.save_every=5", "train.keep_last=5", "train.warmup_steps=0",
                        "train.lr_schedule=constant", "train.adalrs.enabled=true", "train.adalrs.window=3", *extra)


def _losses(out_dir: str) -> dict[int, float]:
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: (r["loss"], r["lr"]) for r in rows if "loss" in r}


@pytest.mark.slow
def test_kill_during_a_trial_and_resume_reproduces_the_run(tmp_path):
    demo, full = str(tmp_path / "demo"), str(tmp_path / "full")
    r = subprocess.run(_trainer_cmd(full, demo, "train.adalrs.snapshot=disk"), env=child_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    trials = [json.loads(x) for x in open(os.path.join(full, "adalrs.jsonl"))]
    assert len(trials) >= 2, trials
    # step 10 was written during a trial (steps 10-12 with window 3 from step 0): its snapshot went with it
    ckpt = os.path.join(full, "checkpoints", "step_00000010")
    state = torch.load(os.path.join(ckpt, "rank_00000.pt"), weights_only=False)["adalrs"]
    assert state["phase"] == "trial" and os.path.isfile(os.path.join(ckpt, "adalrs", "snapshot_rank_00000.pt"))
    # the same run, SIGKILLed (no cleanup) once step 10 (mid-trial) is on disk, then started again: it resumes there
    part = str(tmp_path / "part")
    proc = subprocess.Popen(_trainer_cmd(part, demo, "train.adalrs.snapshot=disk"), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = os.path.join(part, "checkpoints", "step_00000010", "COMPLETE")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not os.path.exists(marker):
        time.sleep(0.02)
    kill_tree(proc)
    done = sorted(n for n in os.listdir(os.path.join(part, "checkpoints")) if not n.endswith(".tmp"))
    assert "step_00000010" in done, done
    if done[-1] != "step_00000010":
        pytest.skip(f"the run got past step 10 before it was killed ({done})")
    r = subprocess.run(_trainer_cmd(part, demo, "train.adalrs.snapshot=disk"), env=child_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "resumed from" in r.stdout + r.stderr and "step_00000010" in r.stdout + r.stderr
    ref, got = _losses(full), _losses(part)  # the resumed run's lines come last in metrics.jsonl
    assert sorted(got) == list(range(1, 15))
    assert all(got[s] == ref[s] for s in got), (got, ref)
    assert [json.loads(x) for x in open(os.path.join(part, "adalrs.jsonl"))] == trials
