"""The RL loop (sail_dist/rl/loop.py): sequences and labels of a rollout batch, the split of an episode into updates
and micro-batches, the prompt order's resumable state; on CPU with the tiny model, the real Sampler and a scripted
reward: a run of N episodes straight equals K episodes + kill + resume + N - K (rewards, losses, clip fractions,
held-out accuracy), rollouts stopped by the context limit are reported and counted, not dropped, and every GPU-backend
rank generating its share of the prompts gives the rollouts and updates of rank 0 generating everything."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, require, require_mcore_checkpoints
from sail_dist.config import load_config
from sail_dist.rl.loop import PromptStream, Rollout, plan_updates, sequence_batch

TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")


def _prompt(ids: list[int], sid: str):
    from sail_dist.data.batch import PackedBatch

    n = len(ids)
    return PackedBatch(input_ids=torch.tensor(ids), labels=torch.full((n,), -100), position_ids=torch.arange(n),
                       cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n, loss_weight=torch.zeros(n),
                       sample_ids=[sid])


def _pad():
    return _prompt([0], "<pad>")


def test_sequence_batch_puts_labels_and_extras_on_the_response_only():
    p1, p2 = _prompt([11, 12, 13], "a"), _prompt([21, 22], "b")
    r1 = Rollout(0, [31, 32], [-0.5, -0.25], "stop", 1.0, True, True, advantage=0.7)
    r2 = Rollout(1, [41, 42, 43], [-1.0, -2.0, -3.0], "length", 0.0, False, True, advantage=-0.7)
    b = sequence_batch([p1, p2], [r1, r2], _pad)
    b.validate()
    assert b.input_ids.tolist() == [11, 12, 13, 31, 32, 21, 22, 41, 42, 43]
    # the label at t is the token at t + 1 within the sequence; prompt positions and each last token: -100
    assert b.labels.tolist() == [-100, -100, 31, 32, -100, -100, 41, 42, 43, -100]
    assert b.extras["response_mask"].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    assert torch.allclose(b.extras["advantage"], torch.tensor([0, 0, .7, .7, 0, 0, -.7, -.7, -.7, 0]))
    assert b.extras["sampler_logp"].tolist() == [0, 0, -0.5, -0.25, 0, 0, -1, -2, -3, 0]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    empty = sequence_batch([], [], _pad)
    assert empty.num_tokens == 1 and float(empty.extras["response_mask"].sum()) == 0


def test_plan_updates_covers_every_rollout_once_with_equal_micro_batch_counts():
    cfg = load_config(TINY, ["data.demo=true", "rl.ppo_updates=3", "train.micro_batches=2"])
    prompts = [_prompt(list(range(16, 16 + 5 + i)), f"p{i}") for i in range(5)]
    rollouts = [Rollout(i % 5, [16] * (3 + 2 * i), [0.0] * (3 + 2 * i), "stop", 1.0, True, True) for i in range(14)]
    plan = plan_updates(cfg, rollouts, lambda r: prompts[r.item], episode=4, dp_size=2)
    assert len(plan) == 3 and all(len(u) == 2 and all(len(rank) == 2 for rank in u) for u in plan)
    seen = sorted(i for u in plan for rank in u for mb in rank for i in mb)
    assert seen == list(range(14))
    again = plan_updates(cfg, rollouts, lambda r: prompts[r.item], episode=4, dp_size=2)
    assert again == plan  # a pure function of (seed, episode): resume replans the same
    assert plan_updates(cfg, rollouts, lambda r: prompts[r.item], episode=5, dp_size=2) != plan


def test_prompt_stream_order_is_seeded_and_resumable():
    a = PromptStream(5, seed=3)
    first = a.take(7)
    assert sorted(first[:5]) == list(range(5))  # a permutation per pass
    b = PromptStream(5, seed=3)
    b.load_state_dict({"pos": 4})
    assert b.take(3) == first[4:7]


@pytest.mark.slow
def test_rl_loop_resume_reproduces_the_uninterrupted_run_and_counts_context_hits(tmp_path):
    require("deepspeed")
    out = tmp_path / "runs"
    args = ["train.objective=dapo", "rl.episodes=2", "rl.prompts_per_episode=2", "rl.group_size=4",
            "rl.ppo_updates=2", "rl.sampling.max_new_tokens=6", "rl.sampling.max_context=18", "train.lr=1e-3",
            # constant: a cosine schedule runs over rl.episodes x ppo_updates, which the first (killed) run shortens
            "train.lr_schedule=constant", "train.warmup_steps=0",
            "train.tensorboard=false", "rl.loss.max_gen_rounds=2"]

    def run(name: str, *extra: str) -> dict:  # one process per run (DeepSpeed keeps process groups per process)
        res = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "dist", "rl_loop_run.py"), str(res), TINY,
                            *args, *extra], env=child_env(), capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        return json.loads(res.read_text())

    straight = run("straight", f"train.out_dir={out}/straight")
    first = run("first", f"train.out_dir={out}/split", "rl.episodes=1")  # then the process ends: a kill
    resumed = run("resumed", f"train.out_dir={out}/split", "train.resume=auto")
    assert resumed["resumed_from"] == 1 and len(straight["history"]) == 2 and len(resumed["history"]) == 1
    keys = ("reward_mean", "accuracy", "loss", "clip_frac", "approx_kl", "response_len_mean", "drop_rate",
            "logprob_mismatch_mean", "context_limit_hits")
    for k in keys:
        assert first["history"][0][k] == pytest.approx(straight["history"][0][k], rel=1e-9, abs=1e-12), k
        assert resumed["history"][0][k] == pytest.approx(straight["history"][1][k], rel=1e-9, abs=1e-12), k
    assert resumed["eval_after"] == straight["eval_after"] and resumed["eval_before"] == straight["eval_before"]
    # per-update losses (metrics.jsonl): the split run's two processes wrote steps 1-2 and 3-4
    def losses(d):
        return [json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in line
                and "rl" not in json.loads(line)]
    a, b = losses(out / "straight"), losses(out / "split")
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-9)
    assert straight["history"][0]["loss"] != straight["history"][1]["loss"]  # it trains
    # the mismatch figure: sampler and trainer run the same reference ops here (fp32): tiny, but measured
    assert 0 <= straight["history"][0]["logprob_mismatch_max"] < 1e-4
    # prompts of 12-14 tokens + 6 new tokens exceed max_context=18: those rollouts stop with "context", are counted
    # and still trained (every rollout of a kept group is in the batch)
    hits = sum(h["context_limit_hits"] for h in straight["history"])
    assert hits > 0 and straight["context_limit_hits"] == hits
    for h in straight["history"]:
        assert h["rollouts"] == h["groups"] * 4


def test_demo_task_prompts_load_as_verifiable_prompts_and_the_curve_is_drawn(tmp_path):
    from PIL import Image

    from sail_dist.data.samples import SampleBuilder, default_tokenizer_dir
    from sail_dist.rl.demo_task import draw_curve, make_prompts
    from sail_dist.rl.prompts import load_prompts
    from sail_dist.rl.rewards import answers_match

    demo = os.path.join(ROOT, "configs", "demo", "rl.yaml")
    path = make_prompts(str(tmp_path / "train.jsonl"), 12, seed=5, image_size=112, arith=0.25)
    assert open(path).read() == open(make_prompts(str(tmp_path / "again.jsonl"), 12, seed=5, image_size=112,
                                                  arith=0.25)).read().replace("again_", "train_")
    from sail_dist.data.demo import ensure_demo

    demo_dir = str(tmp_path / "demo")
    ensure_demo(demo_dir)  # the demo tokenizer: a fresh clone has none yet
    cfg = load_config(demo, [f"rl.prompts=[{{path: {path}}}]", "train.init_from=", f"data.demo_dir={demo_dir}"])
    builder = SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg))
    items, bad = load_prompts(cfg, cfg.rl.prompts, builder)
    assert len(items) == 12 and not bad.counts
    rows = [json.loads(line) for line in open(path)]
    for it, row in zip(items, rows):
        if row["task"] == "count":
            # the picture's circles: distinct blobs of the circle colour along the 3x3 slot centres
            img = Image.open(tmp_path / row["image"]).convert("RGB")
            cell = 112 // 3
            filled = sum(max(img.getpixel((c * cell + cell // 2, r * cell + cell // 2))) -
                         min(img.getpixel((c * cell + cell // 2, r * cell + cell // 2))) > 60
                         for r in range(3) for c in range(3))
            assert str(filled) == row["answer"]
            assert it.prompt.num_images == 1
        assert answers_match(f"<think>\nx\n</think>\n\n\\boxed{{{row['answer']}}}", it.answer)
    png = draw_curve([{"reward_mean": 0.5, "accuracy": 0.3}, {"reward_mean": 0.9, "accuracy": 0.6}],
                     {"accuracy": 0.25}, {"accuracy": 0.55}, str(tmp_path / "curve.png"))
    im = Image.open(png)
    assert im.size == (720, 420) and len(set(im.getdata())) > 3


def test_demo_curve_plots_negative_and_above_one_rewards_at_their_value(tmp_path):
    from PIL import Image

    from sail_dist.rl.demo_task import curve_range, draw_curve

    hist = [{"reward_mean": -0.5, "accuracy": 0.0}, {"reward_mean": 1.25, "accuracy": 1.0}]
    assert curve_range(hist) == (-0.5, 1.25)
    assert curve_range([{"reward_mean": 0.5}, {"reward_mean": float("nan")}]) == (0.0, 1.0)
    im = Image.open(draw_curve(hist, None, None, str(tmp_path / "c.png"))).convert("RGB")
    # plot box y from 40 (top, 1.25) to 370 (bottom, -0.5): the episode-1 reward dot (red) sits at the bottom
    # edge, i.e. below the grey zero line at 370 - 330 * 0.5 / 1.75, not clamped onto it
    W, L, R = 720, 60, 170
    x1 = L + (W - L - R) // 2
    reds = [y for y in range(420) for x in range(x1 - 2, x1 + 3) if im.getpixel((x, y)) == (200, 40, 40)]
    zero_y = 370 - 330 * 0.5 / 1.75
    assert reds and min(reds) > zero_y + 50 and max(reds) >= 369


def test_sampler_prompt_ids_make_a_split_batch_generate_what_the_whole_batch_does():
    """What SharedGeneration relies on: prompts i % 2 == r on 'rank' r, keyed by their index in the whole call."""
    from sail_dist.kernels import get_opset
    from sail_dist.model.sailvl import SailVL
    from sail_dist.rollout.engine import SamplingParams
    from sail_dist.rollout.sampler import Sampler

    sys.path.insert(0, os.path.join(ROOT, "tests", "dist"))
    from rl_loop_run import prompt_items

    cfg = load_config(TINY, ["data.demo=true"])
    model = SailVL(cfg.model, get_opset("reference")).eval()
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(0))  # a spread-out next-token distribution
    prompts = [it.prompt for it in prompt_items(cfg, 5, 100, "p")]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=11)
    whole = Sampler(model).generate(prompts, params, n=3)
    for r in range(2):
        ids = list(range(r, 5, 2))
        part = Sampler(model).generate([prompts[i] for i in ids], params, n=3, prompt_ids=ids)
        for i, cs in zip(ids, part):
            assert [c.tokens for c in cs] == [c.tokens for c in whole[i]]
            for c, w in zip(cs, whole[i]):
                assert c.logprobs == pytest.approx(w.logprobs, rel=1e-6, abs=1e-6)  # another batch: GEMM rounding
    assert len({t for cs in whole for c in cs for t in c.tokens}) > 10  # real draws, not one forced token
    # without prompt_ids a part is keyed by its own positions: other draws (the ids do matter)
    alone = Sampler(model).generate(prompts[1:], params, n=3)
    assert [c.tokens for cs in alone for c in cs] != [c.tokens for cs in whole[1:] for c in cs]
    with pytest.raises(ValueError, match="prompt_ids"):
        Sampler(model).generate(prompts, params, n=1, prompt_ids=[0])


@pytest.mark.slow
def test_rl_loop_same_updates_on_both_backends(tmp_path):
    """The whole loop (sampler on rank 0, broadcast, balanced micro-batches, old log-probs, two updates) under
    torchrun, 2 ranks: GPU backend (ZeRO-2, dp 2) vs NPU backend (Megatron pp 2): the same rollouts and rewards and
    per-update losses / gradient norms within 1e-5."""
    require("deepspeed")
    require_mcore_checkpoints()  # (the loop checkpoints the NPU backend at its end)
    from conftest import torchrun_cmd

    args = ["train.objective=dapo", "rl.episodes=1", "rl.prompts_per_episode=3", "rl.group_size=4",
            "rl.ppo_updates=2", "rl.sampling.max_new_tokens=6", "rl.sampling.max_context=18",
            "train.micro_batches=2", "train.tensorboard=false"]

    def run(name: str, *extra: str) -> tuple[dict, list[dict]]:
        res, out = tmp_path / f"{name}.json", tmp_path / name
        cmd = torchrun_cmd(2, os.path.join(ROOT, "tests", "dist", "rl_loop_run.py"), str(res), TINY, *args,
                           f"train.out_dir={out}", *extra)
        r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
        return json.loads(res.read_text()), [s for s in steps if "loss" in s and "rl" not in s]

    gpu, gs = run("gpu", "backend.name=gpu")
    npu, ns = run("npu", "backend.name=npu", "parallel.pp=2")
    g, n = gpu["history"][0], npu["history"][0]
    for k in ("reward_mean", "accuracy", "response_len_mean", "context_limit_hits", "rollouts"):
        assert g[k] == n[k], k
    assert len(gs) == len(ns) == 2
    for a, b in zip(gs, ns):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["objective_response_tokens"] == b["objective_response_tokens"]


@pytest.mark.slow
def test_parity_sh_stage_rl_verifiable_agrees_on_both_backends(tmp_path):
    """`launch/parity.sh 3 npu_tiny_moe.yaml --stage rl_verifiable`: one RL episode (demo counting prompts, the
    built-in sampler, 3 policy updates; GSPO as the stage picks for an MoE model) on the GPU backend (ZeRO-2 DP 2)
    and the NPU backend (PP 2 x EP 2 x DP 2): per-update losses and the first update's gradient tensors within 1e-5.
    lr 1e-3 so that the later updates' ratios move off 1 (clipping can act). DAPO across the backends: the loop
    test above (the objective is written once for both engines; tests/test_rl_losses.py checks each by hand)."""
    require("deepspeed", "megatron.core")
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "parity.sh"), "3",
                        os.path.join(ROOT, "configs", "demo", "npu_tiny_moe.yaml"), "--stage", "rl_verifiable",
                        f"data.demo_dir={tmp_path / 'demo'}", "train.objective=gspo", "train.lr=1e-3"],
                       cwd=ROOT, env=child_env(OUT_DIR=str(tmp_path / "out")), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == 3
    assert summary["max_loss_rel"] <= 1e-5 and summary["max_grad_rel"] <= 1e-5
    runs = [json.load(open(tmp_path / "out" / f"{b}.json")) for b in ("gpu", "npu")]
    losses = [s["loss"] for s in runs[0]["steps"]]
    assert all(s["loss"] != 0 for s in runs[0]["steps"]) and len(set(losses)) == 3  # real, distinct updates
    assert "llm.layers.0.mlp.experts.w_gate_up" in r.stdout


def test_rl_stages_pick_the_loss_by_model_kind_and_need_prompts():
    from sail_dist.config import ConfigError

    moe = os.path.join(ROOT, "configs", "model", "tiny_moe.yaml")
    p = "rl.prompts=[{path: p.jsonl}]"
    dense = load_config(TINY, ["data.demo=true", p], stage="rl_verifiable")
    assert dense.train.objective == "dapo" and dense.train.lr == 1e-6 and dense.train.lr_schedule == "constant"
    assert (dense.rl.prompts_per_episode * dense.rl.group_size, dense.rl.ppo_updates) == (2048, 8)
    assert (dense.rl.sampling.max_context, dense.rl.sampling.max_new_tokens) == (16384, 4096)
    assert dense.rl.loss.dapo_clip == [0.20, 0.28] and dense.rl.reward.weights == {"answer": 1.0, "format": 0.5}
    mixed = load_config(moe, ["data.demo=true", p], stage="rl_mixed")
    assert mixed.train.objective == "gspo" and set(mixed.rl.reward.weights) == {"answer", "think", "format"}
    assert load_config(moe, ["data.demo=true", p, "train.objective=dapo"], stage="rl_mixed").train.objective == "dapo"
    with pytest.raises(ConfigError, match="rl.prompts.*needs prompt JSONL"):
        load_config(TINY, ["data.demo=true"], stage="rl_verifiable")


@pytest.mark.slow
def test_rl_loop_every_gpu_rank_generates_its_share_with_the_rollouts_of_rank0_generating_all(tmp_path):
    """GPU backend, 2 ranks (ZeRO-2, CPU over gloo), 2 episodes with dynamic-sampling refill rounds and context-limit
    hits: rl.rollout_ranks=all (each rank the prompts i % 2 == rank of each round) vs rank0 (rank 0 generates every
    prompt: the loop before this change). Per generate call, the two ranks' shares put together are exactly rank 0's
    completions (tokens exactly; log-probs to 1e-6: other batches round GEMMs differently), each rank generated only its share, and the episodes' rewards, counts,
    per-update losses and gradient norms are the same."""
    require("deepspeed")
    from conftest import torchrun_cmd

    args = ["backend.name=gpu", "train.objective=dapo", "rl.episodes=2", "rl.prompts_per_episode=3",
            "rl.group_size=4", "rl.ppo_updates=2", "rl.sampling.max_new_tokens=6", "rl.sampling.max_context=18",
            "rl.loss.max_gen_rounds=3", "train.micro_batches=2", "train.lr=1e-3", "train.tensorboard=false",
            "rl.save_every=0"]

    def run(name: str, mode: str):
        res, out = tmp_path / f"{name}.json", tmp_path / name
        cmd = torchrun_cmd(2, os.path.join(ROOT, "tests", "dist", "rl_loop_run.py"), str(res), TINY, *args,
                           f"train.out_dir={out}", f"rl.rollout_ranks={mode}")
        r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
        calls = [json.loads((tmp_path / f"{name}.json.rank{k}.json").read_text()) for k in range(2)]
        return json.loads(res.read_text()), [s for s in steps if "loss" in s and "rl" not in s], calls

    shared, s_steps, s_calls = run("all", "all")
    alone, a_steps, a_calls = run("rank0", "rank0")
    assert a_calls[1] == [] and len(a_calls[0]) == len(s_calls[0])
    rank1 = iter(s_calls[1])  # rank 1 skips a call whose share is empty (a round of one prompt)
    for whole, part0 in zip(a_calls[0], s_calls[0]):
        n = len(whole["ids"])
        part1 = next(rank1) if n > 1 else {"ids": [], "tokens": [], "logprobs": []}
        assert whole["ids"] == list(range(n))
        assert part0["ids"] == list(range(0, n, 2)) and part1["ids"] == list(range(1, n, 2))  # only its share
        merged = {}
        for part in (part0, part1):
            for i, toks, lps in zip(part["ids"], part["tokens"], part["logprobs"]):
                merged[i] = (toks, lps)
        for i in range(n):
            assert merged[i][0] == whole["tokens"][i], (i, merged[i][0], whole["tokens"][i])
            for a, b in zip(merged[i][1], whole["logprobs"][i]):
                assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    assert next(rank1, None) is None
    rounds = sum(h["gen_rounds"] for h in alone["history"])
    assert rounds > 2  # a refill round ran (some group's rewards were all equal)
    for h_s, h_a in zip(shared["history"], alone["history"]):
        for k in ("reward_mean", "accuracy", "response_len_mean", "context_limit_hits", "rollouts", "groups",
                  "gen_rounds", "drop_rate", "updates"):
            assert h_s[k] == h_a[k], k
        assert sum(h_s["generated_prompts_per_rank"]) == sum(h_a["generated_prompts_per_rank"])
        assert h_a["generated_prompts_per_rank"][1] == 0 and h_s["generated_prompts_per_rank"][1] > 0
    assert sum(h["context_limit_hits"] for h in alone["history"]) > 0
    assert shared["eval_before"] == alone["eval_before"] and shared["eval_after"] == alone["eval_after"]
    assert len(s_steps) == len(a_steps) == 4
    for a, b in zip(s_steps, a_steps):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


def test_generation_ranks_every_gpu_rank_by_default_rank0_on_npu_and_all_refused_there():
    from sail_dist.backends.base import DistEnv
    from sail_dist.config import ConfigError
    from sail_dist.rl.loop import SharedGeneration, generation_ranks

    env = DistEnv(rank=1, world_size=4, dp_rank=1, dp_size=4)
    cfg = lambda *o: load_config(TINY, ["data.demo=true", *o])  # noqa: E731
    assert generation_ranks(cfg("backend.name=gpu"), env) == 4
    assert generation_ranks(cfg("backend.name=gpu", "rl.rollout_ranks=rank0"), env) == 1
    assert generation_ranks(cfg("backend.name=npu"), env) == 1
    with pytest.raises(ValueError, match="rollout_ranks=all.*npu"):
        generation_ranks(cfg("backend.name=npu", "rl.rollout_ranks=all"), env)
    with pytest.raises(ConfigError, match="rollout_ranks"):
        cfg("rl.rollout_ranks=some")
    assert SharedGeneration(None, None, env, 4).share(10) == [1, 5, 9]
    assert SharedGeneration(None, None, env, 1).share(10) == []
