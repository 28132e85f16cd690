"""The NPU backend's Engine: our SailVL split into pipeline stages and expert-parallel shards, driven by
Megatron-core (schedules, DDP, distributed optimizer, dist_checkpointing).

Build order (parallelism applied from outside; the model is never forked): the shared model recipe
(parallel/recipe.py: build -> freeze -> activation checkpointing -> MoE hooks) -> experts swapped for this EP
rank's shard (parallel/expert.py) -> pipeline stages for this PP rank (parallel/pipeline.py) -> device / dtype
-> one Megatron DDP per model chunk -> distributed optimizer (dense + expert parts). This module imports
Megatron: `NPUBackend.setup` prepares the platform (MindSpeed on Ascend, the device shim on CPU) before
`NPUBackend.build` imports it.

Loss, spelled out (the objective is the GPU backend's, sail_dist/objectives): the objective returns each
micro-batch's share of the step objective. Megatron runs with `calculate_per_token_loss=True`: the last stage's
loss function returns (loss, count, logs), gradients are SUMMED over DP, and `finalize_model_grads` divides
every gradient by the count summed over micro-batches and DP ranks. Our count is 1 per micro-batch, so that sum
is M * dp, and we return `share * M * dp`: the result is exactly d(objective).

MoE aux loss: the GPU backend's gradient is coeff / (n_moe_layers * M * DP) per micro-batch, rank and layer.
Ours is injected inside the model (AttachAuxLoss) and then divided by M * dp like everything else, so each
layer's `aux_grad_scale` = coeff / n_moe_layers.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import time

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedTensor
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from sail_dist.backends.base import (DistEnv, LayerGradRecorder, TrainStepStats, all_reduce_sum, check_micro_batches,
                                    model_dtype)
from sail_dist.backends.npu.megatron_compat import MCORE_DATA_LOST, checkpoint_keeps_mcore_data
from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.kernels import opset_for_backend
from sail_dist.model.flops import batch_flops_by_part
from sail_dist.model.sailvl import ModelOutput
from sail_dist.objectives import build_objective
from sail_dist.parallel.expert import apply_expert_parallel
from sail_dist.parallel.mesh import ParallelDims
from sail_dist.parallel.pipeline import PipelinePlan, Workload, build_stages, plan_pipeline
from sail_dist.parallel.recipe import build_train_model

log = logging.getLogger(__name__)


def resolve_opset(cfg: Config, platform: str):
    """auto: the torch_npu OpSet on Ascend, its pure-PyTorch emulation (same code, same semantics) elsewhere."""
    name = cfg.backend.opset
    if name == "auto":
        name = "npu" if platform == "npu" else "npu_emulated"
    if name == "npu" and platform != "npu":
        raise ValueError("backend.opset=npu needs an Ascend NPU with torch_npu; use backend.opset=npu_emulated "
                         "(or auto) on CPU/CUDA")
    return opset_for_backend(name, cfg.backend)


def _tied_head(name: str, t: torch.Tensor, sd: dict) -> bool:
    """The lm head of a stage that also holds the embedding it is tied to (the same tensor twice)."""
    return name == "llm.lm_head.weight" and t is sd.get("llm.embed_tokens.weight")


class MegatronEngine(LayerGradRecorder):
    def __init__(self, cfg: Config, env: DistEnv, dims: ParallelDims, platform: str) -> None:
        self.cfg, self.env, self.dims, self.platform = cfg, env, dims, platform
        t, llm = cfg.train, cfg.model.llm
        me = dims.coords(env.rank)
        self.coords = me
        self.ops = resolve_opset(cfg, platform)
        self.dtype = model_dtype(cfg, env.device)

        model, self.trainable = build_train_model(
            cfg, self.ops, aux_loss_weight=llm.aux_loss_coeff,
            reduce_counts=all_reduce_sum(ps.get_data_parallel_group()) if dims.dp > 1 else None)
        self.objective = build_objective(t.objective, cfg)
        # Global MoE layer numbering (for expert-count stats) before the model is pruned to this stage.
        self.moe_layer_ids = [i for i in range(llm.num_layers) if llm.is_moe_layer(i)]
        if dims.ep > 1:
            apply_expert_parallel(model, ps.get_expert_model_parallel_group(), me.ep_rank, dims.ep)
        tied = llm.tie_embeddings
        self.plan: PipelinePlan = plan_pipeline(
            cfg.model, dims.pp, dims.vpp, cfg.parallel.split, t.train_modules,
            Workload.from_config(cfg.model, cfg.data.pack_tokens, cfg.data.max_sample_tokens))
        self.stages = build_stages(model, self.plan, me.pp_rank)
        self.model = model  # this rank's part of the SailVL (other stages' layers are placeholders)
        model.to(device=env.device, dtype=self.dtype)

        self.tied_across_stages = tied and dims.pp > 1
        if self.tied_across_stages and self.stages[-1].spec.last:
            # The last stage's lm head is a copy of the embedding (pipeline.build_stages): Megatron sums the two
            # copies' gradients over the embedding group and leaves the copy out of the gradient norm.
            w = model.llm.lm_head.weight
            w.shared = True
            w.shared_embedding = True

        # MoE layers of each local chunk, with their global MoE index (for the step's aux loss and expert counts).
        self._chunk_moe = [[(self.moe_layer_ids.index(layer.index), layer.mlp) for layer in st.llm.layers.values()
                            if layer.index in self.moe_layer_ids] for st in self.stages]

        # Megatron config: model metadata for the schedules and DDP (our layers are not Megatron's).
        self.pad_pipeline = dims.vpp > 1
        self.mcfg = TransformerConfig(
            num_layers=llm.num_layers, hidden_size=llm.hidden_size, num_attention_heads=llm.num_heads,
            pipeline_model_parallel_size=dims.pp,
            virtual_pipeline_model_parallel_size=dims.vpp if dims.vpp > 1 else None,
            pipeline_dtype=self.dtype, params_dtype=self.dtype, bf16=self.dtype == torch.bfloat16,
            # Packed micro-batches: T differs per micro-batch. 1F1B: p2p exchanges the shapes. Interleaved: its
            # asymmetric warm-up calls deadlock on that handshake (a rank waits for a shape its peer sends only
            # later), so activations are padded to the step's longest micro-batch instead (pipeline.py).
            variable_seq_lengths=not self.pad_pipeline,
            calculate_per_token_loss=True,
            moe_token_dispatcher_type="alltoall",  # unused (our dispatcher); allgather would veto variable lengths
            deallocate_pipeline_outputs=False,
            # Interleaved: with pp = 2 the previous and next stage are one peer and one call sends both ways; the
            # batched p2p path posts both sends to that peer in one order and both receives in another (payloads
            # swap), Megatron's `_p2p_ops` orders them by rank parity on two communicators. 1F1B keeps batching.
            batch_p2p_comm=dims.vpp == 1,
        )
        ddp_cfg = DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=cfg.backend.grad_accum_dtype == "fp32",
            overlap_grad_reduce=False, overlap_param_gather=False, check_for_nan_in_grad=False)
        self.chunks = []
        for st in self.stages:
            st.config = self.mcfg
            st.model_type = ModelType.encoder_or_decoder
            st.pre_process, st.post_process = st.spec.first, st.spec.last
            st.share_embeddings_and_output_weights = self.tied_across_stages
            st.shared_embedding_or_output_weight = functools.partial(self._shared_weight, st)
            self.chunks.append(DistributedDataParallel(self.mcfg, ddp_cfg, st))
        self.mcfg.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                            adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], adam_eps=t.adam_eps,
                            clip_grad=t.grad_clip, bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                            use_distributed_optimizer=True),
            self.chunks)
        self._init_optimizer_state()
        self._optimizer_steps = 0  # successful updates (skipped steps do not count): Adam's step, checkpointed
        self._chunk_of = {id(c): i for i, c in enumerate(self.chunks)}
        self._param_names = {p: n for st in self.stages for n, p in st.named_parameters()}
        # The parts of the model this rank computes (FLOPs accounting): its LLM layers, the vision side and
        # embedding on the first stage, the head on the last.
        self._local_layers = [i for st in self.stages for i in st.spec.llm_layers]
        self._has_vision = any(st.spec.first for st in self.stages)
        self._has_head = any(st.spec.last for st in self.stages)
        if env.rank == 0:
            log.info("NPU backend engine: %s, opset=%s, %s, trainable=%s\n%s", self.dims.describe(), self.ops.name,
                     self.dtype, self.trainable, self.plan.describe())

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _shared_weight(stage):
        """Megatron's hook for tied embeddings across stages: the embedding (first) or its copy (last)."""
        return stage.llm.embed_tokens.weight if stage.spec.first else stage.llm.lm_head.weight

    def _rank_flops(self, mb: PackedBatch) -> float:
        """Training FLOPs this rank performs for micro-batch `mb`: its LLM layers, the vision side and the embedding
        on the first stage, the head on the last. Expert compute is counted where the tokens come from (top-k
        active), so world sums are right."""
        parts = batch_flops_by_part(self.cfg.model, mb, self.cfg.train.train_modules).train
        return parts.select(self._local_layers, vision=self._has_vision, head=self._has_head)

    def _init_optimizer_state(self) -> None:
        """Create torch AdamW's per-parameter state now (what its first step would create: step 0, zero moments).

        Megatron's distributed optimizer reads `step` from that state to save or load a checkpoint, which fails
        on a fresh torch-AdamW optimizer (the fallback when neither Transformer Engine nor apex is there):
        resuming into a new engine, or saving before the first step. Numerically a no-op."""
        for opt in self.optimizer.chained_optimizers:
            inner = getattr(opt, "optimizer", None)
            if not isinstance(inner, torch.optim.AdamW):
                continue
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                          "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _set_lr(self, lr: float) -> None:
        # Megatron's param groups carry lr/wd multipliers (no weight decay on 1-D params: the GPU rule too).
        wd = self.cfg.train.weight_decay
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = wd * g.get("wd_mult", 1.0)

    # ----------------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        out = model(batch)
        for gi, m in self._chunk_moe[self._chunk_of[id(model)]]:  # on device: no host sync per layer
            self._sums[1] += m.last_aux.double()
            self._counts[gi] += m.last_counts.float()
        return out, functools.partial(self._loss_func, batch)

    def _loss_func(self, batch: PackedBatch, loss_T: torch.Tensor):
        """Last stage: (share * M * dp, count 1, logs); Megatron divides by the summed counts, M * dp."""
        share = self.objective.loss(ModelOutput(loss_T=loss_T, aux_loss=None), batch)
        self._sums[0] += share.loss.detach().double()
        for j, name in enumerate(self.objective.metrics):
            self._sums[2 + j] += share.metrics[name].detach().double()
        return share.loss * self._grad_scale, self._count_one, {}

    def train_step(self, micro_batches: list[PackedBatch], lr: float) -> TrainStepStats:
        M = check_micro_batches(micro_batches, self.cfg.train.micro_batches)
        t0 = time.perf_counter()
        dev = self.env.device
        self._set_lr(lr)
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()

        dp_group = ps.get_data_parallel_group()
        obj = self.objective
        obj.begin_step(micro_batches, all_reduce_sum(dp_group, device=dev if dev.type != "cpu" else None))
        self._grad_scale = M * self.dims.dp
        self._count_one = torch.ones((), dtype=torch.int, device=dev)  # read only: Megatron adds it to its own total
        n_moe = len(self.moe_layer_ids)
        # [objective (last stage), aux loss (every stage), objective metrics (last stage)...]: shares, summed below
        self._sums = torch.zeros(2 + len(obj.metrics), dtype=torch.float64, device=dev)
        E = self.cfg.model.llm.num_experts
        self._counts = torch.zeros(n_moe, E, dtype=torch.float32, device=dev) if n_moe else None

        batches = [mb.to(dev) for mb in micro_batches]
        T_max = max(mb.num_tokens for mb in micro_batches)
        for st in self.stages:
            st.pad_to = T_max if self.pad_pipeline else None
        iterator = [iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches)
        get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iterator,
            model=self.chunks, num_microbatches=M,
            seq_length=T_max, micro_batch_size=1, forward_only=False)

        # Objective, metrics (last stage) and aux loss / expert counts (every stage) -> global, on every rank: all
        # are sums, over this stage's DP group and then over the stages (only the last stage holds the objective).
        stats = self._sums
        dist.all_reduce(stats, group=dp_group)
        pp_group = ps.get_pipeline_model_parallel_group()
        if self.dims.pp > 1:
            dist.all_reduce(stats, group=pp_group)
        loss_val = float(stats[0])
        aux = float(stats[1]) / (n_moe * M * self.dims.dp) if n_moe else 0.0
        counts = None
        if self._counts is not None:
            if self.dims.pp > 1:
                dist.all_reduce(self._counts, group=pp_group)
            counts = self._counts.cpu()

        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if self.track_layer_grads:
            self.last_layer_grads = self._layer_grads()  # reduced, before clipping and the update
        skipped = not (math.isfinite(loss_val) and math.isfinite(grad_norm))
        if skipped:
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
        else:
            self._clip_and_step(grad_norm)
            self._optimizer_steps += 1
        flops = sum(self._rank_flops(mb) for mb in micro_batches)
        # Tokens / samples are counted once per DP rank (on its last stage), so sums over the world are global.
        counted = self.env.is_last_stage
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return TrainStepStats(loss=loss_val, aux_loss=aux, grad_norm=grad_norm, lr=lr,
                              tokens=sum(mb.num_tokens for mb in micro_batches) if counted else 0,
                              samples=sum(mb.num_samples for mb in micro_batches) if counted else 0,
                              skipped=skipped, flops=flops, expert_counts=counts,
                              metrics={n: float(stats[2 + j]) for j, n in enumerate(obj.metrics)},
                              time_s=time.perf_counter() - t0)

    @torch.no_grad()
    def token_logprobs(self, micro_batches: list[PackedBatch]) -> list[torch.Tensor | None]:
        """Forward only, through the pipeline (Megatron's schedule with forward_only=True): per micro-batch the [T]
        fp32 log p(labels[t]) (0 where the label is -100) on the CPU, on the last pipeline stage; None on the other
        stages. Collective: every rank of the job calls it with its DP rank's micro-batches (same count on all)."""
        dev = self.env.device
        for c in self.chunks:
            c.eval()
        batches = [mb.to(dev) for mb in micro_batches]
        T_max = max(mb.num_tokens for mb in micro_batches)
        for st in self.stages:
            st.pad_to = T_max if self.pad_pipeline else None
        got: list[torch.Tensor] = []
        zero = torch.zeros((), dtype=torch.int, device=dev)

        def loss_func(loss_T: torch.Tensor):
            got.append((-loss_T.detach()).float().cpu())
            return loss_T.sum() * 0.0, zero, {}

        def forward_step(data_iterator, model):
            return model(next(data_iterator)), loss_func

        iterator = [iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches)
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterator, model=self.chunks,
            num_microbatches=len(batches), seq_length=T_max, micro_batch_size=1, forward_only=True)
        for c in self.chunks:
            c.train()
        if not self.env.is_last_stage:
            return [None] * len(micro_batches)
        if len(got) != len(micro_batches):
            raise RuntimeError(f"token_logprobs: {len(got)} outputs for {len(micro_batches)} micro-batches")
        return got

    def _clip_and_step(self, grad_norm: float) -> None:
        """Megatron ChainedOptimizer.step() minus its norm computation (done above, shared with the skip check)."""
        clip = self.cfg.train.grad_clip
        for opt in self.optimizer.chained_optimizers:
            if getattr(opt, "is_stub_optimizer", False):
                continue
            if clip > 0:
                clip_grad_by_total_norm_fp32(opt.get_parameters(), max_norm=clip, total_norm=grad_norm)
        self.optimizer.step_with_ready_grads()

    # ----------------------------------------------------------------------------------------------
    def _layer_grads(self) -> dict[str, torch.Tensor]:
        """Collective. Rank 0: per global parameter name, its full reduced gradient (before clipping), on the CPU in
        the gradient buffer's dtype (`main_grad`); {} on the other ranks.

        After the distributed optimizer's reduce-scatter each DP rank holds the reduced gradient of its shard
        only (its range of `main_grad`); expert tensors are split over EP ranks (slice ep_rank of ep on dim 0,
        as `full_state_dict` concatenates them) and stages hold different layers. Every rank sends its pieces
        with their offset in the full flattened tensor, rank 0 places them and checks that each element came
        exactly once. The tied lm-head copy on the last stage (same gradient as the embedding) is left out."""
        pieces: list[tuple[str, tuple[int, ...], int, torch.Tensor]] = []
        for opt in self.optimizer.chained_optimizers:
            if getattr(opt, "is_stub_optimizer", False):
                continue
            for p in opt.model_param_gbuf_map:
                if getattr(p, "shared", False):
                    continue
                r = opt._get_model_param_range_map(p)["param"]
                ep_rank, ep = getattr(p, "expert_parallel", (0, 1))
                full_shape = (p.shape[0] * ep, *p.shape[1:])
                piece = p.main_grad.view(-1)[r.start:r.end].detach().to("cpu", copy=True)
                pieces.append((self._param_names[p], full_shape, ep_rank * p.numel() + r.start, piece))
        gathered = [None] * dist.get_world_size() if self.env.rank == 0 else None
        dist.gather_object(pieces, gathered, dst=0)
        if self.env.rank != 0:
            return {}
        flat: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        seen: dict[str, torch.Tensor] = {}
        for part in gathered:
            for name, shape, offset, piece in part:
                if name not in flat:
                    shapes[name] = tuple(shape)
                    flat[name] = torch.zeros(math.prod(shape), dtype=piece.dtype)
                    seen[name] = torch.zeros(math.prod(shape), dtype=torch.int32)
                flat[name][offset:offset + piece.numel()] = piece
                seen[name][offset:offset + piece.numel()] += 1
        bad = [n for n, c in seen.items() if not bool((c == 1).all())]
        if bad:
            raise RuntimeError(f"gradient shards do not cover these parameters exactly once: {sorted(bad)}")
        return {n: flat[n].view(shapes[n]) for n in sorted(flat)}

    # ----------------------------------------------------------------------------------------------
    def _sharded_model_state(self) -> dict[str, ShardedTensor]:
        """This rank's parameters as ShardedTensors under their global names (the unsplit SailVL's).

        replica_id = (pipeline copy, TP, DP copy): only the all-zero replica writes. Expert slices carry
        their offset in the full [E, ...] tensor; the tied lm-head copy on the last stage is a replica of
        `llm.embed_tokens.weight` (written by the first stage, loaded by both)."""
        dp_rank, edp_rank = self.coords.dp_rank, self.coords.edp_rank
        out: dict[str, ShardedTensor] = {}
        for st in self.stages:
            sd = st.state_dict(keep_vars=True)
            for name, t in sd.items():
                if _tied_head(name, t, sd):
                    continue  # tied on one stage: one tensor, saved once
                if getattr(t, "shared", False):
                    out[name] = ShardedTensor.from_rank_offsets("llm.embed_tokens.weight", t,
                                                                replica_id=(1, 0, dp_rank))
                elif hasattr(t, "expert_parallel"):
                    ep_rank, ep = t.expert_parallel
                    out[name] = ShardedTensor.from_rank_offsets(name, t, (0, ep_rank, ep), replica_id=(0, 0, edp_rank))
                else:
                    out[name] = ShardedTensor.from_rank_offsets(name, t, replica_id=(0, 0, dp_rank))
        return out

    def _sharded_state(self, is_loading: bool) -> dict:
        """Model + optimizer sharded state dict whose keys depend on nothing but the global parameter names.

        Megatron names the optimizer tensors `chained_<i>.optimizer.state.<moment>.<param key>`, where i (dense or
        expert optimizer, or the only one) depends on what a stage holds, and saves the optimizer's non-tensor
        state (param groups) from rank 0 only although group order and hyper-parameters differ per stage. Here
        the chain prefix is dropped (parameter keys are globally unique) and the non-tensor state stays local
        (our lr / weight decay are set every step from the config); the one piece of it that matters, the
        optimizer step count, is saved once as `optimizer_step`. So a checkpoint resumes exactly, and loads
        into another PP / EP / DP layout."""
        model_sd = self._sharded_model_state()
        optim_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)

        def localise(node):
            if isinstance(node, ShardedBase):
                node.key = re.sub(r"^chained_\d+\.", "", node.key)
                return node
            if isinstance(node, dict):
                return {k: localise(v) for k, v in node.items()}
            if isinstance(node, list):
                return [localise(v) for v in node]
            return LocalNonpersistentObject(node)

        return {"model": model_sd, "optimizer": localise(optim_sd), "optimizer_step": self._optimizer_steps}

    def _snapshot_state(self) -> dict:
        """This rank's training state, live: each distributed optimizer's shard of the fp32 main parameters with
        its Adam moments (the inner torch optimizer's parameters and state), this rank's stage modules'
        parameters and buffers (its pipeline stage, its experts; DDP replicas are local), the step count."""
        from sail_dist.backends import snapshot as snap

        state: dict = {}
        for i, opt in enumerate(self.optimizer.chained_optimizers):
            if getattr(opt, "is_stub_optimizer", False):
                continue
            state.update(snap.optimizer_state(f"optimizer{i}", opt.optimizer))
        for si, st in enumerate(self.stages):
            for name, t in st.named_parameters():
                state[f"stage{si}.param.{name}"] = t.data
            for name, t in st.named_buffers():
                state[f"stage{si}.buffer.{name}"] = t
        state["engine.optimizer_steps"] = self._optimizer_steps
        return state

    def snapshot(self, path: str | None = None, memory_limit_bytes: float = math.inf):
        """This rank's state for an AdaLRS rollback (sail_dist/backends/snapshot.py): host copies, or streamed to
        `path` when larger than `memory_limit_bytes`. Local: no collective, no gather."""
        from sail_dist.backends import snapshot as snap

        return snap.take(self._snapshot_state(), path, memory_limit_bytes)

    def restore(self, snapshot) -> None:
        """Put `snapshot` back in place: main-parameter shards, Adam moments and steps, stage parameters."""
        from sail_dist.backends import snapshot as snap

        plain = snap.put_back(self._snapshot_state(), snapshot)
        for i, opt in enumerate(self.optimizer.chained_optimizers):
            if not getattr(opt, "is_stub_optimizer", False):
                snap.set_optimizer_plain(f"optimizer{i}", opt.optimizer, plain)
        self._optimizer_steps = plain["engine.optimizer_steps"]

    def save(self, path: str) -> None:
        """Collective: Megatron dist_checkpointing (torch_dist) of the model and the distributed optimizer."""
        state = self._sharded_state(is_loading=False)
        if self.env.rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, path)
        dist.barrier()
        # Read back once, on rank 0, what a load needs: a torch whose checkpoint metadata drops the attribute
        # Megatron adds would otherwise write checkpoints that fail only at resume.
        ok = [self.env.rank != 0 or checkpoint_keeps_mcore_data(path)]
        dist.broadcast_object_list(ok, src=0)
        if not ok[0]:
            from sail_dist.train.checkpoint import CheckpointError
            raise CheckpointError(f"the checkpoint just written to {path} cannot be loaded back: " + MCORE_DATA_LOST)

    def load(self, path: str) -> None:
        """Collective; `path` may come from a different PP / EP / DP layout (the keys are global)."""
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise FileNotFoundError(f"{path}: no Megatron dist checkpoint (missing metadata.json); was it written "
                                    "by the npu backend?")
        state = self._sharded_state(is_loading=True)
        params = {name: sh.data for name, sh in state["model"].items()}
        try:
            loaded = dist_checkpointing.load(state, path)
        except AttributeError as e:
            if "mcore_data" not in str(e):
                raise
            from sail_dist.train.checkpoint import CheckpointError
            raise CheckpointError(f"{path} cannot be loaded: " + MCORE_DATA_LOST) from e
        with torch.no_grad():
            for name, t in loaded["model"].items():
                params[name].copy_(t)
        steps = int(loaded["optimizer_step"])
        optim = loaded["optimizer"]
        for sd in ([optim] if len(self.optimizer.chained_optimizers) == 1 else optim.values()):
            for group in sd["optimizer"]["param_groups"]:
                group["step"] = steps  # torch AdamW: restored into each parameter's state; FusedAdam: per group
        self.optimizer.load_state_dict(optim)
        self._optimizer_steps = steps

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective. Rank 0 gets the whole native state dict (global names, full expert tensors, CPU);
        the other ranks get {}."""
        mine: list[tuple[str, torch.Tensor, tuple[int, int] | None]] = []
        for st in self.stages:
            sd = st.state_dict(keep_vars=True)
            for name, t in sd.items():
                if getattr(t, "shared", False) or _tied_head(name, t, sd):
                    continue
                ep = getattr(t, "expert_parallel", None)
                writer = self.coords.edp_rank == 0 if ep is not None else self.coords.dp_rank == 0
                if writer:
                    mine.append((name, t.detach().cpu().clone(), ep))
        gathered = [None] * dist.get_world_size() if self.env.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.env.rank != 0:
            return {}
        full: dict[str, torch.Tensor] = {}
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        for part in gathered:
            for name, t, ep in part:
                if ep is None:
                    full[name] = t
                else:
                    pieces.setdefault(name, {})[ep[0]] = t
        for name, by_rank in pieces.items():
            full[name] = torch.cat([by_rank[r] for r in sorted(by_rank)], dim=0)
        if self.cfg.model.llm.tie_embeddings:
            full["llm.lm_head.weight"] = full["llm.embed_tokens.weight"]
        return full
