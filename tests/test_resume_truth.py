"""Resume tells the truth (one process, the GPU backend on CPU): a changed config is named key by key with the
ways on, the out_dir's config.yaml is written only by an accepted run, a finished run re-run says it is complete
(exit 0, strict JSON), and train.resume is validated at parse time."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, step_losses
from sail_dist.config import ConfigError, load_config

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")


def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _run(out_dir: str, demo_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sail_dist", "--config", DEMO, f"train.out_dir={out_dir}", f"data.demo_dir={demo_dir}",
           "train.eval_samples=0", "data.pack_tokens=512", "data.num_workers=0", "train.steps=2",
           "train.export_hf=false", "train.tensorboard=false", *overrides]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("resume")
    out, demo = str(root / "run"), str(root / "demo")
    r = _run(out, demo)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _strict_json(r.stdout.strip().splitlines()[-1])["complete"]
    return out, demo


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_complete_and_exits_0(finished):
    out, demo = finished
    r = _run(out, demo)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = _strict_json(r.stdout.strip().splitlines()[-1])
    assert summary["already_complete"] and summary["resumed_step"] == 2 and summary["final_loss"] is None
    assert "is complete" in r.stdout and "raise train.steps" in r.stdout and "train.resume=none" in r.stdout


@pytest.mark.slow
def test_changed_config_names_the_keys_and_leaves_config_yaml(finished):
    out, demo = finished
    before = open(os.path.join(out, "config.yaml")).read()
    r = _run(out, demo, "train.lr=5e-3", "model.llm.num_layers=3")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-4000:]
    err = r.stderr
    assert "written under another config (2 key(s) differ" in err and "corrupt" not in err
    assert "train.lr: 0.002 -> 0.005" in err and "model.llm.num_layers: 4 -> 3" in err
    assert "a new train.out_dir" in err and "train.resume=none" in err
    assert f"train.init_from={os.path.join(out, 'hf')}" in err
    assert err.strip().count("\n") < 12  # the message, not a traceback
    assert open(os.path.join(out, "config.yaml")).read() == before  # a refused run writes nothing


@pytest.mark.slow
def test_run_control_keys_may_change_on_resume(finished, tmp_path):
    out, demo = finished
    r = _run(out, demo, "train.steps=3", "train.log_every=2", "train.keep_last=3")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert "steps: 3" in open(os.path.join(out, "config.yaml")).read()  # the accepted run's config


def test_resume_is_validated_at_parse_time(tmp_path):
    with pytest.raises(ConfigError, match=r"train.resume.*'latest' is not 'auto'.*'none'.*existing checkpoint"):
        load_config(DEMO, ["train.resume=latest"])
    assert load_config(DEMO, [f"train.resume={tmp_path}"]).train.resume == str(tmp_path)
    assert load_config(DEMO, ["train.resume=none"]).train.resume == "none"


@pytest.mark.slow
def test_memory_settings_may_change_on_resume(tmp_path):
    """Activation checkpointing recomputes the same forward: a run that ran out of memory resumes with it on (the
    out-of-memory message marks it so) and continues the uninterrupted run's losses."""
    pytest.importorskip("deepspeed")
    demo = str(tmp_path / "demo")
    full = str(tmp_path / "full")
    assert _run(full, demo, "train.steps=4", "train.save_every=2", "train.log_every=1").returncode == 0
    resumed = str(tmp_path / "resumed")
    r = _run(resumed, demo, "train.steps=4", "train.log_every=1", "train.activation_checkpointing.llm=true",
             "train.activation_checkpointing.vit=true",
             f"train.resume={os.path.join(full, 'checkpoints', 'step_00000002')}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "activation checkpointing: " in r.stdout + r.stderr  # on in the resumed run
    want, got = step_losses(full), step_losses(resumed)
    assert sorted(got) == [3, 4]
    for step, loss in got.items():
        assert abs(loss - want[step]) <= 1e-6 * abs(want[step]), (step, loss, want[step])
