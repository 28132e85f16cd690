"""The whole trainer through its CLI (torchrun, 2 ranks, GPU backend on CPU): exact resume after a kill,
and clear messages for a corrupt checkpoint, a bad config and a non-finite loss."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, kill_tree, require, step_losses, torchrun_cmd
from sail_dist.config import load_config

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo_data"))


def _cmd(nproc: int, out_dir: str, demo_dir: str, *overrides: str) -> list[str]:
    require("deepspeed")  # a training run (GPU backend); the bad-config test never gets that far
    return torchrun_cmd(nproc, "-m", "sail_dist", "--config", DEMO,
            f"train.out_dir={out_dir}", f"data.demo_dir={demo_dir}", "train.eval_samples=0", "train.log_every=1",
            "data.pack_tokens=512", "data.num_workers=1", "train.micro_batches=2", "train.lr_schedule=cosine",
            "train.warmup_steps=2", *overrides)


def _run(cmd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path, demo_dir):
    """SIGKILL at the first checkpoint, then resume=auto: the resumed steps equal the uninterrupted run's bit for bit
    (ZeRO-2 with the optimizer offloaded, torch's Adam on the host). DeepSpeedCPUAdam's state across a resume is
    tests/test_elastic_resume.py's offload case; the kill is the same for either optimizer."""
    steps = ["train.steps=8", "train.save_every=2", "backend.offload_optimizer=cpu", "backend.torch_adam=true"]
    full = str(tmp_path / "full")
    r = _run(_cmd(2, full, demo_dir, *steps))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ref = step_losses(full)
    assert sorted(ref) == list(range(1, 9))

    # The same run, killed (SIGKILL, no cleanup) as soon as its first checkpoint exists.
    part = str(tmp_path / "part")
    proc = subprocess.Popen(_cmd(2, part, demo_dir, *steps), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = os.path.join(part, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(n.startswith("step_") and not n.endswith(".tmp") for n in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    kill_tree(proc)
    done = sorted(n for n in os.listdir(ckpts) if not n.endswith(".tmp"))
    assert done, "the killed run wrote no complete checkpoint"
    k = int(done[-1].split("_")[1])
    if k == 8:
        pytest.skip("the run finished before it could be killed")

    r = _run(_cmd(2, part, demo_dir, *steps))  # resume=auto picks the latest complete checkpoint
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"at step {k}" in r.stdout, r.stdout[-3000:]
    resumed = step_losses(part)
    for step in range(k + 1, 9):
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, demo_dir):
    out = str(tmp_path / "run")
    r = _run(_cmd(1, out, demo_dir, "train.steps=2", "train.micro_batches=1"))
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    with open(os.path.join(ckpt, "rank_00000.pt"), "r+b") as f:
        f.truncate(100)
    r = _run(_cmd(1, out, demo_dir, "train.steps=4", "train.micro_batches=1"))
    assert r.returncode != 0
    assert f"checkpoint {ckpt} is corrupt: cannot read {ckpt}/rank_00000.pt" in r.stderr
    assert "set train.resume to an earlier step_* directory" in r.stderr
    # A half-written save (no COMPLETE marker) is never picked up (the trainer's and the RL loop's resume go through
    # resolve_resume): `auto` starts fresh, naming it is an error.
    from sail_dist.train.checkpoint import CheckpointError, resolve_resume

    os.remove(os.path.join(ckpt, "COMPLETE"))
    assert resolve_resume(load_config(DEMO, [f"train.out_dir={out}", "train.resume=auto"])) is None
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_resume(load_config(DEMO, [f"train.out_dir={out}", f"train.resume={ckpt}"]))


def test_bad_config_names_the_key(tmp_path, demo_dir):
    r = _run([sys.executable, "-m", "sail_dist", "--config", DEMO, "train.lerning_rate=1"])
    assert r.returncode == 2
    assert "unknown config key 'train.lerning_rate' (from command line); did you mean 'train.lr'?" in r.stderr


def test_nonfinite_loss_aborts_with_a_clear_message(tmp_path, demo_dir):
    out = str(tmp_path / "nan")
    r = _run(_cmd(1, out, demo_dir, "train.steps=20", "train.micro_batches=1", "train.lr=1e30",
                  "train.warmup_steps=0", "train.grad_clip=0", "train.max_consecutive_nonfinite=3"))
    assert r.returncode != 0
    assert "consecutive steps" in r.stderr and "had a non-finite loss or gradient" in r.stderr
    assert "update skipped" in r.stdout
