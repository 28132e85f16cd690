"""`sail-data balance` (n-gram linguistic balancing) on a corpus with a planted template: the weights match the
definition computed from exact counts, down-weight the template, raise the distinct-n-gram ratio, are realised by
the loader's mix, and the tool runs in fixed memory and reports bad lines with file:line."""
from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import child_env
from data_testutil import write_jsonl
from sail_dist.config import DataSource
from sail_dist.data import cli
from sail_dist.data.ngram_weights import balance
from sail_dist.data.records import JsonlSource, SourceMix

ADJ = ["red", "blue", "green", "small", "large", "old", "new", "shiny", "dark", "bright"]
OBJ = ["car", "dog", "tree", "house", "boat", "cat", "bird", "plane", "train", "chair"]


def planted_corpus(path: str, n: int, seed: int = 0, template_share: float = 0.7) -> tuple[list[str], list[bool]]:
    """`template_share` of the answers are "The image shows a <adj> <obj>."; the rest 8 random words of 800."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(800)]
    answers, is_template = [], []
    for _ in range(n):
        t = rng.random() < template_share
        answers.append(f"The image shows a {rng.choice(ADJ)} {rng.choice(OBJ)}." if t
                       else " ".join(rng.choice(vocab) for _ in range(8)))
        is_template.append(t)
    write_jsonl(path, [{"conversations": [{"from": "human", "value": "Describe the picture."},
                                          {"from": "gpt", "value": a}]} for a in answers])
    return answers, is_template


def read_weights(path: str) -> np.ndarray:
    return np.array([float(x) for x in open(path) if not x.startswith("#")])


def exact_grams(answer: str, n: int = 3) -> list[tuple[str, ...]]:
    words = re.findall(r"\w+", answer.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)] if len(words) >= n else [tuple(words)]


def test_weights_follow_the_definition_and_down_weight_the_template(tmp_path):
    path = str(tmp_path / "c.jsonl")
    answers, tmpl = planted_corpus(path, 1000)
    rep = balance(path, str(tmp_path / "c.w"), n=3, alpha=0.5)
    w = read_weights(str(tmp_path / "c.w"))
    assert len(w) == 1000 and rep.records == 1000 and not rep.bad
    # reference from exact counts (the sketch is 2**20 wide for ~2k distinct grams: no collisions expected)
    grams = [exact_grams(a) for a in answers]
    freq = Counter(g for gs in grams for g in gs)
    raw = np.array([math.exp(-0.5 * np.mean([math.log(freq[g]) for g in gs])) for gs in grams])
    ref = raw / raw.mean()
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    tmpl = np.array(tmpl)
    assert w[tmpl].mean() < 0.3 * w[~tmpl].mean()
    # printed figures against the same exact counts
    total = sum(len(g) for g in grams)
    assert rep.ngrams == total
    assert rep.top_before[0][0] in ("the image shows", "image shows a")
    assert rep.top_before[0][1] == pytest.approx(freq[("the", "image", "shows")] / total)
    after = sum(wr * gs.count(("the", "image", "shows")) for wr, gs in zip(w, grams)) / sum(
        wr * len(gs) for wr, gs in zip(w, grams))
    got = dict(rep.top_after)["the image shows"]
    assert got == pytest.approx(after, rel=1e-4) and got < rep.top_before[0][1] / 3
    full = balance(path, str(tmp_path / "c2.w"), n=3, alpha=0.5, budget=1000)  # one whole pass: the corpus
    assert full.distinct_before == pytest.approx(len(freq) / total, rel=0.01)
    assert rep.distinct_after > rep.distinct_before * 1.1  # the distinct-n-gram ratio rises


def test_distinct_ratio_after_is_what_a_weighted_pass_realises(tmp_path):
    """The printed ratios are what the first `budget` draws of the loader's mix realise (on average over seeds),
    plain ('before') and with the weights ('after')."""
    path = str(tmp_path / "c.jsonl")
    answers, _ = planted_corpus(path, 1000, seed=1)
    rep = balance(path, str(tmp_path / "c.w"))
    realised = {}
    for name, weights in (("before", ""), ("after", str(tmp_path / "c.w"))):
        src = JsonlSource(DataSource(path=path, record_weights=weights), 0)
        ratios = []
        for seed in range(6):
            mix = SourceMix([src], seed=seed)
            gs = [g for r in (mix.next()[1] for _ in range(rep.budget)) for g in exact_grams(answers[r])]
            ratios.append(len(set(gs)) / len(gs))
        realised[name] = float(np.mean(ratios))
    assert 100 < rep.budget < 1000
    assert realised["before"] == pytest.approx(rep.distinct_before, rel=0.03)
    assert realised["after"] == pytest.approx(rep.distinct_after, rel=0.03)
    assert realised["after"] > 1.1 * realised["before"]


def test_loader_mix_realises_the_record_weights(tmp_path):
    path = str(tmp_path / "c.jsonl")
    _, tmpl = planted_corpus(path, 400, seed=2)
    balance(path, str(tmp_path / "c.w"))
    w = read_weights(str(tmp_path / "c.w"))
    src = JsonlSource(DataSource(path=path, record_weights=str(tmp_path / "c.w")), 0)
    mix = SourceMix([src], seed=3)
    n = len(src)
    passes = [Counter(mix.next()[1] for _ in range(n)) for _ in range(3)]
    expect = n * w / w.sum()
    for counts in passes:  # systematic sampling: each row floor or ceil of its expected count, every pass
        got = np.array([counts.get(r, 0) for r in range(n)])
        assert np.all(got >= np.floor(expect - 1e-9)) and np.all(got <= np.ceil(expect + 1e-9))
    share = sum(c for p in passes for r, c in p.items() if tmpl[r]) / (3 * n)
    assert share == pytest.approx(float(w[np.array(tmpl)].sum() / w.sum()), abs=0.01)
    assert passes[0] != passes[1]  # a new seeded order and offset every pass
    again = SourceMix([src], seed=3)
    assert Counter(again.next()[1] for _ in range(n)) == passes[0]  # deterministic from the seed


def test_memory_is_fixed_by_the_sketch_not_the_corpus(tmp_path):
    """Peak RSS of the tool (a child process each) on a corpus 5x larger: the same sketch, about the same peak."""
    code = ("import json, resource, sys; from sail_dist.data.ngram_weights import balance; "
            "r = balance(sys.argv[1], sys.argv[2], candidates=256); "
            "print(json.dumps([r.sketch_bytes, r.candidates, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))")
    got = []
    for n in (800, 4000):
        path = str(tmp_path / f"c{n}.jsonl")
        planted_corpus(path, n, seed=4)
        out = subprocess.run([sys.executable, "-c", code, path, path + ".w"], capture_output=True, text=True,
                             env=child_env(), timeout=300)
        assert out.returncode == 0, out.stderr
        got.append(json.loads(out.stdout.strip().splitlines()[-1]))
    (sketch0, cand0, rss0), (sketch1, cand1, rss1) = got
    assert sketch0 == sketch1 == (4 * 8 + 2 * (8 + 1)) * (1 << 20)  # count-min rows + presence tables: 50 MiB
    assert cand0 <= 256 and cand1 <= 256
    assert rss0 * 1024 > sketch0  # the sketch is really held (ru_maxrss is in KiB)
    assert (rss1 - rss0) * 1024 < 0.1 * sketch0, (rss0, rss1)  # 5x the corpus: < 5 MiB more


def test_bad_lines_are_reported_with_file_and_line(tmp_path, capsys):
    path = str(tmp_path / "c.jsonl")
    planted_corpus(path, 20, seed=5)
    lines = open(path).read().splitlines()
    lines[4] = '{"conversations": [broken'
    lines[9] = "[1, 2]"
    lines.insert(12, "")  # a blank line keeps the alignment
    open(path, "w").write("\n".join(lines) + "\n")
    out = str(tmp_path / "c.w")
    assert cli.main(["balance", path, "--out", out]) == 0
    cap = capsys.readouterr()
    assert f"{path}:5: bad sample (malformed_json)" in cap.err
    assert f"{path}:10: bad sample (not_an_object)" in cap.err
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["bad_lines"] == 2 and summary["records"] == 18 and summary["lines"] == 21
    w = read_weights(out)
    assert len(w) == 21 and w[4] == 1.0 and w[9] == 1.0 and w[12] == 0.0
    JsonlSource(DataSource(path=path, record_weights=out), 0)  # aligned: the loader accepts it


def test_weights_of_another_file_version_are_refused(tmp_path):
    path = str(tmp_path / "c.jsonl")
    planted_corpus(path, 30, seed=6)
    balance(path, str(tmp_path / "c.w"))
    with open(path, "a") as f:
        f.write(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    with pytest.raises(ValueError, match=r"has 30 weights but .*c.jsonl has 31 lines.*re-run `sail-data balance`"):
        JsonlSource(DataSource(path=path, record_weights=str(tmp_path / "c.w")), 0)
    open(tmp_path / "bad.w", "w").write("1\nx\n")
    with pytest.raises(ValueError, match=r"bad.w:2: 'x' is not a number"):
        JsonlSource(DataSource(path=path, record_weights=str(tmp_path / "bad.w")), 0)
