"""JSONL conversation records: parsing, validation, bad-sample accounting and the weighted source mix.

Two record styles are accepted, one JSON object per line:

  LLaVA / InternVL: {"id": ..., "image": "a.jpg" | ["a.jpg", ...], "images": [...], "video": "v.mp4" | "frames/",
                     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                       {"from": "gpt", "value": "A cat."}]}
  messages:         {"images": [...], "messages": [{"role": "user", "content": "<image>\\nWhat is this?"},
                                                   {"role": "assistant", "content": "A cat."}]}
                    (`content` may also be a list of parts: {"type": "text", "text": ...} / {"type": "image",
                    "image": "a.jpg"} / {"type": "video", "video": ...}; image parts become `<image>` in place)

Every problem with a record is a `BadSample` with a reason from `BAD_REASONS`, the record's `file:line`,
a detail and a fix. With `on_bad_sample: error` it is raised as a `BadSampleError`; with `skip` it is
counted per reason in a `BadSampleLog` that the trainer logs. Nothing disappears unreported.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sail_dist.config import DataConfig, DataSource

# reason -> what to do about it (shown in the error message)
BAD_REASONS: dict[str, str] = {
    "malformed_json": "fix the JSON on that line (one object per line) or delete the line",
    "not_an_object": "each line must be a JSON object with `conversations` or `messages`",
    "empty_conversation": "give the record a non-empty `conversations` (or `messages`) list",
    "bad_turn": "each turn needs a role (from/role: human|user|gpt|assistant|system) and a string value/content",
    "no_assistant_turn": "add at least one assistant (gpt) turn with a non-empty answer: there is nothing to learn",
    "bad_media_field": "`image`/`images` must be a path or a list of paths and `video` a path",
    "missing_image": "check the path and `image_root` of the source (relative paths resolve against it)",
    "corrupt_image": "re-encode or remove the image; Pillow cannot read it",
    "unreadable_video": "give a folder of frames, or install PyAV (`pip install av`) or OpenCV to read video files",
    "placeholder_mismatch": "put exactly one `<image>` in the user turns per listed image (and one `<video>` "
                            "for a video), never in assistant turns",
    "too_long": "raise data.max_sample_tokens / data.pack_tokens, use data.long_samples=periodic, "
                "or lower data.max_tiles",
    "too_long_cap": "raise data.long_sample_max_tokens (a lone long sample must fit in device memory) "
                    "or shorten the sample",
}

_USER = ("human", "user")
_ASSISTANT = ("gpt", "assistant", "model", "bot")
_SYSTEM = ("system",)
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"<image>|<video>")


class BadSample(Exception):
    """One record cannot be used; `reason` is a key of BAD_REASONS and `where` is "file:line"."""

    def __init__(self, reason: str, where: str, detail: str):
        assert reason in BAD_REASONS, reason
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(self.message())

    def message(self) -> str:
        return f"{self.where}: bad sample ({self.reason}): {self.detail}. Fix: {BAD_REASONS[self.reason]}"


class BadSampleError(ValueError):
    """Raised under `on_bad_sample: error`; the message names file:line, the reason and the fix."""


@dataclass
class BadSampleLog:
    """Per-reason counters of skipped samples, with the first few examples of each reason for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where}: {detail}" if detail else where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no bad samples"
        parts = [f"{r}={n} (e.g. {self.examples.get(r, ['?'])[0]})" for r, n in sorted(self.counts.items())]
        return f"{self.total} samples skipped: " + "; ".join(parts)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.counts = Counter(sd.get("counts", {}))
        self.examples = {k: list(v) for k, v in sd.get("examples", {}).items()}


def handle_bad(exc: BadSample, on_bad_sample: str, log: BadSampleLog) -> None:
    """Apply the policy: raise a BadSampleError (error) or count the sample under its reason (skip)."""
    if on_bad_sample == "error":
        raise BadSampleError(exc.message() + " (or set data.on_bad_sample=skip to skip and count such samples)") \
            from None
    log.add(exc.reason, exc.where, exc.detail)


# ------------------------------------------------------------------------------------------- records
@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass
class Record:
    """One validated conversation; media paths are resolved and listed in placeholder order."""

    sample_id: str  # "<source name>:<line>", unique within a run
    where: str  # "<path>:<line>" for messages
    turns: list[Turn]
    images: list[str] = field(default_factory=list)
    video: str | None = None
    image_sizes: list[tuple[int, int]] | None = None  # optional (width, height) per image, from the record
    record_id: str | None = None  # the record's own "id", if any


def _as_paths(value, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadSample("bad_media_field", where, f"`{key}` is {type(value).__name__} {str(value)[:60]!r}")


def _content_text(content, where: str, images: list[str]) -> str:
    """messages-style content: a string, or a list of typed parts (image parts become <image> in place)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadSample("bad_turn", where, f"content is {type(content).__name__}, expected a string or a list of parts")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("image", "image_url"):
            out.append(IMAGE_PLACEHOLDER)
            path = part.get("image") or part.get("image_url")
            if isinstance(path, dict):  # OpenAI style {"image_url": {"url": ...}}
                path = path.get("url")
            if isinstance(path, str):
                images.append(path)
        elif kind == "video":
            out.append(VIDEO_PLACEHOLDER)
        else:
            raise BadSample("bad_turn", where, f"unknown content part {str(part)[:80]!r}")
    return "".join(out)


def _resolve(path: str, root: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def parse_record(line: str, where: str, sample_id: str, media_root: str) -> Record:
    """Parse and structurally validate one JSONL line. Media files are not opened here (see loader.describe)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadSample("malformed_json", where, f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise BadSample("not_an_object", where, f"got a JSON {type(obj).__name__}")

    images: list[str] = []
    for key in ("image", "images"):
        images += _as_paths(obj.get(key), key, where)
    video = obj.get("video")
    if video is not None and not isinstance(video, str):
        raise BadSample("bad_media_field", where, f"`video` is {type(video).__name__}, expected a path")

    turns: list[Turn] = []
    if "conversations" in obj:
        conv_key, role_key, text_key = "conversations", "from", "value"
    elif "messages" in obj:
        conv_key, role_key, text_key = "messages", "role", "content"
    else:
        raise BadSample("empty_conversation", where, "no `conversations` or `messages` key")
    raw = obj[conv_key]
    if not isinstance(raw, list) or not raw:
        raise BadSample("empty_conversation", where, f"`{conv_key}` is {'empty' if raw == [] else type(raw).__name__}")
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise BadSample("bad_turn", where, f"turn {i} is {type(t).__name__}, expected an object")
        role = str(t.get(role_key, "")).lower()
        if role in _USER:
            role = "user"
        elif role in _ASSISTANT:
            role = "assistant"
        elif role in _SYSTEM:
            role = "system"
        else:
            raise BadSample("bad_turn", where, f"turn {i} has role {t.get(role_key)!r}")
        if text_key not in t:
            raise BadSample("bad_turn", where, f"turn {i} has no `{text_key}`")
        text = _content_text(t[text_key], where, images)
        turns.append(Turn(role, text))

    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise BadSample("no_assistant_turn", where, "no assistant turn with text")
    if any(t.role == "system" for t in turns[1:]):
        raise BadSample("bad_turn", where, "a system turn may only come first")

    n_img = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    n_vid = sum(t.text.count(VIDEO_PLACEHOLDER) for t in turns)
    in_answer = [i for i, t in enumerate(turns) if t.role == "assistant" and _PLACEHOLDER_RE.search(t.text)]
    if in_answer:
        raise BadSample("placeholder_mismatch", where, f"assistant turn {in_answer[0]} contains a media placeholder")
    if video is not None and n_vid == 0 and n_img == 1 and not images:
        # LLaVA-Video style: the single <image> stands for the video.
        turns = [Turn(t.role, t.text.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)) for t in turns]
        n_img, n_vid = 0, 1
    if n_img != len(images):
        raise BadSample("placeholder_mismatch", where, f"{n_img} `<image>` placeholder(s) for {len(images)} image(s)")
    if n_vid != (1 if video is not None else 0):
        raise BadSample("placeholder_mismatch", where,
                        f"{n_vid} `<video>` placeholder(s) for {'one video' if video is not None else 'no video'}")

    sizes = obj.get("image_sizes")
    if sizes is not None:
        ok = isinstance(sizes, list) and len(sizes) == len(images) and all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in sizes)
        if not ok:
            raise BadSample("bad_media_field", where, "`image_sizes` must list one [width, height] per image")
        sizes = [tuple(s) for s in sizes]

    return Record(
        sample_id=sample_id,
        where=where,
        turns=turns,
        images=[_resolve(p, media_root) for p in images],
        video=_resolve(video, media_root) if video is not None else None,
        image_sizes=sizes,
        record_id=str(obj["id"]) if "id" in obj else None,
    )


def pictures_before_video(turns: list[Turn]) -> int:
    """How many `<image>` placeholders precede the `<video>` one in text order (where the frames go)."""
    text = "".join(t.text for t in turns)
    at = text.find(VIDEO_PLACEHOLDER)
    return text[:at].count(IMAGE_PLACEHOLDER) if at >= 0 else text.count(IMAGE_PLACEHOLDER)


# ------------------------------------------------------------------------------------------- sources
class JsonlSource:
    """A JSONL file indexed by line offsets, so any record can be read by its row number (blank lines skipped)."""

    def __init__(self, spec: DataSource, index: int):
        self.path = os.path.abspath(os.path.expanduser(spec.path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data source {index} ({spec.path!r}): file not found; "
                                    f"fix data.sources[{index}].path")
        self.name = spec.name or os.path.splitext(os.path.basename(self.path))[0]
        self.weight = spec.weight
        self.media_root = os.path.abspath(os.path.expanduser(spec.image_root)) if spec.image_root \
            else os.path.dirname(self.path)
        offsets, lines = [], []
        pos = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    offsets.append(pos)
                    lines.append(lineno)
                pos += len(raw)
        if not offsets:
            raise ValueError(f"data source {index} ({self.path}) has no records; fix data.sources[{index}].path")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(lines, dtype=np.int64)
        self._fh = None

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, row: int) -> tuple[str, int]:
        """(text, 1-based line number) of record `row`."""
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(int(self.offsets[row]))
        return self._fh.readline().decode("utf-8", errors="replace"), int(self.line_numbers[row])

    def record(self, row: int) -> Record:
        """Parse record `row`; raises BadSample."""
        text, lineno = self.read(row)
        return parse_record(text, f"{self.path}:{lineno}", f"{self.name}:{lineno}", self.media_root)


class SourceMix:
    """The deterministic global sample stream over weighted sources.

    Position n of the stream takes the source whose realised share lags its weight share the most
    (Megatron's blending rule, exact in every window), and within a source walks a permutation seeded by
    (seed, source, pass); when a source is exhausted its next pass starts with a new seeded order. The state
    is (drawn, per-source counts): small, and restoring it resumes the exact stream.
    """

    def __init__(self, sources: list[JsonlSource], seed: int):
        if not sources:
            raise ValueError("SourceMix needs at least one source")
        self.sources = sources
        self.seed = seed
        w = np.asarray([s.weight for s in sources], dtype=np.float64)
        self.share = w / w.sum()
        self.drawn = 0
        self.counts = [0] * len(sources)
        self._perm: dict[int, tuple[int, np.ndarray]] = {}  # source -> (pass, permutation)
        self.total_rows = sum(len(s) for s in sources)

    @property
    def epoch(self) -> float:
        """Passes over the whole mix (records drawn / records in all sources)."""
        return self.drawn / self.total_rows

    def _row(self, src: int, k: int) -> int:
        n = len(self.sources[src])
        p, i = divmod(k, n)
        cached = self._perm.get(src)
        if cached is None or cached[0] != p:
            perm = np.random.default_rng([self.seed, src, p]).permutation(n)
            cached = (p, perm)
            self._perm[src] = cached
        return int(cached[1][i])

    def next(self) -> tuple[int, int]:
        """The next (source index, row) of the stream."""
        n = self.drawn + 1
        lag = [self.share[i] * n - self.counts[i] for i in range(len(self.sources))]
        src = max(range(len(lag)), key=lambda i: (lag[i], -i))
        row = self._row(src, self.counts[src])
        self.counts[src] += 1
        self.drawn = n
        return src, row

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "counts": list(self.counts)}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["counts"]) != len(self.sources):
            raise ValueError(f"loader state has {len(sd['counts'])} sources but data.sources lists "
                             f"{len(self.sources)}; resume with the same data.sources")
        self.drawn = int(sd["drawn"])
        self.counts = [int(c) for c in sd["counts"]]


def open_sources(data_cfg: DataConfig) -> list[JsonlSource]:
    """Index every JSONL file of `data.sources`."""
    return [JsonlSource(s, i) for i, s in enumerate(data_cfg.sources)]
