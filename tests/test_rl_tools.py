"""Prompt data (load_prompts), sail-rl-filter, sail-rl-harvest and sail-eval, driven by a scripted RolloutEngine."""
from __future__ import annotations

import itertools
import json
import math
import os

import pytest

from conftest import ROOT
from data_testutil import save_png, write_jsonl
from sail_dist.config import DataSource, load_config
from sail_dist.data.records import BadSampleError, parse_record
from sail_dist.data.samples import SampleBuilder, default_tokenizer_dir
from sail_dist.data.template import format_think
from sail_dist.eval.run import pass_at_k
from sail_dist.rl.prompts import load_prompts
from sail_dist.rollout.engine import Completion

DEMO_YAML = os.path.join(ROOT, "configs", "demo", "demo.yaml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The demo config (tiny model, demo tokenizer), a SampleBuilder and a tiny random model in the HF layout."""
    from sail_dist.data.demo import ensure_demo
    from sail_dist.kernels.opset import get_opset
    from sail_dist.model.build import build_model
    from sail_dist.model.hf import save_sailvl

    base = tmp_path_factory.mktemp("tools")
    over = [f"data.demo_dir={base / 'demo'}", "data.on_bad_sample=skip"]
    cfg = load_config(DEMO_YAML, over)
    ensure_demo(cfg.data.demo_dir, n_train=40, n_eval=10)
    hf = str(base / "hf")
    os.makedirs(hf)
    save_sailvl(build_model(cfg.model, get_opset("reference"), seed=5), hf, dtype=None)
    return {"cfg": cfg, "over": over, "builder": SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg)),
            "hf": hf, "base": base}


def user(q):
    return [{"from": "human", "value": q}]


# ----------------------------------------------------------------------------------------------- prompt data
def test_load_prompts_formats_and_bad_records(env, tmp_path):
    cfg, b = env["cfg"], env["builder"]
    img = save_png(str(tmp_path / "img" / "a.png"))
    frames = tmp_path / "clip"
    for i in range(20):
        save_png(str(frames / f"f{i}.png"), size=(32, 32), colour=(10 * i, 0, 0))
    lines = [
        {"id": "a", "image": "img/a.png", "conversations": user("<image>\nWhat colour?"), "answer": "red",
         "task": "colour"},                                                                          # 1
        {"id": "b", "conversations": user("1+1?") + [{"from": "gpt", "value": "\\boxed{2}"}]},        # 2 reference
        {"id": "c", "conversations": user("What is it?")},                                           # 3 no truth
        {"id": "d", "conversations": user("Describe."), "kind": "open"},                             # 4 no judge
        {"id": "e", "conversations": user("?"), "answer": "1", "kind": "fuzzy"},                      # 5 bad kind
        {"id": "f", "conversations": user("?"), "answer": "1", "choices": "A or B"},                  # 6 bad choices
        "{not json",                                                                                  # 7
        {"id": "h", "conversations": user("?"), "answer": ""},                                        # 8 empty answer
        {"id": "i", "video": "clip", "conversations": user("<video>\nHow many?"), "answer": 3},       # 9 video
        {"id": "j", "messages": [{"role": "user", "content": "Pick one"}], "answer": "(B)",
         "choices": ["cat", "dog"]},                                                                  # 10 MC
        {"id": "k", "conversations": user("?") + [{"from": "gpt", "value": "\\boxed{}"}]},            # 11 empty box
    ]
    path = write_jsonl(str(tmp_path / "p.jsonl"), lines)
    items, log = load_prompts(cfg, [DataSource(path=path)], b)
    assert [it.meta["record_id"] for it in items] == ["a", "b", "i", "j"]
    assert dict(log.counts) == {"no_ground_truth": 3, "bad_prompt_field": 3, "malformed_json": 1}
    ex = " ".join(e for es in log.examples.values() for e in es)
    for line in (3, 4, 5, 6, 7, 8, 11):
        assert f"{path}:{line}" in ex
    a, ref, vid, mc = items
    assert (a.answer, a.kind, a.question, a.meta["task"]) == ("red", "verifiable", "What colour?", "colour")
    assert a.id == "p:1"
    assert a.prompt.num_images == 1 and a.meta["images"] == [img]
    assert b.template.decode(a.prompt.input_ids.tolist()).endswith("<|im_start|>assistant\n")
    # the reference record's prompt is the SFT record without its answer, exactly as SampleBuilder.prompt builds it
    rec = parse_record(json.dumps(lines[1]), "x:2", "p:2", str(tmp_path))
    assert ref.prompt.input_ids.tolist() == b.prompt(rec)[0].input_ids.tolist() and ref.answer == "\\boxed{2}"
    assert ref.meta["turns"] == [{"role": "user", "content": "1+1?"}]
    text = b.template.decode(vid.prompt.input_ids.tolist())
    assert cfg.data.video_frames == 16 and "Frame16: <img>" in text and "Frame17" not in text
    assert vid.prompt.num_images == 16 and vid.answer == "3"
    assert mc.meta["choices"] == ["cat", "dog"] and mc.answer == "(B)"
    assert json.loads(mc.meta["raw"]) == lines[9]
    with pytest.raises(BadSampleError, match=rf"{path}:3: bad sample \(no_ground_truth\)"):
        load_prompts(load_config(DEMO_YAML, env["over"] + ["data.on_bad_sample=error"]), [DataSource(path=path)], b)
    # an open prompt is fine once a judge is configured; a prompt over the context is counted too_long
    cfg_j = load_config(DEMO_YAML, env["over"] + ["rl.reward.judge.kind=http", "rl.reward.judge.url=http://x",
                                                  "rl.sampling.max_context=40"])
    items, log = load_prompts(cfg_j, [DataSource(path=path)], b)
    assert "p:4" in [it.id for it in items] and next(it for it in items if it.id == "p:4").kind == "open"
    assert log.counts["too_long"] == 1 and "p:9" not in [it.id for it in items]  # 16 frames x 16 tokens > 40
    assert f"{path}:9" in log.examples["too_long"][0] and "max_context=40" in log.examples["too_long"][0]
    # two files of one base name would give colliding prompt ids: refused, naming both paths; `name:` fixes it
    os.makedirs(tmp_path / "sub")
    other = write_jsonl(str(tmp_path / "sub" / "p.jsonl"), lines[1:2])
    with pytest.raises(ValueError, match=rf"{path} and {other} are both named 'p'"):
        load_prompts(cfg, [DataSource(path=path), DataSource(path=other)], b)
    items, _ = load_prompts(cfg, [DataSource(path=path), DataSource(path=other, name="p2")], b)
    assert [it.id for it in items][-1] == "p2:1" and len(items) == 5


# ----------------------------------------------------------------------------------------------- scripted engine
class ScriptedEngine:
    """Answers prompt `sample_id` with the texts of `script[sample_id]` (cycled to n), tokenized."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []

    def generate(self, prompts, params, n=1):
        self.calls.append((len(prompts), n, params))
        out = []
        for p in prompts:
            texts = self.script[p.sample_ids[0]]
            out.append([self._completion(texts[i % len(texts)]) for i in range(n)])
        return out

    def _completion(self, text):
        ids = self.tok.encode(text + "<|im_end|>", add_special_tokens=False).ids
        return Completion(ids, [0.0] * len(ids), "stop")

    def update_weights(self, sd):
        pass


def _patch_engine(monkeypatch, env, script):
    import sail_dist.eval.policy as policy

    eng = ScriptedEngine(env["builder"].template.tok, script)
    monkeypatch.setattr(policy, "default_engine", lambda model, cfg: eng)
    return eng


def _qa(i, answer):
    return {"id": f"q{i}", "conversations": user(f"Question {i}?"), "answer": answer,
            "task": "odd" if i % 2 else "even"}


RIGHT = "<think>\nsteps\n</think>\n\n\\boxed{{{}}}"


def test_filter_keeps_0_lt_c_lt_k(env, tmp_path, monkeypatch, capsys):
    from sail_dist.rl.filter import classify, main

    recs = [_qa(1, "1"), _qa(2, "2"), _qa(3, "3"), _qa(4, "4"), {"conversations": user("no truth")}, _qa(6, "6")]
    path = write_jsonl(str(tmp_path / "prompts.jsonl"), recs)
    script = {"prompts:1": [RIGHT.format(1)] * 4,                                   # 4/4: all correct
              "prompts:2": ["\\boxed{0}", "2 apples", "<think>x", "\\boxed{}"],     # 0/4: all wrong
              "prompts:3": [RIGHT.format(3), "\\boxed{3.0}", "\\boxed{4}", "no"],   # 2/4: kept
              "prompts:4": ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"],  # 1/4: kept
              "prompts:6": ["\\boxed{6}", "\\boxed{6}", "\\boxed{6}", "\\boxed{5}"]}  # 3/4: kept
    eng = _patch_engine(monkeypatch, env, script)
    out = str(tmp_path / "kept.jsonl")
    rc = main(["--config", DEMO_YAML, "--init-from", env["hf"], "--out", out, path, *env["over"],
               "rl.sampling.max_new_tokens=32"])
    assert rc == 0
    src = open(path).read().splitlines()
    assert open(out).read().splitlines() == [src[2], src[3], src[5]]  # the original lines, in order
    report = json.load(open(out + ".report.json"))
    assert report["total"] == {"prompts": 6, "kept": 3, "all_correct": 1, "all_wrong": 1, "judge_failed": 0, "bad": 1}
    assert report["sources"]["prompts"]["bad_reasons"] == {"no_ground_truth": 1}
    assert [p["correct"] for p in report["prompts"]] == [4, 0, 2, 1, 3]
    assert eng.calls[0][1] == 4 and eng.calls[0][2].temperature == 1.0 and eng.calls[0][2].max_new_tokens == 32
    printed = capsys.readouterr().out
    assert "all_correct" in printed and json.loads(printed.strip().splitlines()[-1])["kept"] == 3
    assert classify([True, None, False]) == "judge_failed"


def test_harvest_keeps_only_correct_well_formed_distinct(env, tmp_path, monkeypatch):
    from sail_dist.rl.harvest import main

    img = save_png(str(tmp_path / "im.png"))
    recs = [{"id": "h1", "image": "im.png", "conversations": user("<image>\nHow many?"), "answer": "3"},
            {"id": "h2", "conversations": user("2+2?"), "answer": "4"}]
    path = write_jsonl(str(tmp_path / "hp.jsonl"), recs)
    good1 = "<think>\none two three\n</think>\n\n\\boxed{3} done"
    script = {"hp:1": [good1,
                       "\\boxed{3}",                                       # right, no think: rejected (format)
                       "<think>\ncount\n</think>\n\n\\boxed{4}",           # formatted, wrong: rejected
                       good1 + "  \n",                                     # duplicate of the first
                       "<think>\nthree circles\n</think>\n\n\\boxed{3}",  # a second distinct CoT
                       "<think>\nagain\n</think>\n\n\\boxed{3.0}"],        # third distinct: over the cap of 2
              "hp:2": ["<think>a</think><think>b</think>\\boxed{4}", "\\boxed{5}"]}
    _patch_engine(monkeypatch, env, script)
    out = str(tmp_path / "cot.jsonl")
    run_dir = str(env["base"])  # a run directory: its hf/ export is used
    assert main(["--config", DEMO_YAML, "--init-from", run_dir, "--out", out, "-n", "6", "--max-per-prompt", "2",
                 path, *env["over"]]) == 0
    got = [json.loads(line) for line in open(out)]
    assert [r["messages"][-1]["content"] for r in got] == [format_think("one two three", "3"),
                                                           format_think("three circles", "3")]
    assert got[0]["images"] == [img] and got[0]["messages"][0] == {"role": "user", "content": "<image>\nHow many?"}
    assert got[0]["id"] == "h1#harvest0"
    rep = json.load(open(out + ".report.json"))
    assert {k: rep[k] for k in ("samples", "kept", "wrong", "bad_format", "duplicate", "over_cap",
                                "prompts_with_kept")} == {"samples": 12, "kept": 2, "wrong": 4, "bad_format": 4,
                                                          "duplicate": 1, "over_cap": 1, "prompts_with_kept": 1}
    # the harvested records are valid SFT records for the training pipeline
    from sail_dist.data.template import apply_think_rules

    b = env["builder"]
    for i, line in enumerate(open(out), 1):
        rec = parse_record(line, f"{out}:{i}", f"cot:{i}", str(tmp_path))
        assert rec.answer == "3" and apply_think_rules(rec, "longcot")[0].turns == rec.turns  # already normal
        assert b.describe(rec).encoded.n_label_tokens > 0


# ----------------------------------------------------------------------------------------------- sail-eval
def test_pass_at_k_matches_the_formula_and_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                formula = 1 - math.comb(n - c, k) / math.comb(n, k)
                # brute force: the share of k-subsets of the n samples that hold a correct one
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(formula, abs=1e-12) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_sail_eval_results_and_summary(env, tmp_path, monkeypatch, capsys):
    from sail_dist.eval.cli import main

    recs = [_qa(1, "1"), _qa(2, "1/2"), _qa(3, "C"), _qa(4, "10")]
    path = write_jsonl(str(tmp_path / "ev.jsonl"), recs)
    script = {"ev:1": [RIGHT.format(1), "\\boxed{2}", "\\boxed{1}", "1"],          # 3/4
              "ev:2": ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "1/3", "half"],    # 2/4
              "ev:3": ["(C)", "\\boxed{B}", "Answer: C", "c"],                    # 3/4
              "ev:4": ["\\boxed{1,0}", "9", "\\boxed{}", "<think>10"]}             # 0/4
    eng = _patch_engine(monkeypatch, env, script)
    out = str(tmp_path / "eval")
    assert main(["--config", DEMO_YAML, "--init-from", env["hf"], path, "-n", "4", "-k", "1,2,4", "--out", out,
                 *env["over"]]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert [r["n_correct"] for r in rows] == [3, 2, 3, 0]
    assert rows[0]["id"] == "ev:1" and rows[0]["where"] == f"{path}:1" and rows[0]["record_id"] == "q1"
    assert rows[1]["predictions"] == ["0.5", "\\frac{1}{2}", "1/3", "half"]
    assert rows[1]["correct"] == [True, True, False, False] and rows[2]["matched_by"] == ["choice"] * 4
    summary = json.load(open(os.path.join(out, "summary.json")))["summary"]
    for k in (1, 2, 4):
        want = sum(pass_at_k(4, r["n_correct"], k) for r in rows) / 4
        assert summary["all"][f"pass@{k}"] == pytest.approx(want)
    assert summary["all"]["accuracy"] == pytest.approx(8 / 16) and summary["all"]["pass@4"] == pytest.approx(0.75)
    assert summary["task:even"]["prompts"] == 2 and summary["task:even"]["accuracy"] == pytest.approx(2 / 8)  # q2, q4
    assert summary["source:ev"]["prompts"] == 4
    assert eng.calls[0][2].temperature == 1.0  # n > 1: rl.sampling.temperature
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["pass@4"] == pytest.approx(0.75) and last["prompts"] == 4
    # n = 1 is greedy
    assert main(["--config", DEMO_YAML, "--init-from", env["hf"], path, "--out", out, *env["over"]]) == 0
    assert eng.calls[-1][1] == 1 and eng.calls[-1][2].temperature == 0.0
    # a prompt file that is not there ends the tool with its name (exit status 1), before any generation
    calls = len(eng.calls)
    with pytest.raises(SystemExit, match=r"sail-eval: .*nope\.jsonl"):
        main(["--config", DEMO_YAML, "--init-from", env["hf"], str(tmp_path / "nope.jsonl"), *env["over"]])
    assert len(eng.calls) == calls


def test_sail_eval_on_the_real_sampler(env, tmp_path):
    """No scripted engine: the tiny random model generates through the built-in Sampler end to end."""
    from sail_dist.eval.cli import main

    img = save_png(str(tmp_path / "c.png"))
    path = write_jsonl(str(tmp_path / "real.jsonl"), [
        {"image": "c.png", "conversations": user("<image>\nWhat colour?"), "answer": "red"}, _qa(2, "4")])
    out = str(tmp_path / "real")
    assert main(["--config", DEMO_YAML, "--init-from", env["hf"], path, "--out", out, *env["over"],
                 "rl.sampling.max_new_tokens=8"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert len(rows) == 2 and all(len(r["texts"]) == 1 for r in rows) and os.path.exists(img)


def test_open_prompts_are_judged_in_one_batch_and_failures_stay_unscored():
    from collections import Counter

    from sail_dist.config import RewardConfig
    from sail_dist.eval.run import Samples, judge_samples, summarize
    from sail_dist.rl.judge import JudgeVerdict
    from sail_dist.rl.prompts import PromptItem
    from sail_dist.rl.rewards import build_reward

    class Judge:
        counts = Counter()

        def __init__(self):
            self.calls = []

        def judge(self, reqs):
            self.calls.append([r.response for r in reqs])
            return [JudgeVerdict(None, "timeout") if r.response == "?" else JudgeVerdict(float(r.response) / 10)
                    for r in reqs]

    def it(i, kind, answer=None):
        return PromptItem(f"s:{i}", f"s.jsonl:{i}", None, answer, "q", kind, {"source": "s", "task": kind})

    items = [it(1, "open"), it(2, "verifiable", "2"), it(3, "open")]
    samples = Samples([["\\boxed{9}", "\\boxed{1}"], ["\\boxed{2}", "3"], ["?", "<think>x</think>\\boxed{5}"]],
                      [["stop"] * 2] * 3)
    cfg = RewardConfig()
    cfg.judge.on_failure = "exclude"
    judge = Judge()
    res = judge_samples(items, samples, build_reward(cfg, judge))
    assert judge.calls == [["9", "1", "?", "5"]]  # every open sample in one call, think block removed
    assert [r.correct for r in res] == [[True, False], [True, False], [None, True]]
    s = summarize(res, [1])
    assert s["all"]["samples"] == 5 and s["all"]["unscored"] == 1 and s["all"]["accuracy"] == pytest.approx(3 / 5)
    assert s["task:open"]["pass@1"] == pytest.approx((0.5 + 1.0) / 2)  # the failed sample leaves n = 1 for s:3
