"""The built-in RolloutEngine: batched autoregressive sampling on the project's own SailVL with a KV cache.

    sampler = Sampler(model, max_batch=64)
    completions = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=512), n=8)

How a call runs (docs/rl.md, "Generation"):
  * Slots. The cache (kv_cache.py) has B = min(max_batch, sequences, max_total_tokens // S) slots of S rows,
    S = the longest prompt + max_new_tokens (capped by max_context), rounded up to `seq_len_multiple`. The n
    rollouts of each prompt are queued prompt-major; whenever slots are free the next queued sequences get one
    (continuous batching: a finished sequence's slot is refilled at the next check).
  * Prefill. The new slots' distinct prompts are packed into one varlen stream (the OpSet's attention over
    cu_seqlens; the ViT runs once per prompt over its images), writing K/V into the cache; a prompt's other
    rollouts get a copy of its rows (KVCache.copy_slots). The last prompt token's logits give token 0.
  * Decode. One step feeds every slot's last token (row b = slot b) through SailVL.decode_step (the OpSet's
    decode_attention over the cache), samples, and records the token and its log-prob into preallocated
    [B, max_new_tokens] buffers, all on the device with no host synchronisation and no allocation outside
    the step, so on CUDA the whole step (model + sampling + bookkeeping) replays as one CUDA graph. The host
    reads the finish flags every `sync_every` steps (sooner when a length limit is due) to harvest finished
    sequences and refill their slots.
  * Stopping, per sequence: a token in params.stop_ids -> "stop" (kept in the tokens); max_new_tokens
    generated -> "length"; prompt + generation reaching params.max_context (or the model's
    max_position_embeddings) -> "context" (a prompt already at the cap gets no tokens and "context").
  * Sampling: temperature 0 = argmax; otherwise logits / temperature, top-k, then top-p (the smallest set of
    most probable tokens whose mass reaches top_p), then one inverse-CDF draw. The draw's uniform number is a
    counter-based hash of (seed, prompt index, rollout index, token index): no RNG state, so the same seed,
    prompts and n give the same completions whatever max_batch, slot order or refill timing, and a batch split
    over ranks (each call passing its prompts' `prompt_ids` in the whole batch) gives those of the whole; the only
    dependence on the batch left is the model's own floating-point (a GEMM may round differently for another
    batch size).
  * Completion.logprobs: log_softmax of the unscaled (temperature 1, unfiltered) logits at the drawn token, in
    fp32, for the sampler/trainer mismatch figure.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sail_dist.data.batch import PackedBatch
from sail_dist.model.sailvl import SailVL
from sail_dist.rollout.engine import Completion, SamplingParams
from sail_dist.rollout.kv_cache import KVCache

log = logging.getLogger("sail_dist")

_M32 = 0xFFFFFFFF
_FINISH = {1: "stop", 2: "length", 3: "context"}


# --------------------------------------------------------------------------------------------------
# Counter-based uniform numbers (the same function on Python ints and int64 tensors)
# --------------------------------------------------------------------------------------------------
def _mul32(x, c: int):
    """(x * c) mod 2^32 for 0 <= x, c < 2^32 without int64 overflow (16-bit halves)."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def _mix32(x):
    """A 32-bit integer finaliser (lowbias32): x in [0, 2^32) -> a well-mixed value in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sequence_key(seed: int, prompt_index: int, rollout_index: int) -> int:
    """The RNG key of one rollout: what its draws depend on besides the token index."""
    return _mix32(_mix32(_mix32(seed & _M32) ^ (prompt_index & _M32)) ^ (rollout_index & _M32))


def uniform(key_N: torch.Tensor, step_N: torch.Tensor) -> torch.Tensor:
    """One uniform float32 in (0, 1) per row from its key and token index (24 random bits)."""
    h = _mix32(key_N ^ _mix32((step_N + 0x9E3779B9) & _M32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def filter_logits(logits_NV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """-inf outside the top-k and outside the top-p nucleus (the smallest set of most probable tokens whose
    probability mass reaches top_p; the most probable token always stays)."""
    x = logits_NV
    V = x.shape[-1]
    if 0 < top_k < V:
        kth_N1 = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth_N1, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        p_sorted = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        drop_sorted = mass_before >= top_p
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return x


_CDF_BLOCK = 128  # the inverse CDF runs over block sums, then inside one block (no [N, V] scan)


def inverse_cdf(weights_NV: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
    """Per row, the token i with cdf[i-1] <= u * total < cdf[i] of the non-negative (unnormalised) weights; a
    zero-weight token is never drawn. Two levels (block sums of _CDF_BLOCK tokens, then one block), since a
    cumulative sum along 150k-wide rows is a slow scan on a GPU."""
    N, V = weights_NV.shape
    blk = _CDF_BLOCK
    if V % blk:
        weights_NV = F.pad(weights_NV, (0, blk - V % blk))
    w_NKb = weights_NV.view(N, -1, blk)
    cdf_NK = torch.cumsum(w_NKb.sum(-1), dim=-1)
    total_N1 = cdf_NK[:, -1:]
    # u < 1 - 2^-25; the factor keeps the target a whole ulp under the total after rounding.
    target_N1 = u_N[:, None] * total_N1 * (1.0 - 2.0 ** -22)
    k_N1 = torch.searchsorted(cdf_NK, target_N1, right=True).clamp_(max=cdf_NK.shape[1] - 1)
    before_N1 = torch.where(k_N1 > 0, cdf_NK.gather(1, (k_N1 - 1).clamp_(min=0)), 0.0)
    local_NB = torch.cumsum(w_NKb.gather(1, k_N1[:, :, None].expand(N, 1, blk)).squeeze(1), dim=-1)
    local_total_N1 = local_NB[:, -1:]
    r_N1 = torch.minimum((target_N1 - before_N1).clamp_(min=0.0), local_total_N1 * (1.0 - 2.0 ** -22))
    j_N1 = torch.searchsorted(local_NB, r_N1, right=True).clamp_(max=blk - 1)
    return (k_N1 * blk + j_N1).squeeze(1)


def sample_tokens(logits_NV: torch.Tensor, params: SamplingParams, key_N: torch.Tensor, step_N: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (token ids [N] int64, log p(token) at temperature 1 [N] fp32). Rows are independent of each other."""
    logits_NV = logits_NV.float()
    max_N1 = logits_NV.amax(dim=-1, keepdim=True)
    if params.temperature == 0:
        tok_N = logits_NV.argmax(dim=-1)
        lse_N = torch.logsumexp(logits_NV, dim=-1)
    else:
        plain = params.temperature == 1.0 and not 0 < params.top_k < logits_NV.shape[-1] and params.top_p >= 1.0
        x = logits_NV if plain else filter_logits(logits_NV / params.temperature, params.top_k, params.top_p)
        x_max_N1 = max_N1 if plain else x.amax(dim=-1, keepdim=True)
        weights_NV = torch.exp(x - x_max_N1)  # unnormalised probabilities (0 where filtered)
        tok_N = inverse_cdf(weights_NV, uniform(key_N, step_N))
        # Temperature 1, unfiltered: the same exponentials give the log-partition function.
        lse_N = (max_N1 + weights_NV.sum(-1, keepdim=True).log()).squeeze(1) if plain else \
            torch.logsumexp(logits_NV, dim=-1)
    return tok_N, logits_NV.gather(1, tok_N[:, None]).squeeze(1) - lse_N


def pack_prompts(prompts: list[PackedBatch]) -> PackedBatch:
    """One packed batch of single-sample prompts (images in order)."""
    lens = [p.num_tokens for p in prompts]
    ids = torch.cat([p.input_ids.cpu() for p in prompts])
    pix = [p.pixel_values.cpu() for p in prompts if p.num_images]
    grids = [p.image_grid_hw.cpu() for p in prompts if p.num_images]
    return PackedBatch(input_ids=ids, labels=torch.full_like(ids, -100),
                       position_ids=torch.cat([torch.arange(n) for n in lens]),
                       cu_seqlens=F.pad(torch.cumsum(torch.tensor(lens), 0), (1, 0)).to(torch.int32),
                       max_seqlen=max(lens), loss_weight=torch.zeros(len(ids)),
                       pixel_values=torch.cat(pix) if pix else None, image_grid_hw=torch.cat(grids) if grids else None,
                       sample_ids=[s for p in prompts for s in p.sample_ids])


# --------------------------------------------------------------------------------------------------
# Per-call decode state (static buffers a CUDA graph reads and writes in place)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    slots: int
    seq_len: int
    max_new: int
    n_stop: int


class _State:
    def __init__(self, shape: _Shape, device: torch.device) -> None:
        B, dev = shape.slots, device
        self.shape = shape
        self.tok_B = torch.zeros(B, dtype=torch.long, device=dev)  # next input token per slot
        self.pos_B = torch.zeros(B, dtype=torch.long, device=dev)  # its position (its K/V row)
        self.gen_B = torch.zeros(B, dtype=torch.long, device=dev)  # tokens generated so far
        self.plen_B = torch.zeros(B, dtype=torch.long, device=dev)  # prompt length
        self.cap_B = torch.ones(B, dtype=torch.long, device=dev)  # prompt + generation limit
        self.key_B = torch.zeros(B, dtype=torch.long, device=dev)  # RNG key
        self.active_B = torch.zeros(B, dtype=torch.bool, device=dev)
        self.code_B = torch.zeros(B, dtype=torch.long, device=dev)  # 0 running / idle, else _FINISH
        self.stop_ids = torch.full((max(shape.n_stop, 1),), -1, dtype=torch.long, device=dev)
        # Column max_new is scratch: rows that are not recording write there.
        self.out_tok = torch.zeros(B, shape.max_new + 1, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(B, shape.max_new + 1, dtype=torch.float32, device=dev)
        self.rows_B = torch.arange(B, device=dev)

    def record(self, tok_B: torch.Tensor, lp_B: torch.Tensor, mask_B: torch.Tensor) -> None:
        """Append tok/lp to the slots in mask_B, advance them and set their finish codes (in place)."""
        max_new = self.shape.max_new
        col_B = torch.where(mask_B, self.gen_B, max_new)
        self.out_tok[self.rows_B, col_B] = tok_B
        self.out_lp[self.rows_B, col_B] = lp_B
        self.gen_B.add_(mask_B.long())
        self.tok_B.copy_(torch.where(mask_B, tok_B, self.tok_B))
        self.pos_B.copy_(torch.where(mask_B, self.plen_B + self.gen_B - 1, self.pos_B))
        stop = mask_B & (tok_B[:, None] == self.stop_ids[None, :]).any(-1)
        length = mask_B & ~stop & (self.gen_B >= max_new)
        context = mask_B & ~stop & ~length & (self.plen_B + self.gen_B >= self.cap_B)
        self.code_B.copy_(torch.where(stop, 1, torch.where(length, 2, torch.where(context, 3, self.code_B))))
        self.active_B.copy_(self.active_B & ~(stop | length | context))


# --------------------------------------------------------------------------------------------------
class Sampler:
    """Batched KV-cache generation on a SailVL (the RolloutEngine of sail_dist/rollout/engine.py).

    max_batch: most sequences decoded at once (cache slots). max_total_tokens: the cache budget in tokens over
    all slots (slots * rows; K+V bytes = 2 * layers * kv_heads * head_dim * dtype bytes per token).
    cuda_graphs: replay the decode step as a CUDA graph (None = on CUDA devices; a capture failure then falls
    back to eager with a warning). compile: torch.compile generation's pure pieces (parallel/compile.py
    compile_generation: each layer's norms, projections, RoPE and MLP, in prefill and decode; the decode step's
    sampling and bookkeeping here), which fuses the element-wise kernels the graph would otherwise replay one by
    one; the first calls pay the compilation. prefill_tokens: token budget of one packed prefill. sync_every: decode
    steps between the host's checks for finished sequences.
    """

    def __init__(self, model: SailVL, *, max_batch: int = 64, max_total_tokens: int = 1 << 18,
                 cuda_graphs: bool | None = None, compile: bool = False, prefill_tokens: int = 32768,
                 sync_every: int = 16, seq_len_multiple: int = 64) -> None:
        for name, v in (("max_batch", max_batch), ("max_total_tokens", max_total_tokens),
                        ("prefill_tokens", prefill_tokens), ("sync_every", sync_every),
                        ("seq_len_multiple", seq_len_multiple)):
            if v < 1:
                raise ValueError(f"Sampler({name}={v}): must be >= 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = model.llm.embed_tokens.weight.dtype
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"Sampler(cuda_graphs=True) but the model is on {self.device}")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs_required = bool(cuda_graphs)
        self.max_batch, self.max_total_tokens = max_batch, max_total_tokens
        self.prefill_tokens, self.sync_every, self.seq_len_multiple = prefill_tokens, sync_every, seq_len_multiple
        self._cache: KVCache | None = None
        self._state: _State | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.last_stats: dict = {}
        self._capped: tuple[int, int] | None = None
        self._sample_record = self._sample_record_eager
        if compile:
            from sail_dist.parallel.compile import compile_generation

            compile_generation(model)
            self._sample_record = torch.compile(self._sample_record_eager)

    @classmethod
    def from_config(cls, model: SailVL, sampling, max_batch: int) -> "Sampler":
        """The sampler of a run's `rl.sampling` section (SamplingConfig): graphs and compile apply on CUDA only."""
        cuda = next(model.parameters()).device.type == "cuda"
        return cls(model, max_batch=max_batch, max_total_tokens=sampling.max_total_tokens,
                   cuda_graphs=cuda and sampling.cuda_graphs, compile=cuda and sampling.compile,
                   prefill_tokens=sampling.prefill_tokens, sync_every=sampling.sync_every)

    # ---------------------------------------------------------------------------------------------
    def update_weights(self, state_dict: dict) -> None:
        """Load full, unsharded SailVL weights. The copy is in place, so captured CUDA graphs stay valid."""
        self.model.load_state_dict(state_dict, strict=True)

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[PackedBatch], params: SamplingParams, n: int = 1,
                 prompt_ids: list[int] | None = None) -> list[list[Completion]]:
        """`n` completions for each single-sample prompt (outer list in prompt order). `prompt_ids[i]` is the
        prompt index the draws of prompts[i] are keyed by (default i): a caller that splits one batch of prompts
        over ranks passes each prompt's index in the whole batch and gets the completions of the one-rank call."""
        self._check(prompts, params, n)
        if prompt_ids is None:
            prompt_ids = list(range(len(prompts)))
        elif len(prompt_ids) != len(prompts):
            raise ValueError(f"Sampler.generate: {len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, params, n, [int(x) for x in prompt_ids])
        finally:
            self.model.train(was_training)

    def _check(self, prompts: list[PackedBatch], params: SamplingParams, n: int) -> None:
        if n < 1:
            raise ValueError(f"Sampler.generate: n={n}, must be >= 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
            raise ValueError(f"Sampler.generate: bad sampling params {params} (temperature >= 0, top_p in (0, 1], "
                             "top_k >= 0)")
        if params.max_new_tokens < 1 or params.max_context < 0:
            raise ValueError(f"Sampler.generate: max_new_tokens={params.max_new_tokens} must be >= 1 and "
                             f"max_context={params.max_context} >= 0 (0 = none)")
        for i, p in enumerate(prompts):
            if p.num_samples != 1 or p.num_tokens == 0:
                raise ValueError(f"Sampler.generate: prompt {i} (sample ids {p.sample_ids}) has {p.num_samples} "
                                 f"samples and {p.num_tokens} tokens; a prompt is one non-empty sample "
                                 "(SampleBuilder.prompt)")

    def _cap(self, prompt_len: int, params: SamplingParams) -> int:
        cap = min(prompt_len + params.max_new_tokens, self.model.cfg.llm.max_position_embeddings)
        return min(cap, params.max_context) if params.max_context else cap

    def _generate(self, prompts: list[PackedBatch], params: SamplingParams, n: int, prompt_ids: list[int]
                  ) -> list[list[Completion]]:
        t0 = time.perf_counter()
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        plens = [p.num_tokens for p in prompts]
        caps = [self._cap(L, params) for L in plens]
        queue: deque[tuple[int, int]] = deque()
        for i, (L, cap) in enumerate(zip(plens, caps)):
            for j in range(n):
                if L >= cap:  # no room for a single token
                    results[i][j] = Completion([], [], "context", extra={"prompt_tokens": L, "context_limit": cap})
                else:
                    queue.append((i, j))
        self.last_stats = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "tokens": 0, "sequences": len(queue)}
        if not queue:
            return results  # type: ignore[return-value]
        m = self.seq_len_multiple
        seq_len = -(-max(caps[i] for i, _ in queue) // m) * m
        if seq_len > self.max_total_tokens:
            raise ValueError(f"Sampler: one sequence needs {seq_len} cache rows (prompt + max_new_tokens, capped by "
                             f"max_context) but max_total_tokens={self.max_total_tokens}; raise max_total_tokens or "
                             "lower max_new_tokens / max_context")
        slots = min(self.max_batch, len(queue), self.max_total_tokens // seq_len)
        if slots < min(self.max_batch, len(queue)) and (slots, seq_len) != self._capped:
            self._capped = (slots, seq_len)
            log.warning("Sampler: the KV-cache budget max_total_tokens=%d holds %d slots of %d rows, fewer than "
                        "max_batch=%d; raise rl.sampling.max_total_tokens (or lower max_new_tokens / max_context) "
                        "to decode more sequences at once", self.max_total_tokens, slots, seq_len, self.max_batch)
        st = self._prepare(_Shape(slots, seq_len, params.max_new_tokens, len(params.stop_ids)), params)
        cache = self._cache
        slot_item: list[tuple[int, int] | None] = [None] * slots
        host_gen = [0] * slots  # generated counts as of the last check (exact for harvested slots)

        def harvest() -> None:
            codes, gens = torch.stack([st.code_B, st.gen_B]).cpu().tolist()
            done = [b for b in range(slots) if slot_item[b] is not None and codes[b]]
            for b in range(slots):
                host_gen[b] = gens[b]
            if not done:
                return
            width = max(gens[b] for b in done)
            idx = torch.tensor(done, device=self.device)
            toks = st.out_tok[idx, :width].cpu().tolist()
            lps = st.out_lp[idx, :width].cpu().tolist()
            for r, b in enumerate(done):
                i, j = slot_item[b]
                g = gens[b]
                results[i][j] = Completion(toks[r][:g], lps[r][:g], _FINISH[codes[b]],
                                           extra={"prompt_tokens": plens[i]})
                slot_item[b] = None
                self.last_stats["tokens"] += g

        while True:
            free = [b for b in range(slots) if slot_item[b] is None]
            if queue and free:
                t = time.perf_counter()
                self._refill(st, cache, prompts, params, queue, free, slot_item, plens, caps, prompt_ids)
                harvest()  # token 0 may already end a sequence (a stop id, max_new_tokens = 1)
                self.last_stats["prefill_s"] += time.perf_counter() - t
                continue
            if all(s is None for s in slot_item):
                break
            # Steps until the next check: sync_every, or sooner when a length limit is due (so a fixed-length
            # batch wastes no step).
            due = min(min(params.max_new_tokens, caps[s[0]] - plens[s[0]]) - host_gen[b]
                      for b, s in enumerate(slot_item) if s is not None)
            steps = max(1, min(self.sync_every, due))
            t = time.perf_counter()
            for _ in range(steps):
                self._step(st, cache, params)
            self.last_stats["steps"] += steps
            harvest()
            self.last_stats["decode_s"] += time.perf_counter() - t
        self.last_stats["total_s"] = time.perf_counter() - t0
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------------
    def _prepare(self, shape: _Shape, params: SamplingParams) -> _State:
        """The cache and state buffers for this call's shape, reused when the shape repeats (then the
        captured graphs are reused too)."""
        if self._cache is None or not self._cache.matches(shape.slots, shape.seq_len, self.dtype, self.device):
            self._cache = self._state = None
            self._graphs.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._cache = KVCache(self.model.cfg.llm, shape.slots, shape.seq_len, self.dtype, self.device)
        if self._state is None or self._state.shape != shape:
            self._graphs.clear()
            self._state = _State(shape, self.device)
        st = self._state
        st.active_B.zero_()
        st.code_B.zero_()
        st.stop_ids.fill_(-1)
        if params.stop_ids:
            st.stop_ids[:len(params.stop_ids)] = torch.tensor(params.stop_ids, dtype=torch.long)
        return st

    def _refill(self, st: _State, cache: KVCache, prompts, params, queue, free, slot_item, plens, caps,
                prompt_ids) -> None:
        """Prefill the next queued sequences into free slots: each distinct prompt once, its K/V copied to the
        slots of its other rollouts, token 0 sampled from its last logits."""
        take: list[tuple[int, int, int]] = []  # (slot, prompt, rollout)
        tokens = 0
        while queue and len(take) < len(free):
            i, j = queue[0]
            new_prompt = not take or take[-1][1] != i
            if new_prompt and take and tokens + plens[i] > self.prefill_tokens:
                break
            queue.popleft()
            take.append((free[len(take)], i, j))
            tokens += plens[i] if new_prompt else 0
        for b, i, j in take:
            slot_item[b] = (i, j)
        firsts: dict[int, int] = {}  # prompt -> its prefill slot
        for b, i, _ in take:
            firsts.setdefault(i, b)
        order = list(firsts)
        batch = pack_prompts([prompts[i] for i in order]).to(self.device, dtype=self.dtype)
        logits_UV = self.model.prefill(batch, cache, torch.tensor([firsts[i] for i in order], device=self.device))
        copies = [(firsts[i], b) for b, i, _ in take if b != firsts[i]]
        if copies:
            src, dst = (torch.tensor(c, device=self.device) for c in zip(*copies))
            cache.copy_slots(src, dst, max(plens[i] for _, i, _ in take))
        dev = self.device
        slot_N = torch.tensor([b for b, _, _ in take], device=dev)
        st.plen_B[slot_N] = torch.tensor([plens[i] for _, i, _ in take], device=dev)
        st.cap_B[slot_N] = torch.tensor([caps[i] for _, i, _ in take], device=dev)
        st.key_B[slot_N] = torch.tensor([sequence_key(params.seed, prompt_ids[i], j) for _, i, j in take], device=dev)
        st.gen_B[slot_N] = 0
        st.code_B[slot_N] = 0
        st.active_B[slot_N] = True
        row_N = torch.tensor([order.index(i) for _, i, _ in take], device=dev)
        tok_N, lp_N = sample_tokens(logits_UV[row_N], params, st.key_B[slot_N], st.gen_B[slot_N])
        tok_B, lp_B = st.tok_B.clone(), torch.zeros_like(st.out_lp[:, 0])
        mask_B = torch.zeros_like(st.active_B)
        tok_B[slot_N], lp_B[slot_N], mask_B[slot_N] = tok_N, lp_N, True
        st.record(tok_B, lp_B, mask_B)

    # ---------------------------------------------------------------------------------------------
    def idle_decode_steps(self, params: SamplingParams, steps: int) -> None:
        """Run `steps` eager decode steps over the state of the last `generate` with every slot idle: the kernels of a
        live decode step (idle slots compute too), nothing recorded. For profiling the decode step
        (bench.rollout --profile); the next `generate` starts from fresh state anyway."""
        if self._state is None or self._cache is None:
            raise RuntimeError("idle_decode_steps: call generate() first (it sets up the KV cache and the slots)")
        self._state.active_B.zero_()
        for _ in range(steps):
            self._decode(self._state, self._cache, params)

    def _decode(self, st: _State, cache: KVCache, params: SamplingParams) -> None:
        """One decode step of every slot (idle slots compute too and record nothing)."""
        self._sample_record(st, self.model.decode_step(st.tok_B, st.pos_B, cache), params)

    @staticmethod
    def _sample_record_eager(st: _State, logits_BV: torch.Tensor, params: SamplingParams) -> None:
        tok_B, lp_B = sample_tokens(logits_BV, params, st.key_B, st.gen_B)
        st.record(tok_B, lp_B, st.active_B)

    def _step(self, st: _State, cache: KVCache, params: SamplingParams) -> None:
        if not self.cuda_graphs:
            return self._decode(st, cache, params)
        key = (params.temperature == 0, params.temperature, params.top_k, params.top_p)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(st, cache, params)
            if graph is None:
                return self._decode(st, cache, params)
            self._graphs[key] = graph
        graph.replay()

    def _capture(self, st: _State, cache: KVCache, params: SamplingParams) -> torch.cuda.CUDAGraph | None:
        """Capture the decode step. Warm-up runs with every slot masked off, so they record nothing; their
        cache writes rewrite each slot's current row with the K/V the real step writes there too."""
        active = st.active_B.clone()
        try:
            st.active_B.zero_()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode(st, cache, params)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode(st, cache, params)
        except Exception as e:  # noqa: BLE001 - an op that syncs or allocates on the host cannot be captured
            if self._graphs_required:
                raise
            log.warning("Sampler: CUDA-graph capture of the decode step failed (%s: %s); decoding eagerly",
                        type(e).__name__, e)
            self.cuda_graphs = False
            graph = None
        finally:
            st.active_B.copy_(active)
        return graph
