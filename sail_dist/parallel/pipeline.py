"""Split OUR SailVL into pipeline stages (no second model definition).

Placement (MindSpeed-MM's VLM scheme): the first stage holds the ViT, the adapter and the token
embeddings (plus its share of LLM layers); the last stage holds the final norm, the lm head and the
loss; the LLM layers are split contiguously, either

- by cost: training FLOPs of a reference micro-batch (model/flops.py), the ViT + adapter counted on the
  first stage and the lm head on the last; the split minimises the most expensive stage (ties: the
  most even split), or
- by explicit per-stage lists, `parallel.split.llm=[12, 16]` (`parallel.split.vit=[24, 0]`: the ViT is
  always whole on the first stage).

With vpp > 1 (interleaved 1F1B) there are pp x vpp virtual stages in pipeline order
v = chunk * pp + pp_rank: rank p holds chunks v = p, p + pp, p + 2 pp, ...

A `PipelineStage` keeps the original submodules under their original attribute paths, so parameter
names (`llm.layers.17.attn.qkv_proj.weight`) are the unsplit model's: checkpoints and HF export need no
renaming. Its forward runs SailVL's own `embed` / `decode(layers=...)` / `llm.loss`. Between stages
the activation travels as [T, 1, D] (Megatron's p2p wants 3-D [s, b, h]). Packed micro-batches have
varying T: either the schedule exchanges shapes (Megatron's `variable_seq_lengths`), or, with
`pad_to` set, every activation is zero-padded to one length for the step (all stages of a pipeline
read the same micro-batches, so they agree on it without communicating) and sliced back on receipt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from sail_dist.config import ModelConfig, PipelineSplit
from sail_dist.data.batch import PackedBatch
from sail_dist.model.flops import ALL_MODULES, FlopsByPart, PartFlops, flops_by_part
from sail_dist.parallel.mesh import ParallelConfigError, check_split


# ------------------------------------------------------------------------------------------------ cost
@dataclass(frozen=True)
class Workload:
    """The reference micro-batch the cost-based split balances: `tokens` packed LLM tokens in samples of
    `seqlen` tokens (attention cost; the last one shorter if `seqlen` does not divide `tokens`), with `tiles`
    fixed-resolution image tiles going through the ViT."""

    tokens: int = 8192
    seqlen: int = 2048
    tiles: int = 16

    @staticmethod
    def from_config(cfg: ModelConfig, pack_tokens: int, max_sample_tokens: int = 0, vision_share: float = 0.5
                    ) -> "Workload":
        """A packed micro-batch of `pack_tokens`, samples as long as allowed (capped at 4096), `vision_share`
        of its tokens coming from image tiles (SAIL-VL2 SFT data is image-heavy; explicit splits override)."""
        seqlen = min(max_sample_tokens or pack_tokens, pack_tokens, 4096)
        tiles = max(1, round(pack_tokens * vision_share / cfg.tokens_per_tile))
        return Workload(tokens=pack_tokens, seqlen=seqlen, tiles=tiles)

    def seqlens(self) -> list[int]:
        """Lengths of the packed samples."""
        full, rest = divmod(self.tokens, self.seqlen)
        return [self.seqlen] * full + ([rest] if rest else [])

    def flops(self, cfg: ModelConfig, trainable: Iterable[str] = ALL_MODULES) -> FlopsByPart:
        """model/flops.py's count of this micro-batch by part (every tile a full `cfg.vit.grid` square)."""
        return flops_by_part(cfg, self.seqlens(), [cfg.vit.grid ** 2] * self.tiles, trainable)


def balance_layers(layer_costs: list[float], n_stages: int, first_extra: float = 0.0, last_extra: float = 0.0
                   ) -> list[int]:
    """Contiguous split of the layers into `n_stages` counts minimising the most expensive stage (the first
    stage also pays `first_extra`, the last `last_extra`); ties go to the smallest sum of squared stage
    costs (the most even split). The first and last stages may get 0 layers (they carry other work);
    middle stages get at least one. Exact dynamic programme, O(stages x layers^2)."""
    n = len(layer_costs)
    if n_stages < 1:
        raise ValueError("n_stages must be >= 1")
    if n_stages == 1:
        return [n]
    if n < n_stages - 2:
        raise ParallelConfigError(f"{n} LLM layers cannot fill {n_stages} pipeline stages")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:  # stage s holds layers [a, b)
        extra = (first_extra if s == 0 else 0.0) + (last_extra if s == n_stages - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    inf = (math.inf, math.inf)
    # best[s][j]: (max cost, sum of squares) placing layers [0, j) on stages [0, s]; arg[s][j] = start of stage s
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    arg = [[0] * (n + 1) for _ in range(n_stages)]
    for j in range(n + 1):
        c = cost(0, 0, j)
        best[0][j] = (c, c * c)
    for s in range(1, n_stages):
        min_len = 0 if s == n_stages - 1 else 1
        for j in range(n + 1):
            for a in range(j - min_len + 1):
                prev = best[s - 1][a]
                if prev == inf:
                    continue
                c = cost(s, a, j)
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[s][j]:
                    best[s][j], arg[s][j] = cand, a
    counts, j = [], n
    for s in range(n_stages - 1, 0, -1):
        a = arg[s][j]
        counts.append(j - a)
        j = a
    counts.append(j)
    return counts[::-1]


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class StageSpec:
    """One (virtual) pipeline stage: what it holds, where it runs."""

    index: int  # pipeline order, 0 .. pp*vpp-1
    pp_rank: int
    chunk: int  # model chunk on its rank (interleaved schedule)
    llm_layers: range
    first: bool  # ViT + adapter + token embeddings
    last: bool  # final norm + lm head + loss
    cost: float = 0.0  # training FLOPs of the reference micro-batch (0 for explicit splits without costs)


@dataclass(frozen=True)
class PipelinePlan:
    pp: int
    vpp: int
    stages: tuple[StageSpec, ...]
    source: str = "cost"  # "cost" or "explicit"
    costs: PartFlops | None = field(default=None, compare=False)  # training FLOPs of the reference micro-batch

    def for_rank(self, pp_rank: int) -> list[StageSpec]:
        """This rank's model chunks, in chunk order (what Megatron's interleaved schedule expects)."""
        return sorted((s for s in self.stages if s.pp_rank == pp_rank), key=lambda s: s.chunk)

    @property
    def llm_split(self) -> list[int]:
        return [len(s.llm_layers) for s in self.stages]

    def stage_of_layer(self, i: int) -> StageSpec:
        return next(s for s in self.stages if i in s.llm_layers)

    def describe(self) -> str:
        rows = []
        total = sum(s.cost for s in self.stages) or 1.0
        for s in self.stages:
            parts = (["vit+adapter+embed"] if s.first else []) + (
                [f"llm {s.llm_layers.start}-{s.llm_layers.stop - 1}"] if len(s.llm_layers) else []) + (
                ["norm+head+loss"] if s.last else [])
            share = f" {100 * s.cost / total:5.1f}% of FLOPs" if s.cost else ""
            rows.append(f"  stage {s.index} (pp rank {s.pp_rank}, chunk {s.chunk}):{share} {', '.join(parts)}")
        return f"pipeline split ({self.source}): llm {self.llm_split}\n" + "\n".join(rows)


def plan_pipeline(cfg: ModelConfig, pp: int, vpp: int = 1, split: PipelineSplit | None = None,
                  trainable: Iterable[str] = ALL_MODULES, workload: Workload | None = None) -> PipelinePlan:
    """The stage layout: explicit `split` lists when given, else the cost-balanced split."""
    n_virtual = pp * vpp
    split = split or PipelineSplit()
    costs = (workload or Workload()).flops(cfg, trainable).train
    if split.vit:
        check_split("vit", split.vit, cfg.vit.num_layers, pp, vpp)
        if split.vit[0] != cfg.vit.num_layers:
            raise ParallelConfigError(f"parallel.split.vit={split.vit}: the ViT must sit whole on the first stage")
    if split.llm:
        check_split("llm", split.llm, cfg.llm.num_layers, pp, vpp)
        counts, source = list(split.llm), "explicit"
    else:
        if cfg.llm.num_layers < n_virtual:
            raise ParallelConfigError(f"{n_virtual} pipeline stages (pp={pp} x vpp={vpp}) but only "
                                      f"{cfg.llm.num_layers} LLM layers")
        counts = balance_layers(list(costs.layers), n_virtual, costs.vision, costs.head)
        source = "cost"
    stages, start = [], 0
    for v, n in enumerate(counts):
        chunk, pp_rank = divmod(v, pp)
        layers = range(start, start + n)
        first, last = v == 0, v == n_virtual - 1
        stages.append(StageSpec(v, pp_rank, chunk, layers, first, last, costs.select(layers, vision=first, head=last)))
        start += n
    return PipelinePlan(pp, vpp, tuple(stages), source, costs)


# ------------------------------------------------------------------------------------------- stage module
class _Elsewhere(nn.Module):
    """Placeholder for a decoder layer that lives on another pipeline stage (holds no parameters)."""

    def __init__(self, index: int, stage: int) -> None:
        super().__init__()
        self.index, self.stage = index, stage

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"LLM layer {self.index} lives on pipeline stage {self.stage}, not on this rank")

    def extra_repr(self) -> str:
        return f"layer {self.index} on stage {self.stage}"


class PipelineStage(nn.Module):
    """One (virtual) stage of a SailVL, built around the original submodules.

    forward(batch): the first stage embeds the batch (vision tokens scattered in), every stage runs its
    LLM layers, the last stage returns the per-token loss [T] (fp32); the others return [T, 1, D]. Stages
    after the first take their input through Megatron's `set_input_tensor`.
    """

    def __init__(self, model: nn.Module, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.first:
            self.vision = model.vision
            self.adapter = model.adapter
        self.llm = nn.Module()
        if spec.first:
            self.llm.embed_tokens = model.llm.embed_tokens
        self.llm.layers = nn.ModuleDict({str(i): model.llm.layers[i] for i in spec.llm_layers})
        if spec.last:
            self.llm.norm = model.llm.norm
            self.llm.lm_head = model.llm.lm_head
        object.__setattr__(self, "_model", model)  # not a submodule: parameters are registered above only
        self.input_tensor: torch.Tensor | None = None
        self.pad_to: int | None = None  # fixed inter-stage length for this step (None: exact lengths)

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedule hands the previous stage's activation ([T, 1, D]) here before forward."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        m = self._model
        if self.spec.first:
            h_TD = m.embed(batch)
        else:
            if self.input_tensor is None:
                raise RuntimeError(f"pipeline stage {self.spec.index} got no input tensor from stage "
                                   f"{self.spec.index - 1}")
            h_TD = self.input_tensor.squeeze(1)
            if self.pad_to is not None:
                h_TD = h_TD[:batch.num_tokens]
        if h_TD.shape[0] != batch.num_tokens:
            raise RuntimeError(f"pipeline stage {self.spec.index} received {h_TD.shape[0]} tokens for a micro-batch "
                               f"of {batch.num_tokens}: the stages are not reading the same micro-batches")
        h_TD = m.decode(h_TD, batch, layers=self.spec.llm_layers)
        if self.spec.last:
            return m.llm.loss(h_TD, batch.labels)
        if self.pad_to is not None:
            if self.pad_to < h_TD.shape[0]:
                raise RuntimeError(f"micro-batch of {h_TD.shape[0]} tokens exceeds the step's pad length {self.pad_to}")
            h_TD = torch.nn.functional.pad(h_TD, (0, 0, 0, self.pad_to - h_TD.shape[0]))
        return h_TD.unsqueeze(1)


def build_stages(model: nn.Module, plan: PipelinePlan, pp_rank: int) -> list[PipelineStage]:
    """This rank's stage modules (one per chunk), and `model` pruned to what they hold.

    Layers of other stages become parameterless placeholders, the vision side and the embeddings leave
    ranks without the first stage, the norm and head leave ranks without the last. Tied embeddings
    across stages: the last stage gets its own copy of the embedding matrix as the lm head (same values);
    the backend keeps the two copies in sync by summing their gradients (Megatron's embedding group).
    """
    specs = plan.for_rank(pp_rank)
    if not specs:
        raise ValueError(f"pipeline rank {pp_rank} has no stage in this plan (pp={plan.pp})")
    local = {i for s in specs for i in s.llm_layers}
    has_first = any(s.first for s in specs)
    has_last = any(s.last for s in specs)
    llm = model.llm
    tied = llm.lm_head.weight is llm.embed_tokens.weight
    if has_last and tied and not has_first:
        llm.lm_head.weight = nn.Parameter(llm.embed_tokens.weight.detach().clone(),
                                          requires_grad=llm.embed_tokens.weight.requires_grad)
    for i in range(len(llm.layers)):
        if i not in local:
            llm.layers[i] = _Elsewhere(i, plan.stage_of_layer(i).index)
    if not has_first:
        model.vision = None
        model.adapter = None
        llm.embed_tokens = None
    if not has_last:
        llm.norm = None
        llm.lm_head = None
    return [PipelineStage(model, s) for s in specs]
