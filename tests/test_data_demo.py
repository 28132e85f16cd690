"""Demo dataset: deterministic generation, fixed special-token ids, learnable QA format, exact-match eval."""
from __future__ import annotations

import hashlib
import json
import os


from data_testutil import tiny_config
from sail_dist.data.demo import (SPECIAL_TOKENS, TASKS, eval_items, generate_demo, is_correct,
                                 score)
from sail_dist.data.template import load_tokenizer


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()


def test_generation_is_deterministic_and_complete(tmp_path):
    a = generate_demo(str(tmp_path / "a"), n_train=120, n_eval=20)
    b = generate_demo(str(tmp_path / "b"), n_train=120, n_eval=20)
    assert _digest(a.root) == _digest(b.root)
    recs = [json.loads(line) for line in open(a.train)]
    assert len(recs) == 120 and len(open(a.eval).readlines()) == 20
    tasks = {r["task"] for r in recs}
    assert tasks <= set(TASKS) and len(tasks) >= len(TASKS) - 1  # the 2 % text task may be absent
    assert any(len(r.get("images", [])) == 2 for r in recs)  # multi-image
    assert any(len(r["conversations"]) == 4 for r in recs)  # multi-turn
    for r in recs:
        for p in ([r["image"]] if "image" in r else r.get("images", [])):
            assert os.path.exists(os.path.join(a.root, p))


def test_tokenizer_special_ids_are_fixed(tmp_path):
    tok = load_tokenizer(generate_demo(str(tmp_path / "d"), n_train=60, n_eval=5).tokenizer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(14))
    assert 300 < tok.get_vocab_size() <= 1000
    ids = tok.encode("<|im_start|>user\nHow many circles?<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user")


def test_eval_items_and_exact_match(tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp() / "demo")
    cfg = tiny_config(demo_dir=root)
    items = eval_items(cfg, limit=12)
    assert len(items) == 12
    tail = [1] + load_tokenizer(f"{root}/tokenizer").encode("assistant\n", add_special_tokens=False).ids
    for it in items:
        assert it.input_ids[-len(tail):] == tail  # ready for generation
        it.prompt.validate(2, 7)
        assert bool((it.prompt.labels == -100).all())
    assert score(items, [it.answer for it in items])["all"] == 1.0
    assert score(items, ["definitely wrong"] * len(items))["all"] == 0.0


def test_answer_normalisation():
    assert is_correct(" Red.", "red") and is_correct("3<|im_end|>junk", "3")
    assert is_correct("<think>\n1, 2, 3\n</think>\n\n\\boxed{3}", "<think>\nI count 1, 2, 3.\n</think>\n\n\\boxed{3}")
    assert is_correct("<think>counting</think> 3", "3")
    assert not is_correct("\\boxed{4}", "\\boxed{3}") and not is_correct("blue", "red")
    assert is_correct('"Yes"', "yes")
