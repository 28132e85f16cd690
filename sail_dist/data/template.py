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
from dataclasses import dataclass

from tokenizers import Tokenizer

from sail_dist.config import TokenConfig
from sail_dist.data.records import VIDEO_PLACEHOLDER, Turn

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
def loss_weights(labels: list[int], reduction: str) -> list[float]:
    """Raw per-token weights of one sample: token 1, sample 1/n, square 1/sqrt(n) (n = its label tokens).

    The trainer divides the weighted loss sum by the global sum of these weights (over DP ranks and
    micro-batches), so a packed micro-batch gives each sample exactly the weight it would get alone.
    """
    n = sum(1 for y in labels if y != IGNORE)
    if n == 0:
        return [0.0] * len(labels)
    w = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[reduction]
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


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
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
                return text[i:j].strip()
    return None


def has_think_format(text: str) -> bool:
    """Format check (the RL format reward): one <think>...</think> block first, then a \\boxed{} answer."""
    thought, rest = split_think(text.strip())
    return (thought is not None and text.strip().startswith("<think>") and text.count("<think>") == 1
            and extract_boxed(rest) is not None)
