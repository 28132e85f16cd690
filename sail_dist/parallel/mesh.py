"""Parallel sizes (DP, PP, EP, VPP), their validation, and where each rank sits.

Layout (Megatron-core's default order "tp-cp-ep-dp-pp" with TP = CP = 1): the pipeline dimension is the
slowest, data parallel the fastest, and expert parallelism is carved out of each stage's data-parallel
ranks:

    rank     = dp_rank + dp * pp_rank
    ep_rank  = dp_rank % ep            (ranks of one EP group hold different experts)
    edp_rank = dp_rank // ep           (ranks of one expert-DP group hold the same experts)

Every error names the config key, the numbers involved and a way out.
"""
from __future__ import annotations

from dataclasses import dataclass

from sail_dist.config import ModelConfig, ParallelConfig


class ParallelConfigError(ValueError):
    """The parallel layout cannot work with this world size / model / step shape; the message says why."""


@dataclass(frozen=True)
class RankCoords:
    rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int


@dataclass(frozen=True)
class ParallelDims:
    world: int
    dp: int
    pp: int
    ep: int = 1
    vpp: int = 1

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard."""
        return self.dp // self.ep

    @property
    def virtual_stages(self) -> int:
        return self.pp * self.vpp

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the world of {self.world}")
        pp_rank, dp_rank = divmod(rank, self.dp)
        return RankCoords(rank, pp_rank, dp_rank, dp_rank % self.ep, dp_rank // self.ep)

    def rank_of(self, pp_rank: int, dp_rank: int) -> int:
        return dp_rank + self.dp * pp_rank

    def describe(self) -> str:
        s = f"world {self.world} = PP {self.pp} x DP {self.dp}"
        if self.ep > 1:
            s += f" (EP {self.ep} x expert-DP {self.edp} inside DP)"
        if self.vpp > 1:
            s += f", {self.vpp} virtual stages per rank (interleaved 1F1B)"
        return s


def resolve_parallel_dims(par: ParallelConfig, world_size: int, model: ModelConfig | None = None,
                          micro_batches: int | None = None) -> ParallelDims:
    """Sizes from `parallel.*` and the world size, validated (also against the model and the step's
    micro-batch count when given)."""
    def fail(key: str, msg: str):
        raise ParallelConfigError(f"parallel.{key}: {msg}")

    for key in ("pp", "ep", "vpp"):
        if getattr(par, key) < 1:
            fail(key, f"must be >= 1, got {getattr(par, key)}")
    if world_size < 1:
        raise ParallelConfigError(f"world_size must be >= 1, got {world_size}")
    if world_size % par.pp:
        fail("pp", f"world_size {world_size} is not divisible by pp={par.pp}: launch a multiple of {par.pp} processes")
    dp = world_size // par.pp
    if par.dp not in (0, dp):
        fail("dp", f"dp={par.dp} but world_size {world_size} / pp {par.pp} gives dp={dp}: set parallel.dp=0 (derived) "
                   f"or launch {par.dp * par.pp} processes")
    if dp % par.ep:
        fail("ep", f"ep={par.ep} must divide the data-parallel size dp={dp} (world {world_size} / pp {par.pp}): "
                   "expert parallelism shards experts over a slice of each stage's data-parallel ranks")
    if par.vpp > 1 and par.pp == 1:
        fail("vpp", f"vpp={par.vpp} (interleaved virtual stages) needs pipeline parallelism: set parallel.pp > 1")
    if par.vpp > 1 and micro_batches is not None and micro_batches % par.pp:
        fail("vpp", f"the interleaved schedule needs train.micro_batches to be a multiple of pp={par.pp}, "
                    f"got {micro_batches}")
    dims = ParallelDims(world=world_size, dp=dp, pp=par.pp, ep=par.ep, vpp=par.vpp)
    if model is not None:
        _check_model(dims, par, model)
    return dims


def _check_model(dims: ParallelDims, par: ParallelConfig, model: ModelConfig) -> None:
    llm, vit = model.llm, model.vit
    if dims.ep > 1:
        if llm.num_experts == 0:
            raise ParallelConfigError(f"parallel.ep={dims.ep}: expert parallelism needs an MoE model "
                                      "(model.llm.num_experts > 0)")
        if llm.num_experts % dims.ep:
            raise ParallelConfigError(f"parallel.ep={dims.ep} must divide model.llm.num_experts={llm.num_experts}")
    n_virtual = dims.virtual_stages
    if not par.split.llm and llm.num_layers < n_virtual:
        raise ParallelConfigError(
            f"parallel.pp={dims.pp} x vpp={dims.vpp}: {n_virtual} pipeline stages but the LLM has only "
            f"{llm.num_layers} layers (model.llm.num_layers); every stage needs at least one layer")
    if par.split.llm:
        check_split("llm", par.split.llm, llm.num_layers, dims.pp, dims.vpp)
        inner = par.split.llm[1:-1] if len(par.split.llm) > 2 else []
        if any(n == 0 for n in inner):
            raise ParallelConfigError(f"parallel.split.llm={par.split.llm}: a middle pipeline stage would hold no LLM "
                                      "layer (only the first and last stages carry other work)")
    if par.split.vit:
        check_split("vit", par.split.vit, vit.num_layers, dims.pp, dims.vpp)
        if par.split.vit[0] != vit.num_layers:
            raise ParallelConfigError(
                f"parallel.split.vit={par.split.vit}: the ViT must sit whole on the first pipeline stage, e.g. "
                f"[{vit.num_layers}{', 0' * (len(par.split.vit) - 1)}] (splitting it across stages is not supported)")


def check_split(part: str, split: list[int], total: int, pp: int, vpp: int) -> None:
    """An explicit per-stage list (MindSpeed-MM's `pipeline_num_layers`): one count per (virtual) stage, >= 0,
    summing to the model's layer count. With vpp > 1 its order is virtual-stage order (chunk-major)."""
    allowed = {pp, pp * vpp}
    if len(split) not in allowed:
        want = f"{pp}" if vpp == 1 else f"{pp} (pp) or {pp * vpp} (pp x vpp, chunk-major)"
        raise ParallelConfigError(f"parallel.split.{part}={split} has {len(split)} entries; expected {want}")
    if vpp > 1 and len(split) != pp * vpp:
        raise ParallelConfigError(f"parallel.split.{part}={split}: with vpp={vpp} give one count per virtual stage "
                                  f"({pp * vpp} entries, chunk-major: chunk 0 of every rank, then chunk 1, ...)")
    if any(n < 0 for n in split):
        raise ParallelConfigError(f"parallel.split.{part}={split} has a negative count")
    if sum(split) != total:
        raise ParallelConfigError(f"parallel.split.{part}={split} sums to {sum(split)} but the model has {total} "
                                  f"{part.upper()} layers (model.{part}.num_layers)")
