"""One clean error per failure on every launch path (issue: the user's path, item 4): a multi-rank failure prints
one line naming the error (not rank tracebacks plus torchrun's ChildFailedError report), the traceback goes to
<out_dir>/logs/rank<R>.err, a bad config fails once with exit status 2, and known-harmless startup warnings are
filtered."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import ROOT, child_env, require

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")
DEMO_NPU = os.path.join(ROOT, "configs", "demo", "npu_tiny_moe.yaml")


def _launch(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT, capture_output=True,
                          text=True, env=child_env(**env), timeout=600)


def _assert_clean(r: subprocess.CompletedProcess) -> list[str]:
    for noise in ("Traceback", "ChildFailedError", "Root Cause", "elastic/multiprocessing/api.py"):
        assert noise not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith("sail-train:")]


@pytest.mark.parametrize("script,config", [("gpu_sft.sh", DEMO), ("npu_pretrain.sh", DEMO_NPU)])
def test_bad_config_fails_once_with_exit_status_2(script, config):
    r = _launch(script, config, "train.lr=-1")
    assert r.returncode == 2
    assert _assert_clean(r) == ["sail-train: config key 'train.lr' (from command line): must be > 0, got -1.0"]


@pytest.mark.slow
def test_a_failure_on_every_rank_is_one_line_and_a_traceback_file(tmp_path):
    require("deepspeed")
    out = tmp_path / "run"
    r = _launch("gpu_sft.sh", DEMO, "data.demo=false", f"data.tokenizer={tmp_path}/no_tokenizer",
                f"data.sources=[{{path: {DEMO}}}]", f"train.out_dir={out}")  # both ranks fail alike
    assert r.returncode == 1
    lines = _assert_clean(r)
    assert len(lines) == 1 and "no tokenizer.json" in lines[0], r.stderr
    rank = int(re.match(r"sail-train: rank (\d): ", lines[0]).group(1))
    assert "training stopped (exit status 1)" in r.stderr
    tb = (out / "logs" / f"rank{rank}.err").read_text()
    assert tb.startswith("Traceback") and "no tokenizer.json" in tb


@pytest.mark.slow
def test_world_size_mismatch_is_one_line_and_no_harmless_warnings(tmp_path):
    """PP 2 x EP 2 asked of one process: the NPU backend's layout error once; Megatron's Transformer Engine / Apex
    fallback warnings (harmless: the NPU backend uses torch_npu's fused ops) are not printed."""
    require("megatron.core")
    r = _launch("npu_pretrain.sh", DEMO_NPU, f"train.out_dir={tmp_path / 'run'}", NPROC_PER_NODE="1")
    assert r.returncode == 1
    lines = _assert_clean(r)
    assert len(lines) == 1 and "pp=2" in lines[0], r.stderr
    assert "Transformer Engine and Apex" not in r.stderr
