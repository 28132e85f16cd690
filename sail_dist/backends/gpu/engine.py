"""The GPU backend's Engine: our model inside a DeepSpeed ZeRO-2 engine.

ZeRO-2 partitions optimizer state and gradients over the data-parallel ranks; `offload_optimizer: cpu`
keeps the partitions (and the Adam math, DeepSpeedCPUAdam) on the host. Parameters are bf16 on GPU
with fp32 master weights in the optimizer, fp32 on CPU.

Loss scaling, spelled out: the objective (sail_dist/objectives) returns each micro-batch's share of the
step objective. DeepSpeed divides each micro-batch loss by the accumulation steps M and averages gradients
over the DP ranks, so we hand it `share * M * dp` and its averaging restores the exact sum. The MoE aux-loss
gradient is injected inside the model (model/moe.py), which DeepSpeed's 1/M does not reach and its DP mean
does: hence the per-layer scale coeff / (n_moe_layers * M).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from sail_dist.backends.base import (DistEnv, LayerGradRecorder, TrainStepStats, all_reduce_sum, check_micro_batches,
                                    model_dtype)
from sail_dist.backends.gpu import offload_step, zero_step
from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.kernels import opset_for_backend
from sail_dist.model.flops import batch_flops
from sail_dist.objectives import build_objective
from sail_dist.parallel.recipe import build_train_model

log = logging.getLogger(__name__)


def resolve_opset(cfg: Config, device: torch.device):
    name = cfg.backend.opset
    if name == "auto":
        name = "gpu" if device.type == "cuda" else "reference"
    return opset_for_backend(name, cfg.backend)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (frozen ones get no optimizer state); no decay on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _zero_partitions(tag_dir: str) -> int:
    """How many data-parallel ZeRO partitions a DeepSpeed checkpoint holds (its optimizer-state files)."""
    return len(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


class DeepSpeedEngine(LayerGradRecorder):
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        import deepspeed

        self.cfg, self.env = cfg, env
        t = cfg.train
        self.ops = resolve_opset(cfg, env.device)
        self.model, self.trainable = build_train_model(
            cfg, self.ops, aux_loss_weight=cfg.model.llm.aux_loss_coeff / t.micro_batches,
            reduce_counts=all_reduce_sum() if env.dp_size > 1 else None)
        self.objective = build_objective(t.objective, cfg)
        self.dtype = model_dtype(cfg, env.device)
        self.model.to(env.device)
        self.ds_config = self._ds_config()
        groups = param_groups(self.model, t.weight_decay)
        if cfg.backend.offload_optimizer == "cpu":
            self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.model, model_parameters=groups,
                                                                 config=self.ds_config)
        else:
            fused = env.device.type == "cuda"
            opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                    fused=fused, foreach=None if fused else True)
            self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=opt,
                                                                 config=self.ds_config)
        # ZeRO-1 with bf16 weights and fp32 accumulation runs DeepSpeed's BF16_Optimizer, which (0.19.8) adds each
        # micro-batch's bf16 gradients to its fp32 buffer without clearing them: micro-batch k of M counted M - k + 1
        # times (tests/test_gpu_backend.py, the zero1 case). Cleared after each backward here.
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        self.clear_bf16_grads = isinstance(self.ds.optimizer, BF16_Optimizer)
        zero12 = cfg.backend.zero_stage in (1, 2)
        offload = (offload_step.install(self.ds.optimizer, cfg.backend.offload_chunk, cfg.backend.offload_ratio)
                   if zero12 else "")
        batched = zero12 and zero_step.install(self.ds.optimizer)  # (wraps whichever step is installed)
        self.reduction = zero_step.install_reduction(self.ds.optimizer) if zero12 else ""
        self.stream_wait_epilogue = zero12 and zero_step.install_epilogue(self.ds.optimizer)
        log.info("GPU backend: ZeRO-%d, %s, opset=%s, offload=%s%s, trainable=%s, batched norm/overflow check=%s, "
                 "fp32 accumulation path=%s, backward ends on a %s wait", cfg.backend.zero_stage, self.dtype,
                 self.ops.name, cfg.backend.offload_optimizer, f" ({offload})" if offload else "", self.trainable,
                 batched, self.reduction or "DeepSpeed's", "stream" if self.stream_wait_epilogue else "host")

    def _ds_config(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        cuda = self.env.device.type == "cuda"
        # overlap_comm: the gradient copies into the reduction buckets and the reductions on a side stream during the
        # backward (at one rank too: the copies then overlap the backward's kernels; BENCHMARKS.md, session 5).
        overlap = cuda
        zero = {"stage": cfg.backend.zero_stage, "contiguous_gradients": True, "overlap_comm": overlap,
                "reduce_scatter": True, "reduce_bucket_size": cfg.backend.reduce_bucket_size,
                "allgather_bucket_size": 5e8}
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": t.micro_batches,
              "train_batch_size": t.micro_batches * self.env.dp_size, "gradient_clipping": t.grad_clip,
              "zero_optimization": zero, "bf16": {"enabled": self.dtype == torch.bfloat16},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if self.dtype == torch.bfloat16 and cfg.backend.grad_accum_dtype == "fp32":
            # DeepSpeed then keeps an fp32 gradient partition on the device across micro-batches. Without it, ZeRO-2
            # with offload copies every micro-batch's gradients to the host and back (~10 GB per micro-batch at 2B).
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        if cfg.backend.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps,
                                                           "weight_decay": t.weight_decay,
                                                           "torch_adam": cfg.backend.torch_adam}}
            if cfg.backend.torch_adam:
                ds["zero_force_ds_cpu_optimizer"] = False
        return ds

    # ----------------------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(self, micro_batches: list[PackedBatch], lr: float) -> TrainStepStats:
        M = check_micro_batches(micro_batches, self.cfg.train.micro_batches)
        t0 = time.perf_counter()
        self._set_lr(lr)
        self.ds.train()
        cuda = self.env.device.type == "cuda"
        obj = self.objective
        obj.begin_step(micro_batches, all_reduce_sum(device=self.env.device if cuda else None))
        scale = M * self.env.dp_size
        # [objective, aux loss / M, objective metrics...]: shares summed here and over DP below
        sums = torch.zeros(2 + len(obj.metrics), dtype=torch.float64, device=self.env.device)
        counts, flops, tokens, samples = None, 0.0, 0, 0
        # Pinned, the copy neither blocks the host nor waits for the device's queue to drain. The next micro-batch is
        # pinned (host work) while the device runs this forward, and its copy is queued behind this backward.
        def pinned(mb: PackedBatch) -> PackedBatch:
            return mb.pin_memory() if cuda else mb

        nxt = pinned(micro_batches[0]).to(self.env.device)
        for i, mb in enumerate(micro_batches):
            batch = nxt
            out = self.ds(batch)
            share = obj.loss(out, batch)
            host_next = pinned(micro_batches[i + 1]) if i + 1 < M else None
            self.ds.backward(share.loss * scale)
            if host_next is not None:
                nxt = host_next.to(self.env.device)
            if self.track_layer_grads and i == len(micro_batches) - 1:
                self.last_layer_grads = self._layer_grads()  # reduced, before clipping and the step
            if self.clear_bf16_grads:
                self.ds.optimizer.clear_lp_grads()
            self.ds.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            sums[0] += share.loss.detach().double()
            for j, name in enumerate(obj.metrics):
                sums[2 + j] += share.metrics[name].detach().double()
            if out.aux_loss is not None:
                sums[1] += out.aux_loss.double() / M
                c = torch.stack([m.last_counts for m in self.model.moe_layers()])
                counts = c if counts is None else counts + c  # (on the device: read once, after the loop)
            flops += batch_flops(self.cfg.model, mb, self.cfg.train.train_modules).train
            tokens += mb.num_tokens
            samples += mb.num_samples
        if counts is not None:
            counts = counts.cpu()
        if dist.is_initialized():
            dist.all_reduce(sums)  # shares add up to the step values; the aux loss is reported as the DP mean
        grad_norm = self.ds.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        loss_val, aux = float(sums[0]), float(sums[1]) / self.env.dp_size
        # DeepSpeed skips the update itself when the gradient norm is inf/NaN (ZeRO overflow check).
        skipped = not (math.isfinite(loss_val) and math.isfinite(grad_norm))
        if cuda:
            torch.cuda.synchronize()
        return TrainStepStats(loss=loss_val, aux_loss=aux, grad_norm=grad_norm, lr=lr, tokens=tokens,
                              samples=samples, skipped=skipped, flops=flops, expert_counts=counts,
                              metrics={n: float(sums[2 + j]) for j, n in enumerate(obj.metrics)},
                              time_s=time.perf_counter() - t0)

    @torch.no_grad()
    def token_logprobs(self, micro_batches: list[PackedBatch]) -> list[torch.Tensor | None]:
        """Forward only: per micro-batch the [T] fp32 log p(labels[t]) under the current weights (0 where the label
        is -100), on the CPU (the RL loop's old / reference log-probs). Collective for MoE models with DP > 1 (the
        router's load counts are all-reduced): every rank passes the same number of micro-batches."""
        self.ds.eval()
        out = []
        for mb in micro_batches:
            loss_T = self.model(mb.to(self.env.device)).loss_T
            out.append((-loss_T).float().cpu())
        self.ds.train()
        return out

    def _layer_grads(self) -> dict[str, torch.Tensor]:
        """Collective. Rank 0: per parameter name, its full DP-reduced gradient (before clipping), on the CPU in
        DeepSpeed's accumulation dtype (fp32: `safe_get_full_grad` all-reduces the ZeRO-2 partitions); {} on the
        other ranks. A tied lm head is listed once, as the embedding (named_parameters)."""
        from deepspeed.utils import safe_get_full_grad

        offload_step.gradients_to_host(self.ds.optimizer)  # (with offload: where safe_get_full_grad reads them)
        keep = self.env.rank == 0
        out = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                g = safe_get_full_grad(p)  # every rank takes part in its all-reduce
                if keep:
                    out[name] = (g.detach().to("cpu", copy=True) if g is not None
                                 else torch.zeros(p.shape, dtype=torch.float32))
        return out

    # ----------------------------------------------------------------------------------------------
    def _snapshot_state(self) -> dict:
        """This rank's training state, live: the optimizer's own parameters (under ZeRO-1/2 the fp32 master
        PARTITION of this rank, on the device or, with offload, on the host) with their Adam moments and step, the
        module's parameters and buffers (ZeRO-2 keeps a full local copy on every rank: no gather), DeepSpeed's
        step counters."""
        from sail_dist.backends import snapshot as snap

        zero = self.ds.optimizer
        inner = getattr(zero, "optimizer", zero)  # ZeRO / BF16 wrapper -> the torch (or DeepSpeedCPUAdam) optimizer
        state = snap.optimizer_state("optimizer", inner)
        for name, t in self.model.named_parameters():
            state[f"module.param.{name}"] = t.data
        for name, t in self.model.named_buffers():
            state[f"module.buffer.{name}"] = t
        for key in ("global_steps", "global_samples", "skipped_steps"):
            state[f"engine.{key}"] = getattr(self.ds, key)
        return state

    def snapshot(self, path: str | None = None, memory_limit_bytes: float = math.inf):
        """This rank's state for an AdaLRS rollback (sail_dist/backends/snapshot.py): host copies, or streamed to
        `path` when larger than `memory_limit_bytes`. Local: no collective, no gather."""
        from sail_dist.backends import snapshot as snap

        offload_step.state_to_host(self.ds.optimizer)  # (offload_ratio < 1: the device shares into the host partitions)
        return snap.take(self._snapshot_state(), path, memory_limit_bytes)

    def restore(self, snapshot) -> None:
        """Put `snapshot` back in place: parameters, fp32 master partition, Adam moments and step, counters."""
        from sail_dist.backends import snapshot as snap

        zero = self.ds.optimizer
        inner = getattr(zero, "optimizer", zero)
        plain = snap.put_back(self._snapshot_state(), snapshot)
        snap.set_optimizer_plain("optimizer", inner, plain)
        offload_step.shares_stale(zero)
        for key in ("global_steps", "global_samples", "skipped_steps"):
            setattr(self.ds, key, plain[f"engine.{key}"])

    def save(self, path: str) -> None:
        """Collective: every rank writes its ZeRO partition under `path`."""
        offload_step.state_to_host(self.ds.optimizer)
        self.ds.save_checkpoint(path, tag="deepspeed", save_latest=False)

    def load(self, path: str) -> None:
        """Collective. Written at this DP size: DeepSpeed's native load of the ZeRO partitions. At another DP size
        (elastic resume): the checkpoint is converted once to DeepSpeed's universal format (ds_to_universal, per
        parameter fp32 master and Adam moments, `path/universal/`, written atomically by rank 0 and reused by later
        resumes) and loaded with DeepSpeed's `load_universal`, which repartitions it over this run's ranks."""
        tag_dir = os.path.join(path, "deepspeed")
        if not os.path.isdir(tag_dir):
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (missing {tag_dir}); was it written by the "
                                    "gpu backend?")
        saved_dp = _zero_partitions(tag_dir)
        if saved_dp in (0, self.env.dp_size):
            load_path, _ = self.ds.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        else:
            load_path = self._load_universal(path, tag_dir, saved_dp)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
        offload_step.shares_stale(self.ds.optimizer)

    def _load_universal(self, path: str, tag_dir: str, saved_dp: int) -> str | None:
        """Elastic resume of a checkpoint of `saved_dp` ZeRO partitions (see `load`)."""
        from sail_dist.train.checkpoint import CheckpointError

        universal = os.path.join(path, "universal")
        if self.cfg.backend.zero_stage not in (1, 2):
            raise CheckpointError(f"{tag_dir} holds {saved_dp} ZeRO partitions and this run has DP "
                                  f"{self.env.dp_size} with backend.zero_stage={self.cfg.backend.zero_stage}: "
                                  "resharding ZeRO partitions is implemented for stages 1 and 2. Resume on "
                                  f"{saved_dp} ranks with the checkpoint's backend.zero_stage.")
        failed = ""
        if self.env.rank == 0 and not os.path.isdir(universal):
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = universal + ".tmp"
            log.info("elastic resume: converting %s (DP %d) to DeepSpeed's universal checkpoint in %s", tag_dir,
                     saved_dp, universal)
            t0 = time.perf_counter()
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted conversion
                with contextlib.redirect_stdout(sys.stderr):  # its progress prints; stdout ends with our summary
                    ds_to_universal(argparse.Namespace(
                        input_folder=tag_dir, output_folder=os.path.join(tmp, "deepspeed"), num_extract_workers=1,
                        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
                os.replace(tmp, universal)
                log.info("universal checkpoint written in %.1f s", time.perf_counter() - t0)
            except OSError as e:
                failed = f"{type(e).__name__}: {e}"
        if dist.is_initialized():  # every rank learns whether rank 0's conversion worked
            flag = [failed]
            dist.broadcast_object_list(flag, src=0)
            failed = flag[0]
        if failed:
            raise CheckpointError(f"cannot resume {tag_dir} (DP {saved_dp}) on DP {self.env.dp_size}: converting it "
                                  f"to DeepSpeed's universal checkpoint in {universal} failed ({failed}). Make {path} "
                                  "writable (or copy the step_* directory somewhere writable and resume from the "
                                  f"copy), or resume on {saved_dp} ranks.")
        # Universal loading restores what the optimizer holds (fp32 master -> the module's trainable parameters);
        # frozen parameters and buffers come from the module state DeepSpeed saved alongside.
        module = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)["module"]
        self.model.load_state_dict(module, strict=True)
        self.ds._config.load_universal_checkpoint = True  # DeepSpeed reads its config key at load time only
        try:
            load_path, _ = self.ds.load_checkpoint(universal, tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        return load_path

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """ZeRO-2 keeps full parameters on every rank: the module's own state dict is complete."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

