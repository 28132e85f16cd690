"""Chat template golden tests: exact token layout, labels only on assistant turns, loss weights, think format."""
from __future__ import annotations

import math

import pytest

from sail_dist.config import TokenConfig
from sail_dist.data.demo import DEMO_TOKENS, ensure_demo
from sail_dist.data.records import Turn
from sail_dist.data.template import (IGNORE, ChatTemplate, check_special_tokens, extract_boxed, format_think,
                                     has_think_format, load_tokenizer, loss_weights, split_think)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(ensure_demo(str(tmp_path_factory.getbasetemp() / "demo")).tokenizer)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_golden_layout_system_image_answer(tok):
    t = ChatTemplate(tok, DEMO_TOKENS, system_prompt="You are helpful.")
    out = t.encode([Turn("user", "<image>\nWhat colour is the square?"), Turn("assistant", "red")], [3])
    # exact ChatML string, no newline between turns
    assert t.decode(out.input_ids) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>"
        "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat colour is the square?<|im_end|>"
        "<|im_start|>assistant\nred<|im_end|>")
    S, E, IMG, END, CTX = 1, 2, 5, 6, 7
    expect = ([S] + enc(tok, "system\n") + enc(tok, "You are helpful.") + [E]
              + [S] + enc(tok, "user\n") + [IMG, CTX, CTX, CTX, END] + enc(tok, "\nWhat colour is the square?") + [E]
              + [S] + enc(tok, "assistant\n") + enc(tok, "red") + [E])
    assert out.input_ids == expect
    answer = enc(tok, "red") + [E]
    n = len(expect)
    # shifted labels: only the answer tokens and the closing <|im_end|> are targets
    assert out.labels == [IGNORE] * (n - len(answer) - 1) + answer + [IGNORE]
    assert out.n_label_tokens == len(answer)


def test_labels_on_every_assistant_turn_only(tok):
    t = ChatTemplate(tok, DEMO_TOKENS)
    turns = [Turn("user", "What colour is the shape?"), Turn("assistant", "blue"),
             Turn("user", "And what shape is it?"), Turn("assistant", "circle")]
    out = t.encode(turns, [])
    assert out.input_ids[0] == 1 and out.input_ids[:3] != [1] + enc(tok, "system")[:2]  # no empty system turn
    targets = [y for y in out.labels if y != IGNORE]
    assert targets == enc(tok, "blue") + [2] + enc(tok, "circle") + [2]
    # every target sits right before the token it predicts, inside an assistant turn
    for i, y in enumerate(out.labels):
        if y != IGNORE:
            assert out.input_ids[i + 1] == y
    assert out.labels[-1] == IGNORE


def test_generation_prompt_and_video_frames(tok):
    t = ChatTemplate(tok, DEMO_TOKENS)
    out = t.encode([Turn("user", "<video>\nWhat happens?")], [1, 1], video_frames=2, add_generation_prompt=True)
    text = t.decode(out.input_ids)
    assert text == ("<|im_start|>user\nFrame1: <img><IMG_CONTEXT></img>\nFrame2: <img><IMG_CONTEXT></img>\n"
                    "What happens?<|im_end|><|im_start|>assistant\n")
    assert all(y == IGNORE for y in out.labels)


def test_placeholder_count_must_match(tok):
    t = ChatTemplate(tok, DEMO_TOKENS)
    with pytest.raises(ValueError, match="pictures"):
        t.encode([Turn("user", "<image> and <image>"), Turn("assistant", "x")], [4])
    with pytest.raises(ValueError, match="placeholders"):
        t.encode([Turn("user", "<image>"), Turn("assistant", "x")], [4, 4])


def test_special_token_mismatch_names_the_fix(tok):
    with pytest.raises(ValueError, match=r"model\.tokens\.im_start=1"):
        check_special_tokens(tok, TokenConfig())  # Qwen3 ids vs the demo tokenizer
    check_special_tokens(tok, DEMO_TOKENS)


def test_loss_weights():
    labels = [IGNORE, 5, 6, 7, 8, IGNORE]
    assert loss_weights(labels, "token") == [0, 1, 1, 1, 1, 0]
    assert loss_weights(labels, "sample") == [0, 0.25, 0.25, 0.25, 0.25, 0]
    assert loss_weights(labels, "square") == [0, 0.5, 0.5, 0.5, 0.5, 0]
    assert loss_weights([IGNORE, IGNORE], "sample") == [0, 0]
    assert sum(loss_weights([1] * 9 + [IGNORE], "square")) == pytest.approx(9 / math.sqrt(9))


def test_think_and_boxed_helpers():
    s = format_think("one, two, three", "3")
    assert s == "<think>\none, two, three\n</think>\n\n\\boxed{3}"
    assert split_think(s) == ("one, two, three", "\n\n\\boxed{3}")
    assert extract_boxed(s) == "3"
    assert extract_boxed("a \\boxed{x} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("no box") is None and extract_boxed("\\boxed{open") is None
    assert has_think_format(s)
    assert not has_think_format("\\boxed{3}")  # no thought
    assert not has_think_format("<think>x</think> 3")  # no boxed answer
    assert not has_think_format("so <think>x</think>\\boxed{3}")  # thought not first
