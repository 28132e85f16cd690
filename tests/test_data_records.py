"""Records: both JSONL styles parse; every kind of bad record raises with file:line + reason, or is counted."""
from __future__ import annotations

import json
import os

import pytest

from data_testutil import qa, save_png, tiny_config, write_jsonl
from sail_dist.config import DataSource
from sail_dist.data.demo import ensure_demo
from sail_dist.data.loader import StepLoader
from sail_dist.data.records import (BadSample, BadSampleError, JsonlSource, SourceMix, parse_record,
                                    pictures_before_video)
from sail_dist.data.samples import SampleBuilder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo(str(tmp_path_factory.getbasetemp() / "demo"))


@pytest.fixture
def builder(demo):
    return SampleBuilder.from_config(tiny_config(demo_dir=demo.root), demo.tokenizer)


def test_both_styles_parse(tmp_path):
    a = parse_record('{"id": 7, "image": "x.png", "conversations": [{"from": "human", "value": "<image>\\nQ"}, '
                     '{"from": "gpt", "value": "A"}]}', "f.jsonl:3", "src:3", str(tmp_path))
    assert [(t.role, t.text) for t in a.turns] == [("user", "<image>\nQ"), ("assistant", "A")]
    assert a.images == [str(tmp_path / "x.png")] and a.record_id == "7" and a.where == "f.jsonl:3"
    b = parse_record('{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": '
                     '[{"type": "image", "image": "/abs/y.png"}, {"type": "text", "text": "Q"}]}, '
                     '{"role": "assistant", "content": "A"}]}', "f:1", "s:1", str(tmp_path))
    assert [(t.role, t.text) for t in b.turns] == [("system", "S"), ("user", "<image>Q"), ("assistant", "A")]
    assert b.images == ["/abs/y.png"]
    v = parse_record('{"video": "clip", "conversations": [{"from": "human", "value": "<image>\\nQ"}, '
                     '{"from": "gpt", "value": "A"}]}', "f:1", "s:1", str(tmp_path))  # LLaVA-Video style
    assert v.turns[0].text == "<video>\nQ" and v.video == str(tmp_path / "clip")
    assert pictures_before_video(v.turns) == 0


# (reason, record line) for every structural problem caught at parse time
STRUCTURAL = [
    ("malformed_json", '{"conversations": [ oops'),
    ("not_an_object", '[1, 2]'),
    ("empty_conversation", '{"conversations": []}'),
    ("empty_conversation", '{"id": 1}'),
    ("bad_turn", '{"conversations": [{"from": "alien", "value": "hi"}, {"from": "gpt", "value": "x"}]}'),
    ("bad_turn", '{"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}'),
    ("no_assistant_turn", '{"conversations": [{"from": "human", "value": "hi"}]}'),
    ("placeholder_mismatch", '{"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"},'
                             ' {"from": "gpt", "value": "x"}]}'),
    ("placeholder_mismatch", '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", '
                             '"value": "<image>"}]}'),
    ("bad_media_field", '{"image": 3, "conversations": [{"from": "human", "value": "<image>"}, '
                        '{"from": "gpt", "value": "x"}]}'),
]


@pytest.mark.parametrize("reason,line", STRUCTURAL)
def test_structural_problems_name_file_line_and_reason(tmp_path, reason, line):
    path = write_jsonl(str(tmp_path / "d.jsonl"), [qa("ok?", "yes"), line])
    src = JsonlSource(DataSource(path=path), 0)
    src.record(0)
    with pytest.raises(BadSample) as e:
        src.record(1)
    assert e.value.reason == reason and e.value.where == f"{path}:2"
    assert f"{path}:2: bad sample ({reason})" in str(e.value) and "Fix:" in str(e.value)


def test_invalid_utf8_is_a_bad_sample_not_replacement_characters(tmp_path):
    """A Latin-1 byte in a line: the record is reported (invalid_utf8, file:line, the byte), never trained on as
    U+FFFD; the lines around it still parse."""
    path = str(tmp_path / "d.jsonl")
    with open(path, "wb") as f:
        f.write(json.dumps(qa("ok?", "yes")).encode() + b"\n")
        f.write(json.dumps(qa("caf\u00e9?", "oui")).encode().replace(b"\\u00e9", b"\xe9") + b"\n")
        f.write(json.dumps(qa("ok?", "yes")).encode() + b"\n")
    src = JsonlSource(DataSource(path=path), 0)
    src.record(0)
    src.record(2)
    with pytest.raises(BadSample) as e:
        src.record(1)
    assert e.value.reason == "invalid_utf8" and e.value.where == f"{path}:2" and "\\xe9" in str(e.value)


def _media_cases(root):
    good = save_png(os.path.join(root, "good.png"))
    corrupt = os.path.join(root, "corrupt.png")
    with open(corrupt, "wb") as f:
        f.write(b"not a png at all")
    frames_dir = os.path.join(root, "no_frames")
    os.makedirs(frames_dir)
    video = os.path.join(root, "clip.mp4")
    with open(video, "wb") as f:
        f.write(b"\x00" * 64)
    return [
        ("missing_image", qa("<image>\nQ", "A", image="nope.png")),
        ("corrupt_image", qa("<image>\nQ", "A", image=corrupt)),
        ("unreadable_video", qa("<video>\nQ", "A", video=frames_dir)),
        ("unreadable_video", qa("<video>\nQ", "A", video="missing_dir")),
        ("unreadable_video", qa("<video>\nQ", "A", video=video)),  # no PyAV/OpenCV here, or garbage bytes
        ("placeholder_mismatch", qa("Q without placeholder", "A", image=good)),
    ]


def test_media_problems_raise_at_describe_with_file_line(tmp_path, builder):
    cases = _media_cases(str(tmp_path))
    path = write_jsonl(str(tmp_path / "m.jsonl"), [r for _, r in cases])
    src = JsonlSource(DataSource(path=path), 0)
    for i, (reason, _) in enumerate(cases):
        with pytest.raises(BadSample) as e:
            builder.describe(src.record(i))
        assert (e.value.reason, e.value.where) == (reason, f"{path}:{i + 1}")


def _loader_over(tmp_path, records, *overrides):
    path = write_jsonl(str(tmp_path / "mix.jsonl"), records)
    demo = ensure_demo(str(tmp_path.parent / "demo"))
    cfg = tiny_config(f"data.sources=[{{path: {path}}}]", f"data.tokenizer={demo.tokenizer}", *overrides)
    return StepLoader(cfg, 0, 1), path


def test_error_policy_raises_with_file_line(tmp_path):
    good = save_png(str(tmp_path / "g.png"))
    loader, path = _loader_over(tmp_path, [qa("<image>\nQ", "A", image=good)] * 3 + ['{"broken'] +
                                [qa("<image>\nQ", "A", image=good)] * 40)
    with pytest.raises(BadSampleError, match=rf"{path}:4: bad sample \(malformed_json\).*on_bad_sample=skip"):
        for _ in range(5):
            next(loader)


def test_skip_policy_counts_every_reason(tmp_path):
    good = save_png(str(tmp_path / "g.png"))
    cases = _media_cases(str(tmp_path))
    bad = [line for _, line in STRUCTURAL] + [r for _, r in cases]
    expect = {}
    for reason, _ in STRUCTURAL + cases:
        expect[reason] = expect.get(reason, 0) + 1
    n_good = 60
    loader, _ = _loader_over(tmp_path, bad + [qa("<image>\nWhat?", "fine", image=good)] * n_good,
                             "data.on_bad_sample=skip", "data.buffer_size=8")
    trained, dropped = set(), {}
    for step in loader:
        for mb in step.micro_batches:
            trained.update(mb.sample_ids)
        for k, v in step.stats.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
        if step.stats.epoch >= 1:
            break
    assert dropped == expect  # planning drops, per reason, reported in the step stats
    assert dict(loader.bad_samples().counts) == expect
    assert len([s for s in trained if not s.endswith(tuple(f":{i + 1}" for i in range(len(bad))))]) == n_good
    assert "malformed_json: 1 record" in loader.bad_samples().summary()
    loader.close()


def test_truncated_image_is_caught_at_decode(tmp_path):
    good = save_png(str(tmp_path / "g.png"), size=(200, 200))
    with open(good, "rb") as f:
        data = f.read()
    trunc = str(tmp_path / "t.png")
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2])  # the header is fine, the pixels are not
    records = [qa("<image>\nQ", "A", image=trunc)] + [qa("<image>\nQ", "A", image=good)] * 30
    loader, path = _loader_over(tmp_path, records, "data.on_bad_sample=skip")
    drops = 0
    for _, step in zip(range(6), loader):
        ids = [s for mb in step.micro_batches for s in mb.sample_ids]
        assert "mix:1" not in ids  # never trained, every time the stream brings it (once per pass)
        drops += step.stats.decode_dropped.get("corrupt_image", 0)
    assert drops >= 1 and loader.bad_samples().counts["corrupt_image"] == drops
    loader.close()
    strict, _ = _loader_over(tmp_path, records)
    with pytest.raises(BadSampleError, match=rf"{path}:1: bad sample \(corrupt_image\)"):
        for _ in range(6):
            next(strict)


def test_source_mix_is_seeded_weighted_and_covers_each_pass(tmp_path):
    a = write_jsonl(str(tmp_path / "a.jsonl"), [qa(f"a{i}", "x") for i in range(30)])
    b = write_jsonl(str(tmp_path / "b.jsonl"), [qa(f"b{i}", "x") for i in range(10)])
    srcs = [JsonlSource(DataSource(path=a, weight=3.0), 0), JsonlSource(DataSource(path=b, weight=1.0), 1)]
    m1, m2 = SourceMix(srcs, seed=5), SourceMix(srcs, seed=5)
    draws = [m1.next() for _ in range(80)]
    assert draws == [m2.next() for _ in range(80)]
    assert sum(s == 0 for s, _ in draws) == 60  # 3:1 exactly
    first = [r for s, r in draws if s == 0][:30]
    second = [r for s, r in draws if s == 0][30:60]
    assert sorted(first) == list(range(30)) == sorted(second) and first != second  # new order every pass
    other = SourceMix(srcs, seed=6)
    assert [other.next() for _ in range(80)] != draws
