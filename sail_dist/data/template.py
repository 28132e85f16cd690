"""Chat template, <image> expansion, labels and per-token loss weights (SAIL-VL2 / Qwen3 ChatML).

Layout (ChatML without a newline between turns; the system turn is left out when there is no system text):

  <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{msg}<|im_end|><|im_start|>assistant\\n{answer}<|im_end|>

`<image>` in a message becomes `<img>` + `<IMG_CONTEXT>` x n + `</img>` (n = vision tokens of that picture:
tokens_per_tile x tiles); `<video>` becomes `Frame1: <image>\\nFrame2: <image>...` (InternVL), one frame each.
Role headers ("user\\n") and message text are tokenized separately so label boundaries are exact.

Supervised tokens: every assistant answer and its closing `<|im_end|>`, nothing else. `labels` follow the
PackedBatch convention: labels[t] is the target at position t (= input_ids[t+1] when that token is
supervised, else -100) and the last position is always -100.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from tokenizers import Tokenizer

from sail_dist.config import TokenConfig
from sail_dist.data.records import VIDEO_PLACEHOLDER, BadSample, Record, Turn

IGNORE = -100
_MEDIA_RE = re.compile(r"(<image>)")
_SPECIAL_NAMES = {  # TokenConfig field -> token text
    "pad": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>", "think_start": "<think>",
    "think_end": "</think>", "img_start": "<img>", "img_end": "</img>", "img_context": "<IMG_CONTEXT>",
}


def load_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face tokenizer from a local directory (its tokenizer.json) or the tokenizer.json file itself."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}: set data.tokenizer to a local Hugging Face tokenizer "
                                "directory (or data.demo=true for the demo tokenizer)")
    return Tokenizer.from_file(file)


def check_special_tokens(tok: Tokenizer, tokens: TokenConfig) -> None:
    """Fail loudly when model.tokens disagrees with the tokenizer: a wrong id would silently corrupt training."""
    bad = []
    for name, text in _SPECIAL_NAMES.items():
        tid = tok.token_to_id(text)
        if tid is None:
            bad.append(f"{text} is not in the tokenizer")
        elif tid != getattr(tokens, name):
            bad.append(f"model.tokens.{name}={getattr(tokens, name)} but the tokenizer has {text}={tid}")
    if bad:
        fix = " ".join(f"model.tokens.{n}={tok.token_to_id(t)}" for n, t in _SPECIAL_NAMES.items()
                       if tok.token_to_id(t) is not None)
        raise ValueError("special tokens do not match the tokenizer: " + "; ".join(bad) + f". Fix: set {fix}")


@dataclass
class Encoded:
    """One tokenized sample (lists, not tensors: collation builds the tensors once per micro-batch)."""

    input_ids: list[int]
    labels: list[int]  # shifted next-token targets, IGNORE where there is no loss; last is IGNORE
    n_label_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatTemplate:
    """Turns a conversation (+ vision token counts per picture) into input ids and shifted labels."""

    def __init__(self, tokenizer: Tokenizer, tokens: TokenConfig, system_prompt: str = ""):
        check_special_tokens(tokenizer, tokens)
        self.tok = tokenizer
        self.t = tokens
        self.system_prompt = system_prompt
        self._headers = {r: self._enc(f"{r}\n") for r in ("system", "user", "assistant")}

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def _content(self, text: str, image_tokens: list[int], next_image: int) -> tuple[list[int], int]:
        """Encode one message, expanding each <image> with the next entry of image_tokens."""
        ids: list[int] = []
        for piece in _MEDIA_RE.split(text):
            if piece == "<image>":
                if next_image >= len(image_tokens):
                    raise ValueError(f"more <image> placeholders than pictures ({len(image_tokens)})")
                ids.append(self.t.img_start)
                ids.extend([self.t.img_context] * image_tokens[next_image])
                ids.append(self.t.img_end)
                next_image += 1
            elif piece:
                ids.extend(self._enc(piece))
        return ids, next_image

    def encode(self, turns: list[Turn], image_tokens: list[int], video_frames: int = 0,
               add_generation_prompt: bool = False) -> Encoded:
        """Tokenize a conversation.

        image_tokens: vision tokens of every picture in text order, where the single `<video>` placeholder
        counts as `video_frames` pictures (records.pictures_before_video says where they sit). With
        add_generation_prompt the ids end with `<|im_start|>assistant\n` (for generation / eval).
        """
        if video_frames:
            frames = "\n".join(f"Frame{i + 1}: <image>" for i in range(video_frames))
            turns = [Turn(t.role, t.text.replace(VIDEO_PLACEHOLDER, frames)) for t in turns]
        if turns and turns[0].role != "system" and self.system_prompt:
            turns = [Turn("system", self.system_prompt)] + list(turns)
        ids: list[int] = []
        learn: list[tuple[int, int]] = []  # [start, end) token ranges that carry loss
        next_image = 0
        for turn in turns:
            body, next_image = self._content(turn.text, image_tokens, next_image)
            ids += [self.t.im_start] + self._headers[turn.role]
            if turn.role == "assistant":
                learn.append((len(ids), len(ids) + len(body) + 1))  # the answer and its <|im_end|>
            ids += body + [self.t.im_end]
        if next_image != len(image_tokens):
            raise ValueError(f"{len(image_tokens)} pictures but {next_image} <image> placeholders")
        if add_generation_prompt:
            ids += [self.t.im_start] + self._headers["assistant"]
        labels = [IGNORE] * len(ids)
        for a, b in learn:  # shift: the token at position t is predicted from position t - 1
            labels[a - 1:b - 1] = ids[a:b]
        return Encoded(ids, labels, sum(b - a for a, b in learn))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------------- loss weights
def reduction_weight(n, reduction: str):
    """The per-token weight of a sample with n >= 1 supervised tokens under `data.loss_reduction`: token 1,
    sample 1/n, square 1/sqrt(n). n: a count, or a float tensor of per-sample counts (then elementwise; the
    Think-Fusion objective's masked counts)."""
    is_tensor = hasattr(n, "sqrt")
    if reduction == "token":
        return n * 0.0 + 1.0 if is_tensor else 1.0
    if reduction == "sample":
        return 1.0 / n
    if reduction == "square":
        return 1.0 / (n.sqrt() if is_tensor else math.sqrt(n))
    raise ValueError(f"loss reduction {reduction!r}: choose token, sample or square")


def loss_weights(labels: list[int], reduction: str) -> list[float]:
    """Raw per-token weights of one sample: token 1, sample 1/n, square 1/sqrt(n) (n = its label tokens).

    The trainer divides the weighted loss sum by the global sum of these weights (over DP ranks and
    micro-batches), so a packed micro-batch gives each sample exactly the weight it would get alone.
    """
    n = sum(1 for y in labels if y != IGNORE)
    if n == 0:
        return [0.0] * len(labels)
    w = reduction_weight(n, reduction)
    return [w if y != IGNORE else 0.0 for y in labels]


# ------------------------------------------------------------------------------------------- think / boxed
def format_think(thought: str, answer: str) -> str:
    """The long-CoT answer format: reasoning in <think>...</think>, final answer in \\boxed{}."""
    return f"<think>\n{thought.strip()}\n</think>\n\n\\boxed{{{answer.strip()}}}"


def split_think(text: str) -> tuple[str | None, str]:
    """(thought, rest): the text inside the first <think>...</think> (None if absent) and what follows it."""
    m = re.search(r"<think>(.*?)</think>", text, flags=re.S)
    if not m:
        return None, text
    return m.group(1).strip(), text[m.end():]


def _last_boxed_span(text: str) -> tuple[int, int] | None:
    """(start of the content, index of the closing brace) of the last \\boxed{...}; None if there is none or its
    braces never balance (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return i, j
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
    span = _last_boxed_span(text)
    return None if span is None else text[span[0]:span[1]].strip()


def has_think_format(text: str) -> bool:
    """Format check (the RL format reward): one <think>...</think> block first, then a \\boxed{} answer."""
    thought, rest = split_think(text.strip())
    return (thought is not None and text.strip().startswith("<think>") and text.count("<think>") == 1
            and extract_boxed(rest) is not None)


# ------------------------------------------------------------------------------------------- think rules
EMPTY_THINK = "<think>\n\n</think>\n\n"  # how a direct answer is written under fusion (Qwen3's non-thinking layout)
_OPEN_RE = re.compile(r"<\s*think\s*>", flags=re.I)
_CLOSE_RE = re.compile(r"<\s*/\s*think\s*>", flags=re.I)
# What may follow the final \boxed{...}: whitespace, closing math delimiters and end punctuation ("$\boxed{5}$.").
_AFTER_BOX_RE = re.compile(r"[\s.,;!\u3002$)\]\\]*")


class ThinkFormatError(ValueError):
    """An answer that breaks the think rules; `reason` is a key of records.BAD_REASONS."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class ThinkAnswer:
    """A normalised assistant answer: `text` is what the template encodes."""

    text: str
    thought: str  # "" for a direct answer
    final: str  # what follows </think> (the answer proper)

    @property
    def is_cot(self) -> bool:
        return bool(self.thought)


def _squash(s: str) -> str:
    return " ".join(s.split())


def _last_box_end(text: str) -> int:
    """Index just past the closing brace of the last \\boxed{...} (-1 if there is none or it is unbalanced)."""
    span = _last_boxed_span(text)
    return -1 if span is None else span[1] + 1


def normalise_think(text: str, mode: str, answer: str | None = None) -> ThinkAnswer:
    """Normalise and validate one assistant answer under `data.think_format` = `mode` (longcot | fusion).

    Normalisation (never changes what is said, only how it is laid out):
      - `\\r\\n` -> `\\n`; the tag variants `<Think>`, `< think >`, `</ think>` -> `<think>` / `</think>`;
      - an answer that starts with its reasoning and closes it with `</think>` but has no `<think>` (the opening
        tag sat in the generation prompt, as in DeepSeek-R1 / Qwen3 outputs) gets the `<think>` back;
      - whitespace around the tags is rewritten to `<think>\\n{thought}\\n</think>\\n\\n{final}` (format_think's
        layout), whatever newlines the record had (none, several, spaces);
      - a reasoning answer whose text after `</think>` has no `\\boxed{}` while the record has an `answer` field:
        an empty or bare-answer tail becomes `\\boxed{answer}`; a tail that contains the answer gets
        `\\n\\n\\boxed{answer}` appended; a tail that does not mention it is a think_answer_mismatch;
      - fusion, direct answer (no think block, or an empty one): written as `<think>\\n\\n</think>\\n\\n{final}`.
    Validation (ThinkFormatError, reason bad_think_format unless said): `<think>` without `</think>`; more than one
    think block; text before `<think>`; longcot without a think block or with an empty thought; a reasoning answer
    with no `\\boxed{}` after `</think>` (e.g. only inside the thought) or an unbalanced one; anything but
    whitespace, closing math delimiters or end punctuation after the final `\\boxed{}`; a direct answer with
    nothing after the empty block; a `\\boxed{}` that disagrees with the `answer` field (think_answer_mismatch,
    compared with whitespace squashed).
    """
    if mode not in ("longcot", "fusion"):
        raise ValueError(f"think format {mode!r}: expected longcot or fusion")
    t = _CLOSE_RE.sub("</think>", _OPEN_RE.sub("<think>", text.replace("\r\n", "\n"))).strip()
    n_open, n_close = t.count("<think>"), t.count("</think>")
    if n_open > 1 or n_close > 1:
        raise ThinkFormatError("bad_think_format", f"{max(n_open, n_close)} think blocks (one is allowed)")
    if n_open == 1 and n_close == 0:
        raise ThinkFormatError("bad_think_format", "<think> is never closed by </think>")
    if n_open == 0 and n_close == 1:
        t = "<think>" + t
    if "<think>" not in t:
        if mode == "longcot":
            raise ThinkFormatError("bad_think_format", "no <think>...</think> block (longcot needs the reasoning)")
        thought, final = "", t
    else:
        if not t.startswith("<think>"):
            raise ThinkFormatError("bad_think_format", f"text before <think>: {t[:t.index('<think>')][:40]!r}")
        thought, final = split_think(t)
        final = final.strip()
    if not thought:
        if mode == "longcot":
            raise ThinkFormatError("bad_think_format", "empty thought (longcot needs the reasoning)")
        if not final:
            raise ThinkFormatError("bad_think_format", "no answer after the empty think block")
        got = extract_boxed(final)
        if answer is not None and got is not None and _squash(got) != _squash(answer):
            raise ThinkFormatError("think_answer_mismatch", f"\\boxed{{{got[:40]}}} but answer={answer[:40]!r}")
        return ThinkAnswer(EMPTY_THINK + final, "", final)
    if "\\boxed{" not in final:
        if answer is None:
            where = " (the only \\boxed{} is inside the thought)" if "\\boxed{" in thought else ""
            raise ThinkFormatError("bad_think_format", f"no \\boxed{{}} answer after </think>{where}")
        bare = _squash(final).rstrip(".")
        if not bare or bare == _squash(answer):
            final = f"\\boxed{{{answer.strip()}}}"
        elif _squash(answer) in _squash(final):
            final = f"{final}\n\n\\boxed{{{answer.strip()}}}"
        else:
            raise ThinkFormatError("think_answer_mismatch", f"the text after </think> has no \\boxed{{}} and does "
                                   f"not contain answer={answer[:40]!r}")
    end = _last_box_end(final)
    if end < 0:
        raise ThinkFormatError("bad_think_format", "unbalanced braces in the last \\boxed{...}")
    if not _AFTER_BOX_RE.fullmatch(final[end:]):
        raise ThinkFormatError("bad_think_format", f"text after the final \\boxed{{}}: {final[end:].strip()[:40]!r}")
    got = extract_boxed(final)
    if answer is not None and _squash(got) != _squash(answer):
        raise ThinkFormatError("think_answer_mismatch", f"\\boxed{{{got[:40]}}} but answer={answer[:40]!r}")
    return ThinkAnswer(f"<think>\n{thought}\n</think>\n\n{final}", thought, final)


def apply_think_rules(rec: Record, mode: str) -> tuple[Record, ThinkAnswer]:
    """data.think_format = `mode` (longcot | fusion) on one record: a copy with its last assistant answer
    normalised by `normalise_think` (the record's `answer` field, if any, is checked against it), and that answer.
    Raises BadSample (bad_think_format, think_answer_mismatch) naming the record's file:line. Earlier assistant
    turns must carry no think tags: only the last answer's reasoning is trained (Qwen3's template strips the
    reasoning of history turns too)."""
    last = max(i for i, t in enumerate(rec.turns) if t.role == "assistant")
    for i, t in enumerate(rec.turns[:last]):
        if t.role == "assistant" and (_OPEN_RE.search(t.text) or _CLOSE_RE.search(t.text)):
            raise BadSample("bad_think_format", rec.where, f"assistant turn {i} (not the last) has think tags")
    try:
        ans = normalise_think(rec.turns[last].text, mode, rec.answer)
    except ThinkFormatError as e:
        raise BadSample(e.reason, rec.where, e.detail) from None
    turns = list(rec.turns)
    turns[last] = Turn("assistant", ans.text)
    return replace(rec, turns=turns), ans


def think_targets(labels: list[int], tokens: TokenConfig) -> list[int]:
    """Per position t, 1 where the TARGET labels[t] is a token of the think block (`<think>` ... `</think>`, tags
    included) of a supervised answer, else 0: aligned with `labels`, as the objective reads it.

    The block is found by the two tag ids (single tokens, never merged with text), at supervised positions only,
    so a `<think>` a user typed is never marked."""
    out = [0] * len(labels)
    inside = False
    for t, y in enumerate(labels):
        if y == IGNORE:
            inside = False
            continue
        if y == tokens.think_start:
            inside = True
        if inside:
            out[t] = 1
        if y == tokens.think_end:
            inside = False
    return out
