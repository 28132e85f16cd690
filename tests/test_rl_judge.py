"""LVM judges (sail_dist/rl/judge.py): the HTTP judge against a local server; the local judge on the sampler."""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, free_port
from sail_dist.config import JudgeConfig, RewardConfig, load_config
from sail_dist.rl.judge import HttpJudge, JudgeRequest, LocalJudge, build_judge, judge_text, parse_score
from sail_dist.rl.prompts import PromptItem
from sail_dist.rl.rewards import JudgeError, build_reward
from sail_dist.rollout.engine import Completion


class _Handler(BaseHTTPRequestHandler):
    """Behaviour by path prefix: /good /garbage /noscore /slow /flaky (503 twice, then good) /bad (400)."""

    def log_message(self, *a):  # keep the test output clean
        pass

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.split("/")[1]
        with srv.lock:
            srv.hits[mode] += 1
            srv.requests.append((self.path, dict(self.headers), body))
            hit = srv.hits[mode]
        good = json.dumps({"choices": [{"message": {"role": "assistant",
                                                    "content": "The answer matches the picture.\nScore: 8"}}]}).encode()
        if mode == "good":
            self._send(200, good)
        elif mode == "garbage":
            self._send(200, b"<html>not json</html>")
        elif mode == "noscore":
            self._send(200, json.dumps({"choices": [{"message": {"content": "Looks fine to me!"}}]}).encode())
        elif mode == "slow":
            time.sleep(1.0)
            self._send(200, good)
        elif mode == "flaky":
            self._send(503, b"busy") if hit <= 2 else self._send(200, good)
        else:
            self._send(400, b'{"error": "bad request"}')


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits, srv.requests, srv.lock = Counter(), [], threading.Lock()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    srv.shutdown()
    srv.server_close()


def _cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"kind": "http", "url": url, "model": "judge-1", "timeout_s": 0.3, "retries": 2,
                          "backoff_s": 0.01, "concurrency": 4, **kw})


def _req(i=0, images=()):
    return JudgeRequest("What colour is the car?", "red", "red", list(images), f"q{i}")


def test_parse_score():
    assert parse_score("fine.\nScore: 7") == 0.7
    assert parse_score("Score: 3 ... on reflection, score = 9/10") == 0.9  # the last one counts
    assert parse_score("**Score:** 10") == 1.0
    assert parse_score("Score: 11") is None and parse_score("no number") is None


def test_http_good_answer_and_request_shape(server, tmp_path, monkeypatch):
    url, srv = server
    from data_testutil import save_png

    png = save_png(str(tmp_path / "a.png"))
    monkeypatch.setenv("JUDGE_TEST_KEY", "sekret")
    j = HttpJudge(_cfg(url + "/good/v1", api_key_env="JUDGE_TEST_KEY"))
    vs = j.judge([_req(i, [png] if i == 0 else []) for i in range(5)])
    assert [v.score for v in vs] == [0.8] * 5 and all(v.error == "" for v in vs)
    assert j.counts == Counter(ok=5)
    path, headers, body = next(r for r in srv.requests
                               if r[0].startswith("/good") and len(r[2]["messages"][0]["content"]) == 2)
    assert path == "/good/v1/chat/completions" and headers["Authorization"] == "Bearer sekret"
    assert body["model"] == "judge-1" and body["temperature"] == 0
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": judge_text(_req(0))}
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(ValueError, match="JUDGE_TEST_KEY"):
        HttpJudge(_cfg(url, api_key_env="JUDGE_TEST_KEY"))


def test_http_garbage_and_unparseable_are_counted_failures_without_retry(server):
    url, srv = server
    j = HttpJudge(_cfg(url + "/garbage"))
    v = j.judge([_req()])[0]
    assert v.score is None and "did not return a chat completion" in v.error
    assert srv.hits["garbage"] == 1 and j.counts == Counter(failed_garbage=1)
    j = HttpJudge(_cfg(url + "/noscore"))
    v = j.judge([_req()])[0]
    assert v.score is None and "unparseable" in v.error and "Looks fine" in v.error
    assert j.counts == Counter(failed_unparseable=1)
    j = HttpJudge(_cfg(url + "/bad"))
    v = j.judge([_req()])[0]
    assert v.score is None and "HTTP 400" in v.error and srv.hits["bad"] == 1  # a 4xx is not retried


def test_http_retries_5xx_with_backoff(server):
    url, srv = server
    j = HttpJudge(_cfg(url + "/flaky", retries=3))
    v = j.judge([_req()])[0]
    assert v.score == 0.8 and srv.hits["flaky"] == 3 and j.counts == Counter(retries=2, ok=1)


def test_http_server_down(server):
    port = free_port()  # nothing listens there
    j = HttpJudge(_cfg(f"http://127.0.0.1:{port}/v1", retries=2))
    t = time.perf_counter()
    v = j.judge([_req()])[0]
    assert v.score is None and "cannot reach" in v.error and "after 3 attempts" in v.error
    assert j.counts == Counter(retries=2, failed_connection=1)
    assert time.perf_counter() - t >= 0.01 + 0.02  # backoff 0.01 then 0.02


def test_http_timeout(server):
    url, srv = server
    j = HttpJudge(_cfg(url + "/slow", retries=1, timeout_s=0.2))
    v = j.judge([_req()])[0]
    assert v.score is None and "within 0.2s" in v.error and "after 2 attempts" in v.error
    assert j.counts == Counter(retries=1, failed_timeout=1)


def test_reward_with_a_down_judge_counts_or_raises(server):
    port = free_port()
    item = PromptItem("o1", "p.jsonl:3", None, None, "Describe the picture.", "open", {})
    cfg = RewardConfig(judge=_cfg(f"http://127.0.0.1:{port}", retries=0, on_failure="exclude"))
    r = build_reward(cfg, build_judge(cfg.judge))
    res = r.score(["\\boxed{a car}"], [item])[0]
    assert res.error.startswith("judge_failed: p.jsonl:3") and res.correct is None and r.counts["judge_failed"] == 1
    cfg.judge.on_failure = "error"
    with pytest.raises(JudgeError, match="cannot reach"):
        build_reward(cfg, build_judge(cfg.judge)).score(["\\boxed{a car}"], [item])


# ----------------------------------------------------------------------------------------------- local judge
@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    """A tiny random SAIL-VL written in the SAIL-VL2 HF layout, and the demo config it goes with."""
    from sail_dist.data.demo import ensure_demo
    from sail_dist.kernels.opset import get_opset
    from sail_dist.model.build import build_model
    from sail_dist.model.hf import save_sailvl

    base = tmp_path_factory.mktemp("judge")
    cfg = load_config(os.path.join(ROOT, "configs", "demo", "demo.yaml"), [f"data.demo_dir={base / 'demo'}"])
    ensure_demo(cfg.data.demo_dir, n_train=40, n_eval=10)
    path = str(base / "hf")
    os.makedirs(path)
    save_sailvl(build_model(cfg.model, get_opset("reference"), seed=3), path, dtype=None)
    return cfg, path


class ScriptedEngine:
    """A RolloutEngine that answers every prompt with fixed token ids."""

    def __init__(self, tokens):
        self.tokens, self.prompts = tokens, []

    def generate(self, prompts, params, n=1):
        self.prompts += prompts
        return [[Completion(list(self.tokens), [0.0] * len(self.tokens), "stop") for _ in range(n)] for _ in prompts]

    def update_weights(self, sd):
        pass


def test_local_judge_parses_the_engine_reply(tiny_judge_dir):
    cfg, path = tiny_judge_dir
    from data_testutil import save_png
    from sail_dist.eval.policy import load_policy

    policy = load_policy(cfg, path, engine_factory=lambda m, c: None)
    reply = policy.builder.template.tok.encode("Right colour.\nScore: 7<|im_end|>", add_special_tokens=False).ids
    eng = ScriptedEngine(reply)
    j = LocalJudge(JudgeConfig(kind="local", path=path), engine=eng, builder=policy.builder)
    png = save_png(os.path.join(os.path.dirname(path), "car.png"))
    vs = j.judge([_req(0, [png]), _req(1, ["/nonexistent.png"]), _req(2)])
    assert vs[0].score == 0.7 and vs[2].score == 0.7
    assert vs[1].score is None and "missing_image" in vs[1].error
    assert j.counts == Counter(ok=2, failed_media=1)
    assert len(eng.prompts) == 2 and eng.prompts[0].num_images >= 1 and eng.prompts[1].num_images == 0


def test_local_judge_tiny_random_model_on_the_sampler(tiny_judge_dir):
    """The real path: HF directory -> model -> the built-in Sampler; a random model's reply is either parsed or
    a counted failure with the reply quoted (it is never a silent 0)."""
    cfg, path = tiny_judge_dir
    jc = JudgeConfig(kind="local", path=path, max_new_tokens=12,
                     tokenizer=os.path.join(cfg.data.demo_dir, "tokenizer"))
    j = build_judge(jc, cfg)
    assert isinstance(j, LocalJudge) and type(j.engine).__name__ == "Sampler"
    vs = j.judge([_req(0), _req(1)])
    assert len(vs) == 2
    for v in vs:
        assert (v.score is not None and 0 <= v.score <= 1) or (v.score is None and "unparseable" in v.error)
    assert sum(j.counts.values()) == 2
