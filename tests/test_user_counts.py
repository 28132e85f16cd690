"""Counts a user can act on (issue 16 item 5): bad samples as distinct records (file:line) and occurrences, the
progress line's tok/s over the log window's wall time, MFU said to be n/a where no peak is known (CPU), and
metrics.jsonl / TensorBoard without duplicated steps after a resume."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import ROOT, child_env
from data_testutil import qa, tiny_config, write_jsonl
from sail_dist.backends.base import DistEnv, TrainStepStats
from sail_dist.config import DataSource
from sail_dist.data.demo import ensure_demo
from sail_dist.data.loader import StepLoader
from sail_dist.data.records import BadSampleLog, JsonlSource, SourceMix
from sail_dist.train.metrics import Metrics

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo(str(tmp_path_factory.getbasetemp() / "demo"))


# ------------------------------------------------------------------------------------------- bad samples
def _bad_source(tmp_path) -> tuple[str, list]:
    records = [qa(f"question {i}?", f"answer {i}") for i in range(12)]
    records.insert(2, '{"conversations": [ oops')  # line 3: malformed_json
    records.insert(7, {"conversations": [{"from": "human", "value": "no answer here"}]})  # line 8: no_assistant_turn
    return write_jsonl(str(tmp_path / "a.jsonl"), records), records


def _reference_draws(path: str, seed: int, drawn: int) -> Counter:
    """How often each line of `path` was drawn in the first `drawn` positions of the stream (the mix alone)."""
    src = JsonlSource(DataSource(path=path, name="a"), 0)
    mix = SourceMix([src], seed)
    return Counter(int(src.line_numbers[mix.next()[1]]) for _ in range(drawn))


def test_bad_records_are_distinct_records_and_occurrences_over_two_passes(tmp_path, demo):
    path, _ = _bad_source(tmp_path)
    cfg = tiny_config(f"data.sources=[{{path: {path}, name: a}}]", f"data.tokenizer={demo.tokenizer}",
                      "data.on_bad_sample=skip", "data.buffer_size=4", "data.pack_tokens=256")
    loader = StepLoader(cfg, 0, 1)
    per_step = Counter()
    while loader.state_dict()["mix"]["drawn"] < 2 * 14 + 1:  # into the third pass over the 14 lines
        step = next(loader)
        per_step.update(step.stats.dropped)
    drawn = loader.state_dict()["mix"]["drawn"]
    ref = _reference_draws(path, cfg.data.seed, drawn)
    k3, k8 = ref[3], ref[8]
    assert k3 >= 2 and k8 >= 2  # each bad line was met on every pass
    log = loader.bad_samples()
    assert log.records == {"malformed_json": {f"{path}:3": k3}, "no_assistant_turn": {f"{path}:8": k8}}
    assert log.distinct() == 2 and log.exact() and log.total == k3 + k8 == sum(per_step.values())
    assert dict(per_step) == {"malformed_json": k3, "no_assistant_turn": k8}  # the step stats: occurrences
    assert log.summary() == (f"2 distinct records ({k3 + k8} occurrences): "
                             f"malformed_json: 1 record, {k3} occurrences ({path}:3 x{k3}); "
                             f"no_assistant_turn: 1 record, {k8} occurrences ({path}:8 x{k8})")
    assert log.brief() == f"2 distinct records ({k3 + k8} occurrences)"
    assert log.examples["malformed_json"][0].startswith(f"{path}:3: ")  # the detail of the first one

    # the counts are part of the loader state: a resumed loader continues them exactly
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = StepLoader(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert resumed.bad_samples().state_dict() == log.state_dict()
    for _ in range(3):
        next(loader), next(resumed)
    assert resumed.bad_samples().state_dict() == loader.bad_samples().state_dict()
    loader.close()
    resumed.close()


def test_prefetched_steps_are_not_counted_before_they_are_trained(tmp_path, demo):
    path, _ = _bad_source(tmp_path)
    base = [f"data.sources=[{{path: {path}, name: a}}]", f"data.tokenizer={demo.tokenizer}",
            "data.on_bad_sample=skip", "data.buffer_size=4", "data.pack_tokens=256"]
    sync = StepLoader(tiny_config(*base), 0, 1)
    ahead = StepLoader(tiny_config(*base, "data.num_workers=1", "data.prefetch=4"), 0, 1)
    for _ in range(3):
        next(sync), next(ahead)
    time.sleep(0.5)  # let the planner thread run ahead
    assert ahead.bad_samples().state_dict() == sync.bad_samples().state_dict()
    sync.close()
    ahead.close()


def test_the_kept_records_are_bounded_and_the_rest_counted():
    log = BadSampleLog(max_records=3)
    for rep in range(2):
        for i in range(5):
            log.add("too_long", f"a.jsonl:{i + 1}", f"{100 + i} tokens > 64")
    assert log.counts["too_long"] == 10 and log.total == 10
    assert log.records["too_long"] == {"a.jsonl:1": 2, "a.jsonl:2": 2, "a.jsonl:3": 2}
    assert log.unlisted["too_long"] == 4 and not log.exact() and log.distinct() == 4  # a lower bound
    assert log.brief() == "at least 4 distinct records (10 occurrences)"
    assert "too_long: at least 4 records, 10 occurrences (the first 3 records kept: 4 occurrences are of records " \
           "past them) (a.jsonl:1 x2, a.jsonl:2 x2, a.jsonl:3 x2)" in log.summary()
    size = len(json.dumps(log.state_dict()))
    for i in range(1000):
        log.add("too_long", f"a.jsonl:{1000 + i}", "long")
    assert len(json.dumps(log.state_dict())) - size < 20  # one counter grows, nothing is listed
    assert log.total == 1010

    # merging (decode drops of several ranks): the same record stays one record, occurrences add up
    a, b = BadSampleLog(), BadSampleLog()
    a.add("corrupt_image", "x.jsonl:4", "truncated")
    b.add("corrupt_image", "x.jsonl:4", "truncated")
    b.add("corrupt_image", "x.jsonl:9", "truncated")
    a.merge(b)
    assert a.records == {"corrupt_image": {"x.jsonl:4": 2, "x.jsonl:9": 1}} and a.total == 3 and a.distinct() == 2
    # a state written before records were kept still loads: its occurrences are counted, not listed
    old = BadSampleLog()
    old.load_state_dict({"counts": {"too_long": 3}, "examples": {"too_long": ["a.jsonl:5: long"]}})
    assert old.total == 3 and old.unlisted["too_long"] == 3 and not old.exact()


# ------------------------------------------------------------------------------------------- progress line
class ScriptedClock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def _stats(tokens: int, time_s: float, flops: float = 0.0, loss: float = 2.0) -> TrainStepStats:
    return TrainStepStats(loss=loss, aux_loss=0.0, lr=1e-3, grad_norm=1.0, tokens=tokens, samples=4, flops=flops,
                          time_s=time_s)


def test_tokens_per_s_is_over_the_window_wall_time_and_mfu_is_na_on_cpu(tmp_path, caplog):
    # steps of 0.1 s compute each, but 1 s apart in wall time (data waits): the window figure says 1/10 of it
    tokens = [1000, 3000, 2000, 6000]
    t = [100.0]  # construction; then two reads per printed line (the window's end, the ETA's elapsed time)
    t += [102.0, 102.0]  # step 2 printed: window [100, 102] holds steps 1-2
    t += [105.0, 105.0]  # step 4 printed: window [102, 105] holds steps 3-4
    m = Metrics(str(tmp_path), DistEnv(), total_steps=4, start_step=0, tensorboard=False, clock=ScriptedClock(t))
    caplog.set_level(logging.INFO, logger="sail_dist")
    recs = [m.log_step(i, _stats(n, 0.1, flops=1e9), {}, every=2) for i, n in enumerate(tokens)]
    m.close()
    assert [r["tokens_per_s"] for r in recs] == pytest.approx([n / 0.1 for n in tokens])  # per step, as before
    assert "tokens_per_s_window" not in recs[0] and "tokens_per_s_window" not in recs[2]
    assert recs[1]["tokens_per_s_window"] == pytest.approx(4000 / 2.0)
    assert recs[3]["tokens_per_s_window"] == pytest.approx(8000 / 3.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2
    assert "| 2.0k tok/s |" in lines[0] and "| 2.7k tok/s |" in lines[1]
    # MFU: said once to be n/a (no peak for a CPU), then left out; null in the JSON lines
    assert "MFU n/a: no peak FLOPs known for cpu" in lines[0] and "MFU" not in lines[1]
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("mfu" in r and r["mfu"] is None for r in rows)
    assert rows[1]["mfu_window"] is None and rows[1]["tokens_per_s_window"] == pytest.approx(2000.0)


def test_mfu_where_the_peak_is_known(tmp_path, caplog):
    env = DistEnv(device_name="NVIDIA H200")
    m = Metrics(str(tmp_path), env, total_steps=2, start_step=0, tensorboard=False,
                clock=ScriptedClock([0.0, 4.0, 4.0]))
    caplog.set_level(logging.INFO, logger="sail_dist")
    r1 = m.log_step(0, _stats(100, 0.5, flops=2e14), {}, every=2)
    r2 = m.log_step(1, _stats(100, 0.5, flops=2e14), {}, every=2)
    m.close()
    assert r1["mfu"] == pytest.approx(2e14 / 0.5 / 989e12)  # the step's own: H200 dense bf16 989 TFLOP/s
    assert r2["mfu_window"] == pytest.approx(4e14 / 4.0 / 989e12)  # the window's: 4 s of wall time
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2/2")][0]
    assert f"MFU {100 * 4e14 / 4.0 / 989e12:.1f}%" in line and "n/a" not in line


# ------------------------------------------------------------------------------------------- resume
def _tb_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(tb_dir: str, tag: str) -> list[int]:
    """Every event of `tag` in the files as written (what TensorBoard would show without purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for name in sorted(os.listdir(tb_dir)):
        for ev in EventFileLoader(os.path.join(tb_dir, name)).Load():
            steps += [ev.step for v in ev.summary.value if v.tag == tag]
    return steps


def test_resume_cuts_metrics_jsonl_and_purges_tensorboard_replays(tmp_path):
    out = str(tmp_path)
    first = Metrics(out, DistEnv(), total_steps=5, start_step=0)
    for i in range(5):  # the killed run got to step 5
        first.log_step(i, _stats(10, 0.1, loss=1.0 + i), {}, every=1)
    first.close()
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "loss": 1.')  # torn by the kill
    second = Metrics(out, DistEnv(), total_steps=5, start_step=2)  # resumed from the step-2 checkpoint
    for i in range(2, 5):
        second.log_step(i, _stats(10, 0.1, loss=10.0 + i), {}, every=1)
    second.close()
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 12.0, 13.0, 14.0]  # the replayed steps are the new run's
    tb = os.path.join(out, "tensorboard")
    assert sorted(_raw_steps(tb, "train/loss")) == [1, 2, 3, 3, 4, 4, 5, 5]  # both runs' events are in the files
    scalars = _tb_scalars(tb)
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 12.0), (4, 13.0), (5, 14.0)]
    for tag, events in scalars.items():
        steps = [s for s, _ in events]
        assert steps == sorted(set(steps)), tag

    fresh = Metrics(out, DistEnv(), total_steps=1, start_step=0)  # a run from step 0 in that out_dir: its own logs
    fresh.log_step(0, _stats(10, 0.1, loss=7.0), {}, every=1)
    fresh.close()
    assert [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))] == [(1, 7.0)]
    assert _tb_scalars(tb)["train/loss"] == [(1, 7.0)]


def _train(out_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sail_dist", "--config", DEMO, f"train.out_dir={out_dir}", "train.eval_samples=0",
           "data.pack_tokens=256", "data.num_workers=0", "train.steps=4", "train.save_every=2", "train.keep_last=2",
           "train.log_every=1", "train.export_hf=false", *overrides]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)


def _summary(r: subprocess.CompletedProcess) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_leaves_each_step_once(tmp_path, demo):
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "run")
    bad, _ = _bad_source(tmp_path)  # 14 lines, 2 of them bad: met on every pass over it
    data = ["data.demo=false", f"data.tokenizer={demo.tokenizer}", "data.on_bad_sample=skip",
            f"data.sources=[{{path: {demo.train}, name: demo}}, {{path: {bad}, name: a}}]"]
    r = _train(out, *data)
    assert r.returncode == 0, r.stderr[-4000:]
    full = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    full_loss = {row["step"]: row["loss"] for row in full if "loss" in row}
    assert sorted(full_loss) == [1, 2, 3, 4]
    done = _summary(r)
    occ = sum(n for row in full for k, n in row.items() if k.startswith("data_dropped."))
    assert done["bad_records"] == 2 and done["bad_occurrences"] == occ >= 3  # more than one pass over a.jsonl
    assert done["bad_samples"].startswith(f"2 distinct records ({occ} occurrences): malformed_json: 1 record")
    assert f"{bad}:3" in done["bad_samples"] and f"{bad}:8" in done["bad_samples"]
    assert f"bad samples (skipped and counted): {done['bad_samples']}" in r.stdout
    assert "so far 2 distinct records" in r.stdout  # the per-step warning carries the running counts

    r = _train(out, *data, f"train.resume={os.path.join(out, 'checkpoints', 'step_00000002')}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1, 2, 3, 4]  # strictly increasing, unique, the uninterrupted run's steps
    assert {row["step"]: row["loss"] for row in rows} == pytest.approx(full_loss, rel=1e-6)  # the same run
    resumed = _summary(r)  # the replayed steps' bad samples are counted once, as in the uninterrupted run
    assert (resumed["bad_records"], resumed["bad_occurrences"], resumed["bad_samples"]) == \
        (2, occ, done["bad_samples"])
    scalars = _tb_scalars(os.path.join(out, "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([full_loss[s] for s in (1, 2, 3, 4)], rel=1e-6)
    for tag, events in scalars.items():
        steps = [s for s, _ in events]
        assert len(steps) == len(set(steps)), tag
