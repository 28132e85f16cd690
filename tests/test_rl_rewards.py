"""Rewards (sail_dist/rl/rewards.py): answer extraction and normalisation, multiple choice, format, think, the mix."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from sail_dist.config import ConfigError, RewardConfig, load_config
from sail_dist.rl.judge import JudgeVerdict
from sail_dist.rl.prompts import PromptItem
from sail_dist.data.answers import answers_match, final_answer, match_answer, parse_number
from sail_dist.rl.rewards import JudgeError, build_reward, format_ok, think_structure

from fractions import Fraction


def item(answer, kind="verifiable", choices=None, id="p0") -> PromptItem:
    return PromptItem(id, f"file.jsonl:{id}", None, answer, "How many?", kind, {"choices": choices})


# (prediction, reference, match?, the rule that decides)
CASES = [
    ("\\boxed{\\frac{3}{4}}", "0.75", True, "number"),
    ("\\boxed{\\dfrac34}", "3/4", True, "number"),
    ("\\boxed{\\tfrac{1}{2}}", "0.5", True, "number"),
    ("1/2", "\\frac{1}{2}", True, "number"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True, "number"),
    ("\\boxed{\\frac{-1}{2}}", "-1/2", True, "number"),
    ("1.50", "1.5", True, "number"),
    ("\\boxed{1,000}", "1000", True, "number"),
    ("1,000,000.5", "1000000.5", True, "number"),
    ("1\\,000", "1000", True, "number"),
    ("3 cm", "3", True, "number"),
    ("\\boxed{3\\text{ cm}^2}", "3", True, "number"),
    ("12 kg", "12", True, "number"),
    ("\\boxed{30^\\circ}", "30", True, "number"),
    ("\\boxed{30^{\\circ}}", "30 degrees", True, "number"),
    ("45°", "45", True, "number"),
    ("\\boxed{50\\%}", "50", True, "number"),
    ("$\\$5$", "5 dollars", True, "number"),
    ("\u22123", "-3", True, "number"),  # unicode minus
    ("\\boxed{x = 7}", "7", True, "number"),
    ("\\boxed{\\left( 2 \\right)}", "2", True, "number"),
    ("2x", "2", False, "text"),  # a variable is not a unit
    ("3 apples", "3", False, "text"),  # not a unit we strip
    ("0.3333", "1/3", False, "number"),  # exact rational equality, no tolerance
    ("\\boxed{4}", "\\boxed{3}", False, "number"),
    # extraction
    ("\\boxed{1} no wait \\boxed{2}", "2", True, "number"),  # the last box wins
    ("\\boxed{1} no wait \\boxed{2}", "1", False, "number"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True, "text"),  # nested braces
    ("<think>it is \\boxed{3}</think> so four", "3", False, "text"),  # a box inside the thought is not the answer
    ("<think>it is \\boxed{3}</think>\n\n\\boxed{4}", "4", True, "number"),
    ("<think>hmm \\boxed{3}", "3", False, "none"),  # unclosed think: no final answer
    ("\\boxed{}", "3", False, "none"),  # empty box
    ("\\boxed{3", "3", False, "none"),  # unclosed box
    ("<think>a</think><think>b</think>\\boxed{5}", "5", True, "number"),  # the answer after the last block
    ("3<|im_end|>\\boxed{4}", "3", True, "number"),  # nothing after the end of turn counts
    # text
    (" Red.", "red", True, "text"),
    ("\\text{Paris}", "paris", True, "text"),
    ("\\left( 1, 2 \\right)", "(1,2)", True, "text"),
    ("new york", "newyork", False, "text"),
    ("\\boxed{A \\leftarrow B}", "a \\leftarrow b", True, "text"),  # \\left is dropped, \\leftarrow is not
    ("\\boxed{\\Big( 3 \\Big)}", "3", True, "number"),
    # multiple choice (single-letter references)
    ("(C)", "C", True, "choice"),
    ("\\boxed{B}", "(B)", True, "choice"),
    ("b", "B", True, "choice"),
    ("B.", "B", True, "choice"),
    ("Answer: B", "B", True, "choice"),
    ("The answer is (D).", "D", True, "choice"),
    ("B) a cat", "B", True, "choice"),
    ("(A)", "B", False, "choice"),
    ("I think so", "B", False, "choice"),
]


@pytest.mark.parametrize("pred,truth,ok,how", CASES)
def test_match_cases(pred, truth, ok, how):
    m = match_answer(pred, truth)
    assert (m.ok, m.how) == (ok, how), m
    assert answers_match(pred, truth) is ok


def test_choices_option_text_and_range():
    opts = ["a dog", "a cat", "a bird"]
    assert answers_match("a cat", "B", choices=opts)
    assert answers_match("\\boxed{A cat.}", "b", choices=opts)
    assert answers_match("B", "a cat", choices=opts)  # the reference given as option text
    assert not answers_match("a bird", "B", choices=opts)
    assert not answers_match("D", "B", choices=opts)  # no option D
    assert answers_match("C", "C", choices={"A": "1", "B": "2", "C": "3"})
    assert answers_match("2", "B", choices={"A": "1", "B": "2"})
    assert answers_match("B. 2", "B", choices=["A. 1", "B. 2"])  # options written with their letter


def test_parse_number_values():
    assert parse_number("\\dfrac{6}{8}") == Fraction(3, 4)
    assert parse_number("-1,234.5") == Fraction(-24690, 20)
    assert parse_number("1e3") == 1000
    assert parse_number("\\frac{1}{0}") is None
    assert parse_number("1/2/3") is None
    assert parse_number("(1, 2)") is None


def test_long_generations_stay_fast():
    import random
    import time

    rng = random.Random(0)
    noise = "".join(rng.choice("0123456789 abc cm.,/()") for _ in range(40000))
    t = time.perf_counter()
    assert not answers_match(noise, "3") and not answers_match(noise, "B")
    assert answers_match(noise + " \\boxed{3}", "3")
    assert time.perf_counter() - t < 2.0


def test_final_answer_extraction():
    assert final_answer("<think>\nx\n</think>\n\n\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert final_answer("<think>x</think> 7") == "7"
    assert final_answer("   ") is None
    assert final_answer("<think>x</think>") is None


def _demo_exact_match_reference(text: str) -> str:
    """The demo's original exact-match normalisation (before answers_match replaced it), kept as the reference:
    the \\boxed{} content if any, else the text after </think>; lowercased, stripped of surrounding space, quotes
    and a final full stop; stops at <|im_end|>."""
    import re

    from sail_dist.data.template import extract_boxed, split_think

    text = text.split("<|im_end|>")[0]
    boxed = extract_boxed(text)
    text = split_think(text)[1] if boxed is None else boxed
    return re.sub(r"\s+", " ", text).strip().strip("\"'").rstrip(".").strip().lower()


def test_compatible_with_demo_exact_match(tmp_path):
    """On the demo's answers (words, digits, think + boxed), answers_match is the demo's old exact match."""
    import json

    from sail_dist.data.demo import generate_demo

    paths = generate_demo(str(tmp_path / "demo"), n_train=10, n_eval=150)
    answers = sorted({json.loads(line)["conversations"][-1]["value"] for line in open(paths.eval)})
    assert len(answers) > 20 and any("\\boxed" in a for a in answers)
    variants = lambda a: [a, a.upper() + ".", f" {a}<|im_end|>junk", f'"{a}"']  # noqa: E731
    for a in answers:
        for b in answers:
            for v in variants(b):
                assert answers_match(v, a) == (_demo_exact_match_reference(v) == _demo_exact_match_reference(a)), (v, a)


# ----------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("text,ok", [
    ("<think>\ncount 1, 2\n</think>\n\n\\boxed{2}", True),
    ("<think>x</think>\\boxed{2}<|im_end|>", True),
    ("  <think>x</think> The answer is \\boxed{2}.", True),
    ("\\boxed{2}", False),  # no think
    ("<think>x</think> 2", False),  # no box
    ("<think>x</think>\\boxed{}", False),  # empty box
    ("<think></think>\\boxed{2}", False),  # empty thought
    ("<think>x \\boxed{2}", False),  # never closed
    ("<think>x \\boxed{2}</think>", False),  # box only inside the thought
    ("<think>a</think><think>b</think>\\boxed{2}", False),  # two think blocks
    ("<think>a</think></think>\\boxed{2}", False),  # a stray close tag
    ("x <think>a</think>\\boxed{2}", False),  # text before the thought
    ("</think><think>a</think>\\boxed{2}", False),
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def test_think_structure_hand_computed():
    cfg = RewardConfig(think_min_words=20)
    ten = " ".join(f"w{i}" for i in range(10))
    assert think_structure(f"<think>{ten}</think>\\boxed{{1}}", None, cfg) == pytest.approx(0.5)
    loop = "a b c d " * 3  # 12 words, 9 word 4-grams of which 4 are distinct
    assert think_structure(f"<think>{loop}</think>\\boxed{{1}}", None, cfg) == pytest.approx(12 / 20 * 4 / 9)
    forty = " ".join(f"w{i}" for i in range(40))
    assert think_structure(f"<think>{forty}</think>\\boxed{{1}}", None, cfg) == 1.0
    assert think_structure(f"{forty}\\boxed{{1}}", None, cfg) == 0.0


# ----------------------------------------------------------------------------------------------- the mix
def test_weighted_mix_hand_computed():
    cfg = RewardConfig(weights={"answer": 1.0, "format": 0.5, "think": 0.25}, think_min_words=4)
    r = build_reward(cfg)
    texts = ["<think>one two three four</think>\\boxed{3}",  # right, formatted, think 1.0
             "\\boxed{3}",  # right, no think
             "<think>a b</think>\\boxed{4}",  # wrong, formatted, think 0.5
             "(B)"]
    res = r.score(texts, [item("3"), item("3"), item("3"), item("B")])
    assert [x.total for x in res] == pytest.approx([1.75, 1.0, 0.5 + 0.125, 1.0])
    assert [x.correct for x in res] == [True, True, False, True]
    assert [x.format_ok for x in res] == [True, False, True, False]
    assert res[2].parts == {"answer": 0.0, "format": 1.0, "think": 0.5}
    assert all(x.error == "" for x in res)
    with pytest.raises(ValueError):
        r.score(texts, [item("3")])


def test_reward_config_validation():
    with pytest.raises(ConfigError, match="unknown reward part.*formt"):
        load_config(None, ["data.demo=true", "rl.reward.weights={answer: 1, formt: 0.5}"])
    with pytest.raises(ConfigError, match="rl.reward.think"):
        load_config(None, ["data.demo=true", "rl.reward.think=nope"])
    with pytest.raises(ConfigError, match="every weight is 0"):
        load_config(None, ["data.demo=true", "rl.reward.weights={answer: 0}"])
    with pytest.raises(ConfigError, match="judge.path"):
        load_config(None, ["data.demo=true", "rl.reward.judge.kind=local"])
    cfg = load_config(None, ["data.demo=true", "rl.reward.weights={answer: 1, think: 0.2}"])
    assert cfg.rl.reward.weights == {"answer": 1, "think": 0.2}


class ScriptedJudge:
    def __init__(self, verdicts):
        self.verdicts, self.calls, self.counts = list(verdicts), [], Counter()

    def judge(self, requests):
        self.calls.append(requests)
        return [self.verdicts.pop(0) for _ in requests]


def test_open_prompts_use_the_judge_in_one_batch():
    cfg = RewardConfig(weights={"answer": 1.0, "format": 0.5})
    judge = ScriptedJudge([JudgeVerdict(0.8), JudgeVerdict(0.2)])
    r = build_reward(cfg, judge)
    texts = ["<think>look</think>\\boxed{a red car}", "\\boxed{3}", "a blue car"]
    res = r.score(texts, [item("a red car", "open", id="o1"), item("3"), item(None, "open", id="o2")])
    assert len(judge.calls) == 1 and [q.id for q in judge.calls[0]] == ["o1", "o2"]
    assert judge.calls[0][0].response == "a red car" and judge.calls[0][0].reference == "a red car"
    assert judge.calls[0][1].reference is None
    assert [x.total for x in res] == pytest.approx([0.8 + 0.5, 1.0, 0.2])
    assert [x.correct for x in res] == [True, True, False]


def test_judge_failure_raises_or_is_excluded_and_counted():
    texts = ["\\boxed{x}", "\\boxed{3}"]
    items = [item(None, "open", id="o1"), item("3")]
    strict = build_reward(RewardConfig(), ScriptedJudge([JudgeVerdict(None, "HTTP 500")]))
    with pytest.raises(JudgeError, match="judge_failed.*o1.*HTTP 500"):
        strict.score(texts, items)
    cfg = RewardConfig()
    cfg.judge.on_failure = "exclude"
    lenient = build_reward(cfg, ScriptedJudge([JudgeVerdict(None, "HTTP 500")]))
    res = lenient.score(texts, items)
    assert math.isnan(res[0].total) and math.isnan(res[0].parts["answer"]) and res[0].correct is None
    assert "judge_failed" in res[0].error and "HTTP 500" in res[0].error
    assert res[1].total == 1.0 and res[1].error == ""
    assert lenient.counts["judge_failed"] == 1
    with pytest.raises(JudgeError, match="no judge is configured"):
        build_reward(RewardConfig()).score(texts, items)
