"""Elastic resume (issue 16 item 3): a checkpoint written at one data-parallel size resumes at another.

What "the same run" means after a resize (docs/data.md, "Elastic resume"): the global sample stream continues where
it stopped; every sample drawn is trained exactly once across the boundary (none replayed, none skipped), in steps of
the new size (dp x micro_batches packs). With dp x micro_batches kept, each step holds the same packs as the
uninterrupted run's, so its loss is that run's step loss (the objective is a sum over the step's tokens): the
resumed losses are compared with an uninterrupted run at the resumed size from step 1.

- loader level (in process, fast): the sample ids trained before and after the boundary, plus those still buffered,
  are exactly the stream's prefix (an independent replay of the seeded SourceMix), each once; with the step size
  kept the resumed steps hold the same samples as the uninterrupted run's; the packer's pack counter is rebased
  so the next pack opens a step of the new geometry (long samples are released at step starts).
- the trainer through its CLI, GPU backend (DeepSpeed ZeRO-2; the universal checkpoint on a DP change) and NPU
  backend (Megatron dist_checkpointing): 2 ranks -> 1 and 1 -> 2, losses against the uninterrupted run.
- what cannot be resharded is refused with the layout, the reason and the fix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT, child_env, require, require_mcore_checkpoints, step_losses, torchrun_cmd
from data_testutil import tiny_config
from sail_dist.config import config_to_dict
from sail_dist.data.demo import ensure_demo
from sail_dist.data.loader import StepLoader
from sail_dist.data.records import SourceMix
from sail_dist.data.samples import PAD_SAMPLE_ID
from sail_dist.train.checkpoint import CheckpointError, _elastic_rank_state, check_resume_config, load_checkpoint

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo(str(tmp_path_factory.mktemp("elastic_demo"))).root


# ------------------------------------------------------------------------------------------------ loader level
def _steps(cfg, world: int, micro: int, n: int, state: dict | None = None):
    """n steps of `world` rank loaders (in one process): per step the sample ids of all ranks, and the state after."""
    loaders = [StepLoader(cfg, r, world, micro) for r in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    steps = []
    for _ in range(n):
        ids = []
        for loader in loaders:
            step = next(loader)
            ids += [s for mb in step.micro_batches for s in mb.sample_ids if s != PAD_SAMPLE_ID]
        steps.append(ids)
        loaders[0].long_trained = getattr(loaders[0], "long_trained", 0) + step.stats.long_samples
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states[1:])  # the state is global (no decode drops here)
    return steps, states[0], loaders[0]


def _stream_prefix(loader: StepLoader, drawn: int) -> list[str]:
    """The sample ids of the first `drawn` records of the seeded stream, replayed by a SourceMix of its own."""
    mix = SourceMix(loader.sources, loader.data.seed)
    return [loader.sources[src].record(row).sample_id for src, row in (mix.next() for _ in range(drawn))]


def _pending(loader: StepLoader, state: dict) -> list[str]:
    """Samples drawn but not trained yet: the packer buffer, its long-sample queue and the deferred ones."""
    keys = [it[1] for it in state["packer"]["items"]] + [k[0] for k in state["packer"]["long"]] + state["deferred"]
    return [loader.sources[src].record(row).sample_id for _, src, row in keys]


@pytest.mark.parametrize("before,after", [((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 2), (1, 4)), ((1, 3), (2, 2))])
@pytest.mark.parametrize("long_samples", [False, True])
def test_every_sample_is_trained_once_across_a_resize(demo_dir, before, after, long_samples):
    # max_sample_tokens=60: the demo's 63-71 token samples become lone long packs, released in groups of dp
    cfg = tiny_config(*(["data.max_sample_tokens=60"] if long_samples else []), demo_dir=demo_dir)
    k, n = 4, 5
    first, state, _ = _steps(cfg, *before, k)
    second, end, loader = _steps(cfg, *after, n, state)
    trained = [s for step in first + second for s in step]
    dup = [s for s, c in Counter(trained).items() if c > 1]
    assert not dup, f"replayed across the resize: {dup}"
    drawn = end["mix"]["drawn"]
    assert not end["bad"]["counts"]  # nothing dropped: trained + pending must be the whole prefix
    assert sorted(trained + _pending(loader, end)) == sorted(_stream_prefix(loader, drawn))
    assert len(trained) > 8 * (k + n)  # steps were full (about 10 samples per 512-token pack)
    if long_samples:  # the case is exercised: lone long packs were trained after the resize
        assert loader.long_trained >= after[0]


def test_resized_steps_hold_the_uninterrupted_runs_samples(demo_dir):
    """dp x micro_batches kept (2 x 2 -> 1 x 4): every resumed step trains the samples of the uninterrupted 1 x 4
    run's step, so the step objective (a sum over its tokens) is the same; packs are placed differently."""
    cfg = tiny_config(demo_dir=demo_dir)
    ref, _, _ = _steps(cfg, 1, 4, 6)
    first, state, _ = _steps(cfg, 2, 2, 3)
    second, _, _ = _steps(cfg, 1, 4, 3, state)
    assert [sorted(s) for s in first + second] == [sorted(s) for s in ref]


def test_packer_counter_is_rebased_to_the_new_step_geometry(demo_dir):
    """1 rank x 2 micro-batches for 3 steps = 6 packs; at 2 ranks x 2 a step is 4 packs, so the next pack must open
    a step (long samples are released at step starts): the counter moves to 8 and every arrival stamp with it."""
    cfg = tiny_config("data.max_sample_tokens=60", demo_dir=demo_dir)
    _, state, _ = _steps(cfg, 1, 2, 3)
    assert state["packer"]["n_packs"] == 6
    loader = StepLoader(cfg, 0, 2, 2)
    loader.load_state_dict(state)
    assert loader.packer.n_packs == 8
    saved_ages = sorted(6 - born for _, _, _, born in state["packer"]["items"])
    assert sorted(8 - born for _, (_, _, born) in loader.packer._items.items()) == saved_ages
    same = StepLoader(cfg, 0, 1, 2)  # the geometry unchanged: loaded as saved
    same.load_state_dict(state)
    assert same.packer.state_dict()["n_packs"] == 6 and same.state_dict()["packer"] == state["packer"]


# ------------------------------------------------------------------------------------------------ refusals
def _fake_checkpoint(path, world: int, rank_states: list[dict], backend: str = "gpu") -> str:
    os.makedirs(path, exist_ok=True)
    for r, st in enumerate(rank_states):
        torch.save({**st, "rng": None}, os.path.join(path, f"rank_{r:05d}.pt"))
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump({"step": 2, "world_size": world, "dp_size": world, "backend": backend, "config": {}}, f)
    return str(path)


def test_adalrs_trial_checkpoint_refuses_another_world_size(tmp_path):
    trial = {"adalrs": {"trial": {"snapshot_nbytes": 10}}, "loader": {"decode_bad": {}}}
    path = _fake_checkpoint(tmp_path / "ck", 2, [trial, trial])
    with pytest.raises(CheckpointError) as e:
        _elastic_rank_state(path, lambda r: torch.load(os.path.join(path, f"rank_{r:05d}.pt"), weights_only=False),
                            0, 2, 1)
    msg = str(e.value)
    assert "written on 2 ranks during an AdaLRS trial" in msg and "Resume it on 2 ranks" in msg
    assert "snapshot_rank_" in msg and "earlier checkpoint" in msg


def test_decode_drop_counts_survive_a_shrink(tmp_path):
    """Decode-time bad-sample counts are the only per-rank loader state: a rank that is gone hands its counts to
    new rank 0, so the run's total stays right; the rest of the state is rank 0's."""
    def st(counts):
        return {"loader": {"step": 2, "decode_bad": {"counts": counts, "examples": {}}}}

    path = _fake_checkpoint(tmp_path / "ck", 3, [st({"bad_image": 1}), st({"bad_image": 2}), st({"bad_video": 4})])
    read = lambda r: torch.load(os.path.join(path, f"rank_{r:05d}.pt"), weights_only=False)  # noqa: E731
    r0 = _elastic_rank_state(path, read, 0, 3, 2)["loader"]["decode_bad"]["counts"]
    r1 = _elastic_rank_state(path, read, 1, 3, 2)["loader"]["decode_bad"]["counts"]
    assert r0 == {"bad_image": 1, "bad_video": 4} and r1 == {"bad_image": 2}
    grown = _elastic_rank_state(path, read, 3, 3, 4)  # a new rank: rank 0's global state, no counts, fresh RNG
    assert grown["loader"]["decode_bad"]["counts"] == {} and grown["rng"] is None


def test_another_backend_is_refused_with_the_fix(tmp_path):
    path = _fake_checkpoint(tmp_path / "ck", 1, [{"loader": {}}], backend="npu")
    with pytest.raises(CheckpointError, match="written by backend=npu.*backend.name=npu"):
        load_checkpoint(path, engine=None, rank=0, world_size=1, backend="gpu")


def test_micro_batches_may_change_only_with_the_dp_size(tmp_path, demo_dir):
    cfg = tiny_config("backend.name=npu", "train.micro_batches=4", demo_dir=demo_dir)
    saved = config_to_dict(tiny_config("backend.name=npu", "train.micro_batches=2", "parallel.pp=2",
                                       demo_dir=demo_dir))
    os.makedirs(tmp_path / "ck")
    with open(tmp_path / "ck" / "trainer.json", "w") as f:
        json.dump({"step": 2, "world_size": 4, "dp_size": 2, "backend": "npu", "config": saved}, f)
    assert check_resume_config(str(tmp_path / "ck"), cfg, dp_size=1)["step"] == 2  # parallel.* is layout
    with pytest.raises(CheckpointError, match=r"train.micro_batches: 2 -> 4"):
        check_resume_config(str(tmp_path / "ck"), cfg, dp_size=2)


def test_a_resume_may_move_the_offloaded_state_but_not_switch_offload(tmp_path, demo_dir):
    off = ["backend.offload_optimizer=cpu", "backend.torch_adam=false", "backend.offload_chunk=4096"]
    saved = tiny_config(*off, "backend.offload_ratio=0.5", demo_dir=demo_dir)
    os.makedirs(tmp_path / "ck")
    with open(tmp_path / "ck" / "trainer.json", "w") as f:
        json.dump({"step": 2, "world_size": 1, "dp_size": 1, "backend": "gpu", "config": config_to_dict(saved)}, f)
    moved = tiny_config(*off[:2], "backend.offload_chunk=8192", "backend.offload_ratio=0.25", demo_dir=demo_dir)
    assert check_resume_config(str(tmp_path / "ck"), moved, dp_size=1)["step"] == 2
    with pytest.raises(CheckpointError, match=r"backend.offload_optimizer: 'cpu' -> 'none'"):
        check_resume_config(str(tmp_path / "ck"), tiny_config(demo_dir=demo_dir), dp_size=1)


# ------------------------------------------------------------------------------------------------ the trainer
COMMON = ["train.eval_samples=0", "train.log_every=1", "train.export_hf=false", "data.pack_tokens=512",
          "data.num_workers=1", "train.lr_schedule=cosine", "train.warmup_steps=2"]


def _train(nproc: int, out_dir, demo: str, *overrides: str) -> dict[int, float]:
    args = ["-m", "sail_dist", "--config", DEMO, f"train.out_dir={out_dir}", f"data.demo_dir={demo}", *COMMON,
            *overrides]
    cmd = torchrun_cmd(nproc, *args) if nproc > 1 else [sys.executable, *args]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return step_losses(out_dir)


def _elastic(tmp_path, demo: str, backend: list[str], layouts: dict[str, tuple[int, list[str]]]):
    """The uninterrupted 1-rank run (4 steps of 4 micro-batches, checkpoint at 2), the 2-rank run (2 x 2) for 2 steps,
    each 2-step checkpoint resumed at the other size; returns (uninterrupted, first half of the 2-rank run,
    resumed 2 -> 1, resumed 1 -> 2)."""
    n1, one = layouts["one"]
    n2, two = layouts["two"]
    full = _train(n1, tmp_path / "one", demo, *backend, *one, "train.steps=4", "train.save_every=2")
    half = _train(n2, tmp_path / "two", demo, *backend, *two, "train.steps=2")
    shrunk = _train(n1, tmp_path / "shrunk", demo, *backend, *one, "train.steps=4",
                    f"train.resume={tmp_path / 'two' / 'checkpoints' / 'step_00000002'}")
    grown = _train(n2, tmp_path / "grown", demo, *backend, *two, "train.steps=4",
                   f"train.resume={tmp_path / 'one' / 'checkpoints' / 'step_00000002'}")
    return full, half, shrunk, grown


def _check(full, half, shrunk, grown, tol: float):
    assert sorted(full) == [1, 2, 3, 4] and sorted(half) == [1, 2] and sorted(shrunk) == sorted(grown) == [3, 4]
    for name, run in (("2 ranks", half), ("2 -> 1", shrunk), ("1 -> 2", grown)):
        for step, loss in run.items():
            assert abs(loss - full[step]) <= tol * abs(full[step]), (name, step, loss, full[step])
    assert full[4] < full[1]  # it trains. Step 4's loss follows the resumed step 3 update: it checks Adam's state


@pytest.mark.slow
def test_gpu_backend_resumes_on_another_dp_size(tmp_path, demo_dir):
    """DeepSpeed ZeRO-2: 2 ranks -> 1 and 1 -> 2 through the universal checkpoint (converted once, beside the
    ZeRO partitions), dp x micro_batches = 4 kept; losses equal the uninterrupted run's (measured: bit-equal)."""
    require("deepspeed")
    runs = _elastic(tmp_path, demo_dir, [], {"one": (1, ["train.micro_batches=4"]),
                                             "two": (2, ["train.micro_batches=2"])})
    _check(*runs, tol=1e-6)
    for src in ("one", "two"):  # converted once, atomically, next to the native checkpoint
        engine = tmp_path / src / "checkpoints" / "step_00000002" / "engine"
        assert (engine / "universal" / "deepspeed" / "zero").is_dir() and (engine / "deepspeed").is_dir()
        assert not (engine / "universal.tmp").exists()


@pytest.mark.slow
def test_npu_backend_resumes_on_another_dp_and_pp_layout(tmp_path, demo_dir):
    """Megatron dist_checkpointing (model + distributed optimizer in `fully_sharded_model_space`): DP 2 -> 1 and
    1 -> PP 2 (2 ranks, DP 1) of the dense demo model; losses against the uninterrupted 1-rank run."""
    require_mcore_checkpoints()
    runs = _elastic(tmp_path, demo_dir, ["backend.name=npu"],
                    {"one": (1, ["train.micro_batches=4"]), "two": (2, ["train.micro_batches=2"])})
    _check(*runs, tol=1e-6)
    pp = _train(2, tmp_path / "pp2", demo_dir, "backend.name=npu", "parallel.pp=2", "train.micro_batches=4",
                "train.steps=4", f"train.resume={tmp_path / 'one' / 'checkpoints' / 'step_00000002'}")
    for step, loss in pp.items():
        assert abs(loss - runs[0][step]) <= 1e-6 * abs(runs[0][step]), (step, loss, runs[0][step])


@pytest.mark.slow
def test_gpu_backend_with_cpu_offload_resumes_on_fewer_ranks_and_another_split(tmp_path, demo_dir):
    """backend.offload_optimizer=cpu (DeepSpeedCPUAdam, fp32 partitions on the host): 2 ranks -> 1 through the
    universal checkpoint; losses against the uninterrupted 1-rank run (measured: within 2e-8 relative). At
    offload_ratio 0.5: half of each partition is updated by the host step and half lives on the device between
    checkpoints (DeviceShare), which the save must write back and the resumed run read again. The uninterrupted
    run's own checkpoint resumed at offload_ratio 0.25 and another host chunk: the same losses."""
    require("deepspeed")
    off = ["backend.offload_optimizer=cpu", "backend.torch_adam=false", "backend.offload_ratio=0.5",
           "backend.offload_chunk=4096"]
    full = _train(1, tmp_path / "one", demo_dir, *off, "train.micro_batches=4", "train.steps=4", "train.save_every=2")
    _train(2, tmp_path / "two", demo_dir, *off, "train.micro_batches=2", "train.steps=2")
    shrunk = _train(1, tmp_path / "shrunk", demo_dir, *off, "train.micro_batches=4", "train.steps=4",
                    f"train.resume={tmp_path / 'two' / 'checkpoints' / 'step_00000002'}")
    moved = _train(1, tmp_path / "moved", demo_dir, *off[:2], "backend.offload_ratio=0.25",
                   "backend.offload_chunk=8192", "train.micro_batches=4", "train.steps=4",
                   f"train.resume={tmp_path / 'one' / 'checkpoints' / 'step_00000002'}")
    assert sorted(shrunk) == sorted(moved) == [3, 4]
    for name, run in (("2 -> 1", shrunk), ("ratio 0.5 -> 0.25", moved)):
        for step, loss in run.items():
            assert abs(loss - full[step]) <= 1e-6 * abs(full[step]), (name, step, loss, full[step])
