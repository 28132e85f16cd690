"""Step scheduler: spread one optimizer step's packs over DP ranks x micro-batches with equal compute.

Every DP rank runs `micro_batches` packs per step and waits for the slowest rank at the gradient
reduction, so the step takes as long as the most loaded rank. Loads are compared under a `CostModel`
(`cost_model_from_config`: model/flops.py's training FLOPs, exactly):
  LLM  a * tokens + b * sum(len^2)              (linear layers; causal attention per sample)
  ViT  c * patches + d * sum(patches_per_image^2)  (linear layers; full attention per tile / image)
and balanced in both dimensions at once ("visual packing": the ViT runs on the same rank, or on the
first pipeline stage, so vision work must be even too).

Algorithm (deterministic, a few ms for 256 packs):
  1. LPT with a slot limit: packs, heaviest first, each to the rank with a free slot where it adds the
     least to the sum of squared normalised loads (a dot-product rule that pairs vision-heavy packs with
     vision-light ranks).
  2. Refinement by hill climbing on phi = sum_r ((llm_r - 1)/tol_llm)^2 + ((vit_r - 1)/tol_vit)^2 (loads
     normalised to a mean of 1), always on the currently most overloaded rank: swap whole packs between
     ranks; move a sample into another rank's pack that has room for it; swap two samples of similar
     length between ranks. An exchange must lower that rank's overload without raising either dimension's
     maximum. Packs never exceed `pack_tokens` and lone long samples stay alone. A rank holding a lone long
     sample, which exchanges inside full packs cannot relieve, defers samples to a later step (a pack
     emptied that way becomes a one-token padding micro-batch in the loader).
  3. Each rank's micro-batches are ordered heaviest first (LLM + ViT FLOPs), so micro-batch i is alike on
     every rank (ZeRO-2 reduces gradients after every micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sail_dist.config import ModelConfig
from sail_dist.model.flops import sample_flops


@dataclass(frozen=True)
class CostModel:
    """Training FLOPs per unit of work; only ratios matter for balancing."""

    llm_token: float = 1.0  # per LLM token (projections, MLP, lm head)
    llm_attn_per_len2: float = 0.0  # per (sample length)^2 (causal attention)
    vit_per_patch: float = 0.0  # per ViT patch (patch embed, projections, MLP, adapter)
    vit_attn_per_patch2: float = 0.0  # per (patches of one ViT input)^2 (full attention)

    def llm(self, n_tokens: float, sum_len2: float) -> float:
        return self.llm_token * n_tokens + self.llm_attn_per_len2 * sum_len2

    def vit(self, n_patches: float, sum_patch2: float) -> float:
        return self.vit_per_patch * n_patches + self.vit_attn_per_patch2 * sum_patch2


def cost_model_from_config(model: ModelConfig) -> CostModel:
    """Training FLOPs with every part trainable: model/flops.py's count in the scheduler's linear form.

    flops.py counts a sample of n tokens as a*n + b*n^2 in the LLM (causal attention: n(n+1)/2 pairs) and a
    ViT input of p patches as c*p + d*p^2 in the ViT + adapter (full attention), so two evaluations of each
    give the coefficients exactly; loads then cost two multiply-adds per sample instead of a model walk.
    """
    llm_token, llm_attn = _quadratic(lambda n: sample_flops(model, n).train)
    vit_patch, vit_attn = _quadratic(lambda p: sample_flops(model, 0, [p]).train)
    return CostModel(llm_token, llm_attn, vit_patch, vit_attn)


def _quadratic(f: Callable[[int], float]) -> tuple[float, float]:
    """(a, b) of f(x) = a*x + b*x^2, from f(1) and f(2)."""
    f1, f2 = f(1), f(2)
    return 2 * f1 - f2 / 2, f2 / 2 - f1


@dataclass
class SampleCost:
    """What the scheduler needs to know about one sample."""

    n_tokens: int
    llm: float
    vit: float = 0.0
    vision_tokens: int = 0

    @classmethod
    def of(cls, cost: CostModel, n_tokens: int, grids: list[tuple[int, int]] = (), merge: int = 2) -> "SampleCost":
        patches = [r * c for r, c in grids]
        return cls(n_tokens, cost.llm(n_tokens, n_tokens * n_tokens),
                   cost.vit(sum(patches), sum(p * p for p in patches)),
                   sum((r // merge) * (c // merge) for r, c in grids))


def imbalance(loads) -> float:
    """max / mean (1.0 = perfect; 1.0 when there is no load at all)."""
    loads = np.asarray(loads, dtype=np.float64)
    m = loads.mean() if loads.size else 0.0
    return float(loads.max() / m) if m > 0 else 1.0


@dataclass
class Schedule:
    """ranks[r][m] = sample indices of rank r's micro-batch m (in pack order)."""

    ranks: list[list[list[int]]]
    llm_load: list[float]
    vit_load: list[float]
    vision_tokens: list[int]
    tokens: list[int]
    moves: dict = field(default_factory=dict)
    deferred: list[int] = field(default_factory=list)  # samples taken out of this step; re-queue them

    @property
    def llm_imbalance(self) -> float:
        return imbalance(self.llm_load)

    @property
    def vision_imbalance(self) -> float:
        return imbalance(self.vision_tokens)


def _finish(ranks: list[list[list[int]]], samples: list[SampleCost]) -> Schedule:
    L = [sum(samples[s].llm for mb in r for s in mb) for r in ranks]
    V = [sum(samples[s].vit for mb in r for s in mb) for r in ranks]
    VT = [sum(samples[s].vision_tokens for mb in r for s in mb) for r in ranks]
    N = [sum(samples[s].n_tokens for mb in r for s in mb) for r in ranks]
    return Schedule(ranks, L, V, VT, N)


def round_robin(packs: list[list[int]], samples: list[SampleCost], n_ranks: int) -> Schedule:
    """Baseline: pack i goes to rank i % n_ranks (what a plain distributed sampler does)."""
    ranks: list[list[list[int]]] = [[] for _ in range(n_ranks)]
    for i, p in enumerate(packs):
        ranks[i % n_ranks].append(list(p))
    return _finish(ranks, samples)


def schedule_step(packs: list[list[int]], samples: list[SampleCost], n_ranks: int, pack_tokens: int,
                  long_packs: list[bool] | None = None, tol_llm: float = 0.005, tol_vit: float = 0.0125,
                  defer_above: float = 0.01, refine: bool = True, max_iters: int = 1000) -> Schedule:
    """Assign `len(packs)` packs (a multiple of n_ranks) to ranks, micro_batches = len(packs) // n_ranks each.

    packs: sample indices (into `samples`) per pack; long_packs: which packs are lone over-long samples
    (never merged with others). The objective weighs each dimension by its tolerance; refinement stops once
    max/mean is within 1 + tol_llm (LLM) and 1 + tol_vit (ViT). A rank holding a lone long sample sheds
    samples while it is more than `defer_above` over the mean LLM load (defer_above < 0 disables this); they
    are returned in `Schedule.deferred` and the caller must re-queue them. A micro-batch can end up empty
    that way; the loader makes it a one-token padding micro-batch.
    """
    P = len(packs)
    if P % n_ranks:
        raise ValueError(f"{P} packs cannot be split evenly over {n_ranks} ranks")
    st = _Balancer(packs, samples, n_ranks, pack_tokens, long_packs, tol_llm, tol_vit)
    st.lpt(P // n_ranks)
    if refine and n_ranks > 1:
        st.refine(defer_above, max_iters)
    members = st.members()
    # order each rank's micro-batches heaviest first (LLM + ViT FLOPs), so micro-batch i is alike on every rank
    flops = [sum(samples[s].llm + samples[s].vit for s in m) for m in members]
    ranks: list[list[list[int]]] = [[] for _ in range(n_ranks)]
    for p in sorted(range(P), key=lambda p: (-flops[p], p)):
        ranks[int(st.rank_of[p])].append(members[p])
    out = _finish(ranks, samples)
    out.moves = st.stats
    out.deferred = sorted(int(st.sid[i]) for i in np.flatnonzero(st.pack < 0))
    return out


class _Balancer:
    """Mutable state of one scheduling problem, as flat arrays over the step's samples.

    Loads are normalised so that the ideal rank load is 1 in each dimension. The objective is
    phi = sum_r ((llm_r - 1) / tol_llm)^2 + ((vit_r - 1) / tol_vit)^2, i.e. vit weighted by w = (tol_llm/tol_vit)^2.
    """

    _SWAP_PAIRS_MAX = 200_000  # sample-swap candidates per iteration before restricting the partner ranks
    _PATIENCE = 100  # iterations without a better maximum before refinement stops

    def __init__(self, packs, samples, R, budget, long_packs, tol_l, tol_v):
        self.R, self.budget, self.tol_l, self.tol_v = R, budget, tol_l, tol_v
        self.sid = np.asarray([i for p in packs for i in p], dtype=np.int64)  # global sample index
        self.pack = np.asarray([k for k, p in enumerate(packs) for _ in p], dtype=np.int64)  # -1 = deferred
        sl = np.asarray([samples[i].llm for i in self.sid], dtype=np.float64)
        sv = np.asarray([samples[i].vit for i in self.sid], dtype=np.float64)
        self.sn = np.asarray([samples[i].n_tokens for i in self.sid], dtype=np.int64)
        tl, tv = sl.sum() / R, sv.sum() / R
        self.sl = sl / tl if tl > 0 else sl
        self.sv = sv / tv if tv > 0 else np.zeros_like(sv)
        self.w = (tol_l / tol_v) ** 2 if tv > 0 else 0.0
        P = len(packs)
        self.is_long = np.asarray(long_packs if long_packs is not None else [False] * P, dtype=bool)
        self.pl = np.bincount(self.pack, self.sl, minlength=P)
        self.pv = np.bincount(self.pack, self.sv, minlength=P)
        self.pn = np.bincount(self.pack, self.sn, minlength=P).astype(np.int64)
        self.count = np.bincount(self.pack, minlength=P)
        self.rank_of = np.zeros(P, dtype=np.int64)
        self.l, self.v = np.zeros(R), np.zeros(R)
        self.stats = {"pack_swaps": 0, "sample_moves": 0, "sample_swaps": 0, "deferred": 0}

    def members(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(len(self.pl))]
        for i in np.flatnonzero(self.pack >= 0):
            out[int(self.pack[i])].append(int(self.sid[i]))
        return out

    def _dev(self, l, v):
        """Overload of a rank in tolerance units (the larger of its two dimensions)."""
        return np.maximum((l - 1) / self.tol_l, (v - 1) / self.tol_v if self.w > 0 else -np.inf)

    def _gain(self, A: int, B, dl, dv):
        """Change of phi when rank A's loads move by (dl, dv) and rank B's by (-dl, -dv), +inf for exchanges
        that would not lower A's overload, would leave B at least as overloaded, or would raise either
        dimension's maximum: the maximum (what max/mean measures) never gets worse."""
        l, v, w = self.l, self.v, self.w
        la, lb, va, vb = l[A] + dl, l[B] - dl, v[A] + dv, v[B] - dv
        d = ((la - 1) ** 2 - (l[A] - 1) ** 2 + (lb - 1) ** 2 - (l[B] - 1) ** 2
             + w * ((va - 1) ** 2 - (v[A] - 1) ** 2 + (vb - 1) ** 2 - (v[B] - 1) ** 2))
        cur = self._dev(l[A], v[A])
        cap_l, cap_v = max(l.max(), 1 + self.tol_l), max(v.max(), 1 + self.tol_v)
        ok = ((self._dev(la, va) < cur) & (self._dev(lb, vb) < cur) & (np.maximum(la, lb) <= cap_l)
              & (np.maximum(va, vb) <= cap_v))
        return np.where(ok, d, np.inf)

    # 1. ---------------------------------------------------------------------------------------- LPT
    def lpt(self, M: int) -> None:
        """Heaviest pack first, to the rank with a free slot where it adds least to phi (a dot-product rule
        that pairs vision-heavy packs with vision-light ranks)."""
        slots = np.full(self.R, M)
        for p in sorted(range(len(self.pl)), key=lambda p: (-(self.pl[p] + self.w * self.pv[p]), p)):
            score = self.l * self.pl[p] + self.w * self.v * self.pv[p]
            score[slots == 0] = np.inf
            r = int(np.argmin(score))
            self.rank_of[p] = r
            self.l[r] += self.pl[p]
            self.v[r] += self.pv[p]
            slots[r] -= 1

    # 2. ---------------------------------------------------------------------------------------- refine
    def refine(self, defer_above: float, max_iters: int) -> None:
        # A rank holding a lone long sample is over by far more than exchanges inside full packs can move:
        # shed samples from it first (they train in a later step), then fine-tune everything by exchanges.
        if defer_above >= 0 and self.is_long.any():
            holders = np.zeros(self.R, dtype=bool)
            holders[self.rank_of[self.is_long]] = True
            while holders.any():  # always the most loaded holder: deferring lowers the mean for everyone
                A = int(np.argmax(np.where(holders, self.l, -np.inf)))
                if self.l[A] <= self.l.mean() * (1 + defer_above):
                    break
                found = self._defer(A)
                if found is None:
                    holders[A] = False
                else:
                    found[1]()
            self._renormalise()
        stuck: set[int] = set()
        best_max, since_best = np.inf, 0
        for _ in range(max_iters):
            # only overload matters for max/mean; scale each dimension by its tolerance
            dev = self._dev(self.l, self.v)
            if dev.max() <= 1:
                break
            if dev.max() < best_max * 0.999:
                best_max, since_best = dev.max(), 0
            else:
                since_best += 1
                if since_best > self._PATIENCE:  # the maximum stopped improving: good enough
                    break
            order = [int(r) for r in np.argsort(-dev, kind="stable") if int(r) not in stuck and dev[r] > 1]
            if not order:
                break
            A = order[0]
            cands = [c for c in (self._pack_swap(A), self._sample_move(A), self._sample_swap(A)) if c is not None]
            best = min(cands, key=lambda c: c[0], default=None)
            if best is None and defer_above >= 0 and self.l[A] > 1 + defer_above \
                    and self.is_long[self.rank_of == A].any():
                best = self._defer(A)
                if best is not None:
                    best[1]()
                    self._renormalise()
                    stuck.clear()
                    continue
            if best is None:
                stuck.add(A)
                continue
            stuck.clear()
            best[1]()

    def _renormalise(self) -> None:
        """Rescale loads to a mean of 1 again (deferring samples lowers the mean)."""
        for arrs, load in (((self.sl, self.pl), self.l), ((self.sv, self.pv), self.v)):
            m = load.mean()
            if m > 0:
                for a in arrs + (load,):
                    a /= m

    @staticmethod
    def _best(d: np.ndarray):
        k = int(np.argmin(d))
        return (float(d.flat[k]), np.unravel_index(k, d.shape)) if d.flat[k] < -1e-12 else None

    def _leavers(self, A: int) -> np.ndarray:
        """Positions of the samples of rank A that may leave it (placed, not a lone long sample)."""
        placed = self.pack >= 0
        pk = np.where(placed, self.pack, 0)
        return np.flatnonzero(placed & (self.rank_of[pk] == A) & ~self.is_long[pk])

    def _others(self, A: int) -> np.ndarray:
        """Positions of placed samples on other ranks, outside lone long packs."""
        placed = self.pack >= 0
        pk = np.where(placed, self.pack, 0)
        return np.flatnonzero(placed & (self.rank_of[pk] != A) & ~self.is_long[pk])

    def _pack_swap(self, A: int):
        """Swap a whole pack of A with a pack of another rank."""
        l, v, pl, pv, rank_of = self.l, self.v, self.pl, self.pv, self.rank_of
        mine, other = np.flatnonzero(rank_of == A), np.flatnonzero(rank_of != A)
        if not len(other):
            return None
        dl = pl[other][None, :] - pl[mine][:, None]  # A gains pack b, loses pack a
        dv = pv[other][None, :] - pv[mine][:, None]
        found = self._best(self._gain(A, rank_of[other][None, :], dl, dv))
        if found is None:
            return None
        a, b = int(mine[found[1][0]]), int(other[found[1][1]])

        def apply():
            rb = int(rank_of[b])
            rank_of[a], rank_of[b] = rb, A
            for r, sign in ((A, 1), (rb, -1)):
                l[r] += sign * (pl[b] - pl[a])
                v[r] += sign * (pv[b] - pv[a])
            self.stats["pack_swaps"] += 1
        return found[0], apply

    def _sample_move(self, A: int):
        """Move a sample of A into the best-fitting pack of another rank that has room for it."""
        s = self._leavers(A)
        s = s[self.count[self.pack[s]] > 1]  # a pack never becomes empty by a move
        targets = np.flatnonzero(~self.is_long & (self.rank_of != A))
        if not len(s) or not len(targets):
            return None
        slack = self.budget - self.pn[targets]
        fits = self.sn[s][:, None] <= slack[None, :]
        if not fits.any():
            return None
        d = self._gain(A, self.rank_of[targets][None, :], -self.sl[s][:, None], -self.sv[s][:, None])
        # among equal gains prefer the tightest fit (keeps big gaps for big samples)
        d = np.where(fits, d + 1e-15 * (slack[None, :] - self.sn[s][:, None]), np.inf)
        found = self._best(d)
        if found is None:
            return None
        i, pb = int(s[found[1][0]]), int(targets[found[1][1]])

        def apply():
            self._transfer(i, pb)
            self.stats["sample_moves"] += 1
        return found[0], apply

    def _sample_swap(self, A: int):
        """Swap a sample of A with a sample of another rank whose length is close enough to fit both packs."""
        s, t = self._leavers(A), self._others(A)
        if not len(s) or not len(t):
            return None
        l, v = self.l, self.v
        if len(s) * len(t) > self._SWAP_PAIRS_MAX:  # keep it cheap: the most complementary ranks only
            want = -(l - 1) * (l[A] - 1) - self.w * (v - 1) * (v[A] - 1)
            want[A] = -np.inf
            keep = np.zeros(self.R, dtype=bool)
            keep[np.argsort(-want, kind="stable")[:8]] = True
            t = t[keep[self.rank_of[self.pack[t]]]]
        ps, pt = self.pack[s], self.pack[t]
        grow = self.sn[t][None, :] - self.sn[s][:, None]  # A's pack grows by this, B's shrinks by it
        ok = (self.pn[ps][:, None] + grow <= self.budget) & (self.pn[pt][None, :] - grow <= self.budget)
        if not ok.any():
            return None
        dl = self.sl[t][None, :] - self.sl[s][:, None]
        dv = self.sv[t][None, :] - self.sv[s][:, None]
        d = np.where(ok, self._gain(A, self.rank_of[pt][None, :], dl, dv), np.inf)
        found = self._best(d)
        if found is None:
            return None
        i, j = int(s[found[1][0]]), int(t[found[1][1]])

        def apply():
            pa, pb = int(self.pack[i]), int(self.pack[j])
            self._transfer(i, pb)
            self._transfer(j, pa)
            self.stats["sample_swaps"] += 1
        return found[0], apply

    def _defer(self, A: int):
        """For a rank nothing else can relieve (it holds a lone long sample and every pack is full): take one
        of its samples out of this step; the caller re-queues it, so it trains in a later step. A pack may
        be emptied (it becomes a one-token padding micro-batch). Judged on LLM load only: an under-loaded
        ViT on one rank costs nothing at the sync point."""
        s = self._leavers(A)
        if not len(s):
            return None
        l, m, x = self.l[A], self.l.mean(), self.sl[s]
        found = self._best((l - x - (m - x / self.R)) ** 2 - (l - m) ** 2)  # distance to the (shrinking) mean
        if found is None:
            return None
        i = int(s[found[1][0]])

        def apply():
            self._transfer(i, -1)
            self.stats["deferred"] += 1
        return found[0], apply

    def _transfer(self, i: int, dst: int) -> None:
        """Move sample position i to pack dst (-1: out of the step), keeping all loads current."""
        for p, sign in ((int(self.pack[i]), -1), (dst, 1)):
            if p < 0:
                continue
            self.pl[p] += sign * self.sl[i]
            self.pv[p] += sign * self.sv[i]
            self.pn[p] += sign * self.sn[i]
            self.count[p] += sign
            r = self.rank_of[p]
            self.l[r] += sign * self.sl[i]
            self.v[r] += sign * self.sv[i]
        self.pack[i] = dst
