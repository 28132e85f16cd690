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
    "invalid_utf8": "re-encode the file as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`); the line has bytes that are not",
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
    "no_ground_truth": "give the RL prompt an `answer` (or end it with the reference assistant turn), or mark it "
                       "`\"kind\": \"open\"` and configure a judge (rl.reward.judge.kind=local|http)",
    "bad_prompt_field": "an RL prompt's `answer` must be a non-empty string or number, `kind` one of verifiable | "
                        "open, and `choices` a list of option texts or a {letter: text} mapping",
    "bad_think_format": "write the last assistant answer as `<think>\\n...\\n</think>\\n\\n` + a final answer "
                        "ending in `\\boxed{...}` (one think block, closed, reasoning in longcot; an empty or no think "
                        "block marks a direct answer in fusion); keep earlier assistant turns free of think tags "
                        "(docs/data.md, LongCoT and Think-Fusion data)",
    "think_answer_mismatch": "make the `\\boxed{}` answer after </think> agree with the record's `answer` field, "
                             "or drop the field",
}

_USER = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model", "bot")
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


def decode_line(raw: bytes, where: str) -> str:
    """One JSONL line as text; BadSample (invalid_utf8) for bytes that are not UTF-8, rather than replacement
    characters that would be trained on (or written out) unnoticed."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("invalid_utf8", where, f"byte {e.start} of the line is {raw[e.start:e.start + 4]!r}") from None


class BadSampleError(ValueError):
    """Raised under `on_bad_sample: error`; the message names file:line, the reason and the fix."""


@dataclass
class BadSampleLog:
    """Skipped samples per reason, as distinct records (`file:line`) and as occurrences.

    A bad record is met again on every pass over its source (and on every draw of an up-weighted record), so
    occurrences overcount what there is to fix; the distinct records are what a user acts on. The state stays
    small: up to `max_records` distinct records are kept per reason (with their occurrences); a record first met
    once that list is full is counted (occurrences in `unlisted`), not kept, and the distinct count becomes a
    lower bound ("at least N"). `examples` keeps the detail of the first `max_examples` records per reason.
    """

    counts: Counter = field(default_factory=Counter)  # reason -> occurrences
    records: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> {file:line: occurrences}
    unlisted: Counter = field(default_factory=Counter)  # reason -> occurrences of records past max_records
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> ["file:line: detail", ...]
    max_records: int = 100
    max_examples: int = 5

    def add(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        """Count `n` occurrences of the bad record `where` under `reason`."""
        self.counts[reason] += n
        rec = self.records.setdefault(reason, {})
        if where in rec:
            rec[where] += n
            return
        if len(rec) >= self.max_records:
            self.unlisted[reason] += n
            return
        rec[where] = n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: "BadSampleLog") -> None:
        """Add another log's counts (another rank's decode drops, a rank gone in an elastic resume)."""
        for reason, recs in other.records.items():
            details = {e.split(": ", 1)[0]: e.split(": ", 1)[1] for e in other.examples.get(reason, []) if ": " in e}
            for where, n in recs.items():
                self.add(reason, where, details.get(where, ""), n)
        for reason, n in other.unlisted.items():
            self.counts[reason] += n
            self.unlisted[reason] += n

    @property
    def total(self) -> int:
        """Occurrences, all reasons."""
        return sum(self.counts.values())

    def distinct(self, reason: str | None = None) -> int:
        """Distinct records (of one reason, or all); a lower bound ("at least") where `exact()` is False."""
        reasons = [reason] if reason is not None else list(self.counts)
        return sum(len(self.records.get(r, {})) + (1 if self.unlisted.get(r) else 0) for r in reasons)

    def exact(self, reason: str | None = None) -> bool:
        """Whether every distinct record was kept (so `distinct()` is exact)."""
        reasons = [reason] if reason is not None else list(self.counts)
        return not any(self.unlisted.get(r) for r in reasons)

    def brief(self) -> str:
        """'3 distinct records (7 occurrences)'."""
        n = self.distinct()
        return (f"{'' if self.exact() else 'at least '}{n} distinct record{'' if n == 1 else 's'} "
                f"({self.total} occurrences)")

    def summary(self, show: int = 5) -> str:
        """'3 distinct records (7 occurrences): too_long: 2 records (a.jsonl:12, a.jsonl:40); malformed_json: 1
        record, 5 occurrences (a.jsonl:3 x5)' -- the records of each reason, up to `show` of them."""
        if not self.counts:
            return "no bad samples"
        parts = []
        for reason in sorted(self.counts):
            recs = self.records.get(reason, {})
            n, occ = len(recs), self.counts[reason]
            if self.exact(reason):
                head = f"{n} record{'' if n == 1 else 's'}" + (f", {occ} occurrences" if occ != n else "")
            else:
                head = (f"at least {n + 1} records, {occ} occurrences (the first {n} records kept: "
                        f"{self.unlisted[reason]} occurrences are of records past them)")
            shown = [w if k == 1 else f"{w} x{k}" for w, k in list(recs.items())[:show]]
            if len(recs) > show:
                shown.append(f"{len(recs) - show} more")
            parts.append(f"{reason}: {head} ({', '.join(shown)})")
        return f"{self.brief()}: " + "; ".join(parts)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "records": {k: dict(v) for k, v in self.records.items()},
                "unlisted": dict(self.unlisted), "examples": {k: list(v) for k, v in self.examples.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.counts = Counter(sd.get("counts", {}))
        self.records = {k: dict(v) for k, v in sd.get("records", {}).items()}
        self.unlisted = Counter(sd.get("unlisted", {}))
        self.examples = {k: list(v) for k, v in sd.get("examples", {}).items()}
        for reason, n in self.counts.items():  # a state from before distinct records were kept: count, not list
            extra = n - sum(self.records.get(reason, {}).values()) - self.unlisted.get(reason, 0)
            if extra > 0:
                self.unlisted[reason] += extra


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
    answer: str | None = None  # the record's own final `answer` field (string or number), if any


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


def parse_record(line: str, where: str, sample_id: str, media_root: str, require_answer: bool = True) -> Record:
    """Parse and structurally validate one JSONL line. Media files are not opened here (see loader.describe).

    require_answer=False accepts a record without an assistant turn (an RL / evaluation prompt, sail_dist/rl/prompts.py).
    """
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
        elif role in ASSISTANT_ROLES:
            role = "assistant"
        elif role in _SYSTEM:
            role = "system"
        else:
            raise BadSample("bad_turn", where, f"turn {i} has role {t.get(role_key)!r}")
        if text_key not in t:
            raise BadSample("bad_turn", where, f"turn {i} has no `{text_key}`")
        text = _content_text(t[text_key], where, images)
        turns.append(Turn(role, text))

    if require_answer and not any(t.role == "assistant" and t.text.strip() for t in turns):
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
        answer=str(obj["answer"]) if isinstance(obj.get("answer"), (str, int, float)) and not
        isinstance(obj.get("answer"), bool) else None,
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
        pos = lineno = 0
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
        self.n_lines = lineno
        # per-row sampling weights (None: every row once per pass)
        self.row_weights = (read_record_weights(spec.record_weights, self, index) if spec.record_weights
                            else None)
        self._fh = None

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, row: int) -> tuple[str, int]:
        """(text, 1-based line number) of record `row`; raises BadSample (invalid_utf8) for a line that is not
        UTF-8, rather than training on replacement characters."""
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(int(self.offsets[row]))
        lineno = int(self.line_numbers[row])
        return decode_line(self._fh.readline(), f"{self.path}:{lineno}"), lineno

    def record(self, row: int) -> Record:
        """Parse record `row`; raises BadSample."""
        text, lineno = self.read(row)
        return parse_record(text, f"{self.path}:{lineno}", f"{self.name}:{lineno}", self.media_root)


def read_record_weights(path: str, source: "JsonlSource", index: int) -> np.ndarray:
    """The per-row weights of `source` from a sidecar file: one number per line of the JSONL (blank lines
    included, their numbers unused), lines starting with '#' are comments. -> float64 [len(source)]."""
    where = f"data.sources[{index}].record_weights={path!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: file not found; write it with `sail-data balance {source.path} --out {path}`")
    values = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("#"):
                continue
            try:
                values.append(float(line))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: {line.strip()[:40]!r} is not a number ({where}); one weight "
                                 "per JSONL line") from None
    if len(values) != source.n_lines:
        raise ValueError(f"{where} has {len(values)} weights but {source.path} has {source.n_lines} lines: the "
                         "weights belong to another version of the file; re-run `sail-data balance` on it")
    w = np.asarray(values, dtype=np.float64)[source.line_numbers - 1]
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{where}: weights must be finite and >= 0 with a positive sum (got min {w.min()}, "
                         f"sum {w.sum()})")
    return w


class SourceMix:
    """The deterministic global sample stream over weighted sources.

    Position n of the stream takes the source whose realised share lags its weight share the most
    (Megatron's blending rule, exact in every window), and within a source walks a permutation seeded by
    (seed, source, pass); when a source is exhausted its next pass starts with a new seeded order. The state
    is (drawn, per-source counts): small, and restoring it resumes the exact stream.

    A source with per-record weights (`row_weights`) draws each pass of n rows by systematic sampling from the
    weights (one seeded offset u, the n points (u + i) / n on the cumulative weight: row r appears
    floor or ceil of n * p_r times), then shuffles them with the pass's seeded permutation; so the stream is still
    a pure function of (seed, source, pass, position) and the state stays (drawn, counts).
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
            rng = np.random.default_rng([self.seed, src, p])
            w = getattr(self.sources[src], "row_weights", None)
            if w is None:
                rows = rng.permutation(n)
            else:
                cum = np.cumsum(w)
                points = (rng.random() + np.arange(n)) / n * cum[-1]
                rows = np.minimum(np.searchsorted(cum, points, side="right"), n - 1)[rng.permutation(n)]
            cached = (p, rows)
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
    """Index every JSONL file of `data.sources`; with data.source_weighting=size each source's weight becomes
    weight * n^(1/size_temperature) for its n records (the mix normalises the shares)."""
    sources = [JsonlSource(s, i) for i, s in enumerate(data_cfg.sources)]
    if data_cfg.source_weighting == "size":
        for s in sources:
            s.weight = s.weight * float(len(s)) ** (1.0 / data_cfg.size_temperature)
    return sources
