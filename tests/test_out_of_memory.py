"""A step that runs out of device memory ends with the ways on for this config, not only the allocator's message.

The trainer case runs the CLI (one process, the GPU backend on CPU) with the engine's step made to raise CUDA's
out-of-memory error at step 2: the console line lists the settings and the checkpoint to resume, the traceback file
keeps the allocator's message. The rest checks which settings `ways_on` offers for which config."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env
from sail_dist.config import load_config
from sail_dist.train.out_of_memory import OutOfDeviceMemoryError, explained, is_out_of_memory, ways_on

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")
ALLOCATOR = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"

# the CLI with DeepSpeedEngine.train_step raising the allocator's error from step 2 on
OOM_AT_STEP_2 = f"""
import sys, torch
from sail_dist.backends.gpu.engine import DeepSpeedEngine
real, calls = DeepSpeedEngine.train_step, []
def train_step(self, *a, **k):
    calls.append(1)
    if len(calls) == 2:
        raise torch.OutOfMemoryError({ALLOCATOR!r})
    return real(self, *a, **k)
DeepSpeedEngine.train_step = train_step
from sail_dist.cli import main
sys.exit(main())
"""


def test_the_trainer_names_the_settings_and_the_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", OOM_AT_STEP_2, "--config", DEMO, f"train.out_dir={out}",
                        f"data.demo_dir={tmp_path / 'demo'}", "train.eval_samples=0", "data.pack_tokens=512",
                        "data.num_workers=0", "train.steps=3", "train.save_every=1", "train.export_hf=false",
                        "train.tensorboard=false"], env=child_env(), capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr
    assert "OutOfDeviceMemoryError: step 2 ran out of device memory on rank 0" in err, err[-3000:]
    assert "backend.offload_optimizer=cpu backend.torch_adam=false backend.offload_ratio=0.3" in err
    assert "train.activation_checkpointing.llm=true" in err and "train.activation_checkpointing.vit=true" in err
    assert f"train.resume={out / 'checkpoints' / 'step_00000001'}" in err  # step 1's checkpoint, written before
    traceback_file = out / "logs" / "rank0.err"
    assert ALLOCATOR in traceback_file.read_text()  # the cause stays in the traceback


def _cfg(*overrides: str):
    return load_config(None, ["data.demo=true", *overrides])


def _text(ways) -> list[str]:
    return [w.split(":")[0] for w, _ in ways]


def test_offload_is_offered_then_a_higher_ratio_then_nothing_more():
    plain = ways_on(_cfg())
    assert plain[0] == (plain[0][0], False) and plain[0][0].startswith("backend.offload_optimizer=cpu")
    off = ["backend.offload_optimizer=cpu", "backend.torch_adam=false", "backend.offload_chunk=4096"]
    partial = ways_on(_cfg(*off, "backend.offload_ratio=0.5"))
    assert partial[0][0].startswith("backend.offload_ratio=0.8 (now 0.5)") and partial[0][1]  # a resume accepts it
    assert ways_on(_cfg(*off, "backend.offload_ratio=0.9"))[0][0].startswith("backend.offload_ratio=1 (now 0.9)")
    assert not any("offload" in w for w in _text(ways_on(_cfg(*off))))  # ratio 1: all of it is on the host


def test_the_npu_backend_is_offered_pipeline_stages_and_no_offload():
    ways = _text(ways_on(_cfg("backend.name=npu", "parallel.pp=2")))
    assert "parallel.pp=4" in ways and not any("offload" in w for w in ways)


def test_settings_already_on_are_not_offered():
    ways = _text(ways_on(_cfg("train.activation_checkpointing.llm=true", "data.pack_tokens=1024")))
    assert "train.activation_checkpointing.vit=true" in ways
    assert not any("activation_checkpointing.llm" in w or "pack_tokens" in w for w in ways)
    assert "data.pack_tokens=4096 train.micro_batches=8" in _text(ways_on(_cfg("data.pack_tokens=8192",
                                                                             "train.micro_batches=4")))
    assert ways_on(_cfg())[-1][1]  # more DP ranks: always, through elastic resume


def test_only_out_of_memory_errors_are_explained():
    assert is_out_of_memory(torch.OutOfMemoryError(ALLOCATOR))
    assert is_out_of_memory(RuntimeError("NPU out of memory. Tried to allocate 1.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid")) and not is_out_of_memory(ValueError("x"))
    with pytest.raises(OutOfDeviceMemoryError, match="No checkpoint was written yet") as e:
        with explained(_cfg(), 1, 0, None, torch.device("cpu")):
            raise torch.OutOfMemoryError(ALLOCATOR)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(RuntimeError, match="invalid") as e:
        with explained(_cfg(), 1, 0, None, torch.device("cpu")):
            raise RuntimeError("shape '[2, 3]' is invalid")
    assert type(e.value) is RuntimeError
