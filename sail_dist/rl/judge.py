"""LVM judges for open (unverifiable) prompts: `Judge.judge(requests) -> verdicts`, batched.

Two implementations, picked by rl.reward.judge.kind (`build_judge`):
  local  `LocalJudge`: a SAIL-VL2 HF directory (sail_dist/model/hf.py save_sailvl layout) served by the project's
         own RolloutEngine (the built-in sampler), greedy, one batch for all requests; sees images and video
  http   `HttpJudge`: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted API) over urllib,
         `concurrency` requests in flight, per-request timeout, retries with exponential backoff on timeouts,
         connection errors, HTTP 429 and 5xx (never on other 4xx, malformed JSON or an unparseable reply, which a
         retry at temperature 0 would repeat); images are sent inline as base64 data URLs, a video as 4 frames
Both ask for "Score: N" with N in 0..10 (JUDGE_INSTRUCTIONS) and return score N / 10. A failure is a verdict with
`score=None` and `error` saying why (never a 0): the reward then raises or counts it (rl.reward.judge.on_failure,
sail_dist/rl/rewards.py). `counts` on each judge tallies ok / failures by kind / retries.
"""
from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from sail_dist.config import JudgeConfig

JUDGE_INSTRUCTIONS = (
    "You are grading an answer to a question about the given picture(s). Judge whether the answer is correct, "
    "complete and faithful to the picture(s){ref_clause}. Reply with a one-sentence reason, then a last line "
    "'Score: N' where N is an integer from 0 (wrong) to 10 (fully correct).")


@dataclass
class JudgeRequest:
    question: str
    response: str  # the policy's final answer (the think block removed)
    reference: str | None = None  # a reference answer when the prompt has one
    images: list[str] = field(default_factory=list)  # image paths of the prompt, in order
    id: str = ""
    video: str | None = None


@dataclass
class JudgeVerdict:
    score: float | None  # in [0, 1]; None = the judge failed (see error)
    error: str = ""
    raw: str = ""  # the judge's reply text


class Judge(Protocol):
    counts: Counter

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeVerdict]:
        """One verdict per request, in order."""
        ...


def judge_text(req: JudgeRequest) -> str:
    """The user message a judge gets (without the pictures)."""
    ref = " (a reference answer is given)" if req.reference else ""
    parts = [JUDGE_INSTRUCTIONS.format(ref_clause=ref), f"Question: {req.question}"]
    if req.reference:
        parts.append(f"Reference answer: {req.reference}")
    parts.append(f"Answer to grade: {req.response}")
    return "\n\n".join(parts)


_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.I)


def parse_score(reply: str) -> float | None:
    """N / 10 from the last "Score: N" of a reply (N in 0..10), else None."""
    hits = _SCORE.findall(reply)
    if not hits:
        return None
    v = float(hits[-1])
    return v / 10.0 if 0.0 <= v <= 10.0 else None


def _verdict(reply: str) -> JudgeVerdict:
    s = parse_score(reply)
    if s is None:
        return JudgeVerdict(None, f"unparseable judge reply (no 'Score: N' with N in 0..10): {reply[:120]!r}", reply)
    return JudgeVerdict(s, "", reply)


# ------------------------------------------------------------------------------------------- http
def _data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def _frame_urls(video: str, n: int = 4) -> list[str]:
    from sail_dist.data.vision import load_video_frames

    urls = []
    for img in load_video_frames(video, n):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        urls.append(f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}")
    return urls


class _Retryable(Exception):
    """(kind, detail): a failure another attempt may not repeat."""


class _Fatal(Exception):
    """(kind, detail): a failure a retry would repeat."""


class HttpJudge:
    """An OpenAI-compatible /chat/completions endpoint as a judge (see the module docstring)."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        url = cfg.url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ValueError(f"rl.reward.judge.api_key_env={cfg.api_key_env!r}: that environment variable is "
                                 "not set (export it, or clear api_key_env for a server without auth)")
            self.headers["Authorization"] = f"Bearer {key}"
        self.counts: Counter = Counter()
        self._lock = threading.Lock()  # `_one` runs on `concurrency` threads; `counts[k] += 1` is not atomic

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _body(self, req: JudgeRequest) -> dict:
        content: list[dict] = [{"type": "text", "text": judge_text(req)}]
        urls = [_data_url(p) for p in req.images] + (_frame_urls(req.video) if req.video else [])
        content += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        return {"model": self.cfg.model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": self.cfg.max_new_tokens}

    def _post_once(self, data: bytes) -> str:
        rq = urllib.request.Request(self.endpoint, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(rq, timeout=self.cfg.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = f"HTTP {e.code} from {self.endpoint}: {e.read()[:200]!r}"
            if e.code == 429 or e.code >= 500:
                raise _Retryable("http", detail) from None
            raise _Fatal("http", detail) from None
        except (socket.timeout, TimeoutError):
            raise _Retryable("timeout", f"no reply from {self.endpoint} within {self.cfg.timeout_s}s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _Retryable("timeout", f"no reply from {self.endpoint} within {self.cfg.timeout_s}s") from None
            raise _Retryable("connection", f"cannot reach {self.endpoint}: {e.reason}") from None
        except (ConnectionError, OSError) as e:
            raise _Retryable("connection", f"cannot reach {self.endpoint}: {e}") from None
        except ValueError as e:  # e.g. a malformed URL
            raise _Fatal("config", f"rl.reward.judge.url={self.cfg.url!r}: {e}") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Fatal("garbage", f"{self.endpoint} did not return a chat completion: {raw[:120]!r}") from None

    def _one(self, req: JudgeRequest) -> JudgeVerdict:
        try:
            data = json.dumps(self._body(req)).encode()
        except OSError as e:
            self._count("failed_media")
            return JudgeVerdict(None, f"cannot read the prompt's media: {e}")
        for attempt in range(self.cfg.retries + 1):
            try:
                reply = self._post_once(data)
            except _Retryable as e:
                kind, detail = e.args
                if attempt < self.cfg.retries:
                    self._count("retries")
                    time.sleep(self.cfg.backoff_s * 2 ** attempt)
                    continue
                self._count(f"failed_{kind}")
                return JudgeVerdict(None, f"{detail} (after {attempt + 1} attempts)")
            except _Fatal as e:
                kind, detail = e.args
                self._count(f"failed_{kind}")
                return JudgeVerdict(None, detail)
            v = _verdict(reply)
            self._count("ok" if v.score is not None else "failed_unparseable")
            return v
        raise AssertionError("unreachable")

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeVerdict]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))


# ------------------------------------------------------------------------------------------- local
class LocalJudge:
    """A SAIL-VL2 HF directory on a RolloutEngine (the built-in sampler), greedy.

    `engine` and `builder` (a SampleBuilder with the judge's tokenizer and vision settings) are built from
    `cfg.path` when not given (sail_dist/eval/policy.py load_policy)."""

    def __init__(self, cfg: JudgeConfig, engine=None, builder=None, base_cfg=None):
        if engine is None or builder is None:
            from sail_dist.config import Config
            from sail_dist.eval.policy import load_policy

            policy = load_policy(base_cfg or Config(), cfg.path, tokenizer=cfg.tokenizer)
            engine, builder = policy.engine, policy.builder
        self.cfg, self.engine, self.builder = cfg, engine, builder
        self.counts: Counter = Counter()

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeVerdict]:
        from sail_dist.data.records import BadSample, Record, Turn
        from sail_dist.rollout.engine import SamplingParams

        out: list[JudgeVerdict | None] = [None] * len(requests)
        prompts, where = [], []
        for i, req in enumerate(requests):
            media = IMAGE_LINE * len(req.images) + ("<video>\n" if req.video else "")
            rec = Record(f"judge:{req.id}", f"judge request {req.id}", [Turn("user", media + judge_text(req))],
                         images=list(req.images), video=req.video)
            try:
                prompts.append(self.builder.prompt(rec)[0])
                where.append(i)
            except BadSample as e:
                self.counts["failed_media"] += 1
                out[i] = JudgeVerdict(None, f"cannot build the judge prompt: {e.reason}: {e.detail}")
        if prompts:
            t = self.builder.template.t
            params = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.max_new_tokens, stop_ids=(t.im_end,))
            for i, comps in zip(where, self.engine.generate(prompts, params, n=1), strict=True):
                c = comps[0]
                reply = self.builder.template.decode(c.tokens)
                v = _verdict(reply.split("<|im_end|>")[0])
                if v.score is None and c.finish_reason != "stop":
                    v.error += f" (the reply was cut: finish_reason={c.finish_reason})"
                self.counts["ok" if v.score is not None else "failed_unparseable"] += 1
                out[i] = v
        return out  # type: ignore[return-value]


IMAGE_LINE = "<image>\n"


def build_judge(cfg: JudgeConfig, base_cfg=None) -> Judge | None:
    """The judge of rl.reward.judge (None for kind=none); base_cfg (the run's Config) gives the local judge its
    data settings (tiles, video frames)."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "http":
        return HttpJudge(cfg)
    return LocalJudge(cfg, base_cfg=base_cfg)
