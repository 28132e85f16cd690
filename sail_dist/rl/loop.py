"""The RL loop (the runner of the `rl_verifiable` / `rl_mixed` stages), written once for both backends:

    episode = prompts_per_episode prompts x group_size rollouts (the policy's current weights)
           -> rewards (sail_dist/rl/rewards.py) [+ DAPO overlong shaping] -> group-normalised advantages
           -> dynamic sampling (drop groups whose rewards are all equal, draw more prompts; rl/advantages.py)
           -> prompt + response sequences, balanced over DP ranks x micro-batches (data/balance.py)
           -> old log-probs by the trainer's own forward (engine.token_logprobs)
           -> `ppo_updates` optimizer steps (engine.train_step with the dapo / gspo objective)

Generation (docs/rl.md "Generation in the loop"): on the GPU backend every ZeRO-2 rank holds full parameters,
so every DP rank keeps its own policy copy, refreshed each episode by a local device copy of `engine.model`'s
weights (no gather), and generates its share of each round's prompts (prompt i of the round on rank i % dp);
on the NPU backend (pipeline / expert sharded) `engine.full_state_dict()` gathers one replica on rank 0, which
generates every prompt. Either way each rank scores its own completions, the scored rollouts are all-gathered in
round order, and every rank holds the same rollouts as one rank generating everything (the sampler's draws are
keyed by the prompt's index in the round, not on the rank); every rank builds the same sequences and trains its
share. Every random
choice is a pure function of (seed, episode, round): the sampler's draws are counter-based hashes of its seed
(rollout/sampler.py), the prompt order is a seeded permutation per pass over the prompts, the split into updates
a seeded shuffle per episode. So a checkpoint at an episode boundary (engine + prompt cursor + RNG states)
resumes exactly: a killed and resumed run reproduces the uninterrupted one.

Bad rollouts are counted, never dropped silently: a rollout stopped by the context limit (finish_reason
"context") is reported with its prompt id and trained like a truncated one; a rollout whose reward failed
(a judge error with on_failure=exclude) leaves its group's advantage and the batch, counted; an empty rollout
(no token) has nothing to train and is counted.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from sail_dist.backends.base import model_dtype
from sail_dist.config import Config, dump_config
from sail_dist.data.balance import SampleCost, cost_model_from_config, schedule_step
from sail_dist.data.batch import PackedBatch
from sail_dist.rl.advantages import DynamicSampling, group_advantages, overlong_penalty
from sail_dist.rollout.engine import SamplingParams
from sail_dist.rollout.sampler import pack_prompts
from sail_dist.train import out_of_memory
from sail_dist.train.checkpoint import check_resume_config, load_checkpoint, resolve_resume, save_checkpoint
from sail_dist.train.lr import lr_at
from sail_dist.train.metrics import Metrics
from sail_dist.train.trainer import run_on_backend

log = logging.getLogger("sail_dist")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Rollout:
    """One completion of one prompt, with its reward (plain data: all-gathered from the generating ranks)."""

    item: int  # index into the run's prompt items
    tokens: list[int]
    logprobs: list[float]  # the sampler's, for the mismatch figure
    finish_reason: str
    reward: float  # total incl. overlong shaping; NaN when the reward failed (error)
    correct: bool | None
    format_ok: bool
    error: str = ""
    parts: dict = field(default_factory=dict)
    advantage: float = 0.0


@dataclass
class RLParts:
    """What the loop needs besides the engine; built from the config by `default_parts` (tests pass fakes)."""

    items: list  # PromptItem (sail_dist/rl/prompts.py): prompt PackedBatch, answer, id, kind
    eval_items: list
    reward: object  # .score(texts, items) -> list[RewardResult]
    decode: Callable[[list[int]], str]
    make_rollout: Callable[[torch.nn.Module], object]  # model -> RolloutEngine (generate, update_weights)
    padding_batch: Callable[[], PackedBatch]
    bad_prompts: dict = field(default_factory=dict)


def default_parts(cfg: Config) -> RLParts:
    from sail_dist.data.samples import SampleBuilder, default_tokenizer_dir
    from sail_dist.rl.prompts import load_prompts
    from sail_dist.rl.rewards import build_reward
    from sail_dist.rollout.sampler import Sampler

    if not cfg.rl.prompts:
        raise ValueError("config key 'rl.prompts' is empty: list the prompt JSONL files with ground truth "
                         "(docs/rl.md), e.g. rl.prompts=[{path: prompts.jsonl}]")
    builder = SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg))
    items, bad = load_prompts(cfg, cfg.rl.prompts, builder)
    eval_items, bad_eval = load_prompts(cfg, cfg.rl.eval_prompts, builder) if cfg.rl.eval_prompts else ([], None)
    if not items:
        raise ValueError(f"rl.prompts: no usable prompt in {[s.path for s in cfg.rl.prompts]} "
                         f"(bad records: {bad.summary()})")
    judge = None
    if cfg.rl.reward.judge.kind != "none":
        from sail_dist.rl.judge import build_judge

        judge = build_judge(cfg.rl.reward.judge, cfg)
    return RLParts(items, eval_items, build_reward(cfg.rl.reward, judge), builder.template.decode,
                   lambda model: Sampler.from_config(model, cfg.rl.sampling, cfg.rl.rollout_batch), builder.padding_batch,
                   {"prompts": bad.summary(), **({"eval_prompts": bad_eval.summary()} if bad_eval else {})})


class PromptStream:
    """Prompt indices in a seeded random order per pass over the prompts; its state is one integer."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.pos = n, seed, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            p = self.pos // self.n
            if self._perm is None or self._perm[0] != p:
                self._perm = (p, np.random.default_rng([self.seed, p]).permutation(self.n))
            out.append(int(self._perm[1][self.pos % self.n]))
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.pos = int(sd["pos"])


# ------------------------------------------------------------------------------------------------ sequences
def sequence_batch(prompts: list[PackedBatch], rollouts: list[Rollout], padding: Callable[[], PackedBatch]
                   ) -> PackedBatch:
    """One packed micro-batch of prompt + response sequences: labels on the response tokens only (the label at
    position t is the token at t + 1), extras response_mask / advantage / sampler_logp on those positions.
    No sequence: a padding micro-batch (one token, no label, zero extras)."""
    if not rollouts:
        b = padding()
        b.extras = {k: torch.zeros(b.num_tokens) for k in ("response_mask", "advantage", "sampler_logp")}
        return b
    def with_response(p: PackedBatch, tokens: list[int]) -> PackedBatch:
        ids = torch.cat([p.input_ids.cpu(), torch.tensor(tokens, dtype=torch.long)])
        return dataclasses.replace(p, input_ids=ids, labels=torch.full_like(ids, -100), extras={})

    b = pack_prompts([with_response(p, r.tokens) for p, r in zip(prompts, rollouts)])
    T = b.num_tokens
    mask, adv, slp = torch.zeros(T), torch.zeros(T), torch.zeros(T)
    labels = b.labels.clone()
    for s, (p, r) in enumerate(zip(prompts, rollouts)):
        start = int(b.cu_seqlens[s]) + p.num_tokens - 1  # the last prompt token predicts response token 0
        n = len(r.tokens)
        labels[start:start + n] = torch.tensor(r.tokens, dtype=torch.long)
        mask[start:start + n] = 1.0
        adv[start:start + n] = r.advantage
        slp[start:start + n] = torch.tensor(r.logprobs[:n], dtype=torch.float32)
    b.labels = labels
    b.loss_weight = mask.clone()
    b.extras = {"response_mask": mask, "advantage": adv, "sampler_logp": slp}
    b.sample_ids = [f"{p.sample_ids[0]}#{i}" for i, p in enumerate(prompts)]
    return b


def plan_updates(cfg: Config, rollouts: list[Rollout], prompt_of: Callable[[Rollout], PackedBatch], episode: int,
                 dp_size: int) -> list[list[list[list[int]]]]:
    """Split the episode's trainable rollouts into optimizer steps and each step over DP ranks x micro-batches:
    plan[u][rank][m] = rollout indices. A seeded shuffle per episode picks each step's rollouts; within a step,
    rollouts go longest-first to the lightest of dp * M micro-batches (by the FLOPs cost model), then the balanced
    scheduler (data/balance.py) spreads those micro-batches over the ranks."""
    M = cfg.train.micro_batches
    n_upd = max(1, min(cfg.rl.ppo_updates, len(rollouts)))
    order = np.random.default_rng([cfg.train.seed, episode, 7]).permutation(len(rollouts)).tolist()
    cost = cost_model_from_config(cfg.model)
    merge = cfg.model.adapter.downsample
    costs = []
    for r in rollouts:
        p = prompt_of(r)
        grids = [tuple(g) for g in p.image_grid_hw.tolist()] if p.num_images else []
        costs.append(SampleCost.of(cost, p.num_tokens + len(r.tokens), grids, merge))
    plan = []
    for u in range(n_upd):
        members = order[u::n_upd]
        bins: list[list[int]] = [[] for _ in range(M * dp_size)]
        load = [0.0] * len(bins)
        for i in sorted(members, key=lambda i: (-(costs[i].llm + costs[i].vit), i)):
            j = min(range(len(bins)), key=lambda j: (load[j], j))
            bins[j].append(i)
            load[j] += costs[i].llm + costs[i].vit
        widest = max(sum(costs[i].n_tokens for i in b) for b in bins)
        sched = schedule_step(bins, costs, dp_size, max(widest, cfg.data.pack_tokens), defer_above=-1.0)
        plan.append(sched.ranks)
    return plan


# ------------------------------------------------------------------------------------------------ the loop
def train_rl(cfg: Config, parts: RLParts | None = None) -> dict:
    """Run (or resume) the RL job described by `cfg` (stage rl_verifiable / rl_mixed); returns a summary."""
    return run_on_backend(cfg, lambda cfg, backend, env: run_rl(cfg, backend, env, parts))


def _gather(obj, env) -> list:
    """Every rank's `obj`, in rank order, on every rank (pickled: an episode's rollouts are token-id lists of a
    few MB at the report's 2048 x 4096 tokens, gathered once per generation round next to minutes of decoding)."""
    if env.world_size == 1:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def generation_ranks(cfg: Config, env) -> int:
    """How many ranks generate (ranks 0..k-1, each the prompts i % k == rank of a round): every DP rank on the
    gpu backend (ZeRO-2: full parameters everywhere), rank 0 alone on npu (`rl.rollout_ranks` overrides)."""
    mode = cfg.rl.rollout_ranks
    if mode == "auto":
        mode = "all" if cfg.backend.name == "gpu" else "rank0"
    if mode == "all" and cfg.backend.name != "gpu":
        raise ValueError(f"rl.rollout_ranks=all needs full parameters on every rank (the gpu backend's ZeRO-2); "
                         f"backend.name={cfg.backend.name} shards them (pipeline / experts): use auto or rank0")
    return env.world_size if mode == "all" else 1


def _rollout_model(cfg: Config, env):
    """A generating rank's full policy copy (the sampler's model), on this rank's device."""
    from sail_dist.kernels import get_opset
    from sail_dist.model.sailvl import SailVL

    cuda = env.device.type == "cuda"
    model = SailVL(cfg.model, get_opset("gpu" if cuda else "reference"))
    return model.to(env.device, dtype=model_dtype(cfg, env.device)).eval()


class SharedGeneration:
    """Generate and score prompts spread over the generating ranks; every rank gets every result.

    Ranks 0..k-1 generate (k = `generation_ranks`): rank r the prompts i % k == r of the call, keyed by their
    index i in the call (Sampler `prompt_ids`), so the completions are those of one rank generating all; each
    rank scores its own completions; the scored groups are all-gathered and put back in prompt order. Collective:
    every rank calls `run` with the same prompts (the loop's prompt stream is the same on every rank)."""

    def __init__(self, parts: RLParts, rollout, env, ranks: int) -> None:
        self.parts, self.rollout, self.env, self.ranks = parts, rollout, env, ranks
        self.prompts_by_rank = [0] * env.world_size  # prompts each rank generated, since the last reset

    def share(self, n: int) -> list[int]:
        r = self.env.rank
        return list(range(r, n, self.ranks)) if r < self.ranks else []

    def run(self, items: list, params: SamplingParams, n: int) -> tuple[list[list[tuple]], float]:
        """-> (per prompt, its n (Completion, RewardResult) pairs; the slowest rank's generation seconds)."""
        mine = self.share(len(items))
        rows, gen_s = [], 0.0
        if mine:
            t0 = time.perf_counter()
            comps = self.rollout.generate([items[i].prompt for i in mine], params, n=n, prompt_ids=mine)
            gen_s = time.perf_counter() - t0
            texts = [self.parts.decode(c.tokens) for cs in comps for c in cs]
            results = self.parts.reward.score(texts, [items[i] for i in mine for _ in range(n)])
            rows = [(i, list(zip(cs, results[k * n:(k + 1) * n]))) for k, (i, cs) in enumerate(zip(mine, comps))]
        out: list = [None] * len(items)
        slowest = 0.0
        for r, (part, s) in enumerate(_gather((rows, gen_s), self.env)):
            self.prompts_by_rank[r] += len(part)
            slowest = max(slowest, s)
            for i, pairs in part:
                out[i] = pairs
        missing = [i for i, x in enumerate(out) if x is None]
        if missing:  # a broken rank split would silently shrink the episode
            raise RuntimeError(f"SharedGeneration: prompts {missing[:5]} of {len(items)} came back from no rank")
        return out, slowest


class _Episode:
    """Generation + rewards for one episode on every rank (dynamic sampling's `draw`; collective)."""

    def __init__(self, cfg: Config, parts: RLParts, gen: SharedGeneration, stream: PromptStream, episode: int
                 ) -> None:
        self.cfg, self.parts, self.gen, self.stream, self.episode = cfg, parts, gen, stream, episode
        self.round = 0
        self.gen_tokens = 0
        self.gen_s = 0.0
        self.context_hits: list[str] = []
        self.reward_failed = 0

    def params(self) -> SamplingParams:
        s = self.cfg.rl.sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_new_tokens=s.max_new_tokens, stop_ids=(self.cfg.model.tokens.im_end,),
                              max_context=s.max_context, seed=s.seed + 100_003 * self.episode + 101 * self.round)

    def draw(self, n: int) -> list[list[Rollout]]:
        idx = self.stream.take(n)
        items = [self.parts.items[i] for i in idx]
        scored, gen_s = self.gen.run(items, self.params(), self.cfg.rl.group_size)
        self.gen_s += gen_s
        self.round += 1
        loss = self.cfg.rl.loss
        groups = []
        for i, it, pairs in zip(idx, items, scored):
            group = []
            for c, res in pairs:
                self.gen_tokens += len(c.tokens)
                if c.finish_reason == "context":
                    self.context_hits.append(it.id)
                shaped = res.total + overlong_penalty(len(c.tokens), self.cfg.rl.sampling.max_new_tokens,
                                                      loss.overlong_buffer, loss.overlong_penalty)
                if res.error:
                    self.reward_failed += 1
                group.append(Rollout(i, list(c.tokens), list(c.logprobs), c.finish_reason,
                                     math.nan if res.error else shaped, res.correct, res.format_ok, res.error,
                                     dict(res.parts)))
            groups.append(group)
        return groups


def _scored(group: list[Rollout]) -> list[float]:
    return [r.reward for r in group if not math.isnan(r.reward)]


def evaluate_policy(cfg: Config, parts: RLParts, gen: SharedGeneration) -> dict:
    """Greedy accuracy / format rate / reward on the held-out prompts (collective; the same on every rank)."""
    items = parts.eval_items
    if not items:
        return {}
    s = cfg.rl.sampling
    params = SamplingParams(temperature=0.0, max_new_tokens=s.max_new_tokens, stop_ids=(cfg.model.tokens.im_end,),
                            max_context=s.max_context, seed=s.seed)
    scored, _ = gen.run(items, params, 1)
    res = [pairs[0][1] for pairs in scored]
    return {"accuracy": sum(r.correct is True for r in res) / len(res),
            "format_rate": sum(r.format_ok for r in res) / len(res),
            "reward_mean": float(np.mean([r.total for r in res if not math.isnan(r.total)] or [math.nan])),
            "n": len(res)}


def run_rl(cfg: Config, backend, env, parts: RLParts | None = None,
           on_update: Callable[[Any, int, Any], None] | None = None) -> dict:
    """The loop on a set-up backend (`train_rl` wraps it with setup / teardown). `on_update(engine, step, stats)`
    is called before each optimizer update with stats None and after it with its StepStats (bench/parity.py
    records the first update's gradients this way)."""
    rl, t = cfg.rl, cfg.train
    resume = resolve_resume(cfg)
    meta = check_resume_config(resume, cfg) if resume else None
    parts = parts or default_parts(cfg)
    engine = backend.build(cfg, env)
    stream = PromptStream(len(parts.items), t.seed)
    start, state = 0, {"eval_before": None, "context_total": 0, "reward_failed_total": 0, "empty_total": 0}
    if resume:
        meta, rank_state = load_checkpoint(resume, engine, env.rank, env.world_size, cfg.backend.name)
        stream.load_state_dict(rank_state["prompts"])
        start = meta["step"]
        state.update(meta.get("rl_state", {}))
        log.info("resumed from %s after episode %d", resume, start)
    if env.is_main:
        os.makedirs(t.out_dir, exist_ok=True)
        path = os.path.join(t.out_dir, "config.yaml")
        dump_config(cfg, path + ".tmp")
        os.replace(path + ".tmp", path)
    total_updates = rl.episodes * rl.ppo_updates
    sched = dataclasses.replace(t, steps=total_updates)  # the lr schedule runs over all updates of the run
    metrics = Metrics(t.out_dir, env, total_updates, start * rl.ppo_updates, tensorboard=t.tensorboard)
    n_gen = generation_ranks(cfg, env)
    rollout = parts.make_rollout(_rollout_model(cfg, env)) if env.rank < n_gen else None
    gen = SharedGeneration(parts, rollout, env, n_gen)
    G = rl.group_size
    log.info("RL: %d episodes x %d prompts x %d rollouts, %d updates each, objective %s, on %s, generation on %d "
             "rank(s); logs: %s", rl.episodes, rl.prompts_per_episode, G, rl.ppo_updates, t.objective,
             env.device_name, n_gen, t.out_dir)

    def refresh() -> None:
        if cfg.backend.name == "gpu":
            # ZeRO-2: this rank's engine.model holds the full current parameters; a device-to-device copy, no
            # gather (the copy keeps the training module's MoE count all-reduce out of per-rank generation)
            if rollout is not None:
                rollout.update_weights(engine.model.state_dict())
        else:
            sd = engine.full_state_dict()  # collective: the whole state on rank 0 only
            if env.is_main:
                rollout.update_weights(sd)

    history, last_ckpt = [], resume
    if start == 0 and parts.eval_items:
        refresh()
        state["eval_before"] = evaluate_policy(cfg, parts, gen)
        if env.is_main:
            log.info("held-out before RL: %s", _fmt_eval(state["eval_before"]))
            metrics.log_scalars("eval", state["eval_before"], 0)
    eval_after = None
    for episode in range(start, rl.episodes):
        t_ep = time.perf_counter()
        refresh()
        # ---- generation + rewards + dynamic sampling, on every rank in lockstep: each round's rollouts are
        # all-gathered, so every rank takes the same prompts (cursor checkpointed per rank) and keeps the same groups
        gen.prompts_by_rank = [0] * env.world_size
        ep = _Episode(cfg, parts, gen, stream, episode)
        ds = DynamicSampling(rl.prompts_per_episode, rl.loss.max_gen_rounds, rl.loss.dynamic_sampling)
        got = ds.run(ep.draw, _scored, lambda g: parts.items[g[0].item].id)
        payload = {"kept": got.kept, "drawn": got.drawn, "dropped": got.dropped, "rounds": got.rounds,
                   "gen_s": ep.gen_s, "gen_tokens": ep.gen_tokens, "context": ep.context_hits,
                   "reward_failed": ep.reward_failed}
        groups: list[list[Rollout]] = payload["kept"]
        # ---- advantages over the scored rollouts of each group
        for g in groups:
            scored = [r for r in g if not math.isnan(r.reward)]
            if len(scored) > 1:
                adv = group_advantages(torch.tensor([[r.reward for r in scored]]), rl.loss.adv_eps)[0].tolist()
                for r, a in zip(scored, adv):
                    r.advantage = a
        everything = [r for g in groups for r in g]
        trainable = [r for r in everything if not math.isnan(r.reward) and r.tokens]
        empty = sum(1 for r in everything if not r.tokens)
        state["context_total"] += len(payload["context"])
        state["reward_failed_total"] += payload["reward_failed"]
        state["empty_total"] += empty
        if payload["context"] and env.is_main:
            log.warning("episode %d: %d rollout(s) reached the context limit rl.sampling.max_context=%d (trained "
                        "as truncated; prompts %s)", episode + 1, len(payload["context"]), rl.sampling.max_context,
                        sorted(set(payload["context"]))[:5])
        # ---- sequences, old log-probs, updates
        t_old = t_upd = 0.0
        upd_stats = []
        if trainable and any(r.advantage != 0 for r in trainable):
            plan = plan_updates(cfg, trainable, lambda r: parts.items[r.item].prompt, episode, env.dp_size)
            steps = [[sequence_batch([parts.items[trainable[i].item].prompt for i in mb],
                                     [trainable[i] for i in mb], parts.padding_batch)
                      for mb in upd[env.dp_rank]] for upd in plan]
            t0 = time.perf_counter()
            flat = [b for s in steps for b in s]
            lps = engine.token_logprobs(flat)
            t_old = time.perf_counter() - t0
            mism = torch.zeros(3, dtype=torch.float64)  # sum |diff|, count, max
            for b, lp in zip(flat, lps):
                m = b.extras["response_mask"]
                b.extras["old_logp"] = lp * m if lp is not None else torch.zeros_like(m)
                if lp is not None and m.sum() > 0:
                    d = (lp - b.extras["sampler_logp"]).abs()[m > 0].double()
                    mism += torch.tensor([float(d.sum()), float(d.numel()), 0.0], dtype=torch.float64)
                    mism[2] = max(float(mism[2]), float(d.max()))
            if dist.is_initialized() and env.world_size > 1:
                mx = mism[2:].clone()
                dist.all_reduce(mism)
                dist.all_reduce(mx, op=dist.ReduceOp.MAX)
                mism[2] = mx[0]
            t0 = time.perf_counter()
            for u, mbs in enumerate(steps):
                step = episode * rl.ppo_updates + u
                if on_update:
                    on_update(engine, step, None)
                with out_of_memory.explained(cfg, step + 1, env.rank, last_ckpt, env.device):
                    s = engine.train_step(mbs, lr_at(sched, step))
                if on_update:
                    on_update(engine, step, s)
                upd_stats.append(metrics.log_step(step, s, {"episode": episode + 1}, every=t.log_every))
            t_upd = time.perf_counter() - t0
            train_tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in upd_stats)
        else:
            mism = torch.tensor([0.0, 0.0, math.nan], dtype=torch.float64)
            train_tokens = 0.0
            if env.is_main:
                log.warning("episode %d: no rollout with a non-zero advantage (every group's rewards equal): no "
                            "update", episode + 1)
        # ---- metrics of the episode
        rewards = [r.reward for r in everything if not math.isnan(r.reward)]
        lens = [len(r.tokens) for r in everything]
        lp_all = [x for r in everything for x in r.logprobs]
        s_cfg = rl.sampling
        plain = s_cfg.temperature == 1.0 and s_cfg.top_p == 1.0 and s_cfg.top_k == 0
        row = {"reward_mean": float(np.mean(rewards)) if rewards else math.nan,
               "reward_std": float(np.std(rewards)) if rewards else math.nan,
               "accuracy": float(np.mean([r.correct is True for r in everything])) if everything else math.nan,
               "format_rate": float(np.mean([r.format_ok for r in everything])) if everything else math.nan,
               "response_len_mean": float(np.mean(lens)) if lens else 0.0,
               "response_len_max": float(max(lens)) if lens else 0.0,
               # entropy: Monte-Carlo estimate -mean log p(sampled token) (exact in expectation only for plain
               # temperature-1 sampling; n/a otherwise: the sampler reports no full distribution)
               "entropy": -float(np.mean(lp_all)) if (plain and lp_all) else math.nan,
               "drop_rate": payload["dropped"] / payload["drawn"] if payload["drawn"] else 0.0,
               "groups": len(groups), "gen_rounds": payload["rounds"], "rollouts": len(everything),
               "generated_prompts_per_rank": list(gen.prompts_by_rank),
               "context_limit_hits": len(payload["context"]), "reward_failed": payload["reward_failed"],
               "empty_rollouts": empty,
               "rollout_tokens_per_s": payload["gen_tokens"] / max(payload["gen_s"], 1e-9),
               "train_tokens_per_s": train_tokens / max(t_upd, 1e-9),
               "time_generate_s": payload["gen_s"], "time_old_logprobs_s": t_old, "time_update_s": t_upd,
               "logprob_mismatch_mean": float(mism[0] / mism[1]) if mism[1] > 0 else math.nan,
               "logprob_mismatch_max": float(mism[2]), "updates": len(upd_stats)}
        for k in ("clip_frac", "approx_kl", "pg_loss", "kl_ref"):
            vals = [r[f"objective_{k}"] for r in upd_stats if f"objective_{k}" in r]
            row[k] = float(np.mean(vals)) if vals else math.nan
        row["loss"] = float(np.mean([r["loss"] for r in upd_stats])) if upd_stats else math.nan
        row["time_episode_s"] = time.perf_counter() - t_ep
        if rl.eval_every and (episode + 1) % rl.eval_every == 0 and episode + 1 < rl.episodes and parts.eval_items:
            refresh()
            ev = evaluate_policy(cfg, parts, gen)
            row.update({f"eval_{k}": v for k, v in ev.items()})
        history.append(row)
        if env.is_main:
            # on the optimizer-step axis of the per-update rows, so a resume's log truncation (Metrics) cuts both
            metrics.log_scalars("rl", {"episode": episode + 1, **{k: v for k, v in row.items() if isinstance(
                v, (int, float)) and math.isfinite(float(v))}}, (episode + 1) * rl.ppo_updates)
            log.info("episode %d/%d | reward %.3f +- %.3f | acc %.3f | format %.3f | len %.0f (max %.0f) | clip %.3f"
                     " | kl %.2e | entropy %s | drop %.2f (%d rounds) | mismatch %.1e / %.1e | gen %.1fs (%.0f tok/s)"
                     " old %.1fs upd %.1fs (%.0f tok/s)", episode + 1, rl.episodes, row["reward_mean"],
                     row["reward_std"], row["accuracy"], row["format_rate"], row["response_len_mean"],
                     row["response_len_max"], row["clip_frac"], row["approx_kl"],
                     "n/a" if math.isnan(row["entropy"]) else f"{row['entropy']:.3f}", row["drop_rate"],
                     row["gen_rounds"], row["logprob_mismatch_mean"], row["logprob_mismatch_max"], row["time_generate_s"],
                     row["rollout_tokens_per_s"], t_old, t_upd, row["train_tokens_per_s"])
        done = episode + 1
        if rl.save_every and (done % rl.save_every == 0 or done == rl.episodes):
            last_ckpt = save_checkpoint(cfg, engine, done, env.rank, env.world_size,
                                        {"prompts": stream.state_dict()}, {"rl_state": state})
    if parts.eval_items and (start < rl.episodes or state["eval_before"] is None):
        refresh()
        eval_after = evaluate_policy(cfg, parts, gen)
        if env.is_main:
            log.info("held-out after RL: %s (before: %s)", _fmt_eval(eval_after), _fmt_eval(state["eval_before"]))
            metrics.log_scalars("eval", eval_after, rl.episodes * rl.ppo_updates)
    summary = {"episodes": rl.episodes, "complete": True, "resumed_from": start, "checkpoint": last_ckpt,
               "history": history, "eval_before": state["eval_before"], "eval_after": eval_after,
               "context_limit_hits": state["context_total"], "reward_failed": state["reward_failed_total"],
               "empty_rollouts": state["empty_total"], "bad_prompts": parts.bad_prompts,
               "metrics": os.path.join(t.out_dir, "metrics.jsonl"), "is_main": env.is_main,
               # the fields a recipe's summary table reads (sail_dist/stages/recipe.py)
               "steps": rl.episodes * rl.ppo_updates, "rollouts": sum(h.get("rollouts", 0) for h in history),
               "final_loss": history[-1]["loss"] if history else None, "eval": eval_after}
    if t.export_hf:
        sd = engine.full_state_dict()
        if env.is_main:
            from sail_dist.model import hf

            model = _rollout_model(cfg, env).float()
            model.load_state_dict(sd)
            summary["hf_export"] = os.path.join(t.out_dir, "hf")
            hf.save_sailvl(model, summary["hf_export"])
    metrics.close()
    return summary


def _fmt_eval(ev: dict | None) -> str:
    if not ev:
        return "n/a"
    return f"accuracy {100 * ev['accuracy']:.1f}%, format {100 * ev['format_rate']:.1f}% over {ev['n']} prompts"
