"""LongCoT and Think-Fusion data (data.think_format, template.normalise_think, `sail-data longcot`) and the
think_fusion objective: format rules on tricky strings, bad samples through the loader, exact / near-duplicate
removal and bucket balancing on planted corpora, the collate's marks token by token, the objective against a
float64 hand computation, and the same loss on both engines."""
from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
import torch

from conftest import ROOT, child_env, rel_err, require, torchrun_cmd
from data_testutil import qa, tiny_config, write_jsonl
from sail_dist.config import ConfigError, load_config
from sail_dist.data import longcot
from sail_dist.data.demo import DEMO_TOKENS, ensure_demo
from sail_dist.data.loader import StepLoader
from sail_dist.data.records import BadSample, BadSampleError, Record, Turn, parse_record
from sail_dist.data.samples import SampleBuilder
from sail_dist.data.template import (IGNORE, ChatTemplate, ThinkFormatError, apply_think_rules, load_tokenizer,
                                     normalise_think)
from sail_dist.kernels import get_opset
from sail_dist.model.build import build_model
from sail_dist.objectives import build_objective

TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
TINY_MOE = os.path.join(ROOT, "configs", "model", "tiny_moe.yaml")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo(str(tmp_path_factory.getbasetemp() / "demo")).root


# ------------------------------------------------------------------------------------------- format rules
@pytest.mark.parametrize("text, mode, answer, expect", [
    # layout: whitespace around the tags, missing newlines, tag variants
    ("<think>a b</think>\\boxed{5}", "longcot", None, "<think>\na b\n</think>\n\n\\boxed{5}"),
    ("< Think >\n\n  a b \n\n</ THINK >   \\boxed{5}.", "longcot", None, "<think>\na b\n</think>\n\n\\boxed{5}."),
    ("<think>a\r\nb</think>\r\n$\\boxed{\\frac{1}{2}}$", "longcot", None,
     "<think>\na\nb\n</think>\n\n$\\boxed{\\frac{1}{2}}$"),
    # the opening tag was in the generation prompt (R1 / Qwen3 outputs)
    ("a b</think>\n\\boxed{5}", "longcot", None, "<think>\na b\n</think>\n\n\\boxed{5}"),
    # no box after the think block, the record has an `answer`
    ("<think>a</think>", "longcot", "5", "<think>\na\n</think>\n\n\\boxed{5}"),
    ("<think>a</think>5.", "longcot", "5", "<think>\na\n</think>\n\n\\boxed{5}"),
    ("<think>a</think>So it is 5.", "longcot", "5", "<think>\na\n</think>\n\nSo it is 5.\n\n\\boxed{5}"),
    ("<think>a</think>\\boxed{ 5 }", "longcot", "5", "<think>\na\n</think>\n\n\\boxed{ 5 }"),
    # fusion: direct answers get the empty block, CoT answers stay CoT
    ("red", "fusion", None, "<think>\n\n</think>\n\nred"),
    ("<think> </think>red", "fusion", None, "<think>\n\n</think>\n\nred"),
    ("<think>\n\n</think>\n\nred", "fusion", None, "<think>\n\n</think>\n\nred"),
    ("<think>x</think>\\boxed{2}", "fusion", None, "<think>\nx\n</think>\n\n\\boxed{2}"),
])
def test_think_rules_normalise(text, mode, answer, expect):
    out = normalise_think(text, mode, answer)
    assert out.text == expect
    assert out.is_cot == (not expect.startswith("<think>\n\n</think>"))
    # idempotent: the normalised answer is a fixed point
    assert normalise_think(out.text, mode, answer).text == expect


@pytest.mark.parametrize("text, mode, answer, reason, detail", [
    ("<think>a b \\boxed{5}", "longcot", None, "bad_think_format", "never closed"),
    ("<think>a</think><think>b</think>\\boxed{1}", "longcot", None, "bad_think_format", "2 think blocks"),
    ("<think>a</think>\\boxed{1}</think>", "fusion", None, "bad_think_format", "2 think blocks"),
    ("<think>a so \\boxed{5}</think>", "longcot", None, "bad_think_format", "only \\boxed{} is inside the thought"),
    ("<think>a</think>the end", "longcot", None, "bad_think_format", "no \\boxed{} answer after </think>"),
    ("<think>\n  \n</think>\\boxed{1}", "longcot", None, "bad_think_format", "empty thought"),
    ("\\boxed{1}", "longcot", None, "bad_think_format", "no <think>...</think> block"),
    ("<think>a</think>\\boxed{5} but maybe 6", "longcot", None, "bad_think_format", "text after the final"),
    ("<think>a</think>\\boxed{5}\n\nSo the answer is 5.", "fusion", None, "bad_think_format", "text after the final"),
    ("Sure. <think>a</think>\\boxed{5}", "longcot", None, "bad_think_format", "text before <think>"),
    ("<think>a</think>\\boxed{\\frac{1}{2}", "longcot", None, "bad_think_format", "unbalanced"),
    ("<think></think>", "fusion", None, "bad_think_format", "no answer after the empty think block"),
    ("<think>a</think>\\boxed{4}", "longcot", "5", "think_answer_mismatch", "\\boxed{4} but answer='5'"),
    ("<think>a</think>it is 4", "longcot", "5", "think_answer_mismatch", "does not contain answer='5'"),
    ("<think></think>\\boxed{4}", "fusion", "5", "think_answer_mismatch", "\\boxed{4}"),
])
def test_think_rules_reject(text, mode, answer, reason, detail):
    with pytest.raises(ThinkFormatError) as e:
        normalise_think(text, mode, answer)
    assert e.value.reason == reason and detail in e.value.detail, (e.value.reason, e.value.detail)


def test_only_the_last_answer_may_think_and_the_answer_field_is_read():
    rec = parse_record(json.dumps({"answer": 7, "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "<think>x</think>\\boxed{1}"},
        {"from": "human", "value": "b"}, {"from": "gpt", "value": "<think>y</think>"}]}), "f.jsonl:3", "f:3", "/")
    assert rec.answer == "7"
    with pytest.raises(BadSample, match=r"f.jsonl:3: bad sample \(bad_think_format\): assistant turn 1"):
        apply_think_rules(rec, "longcot")
    ok = Record("f:1", "f.jsonl:1", [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"),
                                      Turn("assistant", "<think>y</think>")], answer="7")
    out, ans = apply_think_rules(ok, "longcot")
    assert [t.text for t in out.turns] == ["a", "b", "c", "<think>\ny\n</think>\n\n\\boxed{7}"] and ans.is_cot
    assert ok.turns[3].text == "<think>y</think>"  # the input record is not modified


# ------------------------------------------------------------------------------------------- loader policy
def _cot(q: str, thought: str, box: str) -> dict:
    return qa(q, f"<think>{thought}</think>\\boxed{{{box}}}")


def test_loader_counts_bad_think_samples_under_skip_and_raises_under_error(tmp_path, demo_dir):
    good = [_cot(f"question {i}", f"step {i} then {i + 1}", str(i)) for i in range(6)]
    recs = good[:2] + [qa("q", "<think>never closed \\boxed{1}")] + good[2:4] + [qa("q", "plain answer")] + good[4:]
    path = write_jsonl(str(tmp_path / "cot.jsonl"), recs)  # bad ones on lines 3 and 6
    base = [f"data.sources=[{{path: {path}}}]", f"data.tokenizer={demo_dir}/tokenizer", "data.think_format=longcot"]
    with StepLoader(tiny_config(*base, "data.on_bad_sample=skip"), 0, 1) as loader:
        seen = set()
        for _ in range(3):
            step = next(loader)
            seen |= {s for mb in step.micro_batches for s in mb.sample_ids}
        log = loader.bad_samples()
    # every pass over the file meets both again (epochs roll over): counted each time, nothing else is bad
    assert set(log.counts) == {"bad_think_format"} and log.counts["bad_think_format"] >= 2
    assert {e.split(": ")[0] for e in log.examples["bad_think_format"]} == {f"{path}:3", f"{path}:6"}
    assert seen == {f"cot:{n}" for n in (1, 2, 4, 5, 7, 8)}
    with pytest.raises(BadSampleError, match=rf"{path}:(3|6): bad sample \(bad_think_format\): .*Fix: write"):
        with StepLoader(tiny_config(*base, "data.on_bad_sample=error"), 0, 1) as loader:
            next(loader)
    # the same file under data.think_format=none trains every record as it is
    with StepLoader(tiny_config(*base[:2], "data.on_bad_sample=error"), 0, 1) as loader:
        assert not next(loader).micro_batches[0].extras


# ------------------------------------------------------------------------------------------- sail-data longcot
def _words(rng: random.Random, n: int) -> str:
    vocab = [f"w{i}" for i in range(300)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _run_tool(argv: list[str], capsys) -> tuple[int, dict, str]:
    rc = longcot.main(argv)
    out = capsys.readouterr().out
    return rc, json.loads(out.strip().splitlines()[-1]), out


def test_longcot_tool_drops_exact_and_near_duplicates(tmp_path, capsys):
    rng = random.Random(0)
    base = [_cot(f"Q{i}: what is it?", _words(rng, 200), str(i)) for i in range(40)]
    for i, r in enumerate(base):
        r["id"] = f"orig{i}"
    extra = []
    for i in range(0, 10):  # exact duplicates, some only after normalisation (tag / whitespace variants)
        d = json.loads(json.dumps(base[i]))
        d["id"] = f"exact{i}"
        if i % 2:
            d["conversations"][1]["value"] = d["conversations"][1]["value"].replace("<think>", "< think >\n\n  ")
        extra.append(d)
    for i in range(10, 20):  # near duplicates: one word of ~200 changed (Jaccard of 5-shingles ~0.97)
        d = json.loads(json.dumps(base[i]))
        d["id"] = f"near{i}"
        words = d["conversations"][1]["value"].split(" ")
        words[-3] = "changed"
        d["conversations"][1]["value"] = " ".join(words)
        extra.append(d)
    for i in range(20, 25):  # same question, a different chain: not a duplicate
        d = _cot(base[i]["conversations"][0]["value"], _words(rng, 200), str(i))
        d["id"] = f"other{i}"
        extra.append(d)
    for i in range(25, 30):  # a fifth of the words changed (Jaccard ~0.3): similar, not a near duplicate
        d = json.loads(json.dumps(base[i]))
        d["id"] = f"similar{i}"
        words = d["conversations"][1]["value"].split(" ")
        for j in range(5, len(words) - 5, 5):
            words[j] = "x"
        d["conversations"][1]["value"] = " ".join(words)
        extra.append(d)
    rng.shuffle(extra)
    src = write_jsonl(str(tmp_path / "in.jsonl"), base + extra + ["{not json"])
    out = str(tmp_path / "out.jsonl")
    rc, fig, text = _run_tool([src, "--out", out, "--near-dup-threshold", "0.9"], capsys)
    assert rc == 0
    assert (fig["records"], fig["exact_dup"], fig["near_dup"], fig["kept"]) == (71, 10, 10, 50)
    assert fig["bad"] == {"malformed_json": 1} and f"{src}:71" in text
    kept = [json.loads(line) for line in open(out)]
    expect = [r["id"] for r in base + extra if r["id"].startswith(("orig", "other", "similar"))]
    assert [r["id"] for r in kept] == expect  # first occurrences, input order
    assert all(r["conversations"][1]["value"].startswith("<think>\n") for r in kept)  # normalised
    # threshold 1.0 turns the near-duplicate pass off
    _, fig, _ = _run_tool([src, "--out", out, "--near-dup-threshold", "1.0"], capsys)
    assert (fig["near_dup"], fig["kept"]) == (0, 60)


def test_longcot_tool_balances_length_buckets(tmp_path, capsys):
    rng = random.Random(1)
    lengths = [20] * 10 + [70] * 20 + [150] * 5  # words in the thought; the answer adds 4 tokens of layout
    recs = [_cot(f"Q{i}", _words(rng, n), str(i)) for i, n in enumerate(lengths)]
    recs.insert(7, qa("Q", "<think>a</think><think>b</think>\\boxed{1}"))  # line 8
    src = write_jsonl(str(tmp_path / "in.jsonl"), recs)
    out = str(tmp_path / "out.jsonl")

    def run(*extra):
        rc, fig, text = _run_tool([src, "--out", out, "--buckets", "0,50,100", *extra], capsys)
        assert rc == 0 and fig["bad"] == {"bad_think_format": 1} and f"{src}:8" in text
        kept = [json.loads(line) for line in open(out)]
        counts = [sum(1 for r in kept if lo <= len(r["conversations"][1]["value"].split()) < hi)
                  for lo, hi in ((0, 50), (50, 100), (100, 10 ** 9))]
        assert counts == [b["kept"] for b in fig["buckets"]]
        assert [b["available"] for b in fig["buckets"]] == [10, 20, 5]
        return counts, kept

    assert run()[0] == [10, 20, 5]
    assert run("--cap", "6")[0] == [6, 6, 5]
    assert run("--target", "1,1,1")[0] == [5, 5, 5]
    counts, kept = run("--target", "2,1,0")
    assert counts == [10, 5, 0]  # n = min(10 / (2/3), 20 / (1/3)) = 15
    q = [int(r["conversations"][0]["value"][1:]) for r in kept]
    assert q == sorted(q)  # input order kept
    other_seed = run("--target", "2,1,0", "--seed", "5")[1]
    assert [r["conversations"][0]["value"] for r in other_seed] != [r["conversations"][0]["value"] for r in kept]


def test_longcot_tool_error_policy_stops_at_the_bad_line(tmp_path, capsys):
    src = write_jsonl(str(tmp_path / "in.jsonl"), [_cot("Q", "a", "1"), qa("Q", "<think>a</think>")])
    rc = longcot.main([src, "--out", str(tmp_path / "o.jsonl"), "--on-bad", "error"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{src}:2: bad sample (bad_think_format)" in err and "Fix:" in err


def test_lsh_params_put_the_s_curve_at_the_threshold():
    for t in (0.5, 0.8, 0.9):
        b, r = longcot.lsh_params(t, 128)
        assert b * r <= 128
        p = lambda s: 1 - (1 - s ** r) ** b  # noqa: E731
        assert p(t + 0.08) > 0.8 and p(t - 0.25) < 0.2, (t, b, r)
    # the signatures estimate the Jaccard similarity of the shingle sets (std ~ sqrt(J(1-J)/128) <= 0.045)
    lsh = longcot.MinHashLSH(0.9, 128, shingle=1)
    rng = random.Random(2)
    for overlap in (0, 100, 160, 190):
        common = [f"c{i}" for i in range(overlap)]
        x = common + [f"x{i}" for i in range(200 - overlap)]
        y = common + [f"y{i}" for i in range(200 - overlap)]
        rng.shuffle(y)
        jaccard = overlap / (400 - overlap)
        est = float((lsh.signature(x) == lsh.signature(y)).mean())
        assert abs(est - jaccard) < 0.15, (overlap, est, jaccard)


# ------------------------------------------------------------------------------------------- collate marks
def _fusion_builder(demo_dir, *extra) -> SampleBuilder:
    cfg = tiny_config("data.think_format=fusion", *extra, demo_dir=demo_dir)
    return SampleBuilder.from_config(cfg, f"{demo_dir}/tokenizer")


def _rec(n: int, answer: str) -> Record:
    return Record(f"s:{n}", f"s.jsonl:{n}", [Turn("user", f"How many? {n}"), Turn("assistant", answer)])


def test_collate_marks_direct_and_cot_tokens(demo_dir):
    tok = load_tokenizer(f"{demo_dir}/tokenizer")
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    b = _fusion_builder(demo_dir)
    direct, cot = _rec(1, "red"), _rec(2, "<think>I count 1, 2.</think>\\boxed{2}")
    batch = b.collate([b.describe(direct), b.describe(cot)]).batch
    S, E, TS, TE = DEMO_TOKENS.im_start, DEMO_TOKENS.im_end, DEMO_TOKENS.think_start, DEMO_TOKENS.think_end
    ids, labels, thought = [], [], []
    for n, text in ((1, "<think>\n\n</think>\n\nred"), (2, "<think>\nI count 1, 2.\n</think>\n\n\\boxed{2}")):
        prefix = [S] + enc("user\n") + enc(f"How many? {n}") + [E] + [S] + enc("assistant\n")
        answer = enc(text) + [E]
        assert answer[0] == TS and answer.count(TE) == 1
        ids += prefix + answer
        labels += [IGNORE] * (len(prefix) - 1) + answer + [IGNORE]
        block = answer.index(TE) + 1  # <think> ... </think>, tags included
        thought += [0] * (len(prefix) - 1) + [1] * block + [0] * (len(answer) - block) + [0]
    assert batch.input_ids.tolist() == ids
    assert batch.labels.tolist() == labels
    assert batch.extras["thought_T"].tolist() == thought
    assert batch.extras["is_cot_S"].tolist() == [0.0, 1.0]
    # the template's own encoding of the normalised record gives the same sample
    t = ChatTemplate(tok, DEMO_TOKENS)
    assert t.encode([Turn("user", "How many? 1"), Turn("assistant", "<think>\n\n</think>\n\nred")], []).input_ids == \
        ids[:batch.seqlens()[0]]
    pad = b.padding_batch()
    assert set(pad.extras) == {"thought_T", "is_cot_S"} and float(pad.extras["thought_T"].sum()) == 0
    # other formats: no extras, the answer as written
    plain = SampleBuilder.from_config(tiny_config(demo_dir=demo_dir), f"{demo_dir}/tokenizer")
    pb = plain.collate([plain.describe(direct)]).batch
    assert pb.extras == {} and pb.input_ids.tolist()[-len(enc("red")) - 1:] == enc("red") + [E]


# ------------------------------------------------------------------------------------------- objective
def _hand_loss(batches, ce, reduction: str) -> tuple[float, float]:
    """Eq. 3 by hand in float64: per sample, the targets are every answer token (CoT) or those after </think>
    (direct), read from the token layout, not from the extras; then the step's weighted token mean."""
    num = den = 0.0
    n_cot = n = 0
    for b, ce_T in zip(batches, ce):
        cu = b.cu_seqlens.tolist()
        for s, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
            ids, lab = b.input_ids[a:e].tolist(), b.labels[a:e].tolist()
            is_cot = "<think>\n\n</think>" not in b.sample_ids[s]  # the test's ids say which is which
            close = ids.index(DEMO_TOKENS.think_end)
            targets = [t for t in range(e - a) if lab[t] != IGNORE and (is_cot or t + 1 > close)]
            w = {"token": 1.0, "sample": 1.0 / len(targets), "square": len(targets) ** -0.5}[reduction]
            num += w * sum(float(ce_T[a + t]) for t in targets)
            den += w * len(targets)
            n_cot += is_cot
            n += 1
    return num / den, n_cot / n


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_think_fusion_loss_equals_the_hand_computation(demo_dir, reduction):
    b = _fusion_builder(demo_dir, f"data.loss_reduction={reduction}")
    answers = [["red", "<think>one, two</think>\\boxed{2}", "a blue square"],
               ["<think>x</think>\\boxed{7}", "<think>\n\n</think>\n\nno"]]
    batches = []
    for m, group in enumerate(answers):
        metas = []
        for i, a in enumerate(group):
            meta = b.describe(_rec(10 * m + i, a))
            meta.record.sample_id = meta.record.turns[-1].text  # lets _hand_loss read the kind
            metas.append(meta)
        batches.append(b.collate(metas).batch)
    cfg = load_config(TINY, ["data.demo=true", "data.think_format=fusion", "train.objective=think_fusion",
                             f"data.loss_reduction={reduction}"])
    model = build_model(cfg.model, get_opset("reference"), seed=3).eval()
    obj = build_objective("think_fusion", cfg)
    obj.begin_step(batches, lambda t: t)
    with torch.no_grad():
        outs = [model(x) for x in batches]
    shares = [obj.loss(o, x) for o, x in zip(outs, batches)]
    loss = sum(float(s.loss) for s in shares)
    cot = sum(float(s.metrics["cot_fraction"]) for s in shares)
    hand, hand_cot = _hand_loss(batches, [o.loss_T.double() for o in outs], reduction)
    assert abs(loss - hand) <= 1e-6 * hand, (loss, hand)
    assert cot == pytest.approx(hand_cot, abs=1e-7) and hand_cot == pytest.approx(2 / 5)
    # and it differs from plain SFT exactly by the direct samples' think blocks
    sft = build_objective("sft", cfg)
    sft.begin_step(batches, lambda t: t)
    assert abs(sum(float(sft.loss(o, x).loss) for o, x in zip(outs, batches)) - loss) > 1e-3


def test_think_fusion_refuses_batches_without_marks_and_the_config_says_so(demo_dir):
    with pytest.raises(ConfigError, match=r"data.think_format.*set data.think_format=fusion"):
        load_config(TINY, ["data.demo=true", "train.objective=think_fusion"])
    plain = SampleBuilder.from_config(tiny_config(demo_dir=demo_dir), f"{demo_dir}/tokenizer")
    batch = plain.collate([plain.describe(_rec(1, "red"))]).batch
    with pytest.raises(RuntimeError, match="needs the batch's extras thought_T and is_cot_S"):
        build_objective("think_fusion").begin_step([batch], lambda t: t)


# ------------------------------------------------------------------------------------------- both engines
TRAIN = ["train.objective=think_fusion", "data.think_format=fusion", "train.steps=3", "train.micro_batches=2",
         "train.lr=5e-4", "train.warmup_steps=1", "train.grad_clip=0.5"]


def _engine_run(nproc: int, script: str, mode: list[str], args: list[str], out) -> dict:
    cmd = torchrun_cmd(nproc, os.path.join(ROOT, "tests", "dist", script), *mode, str(out), *args)
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_think_fusion_same_loss_on_both_backends(tmp_path):
    """GPU engine (DeepSpeed ZeRO-2, DP 2) vs NPU engine (Megatron, PP 2 x EP 2) on the synthetic batches of
    tests/dist/engine_run.py with Think-Fusion marks (tests/dist/fusion_extras.py); step 0 against the hand value."""
    require("deepspeed", "megatron.core")
    gpu = _engine_run(2, "engine_run.py", [], [TINY_MOE, "backend.name=gpu", *TRAIN], tmp_path / "gpu.json")["steps"]
    npu = _engine_run(4, "npu_run.py", ["train"], [TINY_MOE, *TRAIN, "parallel.pp=2", "parallel.ep=2"],
                      tmp_path / "npu.json")["steps"]
    from dist.engine_run import step_batches

    cfg = load_config(TINY_MOE, ["data.demo=true", *TRAIN])
    model = build_model(cfg.model, get_opset("reference"), seed=cfg.train.seed).eval()
    num = den = 0.0
    n = n_cot = 0
    with torch.no_grad():
        for b in [b for r in range(2) for b in step_batches(cfg, 0, r, 2)]:
            ce = model(b).loss_T.double()
            cu = b.cu_seqlens.tolist()
            for s, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
                cot = bool(b.extras["is_cot_S"][s])
                keep = (b.labels[a:e] != -100) & (cot | (b.extras["thought_T"][a:e] == 0))
                num += float(ce[a:e][keep].sum())
                den += int(keep.sum())
                n_cot += cot
                n += 1
    assert len(gpu) == len(npu) == 3 and not any(r["skipped"] for r in gpu + npu)
    for engine in (gpu, npu):
        assert abs(engine[0]["loss"] - num / den) <= 1e-5 * num / den, (engine[0]["loss"], num / den)
        assert engine[0]["metrics"]["cot_fraction"] == pytest.approx(n_cot / n, abs=1e-6)
    for step, (a, b) in enumerate(zip(gpu, npu)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (step, a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (step, a, b)
    assert gpu[0]["loss"] != gpu[2]["loss"]
    assert rel_err(torch.tensor([r["loss"] for r in npu]), torch.tensor([r["loss"] for r in gpu])) <= 1e-5
