"""Loader: contract of every micro-batch, exact resume, rank agreement, epochs, padding micro-batches."""
from __future__ import annotations

import json

import pytest
import torch

from data_testutil import tiny_config
from sail_dist.data.demo import DEMO_TOKENS, ensure_demo
from sail_dist.data.loader import StepLoader, build_loader
from sail_dist.data.samples import PAD_SAMPLE_ID, SampleBuilder


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo(str(tmp_path_factory.getbasetemp() / "demo")).root


def _fingerprint(step):
    return [(mb.sample_ids, mb.input_ids.tolist(), mb.labels.tolist(), mb.loss_weight.tolist(),
             None if mb.pixel_values is None else float(mb.pixel_values.double().sum())) for mb in step.micro_batches]


def test_micro_batches_meet_the_packed_batch_contract(demo_dir):
    cfg = tiny_config(demo_dir=demo_dir)
    T = DEMO_TOKENS
    with build_loader(cfg, 0, 2) as loader:
        for _, step in zip(range(3), loader):
            assert len(step.micro_batches) == cfg.train.micro_batches
            for mb in step.micro_batches:
                mb.validate(downsample=2, img_context_id=T.img_context)  # positions, cu_seqlens, labels, counts
                assert mb.num_tokens <= cfg.data.pack_tokens
                ids, cu = mb.input_ids.tolist(), mb.cu_seqlens.tolist()
                assert mb.cu_seqlens.dtype == torch.int32 and cu[0] == 0
                # an image span never crosses a sample boundary, and spans follow the ViT inputs in order
                grids = mb.image_grid_hw.tolist() if mb.image_grid_hw is not None else []
                per_tile = [(r // 2) * (c // 2) for r, c in grids]
                spans = []
                for a, b in zip(cu[:-1], cu[1:]):
                    s = ids[a:b]
                    assert s.count(T.img_start) == s.count(T.img_end)
                    i = 0
                    while T.img_start in s[i:]:
                        i = s.index(T.img_start, i)
                        j = s.index(T.img_end, i)
                        assert set(s[i + 1:j]) == {T.img_context}
                        spans.append(j - i - 1)
                        i = j
                    assert mb.position_ids[a:b].tolist() == list(range(b - a))
                # each <image> span holds the tokens of a whole number of consecutive tiles
                k = 0
                for n in spans:
                    got = 0
                    while got < n:
                        got += per_tile[k]
                        k += 1
                    assert got == n
                assert k == len(per_tile)
                assert mb.pixel_values.shape == (sum(r * c for r, c in grids), 3 * 14 * 14)
                # weights only where there are targets
                assert torch.equal(mb.loss_weight > 0, mb.labels != -100)


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_restore_gives_identical_next_batches(demo_dir, workers):
    cfg = tiny_config(f"data.num_workers={workers}", "data.buffer_size=16", demo_dir=demo_dir)
    with StepLoader(cfg, 1, 2) as ref_loader:
        ref = [_fingerprint(next(ref_loader)) for _ in range(7)]
    with StepLoader(cfg, 1, 2) as first:
        for _ in range(3):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    with StepLoader(cfg, 1, 2) as resumed:
        resumed.load_state_dict(state)
        assert [_fingerprint(next(resumed)) for _ in range(4)] == ref[3:]


def test_ranks_agree_and_split_the_step_without_overlap(demo_dir):
    cfg = tiny_config(demo_dir=demo_dir)
    loaders = [StepLoader(cfg, r, 3) for r in range(3)]
    for _ in range(3):
        steps = [next(l) for l in loaders]
        ids = [s for st in steps for mb in st.micro_batches for s in mb.sample_ids]
        assert len(ids) == len(set(ids)) == steps[0].stats.samples
        assert all(st.stats.tokens == steps[0].stats.tokens for st in steps)
        assert sum(st.stats.rank_tokens for st in steps) == steps[0].stats.tokens
        assert 0.9 < steps[0].stats.utilisation <= 1.0
    for l in loaders:
        l.close()


def test_epochs_roll_over_with_a_new_order_and_every_sample_once(tmp_path, demo_dir):
    from data_testutil import qa, write_jsonl

    path = write_jsonl(str(tmp_path / "t.jsonl"), [qa(f"question {i}", f"answer {i}") for i in range(50)])
    cfg = tiny_config(f"data.sources=[{{path: {path}}}]", f"data.tokenizer={demo_dir}/tokenizer",
                      "data.buffer_size=4", "data.pack_tokens=128")
    seen = []
    with StepLoader(cfg, 0, 1) as loader:
        while len(seen) < 150:
            step = next(loader)
            seen += [s for mb in step.micro_batches for s in mb.sample_ids]
            assert step.stats.deferred == 0 and not step.stats.dropped
        assert step.stats.epoch >= 2
    first, second = seen[:50], seen[50:100]
    # a tiny buffer delays samples by at most a few positions, so each window of one pass holds each id once
    assert len(set(seen[:46])) == 46
    assert sorted(set(seen[:100])) == sorted(f"t:{i + 1}" for i in range(50))
    assert first != second


def test_padding_micro_batch_is_valid(demo_dir):
    b = SampleBuilder.from_config(tiny_config(demo_dir=demo_dir), f"{demo_dir}/tokenizer")
    pad = b.padding_batch()
    pad.validate(2, DEMO_TOKENS.img_context)
    assert pad.sample_ids == [PAD_SAMPLE_ID] and float(pad.loss_weight.sum()) == 0.0
    empty = b.collate([])
    assert empty.batch.sample_ids == [PAD_SAMPLE_ID]


def test_loss_reduction_weights_reach_the_batch(demo_dir):
    for reduction in ("token", "sample", "square"):
        cfg = tiny_config(f"data.loss_reduction={reduction}", demo_dir=demo_dir)
        with StepLoader(cfg, 0, 1) as loader:
            mb = next(loader).micro_batches[0]
        cu = mb.cu_seqlens.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            w = mb.loss_weight[a:b]
            n = int((mb.labels[a:b] != -100).sum())
            expect = {"token": float(n), "sample": 1.0, "square": n ** 0.5}[reduction]
            assert float(w.sum()) == pytest.approx(expect, rel=1e-5)


def test_state_from_other_settings_is_refused(demo_dir):
    cfg = tiny_config(demo_dir=demo_dir)
    with StepLoader(cfg, 0, 1) as a:
        next(a)
        sd = a.state_dict()
    other = StepLoader(tiny_config("data.seed=99", demo_dir=demo_dir), 0, 1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(sd)
    other.close()


def test_images_and_video_frames_keep_text_order(tmp_path, demo_dir):
    from data_testutil import qa, save_png, write_jsonl

    small = save_png(str(tmp_path / "small.png"), size=(40, 40))  # 1 tile
    wide = save_png(str(tmp_path / "wide.png"), size=(160, 40))  # 4x1 tiles + thumbnail = 5 ViT inputs
    frames = tmp_path / "frames"
    for i in range(5):
        save_png(str(frames / f"f{i}.png"), size=(30, 20))
    rec = qa("<image>\nfirst <video> then <image>\nWhat?", "ok", images=[wide, small], video=str(frames))
    path = write_jsonl(str(tmp_path / "v.jsonl"), [rec] * 4)
    cfg = tiny_config(f"data.sources=[{{path: {path}}}]", f"data.tokenizer={demo_dir}/tokenizer",
                      "data.video_frames=3", "data.buffer_size=2", "train.micro_batches=1")
    with StepLoader(cfg, 0, 1) as loader:
        mb = next(loader).micro_batches[0]
    mb.validate(2, DEMO_TOKENS.img_context)
    one = mb.input_ids[: mb.cu_seqlens[1]].tolist()
    spans, i = [], 0
    while DEMO_TOKENS.img_start in one[i:]:
        i = one.index(DEMO_TOKENS.img_start, i)
        j = one.index(DEMO_TOKENS.img_end, i)
        spans.append(j - i - 1)
        i = j
    assert spans == [5 * 4, 4, 4, 4, 1 * 4]  # wide image, 3 frames, small image: 4 tokens per 56 px tile
    assert mb.image_grid_hw[: 5 + 3 + 1].tolist() == [[4, 4]] * 9


def _two_sources(tmp_path, demo_dir, n_a=30, n_b=10, **extra):
    from data_testutil import qa, save_png, write_jsonl

    img = save_png(str(tmp_path / "i.png"), size=(40, 40))
    frames = tmp_path / "frames"
    for i in range(3):
        save_png(str(frames / f"f{i}.png"), size=(30, 20))
    a = write_jsonl(str(tmp_path / "img.jsonl"), [qa(f"<image>\nq{i}", f"a{i}", image=img) for i in range(n_a)])
    b = write_jsonl(str(tmp_path / "vid.jsonl"), [qa(f"<video>\nq{i}", f"v{i}", video=str(frames)) for i in range(n_b)])
    return a, b


def test_realised_mix_is_logged_per_source_and_modality(tmp_path, demo_dir):
    """Two sources of equal weight (the SFT phase-4 image:video 1:1 set-up): the step stats count each step's
    samples per source and modality, the totals add up, track 1:1, and continue exactly across a resume."""
    a, b = _two_sources(tmp_path, demo_dir)
    cfg = tiny_config(f"data.sources=[{{path: {a}, name: img}}, {{path: {b}, name: vid}}]",
                      f"data.tokenizer={demo_dir}/tokenizer", "data.video_frames=2", "data.buffer_size=8",
                      "data.pack_tokens=256")
    with StepLoader(cfg, 0, 1) as loader:
        steps = [next(loader).stats for _ in range(6)]
        state = json.loads(json.dumps(loader.state_dict()))
        more = [next(loader).stats for _ in range(2)]
    total = {}
    for st in steps:
        assert sum(st.source_samples.values()) == sum(st.modality_samples.values()) == st.samples
        assert st.source_samples.get("img", 0) == st.modality_samples.get("image", 0)
        assert st.source_samples.get("vid", 0) == st.modality_samples.get("video", 0)
        for k, v in st.source_samples.items():
            total[k] = total.get(k, 0) + v
        assert st.source_samples_total == total
    assert abs(total["img"] - total["vid"]) <= 2 + steps[-1].deferred  # 1:1 by sample count, up to packing lag
    with StepLoader(cfg, 0, 1) as resumed:
        resumed.load_state_dict(state)
        again = [next(resumed).stats for _ in range(2)]
    assert [s.source_samples_total for s in again] == [s.source_samples_total for s in more]
    assert [s.modality_samples_total for s in again] == [s.modality_samples_total for s in more]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1e6])
def test_size_weighting_sets_shares_from_source_sizes(tmp_path, demo_dir, temperature):
    a, b = _two_sources(tmp_path, demo_dir)  # 30 and 10 records
    cfg = tiny_config(f"data.sources=[{{path: {a}}}, {{path: {b}}}]", f"data.tokenizer={demo_dir}/tokenizer",
                      "data.source_weighting=size", f"data.size_temperature={temperature}", "data.video_frames=2")
    with StepLoader(cfg, 0, 1) as loader:
        want = 30 ** (1 / temperature) / (30 ** (1 / temperature) + 10 ** (1 / temperature))
        assert loader.mix.share[0] == pytest.approx(want)  # T=1: 3/4, T=2: sqrt(3)/(sqrt(3)+1), T->inf: 1/2
        draws = [loader.mix.next()[0] for _ in range(400)]
    assert abs(draws.count(0) - 400 * want) <= 1


def test_stop_and_restore_with_record_weights_is_exact(tmp_path, demo_dir):
    from data_testutil import qa, write_jsonl

    path = write_jsonl(str(tmp_path / "t.jsonl"), [qa(f"question {i}", f"answer {i}") for i in range(40)])
    weights = tmp_path / "t.w"
    weights.write_text("# hand-written\n" + "".join(f"{(i % 4) * 0.5}\n" for i in range(40)))  # rows 0,4,..: 0
    cfg = tiny_config(f"data.sources=[{{path: {path}, record_weights: {weights}}}]",
                      f"data.tokenizer={demo_dir}/tokenizer", "data.buffer_size=4", "data.pack_tokens=128")
    with StepLoader(cfg, 0, 1) as ref_loader:
        ref = [_fingerprint(next(ref_loader)) for _ in range(9)]
    ids = [s for step in ref for mb in step for s in mb[0]]
    assert not {f"t:{i + 1}" for i in range(0, 40, 4)} & set(ids)  # weight 0: never drawn
    with StepLoader(cfg, 0, 1) as first:
        for _ in range(4):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
    assert len(json.dumps(state["mix"])) < 200  # the mix state stays (drawn, counts)
    with StepLoader(cfg, 0, 1) as resumed:
        resumed.load_state_dict(state)
        assert [_fingerprint(next(resumed)) for _ in range(5)] == ref[4:]
    other = tiny_config(f"data.sources=[{{path: {path}}}]", f"data.tokenizer={demo_dir}/tokenizer",
                        "data.buffer_size=4", "data.pack_tokens=128")
    with StepLoader(other, 0, 1) as plain, pytest.raises(ValueError, match="record_weights"):
        plain.load_state_dict(state)  # the weights change the stream: a state from a weighted run is refused
