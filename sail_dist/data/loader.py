"""Per-rank step loader: every optimizer step, this DP rank's packed, balanced micro-batches.

Design: all DP ranks run the same cheap, deterministic *planning* over the global sample stream
(records -> metadata from file headers -> stream packer -> step scheduler), so they agree on the whole
step without any communication; each rank then *materialises* (decodes pixels for) only its own packs.

    SourceMix ──> describe (tokens, tiles) ──> StreamPacker ──> schedule_step ──> this rank's packs
      (seeded)        (bad samples counted)      (BFD, long)     (LLM + ViT)        │ decode in workers
                                                                                    v
                                                                   DataStep(micro_batches, stats)

Determinism and resume: the plan depends only on (seed, sources, config); `state_dict()` after step k holds
the stream position, the packer buffer (as record keys), deferred samples and the bad-sample counters, so
`load_state_dict` + iterating gives exactly the batches the uninterrupted run would have given. The stream
is global, so the state is the same on every rank, and it loads at another DP size or micro-batch count (elastic
resume): the stream continues where it stopped and every sample drawn is trained exactly once across the boundary,
in steps of the new size (docs/data.md, "Elastic resume").

Background: with num_workers > 0 a planner thread runs up to `prefetch` steps ahead and a thread pool decodes
this rank's micro-batches (PIL and numpy release the GIL), so the device never waits on image decoding.
"""
from __future__ import annotations

import copy
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from sail_dist.config import Config, DataSource
from sail_dist.data.balance import imbalance, schedule_step
from sail_dist.data.batch import PackedBatch
from sail_dist.data.packing import StreamPacker
from sail_dist.data.records import BadSample, BadSampleLog, SourceMix, handle_bad, open_sources
from sail_dist.data.samples import SampleBuilder, SampleMeta, default_tokenizer_dir

STATE_VERSION = 1


@dataclass
class DataStepStats:
    """What happened in one optimizer step; planning figures are global (identical on all ranks)."""

    step: int  # index of this optimizer step (0-based)
    epoch: float  # passes over the data mix so far (records drawn / records in all sources)
    samples: int  # samples trained in this step, all ranks
    tokens: int  # tokens in this step, all ranks
    vision_tokens: int
    utilisation: float  # tokens / capacity (micro-batches x pack_tokens; a lone long sample: its own length)
    llm_imbalance: float  # max / mean per-rank LLM cost
    vision_imbalance: float  # max / mean per-rank vision tokens
    long_samples: int  # lone over-long micro-batches in this step
    deferred: int  # samples moved to a later step by the scheduler
    dropped: dict[str, int] = field(default_factory=dict)  # samples dropped while planning, per reason
    rank_samples: int = 0
    rank_tokens: int = 0
    decode_dropped: dict[str, int] = field(default_factory=dict)  # this rank only: dropped at decode (skip)
    plan_s: float = 0.0  # planning time of this step (background when num_workers > 0)
    wait_s: float = 0.0  # how long the consumer waited for this step
    # the realised mix (all ranks, planned samples of this step; decode-time drops not subtracted): per source
    # name and per modality ("image" | "video" | "text"; a record with a video counts as video), and the same
    # counts summed over the run so far (part of the loader state, so exact across resume)
    source_samples: dict[str, int] = field(default_factory=dict)
    modality_samples: dict[str, int] = field(default_factory=dict)
    source_samples_total: dict[str, int] = field(default_factory=dict)
    modality_samples_total: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DataStep:
    micro_batches: list[PackedBatch]
    stats: DataStepStats


@dataclass
class _Plan:
    stats: DataStepStats
    own: list[list[SampleMeta]]  # this rank's micro-batches
    state_after: dict
    error: BaseException | None = None


def data_sources(cfg: Config) -> list[DataSource]:
    """data.sources, or the demo's train split (generated on first use) with data.demo."""
    if cfg.data.demo:
        from sail_dist.data.demo import ensure_demo

        paths = ensure_demo(cfg.data.demo_dir)
        return [DataSource(path=paths.train, name="demo")]
    return list(cfg.data.sources)


class StepLoader:
    """Iterate `DataStep`s: `for step in loader: engine.train_step(step.micro_batches, lr)`. Infinite (epochs
    roll over with a new seeded order); call `close()` (or use it as a context manager) to stop workers."""

    def __init__(self, cfg: Config, dp_rank: int = 0, dp_size: int = 1, micro_batches: int | None = None,
                 builder: SampleBuilder | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.cfg, self.data = cfg, cfg.data
        self.rank, self.world = dp_rank, dp_size
        self.M = micro_batches or cfg.train.micro_batches
        sources = data_sources(cfg)
        self.builder = builder or SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg))
        self.sources = open_sources(replace(cfg.data, sources=sources))
        self.bad = BadSampleLog()  # planning drops: global, deterministic, part of the state
        self.decode_bad = BadSampleLog()  # decode-time drops of this rank's own samples (skip policy)
        self._fingerprint = {"seed": self.data.seed, "sources": [s.path for s in self.sources],
                             "pack_tokens": self.data.pack_tokens, "buffer_size": self.data.buffer_size}
        if any(s.record_weights for s in sources) or self.data.source_weighting != "manual":
            # only then (older states stay loadable): these change the stream
            self._fingerprint["record_weights"] = [s.record_weights for s in sources]
            total = sum(s.weight for s in self.sources)
            self._fingerprint["shares"] = [round(s.weight / total, 12) for s in self.sources]
        names = [s.name for s in self.sources]
        self._source_names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self._realised_sources: Counter = Counter()
        self._realised_modality: Counter = Counter()
        self._reset_planner()
        self._consumed = self._snapshot()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------------------------ planning
    def _reset_planner(self) -> None:
        self.mix = SourceMix(self.sources, self.data.seed)
        self.packer = StreamPacker.from_config(self.data)
        self.packer.set_step(self.world * self.M, self.world)
        self._metas: dict[tuple, SampleMeta] = {}
        self._deferred: list[tuple] = []
        self._step = 0

    def _describe(self, key: tuple) -> SampleMeta:
        _, src, row = key
        return self.builder.describe(self.sources[src].record(row), key)

    def _draw(self, dropped: Counter) -> None:
        """Pull the next record of the global stream into the packer (or count it as bad)."""
        src, row = self.mix.next()
        key = (self.mix.drawn - 1, src, row)
        try:
            meta = self._describe(key)
        except BadSample as e:
            handle_bad(e, self.data.on_bad_sample, self.bad)
            dropped[e.reason] += 1
            return
        self._metas[key] = meta
        self.packer.push(key, meta.n_tokens)

    def _plan(self) -> _Plan:
        t0 = time.perf_counter()
        R, M, B = self.world, self.M, self.data.pack_tokens
        dropped: Counter = Counter()
        for key in self._deferred:  # samples the scheduler moved out of the previous step go first
            self.packer.push(key, self._metas[key].n_tokens)
        self._deferred = []
        packs = []
        while len(packs) < R * M:
            p = self.packer.pop()
            if p is None:
                self._draw(dropped)
            else:
                packs.append(p)
        for key, reason, detail in self.packer.take_dropped():  # over-long samples
            meta = self._metas.pop(key)
            handle_bad(BadSample(reason, meta.record.where, detail), self.data.on_bad_sample, self.bad)
            dropped[reason] += 1

        keys = [k for p in packs for k in p.keys]
        index = {k: i for i, k in enumerate(keys)}
        costs = [self._metas[k].cost for k in keys]
        sched = schedule_step([[index[k] for k in p.keys] for p in packs], costs, R, B, [p.long for p in packs])
        self._deferred = [keys[i] for i in sched.deferred]
        own = [[self._metas[keys[i]] for i in mb] for mb in sched.ranks[self.rank]]
        deferred = set(self._deferred)

        all_mbs = [mb for r in sched.ranks for mb in r]
        source_samples: Counter = Counter()
        modality_samples: Counter = Counter()
        for mb in all_mbs:
            for i in mb:
                rec = self._metas[keys[i]].record
                source_samples[self._source_names[keys[i][1]]] += 1
                modality_samples["video" if rec.video is not None else "image" if rec.images else "text"] += 1
        self._realised_sources.update(source_samples)
        self._realised_modality.update(modality_samples)
        tokens = sum(sched.tokens)
        capacity = sum(max(B, sum(costs[i].n_tokens for i in mb)) for mb in all_mbs)
        stats = DataStepStats(
            step=self._step, epoch=self.mix.epoch, samples=sum(len(mb) for mb in all_mbs), tokens=tokens,
            vision_tokens=sum(sched.vision_tokens), utilisation=tokens / capacity,
            llm_imbalance=sched.llm_imbalance, vision_imbalance=imbalance(sched.vision_tokens),
            long_samples=sum(p.long for p in packs), deferred=len(sched.deferred), dropped=dict(dropped),
            rank_samples=sum(len(mb) for mb in own), rank_tokens=sched.tokens[self.rank],
            plan_s=time.perf_counter() - t0, source_samples=dict(source_samples),
            modality_samples=dict(modality_samples), source_samples_total=dict(self._realised_sources),
            modality_samples_total=dict(self._realised_modality))
        for k in keys:
            if k not in deferred:
                del self._metas[k]
        self._step += 1
        return _Plan(stats, own, self._snapshot())

    def _snapshot(self) -> dict:
        return {"version": STATE_VERSION, "step": self._step, "mix": self.mix.state_dict(),
                "packer": self.packer.state_dict(), "deferred": [list(k) for k in self._deferred],
                "bad": self.bad.state_dict(), "fingerprint": dict(self._fingerprint),
                "realised": {"sources": dict(self._realised_sources), "modality": dict(self._realised_modality)}}

    def plan_steps(self, n: int) -> list[DataStepStats]:
        """Plan the next `n` steps without decoding a picture (cheap: headers only); advances the stream, so call
        it on a loader of its own (train/batch_plan.py sizes steps in samples this way)."""
        return [self._plan().stats for _ in range(n)]

    # ------------------------------------------------------------------------------------ materialising
    def _collate(self, metas: list[SampleMeta]):
        return self.builder.collate(metas, BadSampleLog())

    def _finish(self, plan: _Plan, parts) -> DataStep:
        stats = plan.stats
        decode_dropped: Counter = Counter()
        batches = []
        for c in parts:
            batches.append(c.batch)
            for _, reason, where, detail in c.dropped:
                decode_dropped[reason] += 1
                self.decode_bad.add(reason, where, detail)
        stats.decode_dropped = dict(decode_dropped)
        if decode_dropped:
            stats.rank_samples -= sum(decode_dropped.values())
        self._consumed = plan.state_after
        return DataStep(batches, stats)

    # ------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> "StepLoader":
        return self

    def __next__(self) -> DataStep:
        t0 = time.perf_counter()
        if self.data.num_workers == 0:
            plan = self._plan()
            step = self._finish(plan, [self._collate(mb) for mb in plan.own])
        else:
            if self._thread is None:
                self._start()
            plan, futures = self._queue.get()
            if plan.error is not None:
                self.close()
                raise plan.error
            step = self._finish(plan, [f.result() for f in futures])
        step.stats.wait_s = time.perf_counter() - t0
        return step

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=max(1, self.data.prefetch))
        self._pool = ThreadPoolExecutor(self.data.num_workers, thread_name_prefix="sail-data-decode")
        self._thread = threading.Thread(target=self._run_planner, name="sail-data-plan", daemon=True)
        self._thread.start()

    def _run_planner(self) -> None:
        while not self._stop.is_set():
            try:
                plan = self._plan()
                futures: list[Future] = [self._pool.submit(self._collate, mb) for mb in plan.own]
                item = (plan, futures)
            except BaseException as e:  # handed to the consumer, raised from __next__ in order
                item = (_Plan(None, [], {}, error=e), [])
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0].error is not None:
                return

    def close(self) -> None:
        """Stop the planner thread and the decode workers (unconsumed prefetched steps are discarded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._queue = None

    def __enter__(self) -> "StepLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------ state
    def bad_samples(self) -> BadSampleLog:
        """All samples skipped so far, per reason: planning drops (the same on every rank: log them once) plus
        this rank's decode-time drops (sum them over ranks). As of the last step `next()` returned: the planner
        thread may have planned (and counted) steps ahead that are not trained yet."""
        out = BadSampleLog()
        planned = BadSampleLog()
        planned.load_state_dict(self._consumed["bad"])
        for log in (planned, self.decode_bad):
            out.merge(log)
        return out

    def state_dict(self) -> dict:
        """State after the last step returned by `next()` (JSON-serialisable). Everything but `decode_bad`
        is identical on every rank."""
        sd = copy.deepcopy(self._consumed)
        sd["decode_bad"] = self.decode_bad.state_dict()
        return sd

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        """Resume exactly after the step `sd` was taken at. Stops prefetching; the next `next()` restarts it.

        strict: refuse a state from a different seed, source list, pack_tokens or buffer_size (the stream
        would differ); pass strict=False to continue anyway from the same stream position.
        """
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')} != {STATE_VERSION}")
        if strict and sd["fingerprint"] != self._fingerprint:
            diff = {k: (sd["fingerprint"].get(k), self._fingerprint.get(k))
                    for k in {**sd["fingerprint"], **self._fingerprint}
                    if sd["fingerprint"].get(k) != self._fingerprint.get(k)}
            raise ValueError(f"loader state was saved with different data settings {diff} (saved, now): "
                             "resume with the same data config, or load_state_dict(..., strict=False)")
        self.close()
        self._reset_planner()
        self.mix.load_state_dict(sd["mix"])
        self.packer.load_state_dict(_align_packer_state(sd["packer"], self.world * self.M), key_fn=tuple)
        self._deferred = [tuple(k) for k in sd["deferred"]]
        self._step = int(sd["step"])
        self.bad.load_state_dict(sd["bad"])
        self.decode_bad.load_state_dict(sd.get("decode_bad", {}))
        realised = sd.get("realised", {})
        self._realised_sources = Counter(realised.get("sources", {}))
        self._realised_modality = Counter(realised.get("modality", {}))
        keys = [tuple(it[1]) for it in sd["packer"]["items"]] + [tuple(k[0]) for k in sd["packer"]["long"]]
        for key in keys + self._deferred:
            self._metas[key] = self._describe(key)
        self._consumed = self._snapshot()


def _align_packer_state(sd: dict, step_packs: int) -> dict:
    """The packer state with its pack counter rebased so that the next pack opens a step of `step_packs` packs.

    The packer releases long samples when `n_packs % step_packs == 0`; a state saved after k steps of another
    geometry (elastic resume: DP size x micro-batches changed) need not be a multiple of the new one. Every
    arrival stamp moves by the same offset, so ages (and so ageing and long-sample waits) are unchanged; with the
    geometry unchanged the offset is 0 and the state is loaded as saved."""
    shift = -int(sd["n_packs"]) % step_packs
    if shift == 0:
        return sd
    return {**sd, "n_packs": int(sd["n_packs"]) + shift,
            "items": [[seq, key, n, int(born) + shift] for seq, key, n, born in sd["items"]],
            "long": [[key, n, int(born) + shift] for key, n, born in sd["long"]]}


def build_loader(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> StepLoader:
    """The trainer's entry point: a StepLoader for this DP rank with train.micro_batches per step."""
    return StepLoader(cfg, dp_rank, dp_size, cfg.train.micro_batches)
