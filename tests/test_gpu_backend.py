"""GPU backend (DeepSpeed ZeRO-2) on CPU over gloo, against a plain single-process PyTorch AdamW reference."""
from __future__ import annotations

import functools
import json
import os
import subprocess

import pytest
import torch

from conftest import ROOT, child_env, require, torchrun_cmd
from dist.engine_run import step_batches
from sail_dist.config import load_config
from sail_dist.kernels import get_opset
from sail_dist.model.build import build_model
from sail_dist.train.lr import lr_at

TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
COMMON = ["train.steps=5", "train.micro_batches=2", "train.lr=2e-3", "train.warmup_steps=2", "train.weight_decay=0.1",
          "train.grad_clip=0.5"]


def torchrun(nproc: int, args: list[str], tmp_path, timeout: int = 600) -> list[dict]:
    require("deepspeed")  # the engine runs in the children; a test that does not launch them does not need it
    out = tmp_path / "out.json"
    env = child_env()
    cmd = torchrun_cmd(nproc, os.path.join(ROOT, "tests", "dist", "engine_run.py"), str(out), *args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())["steps"]


def reference_losses(config: str, overrides: list[str], dp: int, grad_norms: list | None = None) -> list[float]:
    """Single process, plain torch AdamW, the same global batches (all ranks' micro-batches); appends each step's
    gradient norm (before clipping) to `grad_norms` when given."""
    cfg = load_config(config, ["data.demo=true", *overrides])
    t = cfg.train
    model = build_model(cfg.model, get_opset("reference"), seed=t.seed)
    moe = model.moe_layers()
    for m in moe:  # the aux objective's share of each of the dp * M micro-batches
        m.aux_grad_scale = cfg.model.llm.aux_loss_coeff / (len(moe) * t.micro_batches * dp)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    losses = []
    for step in range(t.steps):
        batches = [b for r in range(dp) for b in step_batches(cfg, step, r, dp)]
        W = sum(float(b.loss_weight.sum()) for b in batches)
        opt.zero_grad()
        total = 0.0
        for b in batches:
            loss = (model(b).loss_T * b.loss_weight).sum() / W  # sum(w * ce) / W, by hand
            loss.backward()
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if grad_norms is not None:
            grad_norms.append(float(norm))
        for g in opt.param_groups:
            g["lr"] = lr_at(t, step)
        opt.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("offload", ["none", "cpu_torch_adam", "cpu_adam", "cpu_adam_ratio"])
def test_zero2_two_ranks_equal_reference(tmp_path, offload):
    cpu_adam = ["backend.offload_optimizer=cpu", "backend.torch_adam=false", "backend.offload_chunk=4096"]
    extra = {"none": [], "cpu_torch_adam": ["backend.offload_optimizer=cpu", "backend.torch_adam=true"],
             # the chunked host step (backends/gpu/offload_step.py) over ~75 chunks of each rank's partition
             "cpu_adam": cpu_adam,
             # 40 % of each partition on the host, the rest updated by torch's AdamW beside it (DeviceShare)
             "cpu_adam_ratio": [*cpu_adam, "backend.offload_ratio=0.4"],
             }[offload]
    got = torchrun(2, [TINY, *COMMON, *extra], tmp_path, timeout=900)
    ref = reference_losses(TINY, COMMON, dp=2)
    assert len(got) == 5 and not any(r["skipped"] for r in got)
    for step, (g, r) in enumerate(zip(got, ref)):
        assert abs(g["loss"] - r) <= 1e-6 * max(1.0, abs(r)), (step, g["loss"], r)
    assert ref[-1] < ref[0]  # it trains


def _run_worker(worker: str, tmp_path, args: list[str], nproc: int = 2) -> dict:
    """Run this file's `worker` function on `nproc` ranks under torchrun (argv: OUT.pt args...); its saved results."""
    import sys

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out.pt"
    cmd = torchrun_cmd(nproc, "--no-python", sys.executable, "-c", f"from test_gpu_backend import {worker}; {worker}()",
                       str(out), *args)
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return torch.load(out)


def _bf16_worker() -> None:
    """torchrun child of the bf16 test (`python -c`, argv: OUT.pt CONFIG overrides...): the engine over step_batches;
    rank 0 saves the per-step stats and every parameter's fp32 master weight (DeepSpeed's partitions, gathered)."""
    import sys

    from deepspeed.utils import safe_get_full_fp32_param

    from sail_dist.backends.base import get_backend
    from sail_dist.backends.gpu import offload_step

    out_path, config, *overrides = sys.argv[1:]
    if "--deepspeed-reduction" in overrides:  # DeepSpeed's own gradient path (the patch's anchor)
        from sail_dist.backends.gpu import zero_step

        overrides.remove("--deepspeed-reduction")
        zero_step.install_reduction = lambda zero_optimizer: ""
        zero_step.install_epilogue = lambda zero_optimizer: False
    cfg = load_config(config, ["data.demo=true", *overrides])
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    engine = backend.build(cfg, env)
    from deepspeed.accelerator import get_accelerator

    acc, host_waits = get_accelerator(), [0]
    device_sync = acc.synchronize

    def counted_sync(*args, **kwargs):  # DeepSpeed's device-wide host waits during the steps
        host_waits[0] += 1
        return device_sync(*args, **kwargs)

    acc.synchronize = counted_sync

    def master() -> dict[str, torch.Tensor]:  # collective
        offload_step.state_to_host(engine.ds.optimizer)  # (offload_ratio < 1: the device shares)
        return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.model.named_parameters()}

    steps, masters = [], []
    for step in range(cfg.train.steps):
        s = engine.train_step(step_batches(cfg, step, env.dp_rank, env.dp_size), lr_at(cfg.train, step))
        steps.append({"loss": s.loss, "grad_norm": s.grad_norm, "skipped": s.skipped})
        if step in (0, cfg.train.steps - 1):
            masters.append(master())
    if env.rank == 0:
        torch.save({"steps": steps, "master_step0": masters[0], "master": masters[-1], "reduction": engine.reduction,
                    "stream_wait_epilogue": engine.stream_wait_epilogue, "host_waits": host_waits[0],
                    "device": env.device.type,
                    "dtypes": {n: str(p.dtype) for n, p in engine.model.named_parameters()}}, out_path)
    backend.teardown()


def _bf16_reference(config: str, overrides: list[str], dp: int) -> dict:
    """Single process, DeepSpeed's bf16 recipe by hand on the same global batches: bf16 parameters; each micro-batch
    index's bf16 gradients summed over the ranks and rounded to bf16, then accumulated in fp32; clipping and plain
    torch AdamW on fp32 master weights, copied back to bf16 after each step. Per-step losses and gradient norms
    (before clipping), the master weights at the start, after step 0 and at the end."""
    cfg = load_config(config, ["data.demo=true", *overrides])
    t = cfg.train
    model = build_model(cfg.model, get_opset("reference"), seed=t.seed)
    assert not model.moe_layers()  # (no aux-loss scaling to mimic)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    master = [p.detach().float().clone().requires_grad_() for p in params]  # from the bf16 values, as DeepSpeed
    init = {n: m.detach().clone() for n, m in zip(names, master)}
    opt = torch.optim.AdamW([{"params": [m for m in master if m.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [m for m in master if m.dim() < 2], "weight_decay": 0.0}],
                            lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    losses, norms = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (child_env): the same bf16 GEMM blocking
    try:
        for step in range(t.steps):
            per_rank = [step_batches(cfg, step, r, dp) for r in range(dp)]
            W = sum(float(b.loss_weight.sum()) for batches in per_rank for b in batches)
            acc = [torch.zeros_like(m) for m in master]
            total = 0.0
            for i in range(t.micro_batches):
                # DeepSpeed reduces micro-batch i's bf16 gradients over the ranks in bf16 (its communication dtype),
                # then adds them to its fp32 partitions.
                summed = [torch.zeros_like(m) for m in master]
                for batches in per_rank:
                    b = batches[i]
                    model.zero_grad(set_to_none=True)
                    loss = (model(b).loss_T * b.loss_weight).sum() / W  # sum(w * ce) / W, by hand
                    loss.backward()
                    total += float(loss.detach())
                    for s, p in zip(summed, params):
                        s += p.grad.float()
                for a, s in zip(acc, summed):
                    a += s.to(torch.bfloat16).float()
            for m, a in zip(master, acc):
                m.grad = a
            norms.append(float(torch.nn.utils.clip_grad_norm_(master, t.grad_clip)))
            for g in opt.param_groups:
                g["lr"] = lr_at(t, step)
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, master):
                    p.copy_(m)
            losses.append(total)
            if step == 0:
                step0 = {n: m.detach().clone() for n, m in zip(names, master)}
    finally:
        torch.set_num_threads(threads)
    return {"losses": losses, "grad_norms": norms, "init": init, "master_step0": step0,
            "master": {n: m.detach().clone() for n, m in zip(names, master)}}


@functools.cache
def _bf16_references() -> tuple[dict, list[float], list[float]]:
    """The bf16 test's two references (same precision recipe; fp32 losses and gradient norms), computed once for
    its four cases: they share the config."""
    same = _bf16_reference(TINY, [*COMMON, "train.micro_batches=4"], dp=2)
    norms: list[float] = []
    ref = reference_losses(TINY, [*COMMON, "train.micro_batches=4"], dp=2, grad_norms=norms)
    return same, ref, norms


@pytest.mark.parametrize("offload", ["none", "cpu", "cpu_adam", "cpu_adam_ratio", "zero1"])
def test_bf16_fp32_grad_accumulation_tracks_fp32_reference(tmp_path, offload):
    """bf16 weights with fp32 gradient accumulation (DeepSpeed's device-side fp32 partition buffer, which with
    offload replaces the per-micro-batch host round trip): every micro-batch's gradient lands exactly once, the
    update is the configured AdamW's, and the run tracks the fp32 reference to bf16 precision.

    Against a reference of the same precision recipe, by hand (_bf16_reference): the losses and gradient norms, and
    each parameter's update (master weight minus initial), after step 0 and after the last step. Measured (both
    offload settings): losses 3e-5, norms 8e-8 at step 0 and 4e-4 by step 4, updates 2e-5 after step 0 and 5e-3 after
    step 4. A 10 % wrong lr moves the step-0 updates by 9e-2 and the losses by 6e-4, dropped weight decay the
    step-0 updates of the ViT's matrices by 2e-3, a parameter left stale its updates by 1. Against the fp32
    reference: the step-0 gradient norm and the losses to 1e-2 (bf16 precision).

    Gradient buckets of 4096 elements, so that the backward reduces many buckets, and micro-batches without images
    (the ViT's parameters get no gradient from them): DeepSpeed 0.19.8's own offload path loses gradients there
    (backends/gpu/offload_step.py; its step-0 gradient norm was 0.70x the reference's on this test). Offload with
    torch Adam (DeepSpeed's step) and with DeepSpeedCPUAdam (the chunked host step)."""
    require("deepspeed")
    extra = ["train.precision=bf16", "backend.grad_accum_dtype=fp32", "train.micro_batches=4",
             "backend.reduce_bucket_size=4096"]
    if offload == "cpu":
        extra += ["backend.offload_optimizer=cpu", "backend.torch_adam=true"]
    if offload.startswith("cpu_adam"):
        extra += ["backend.offload_optimizer=cpu", "backend.torch_adam=false", "backend.offload_chunk=4096"]
    if offload == "cpu_adam_ratio":  # half of each partition kept and updated on the device (DeviceShare)
        extra += ["backend.offload_ratio=0.5"]
    if offload == "zero1":  # no offload, ZeRO-1: DeepSpeed's BF16_Optimizer (its gradient norm was 2.8x without the
        extra += ["backend.zero_stage=1"]  # engine's clearing of the bf16 gradients after each micro-batch)
    run = _run_worker("_bf16_worker", tmp_path, [TINY, *COMMON, *extra])
    got = run["steps"]
    assert len(got) == 5 and not any(s["skipped"] for s in got)
    assert set(run["dtypes"].values()) == {"torch.bfloat16"}
    same, ref, norms = _bf16_references()
    # (ZeRO-1's BF16_Optimizer sums the fp32 gradients in another order than the reference: 3.8e-6 measured)
    norm0_tol = 1e-5 if offload == "zero1" else 1e-6
    assert abs(got[0]["grad_norm"] - same["grad_norms"][0]) <= norm0_tol * same["grad_norms"][0]
    for step, (g, loss, norm) in enumerate(zip(got, same["losses"], same["grad_norms"])):
        assert abs(g["loss"] - loss) <= 1e-4 * abs(loss), (step, g["loss"], loss)
        assert abs(g["grad_norm"] - norm) <= 2e-3 * norm, (step, g["grad_norm"], norm)
    # Each parameter's update (relative Frobenius error): after step 0, from the same weights, and after the last step,
    # where bf16 weight copies rounding differently have compounded.
    assert sorted(run["master"]) == sorted(same["master"])
    # ZeRO-1 (BF16_Optimizer) sums in another order: Adam's sign-like first step then flips the few near-zero
    # elements (measured up to 8.8e-2 after step 0, 2.8e-2 after the last); its scale is checked separately.
    tols = (("master_step0", 0.15), ("master", 5e-2)) if offload == "zero1" else (("master_step0", 2e-4), ("master", 2e-2))
    for key, tol in tols:
        for n, final in same[key].items():
            want = (final - same["init"][n]).double()
            got_u = (run[key][n] - same["init"][n]).double()
            err = float((got_u - want).norm() / want.norm())
            assert err <= tol, (key, n, err)
            if offload == "zero1":  # and the update's scale along the reference's: a 10 % wrong lr moves it by 0.1
                assert abs(float((got_u * want).sum() / (want * want).sum()) - 1) <= 1e-2, (key, n)
    # bf16 against fp32: a micro-batch dropped or counted twice moves the step-0 norm by far more than bf16 rounding.
    assert abs(got[0]["grad_norm"] - norms[0]) <= 1e-2 * norms[0], (got[0]["grad_norm"], norms[0])
    for step, (g, r) in enumerate(zip(got, ref)):
        assert abs(g["loss"] - r) <= 1e-2 * abs(r), (step, g["loss"], r)


@pytest.mark.parametrize("nproc", [1, 2])
def test_bf16_reduction_path_equals_deepspeeds_bitwise(tmp_path, nproc):
    """The engine's gradient path into DeepSpeed's fp32 accumulation buffer (backends/gpu/zero_step.py
    `install_reduction`: each bucket's span all-reduced in place instead of a flattened copy, the cast inside the
    add; at one rank no collective or division) makes the same fp32 sums as DeepSpeed's own path, so the same run
    bit for bit, at one rank and at two. Many buckets, micro-batches without images; on CUDA (the GPU test run,
    one rank) with overlap_comm, the adds on DeepSpeed's reduction stream, and each backward ending on a stream
    wait instead of DeepSpeed's host wait (`install_epilogue`): one device-wide synchronize fewer per micro-batch,
    the same bits."""
    require("deepspeed")
    args = [TINY, *COMMON, "train.precision=bf16", "backend.grad_accum_dtype=fp32", "train.micro_batches=4",
            "backend.reduce_bucket_size=4096"]
    ours = _run_worker("_bf16_worker", tmp_path / "ours", args, nproc=nproc)
    theirs = _run_worker("_bf16_worker", tmp_path / "deepspeed", [*args, "--deepspeed-reduction"], nproc=nproc)
    assert ours["reduction"] == ("in_place+one_rank" if nproc == 1 else "in_place") and theirs["reduction"] == ""
    cuda = ours["device"] == "cuda"  # (a CPU run has no reduction stream and no host wait to remove)
    assert ours["stream_wait_epilogue"] == cuda and not theirs["stream_wait_epilogue"]
    micro_batches = 4 * len(ours["steps"])
    assert ours["host_waits"] == theirs["host_waits"] - (micro_batches if cuda else 0), (ours["host_waits"],
                                                                                         theirs["host_waits"])
    assert ours["steps"] == theirs["steps"] and not any(s["skipped"] for s in ours["steps"])
    for key in ("master_step0", "master"):
        assert sorted(ours[key]) == sorted(theirs[key])
        for n, t in ours[key].items():
            assert torch.equal(t, theirs[key][n]), (key, n)


def _nonfinite_worker() -> None:
    """torchrun child of the non-finite test (argv: OUT.pt CONFIG overrides...): step 1's loss is NaN on rank 1 only
    (its final norm's output times NaN); rank 0 saves the step stats, the fp32 master weights after steps 0 and 1, and
    whether the batched norm / overflow check (backends/gpu/zero_step.py) is installed."""
    import sys

    from deepspeed.utils import safe_get_full_fp32_param

    from sail_dist.backends.base import get_backend

    out_path, config, *overrides = sys.argv[1:]
    cfg = load_config(config, ["data.demo=true", *overrides])
    backend = get_backend(cfg.backend.name)
    env = backend.setup(cfg)
    engine = backend.build(cfg, env)
    steps, masters = [], []
    for step in range(3):
        hook = None
        if step == 1 and env.rank == 1:
            hook = engine.model.llm.norm.register_forward_hook(lambda m, i, o: o * float("nan"))
        s = engine.train_step(step_batches(cfg, step, env.dp_rank, env.dp_size), lr_at(cfg.train, step))
        if hook is not None:
            hook.remove()
        steps.append({"loss": s.loss, "grad_norm": s.grad_norm, "skipped": s.skipped})
        masters.append({n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.model.named_parameters()})
    if env.rank == 0:
        opt = engine.ds.optimizer
        torch.save({"steps": steps, "masters": masters, "skipped_steps": engine.ds.skipped_steps,
                    "batched_norm": "get_grad_norm_direct" in vars(opt),
                    "overflow_check_dropped": "has_overflow" in vars(opt)}, out_path)
    backend.teardown()


@pytest.mark.parametrize("precision,offload", [("fp32", "none"), ("bf16", "none"), ("bf16", "cpu")])
def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path, precision, offload):
    """A NaN in one rank's gradients: every rank skips that update (the weights stay exactly as they were), DeepSpeed
    counts the skipped step, and the next step trains normally. Without offload this goes through the batched norm
    (zero_step.py; its norm is checked against the references in the tests above), which in bf16 is also the overflow
    check (DeepSpeed checks fp32 runs by the norm alone); with offload through DeepSpeed's own check."""
    require("deepspeed")
    extra = [f"train.precision={precision}"]
    extra += ["backend.offload_optimizer=cpu", "backend.torch_adam=true"] if offload == "cpu" else []
    run = _run_worker("_nonfinite_worker", tmp_path, [TINY, *COMMON, *extra])
    assert run["batched_norm"] == (offload == "none")
    assert run["overflow_check_dropped"] == (offload == "none" and precision == "bf16")
    s0, s1, s2 = run["steps"]
    assert not s0["skipped"] and s1["skipped"] and not s2["skipped"]
    assert run["skipped_steps"] == 1
    m0, m1, m2 = run["masters"]
    assert all(torch.equal(m1[n], m0[n]) for n in m0)
    assert any(not torch.equal(m2[n], m1[n]) for n in m1) and all(torch.isfinite(m2[n]).all() for n in m2)


def test_more_ranks_than_devices_is_a_clear_error():
    """A node started with more ranks than devices fails naming the fix, not with set_device's bare ordinal error."""
    from sail_dist.backends.base import check_local_device

    check_local_device(1, 2, "CUDA")  # fits
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 .* 1 visible CUDA device.*nproc_per_node"):
        check_local_device(1, 1, "CUDA")


def test_epilogue_waits_on_the_reduction_stream_instead_of_the_host(monkeypatch):
    """zero_step.install_epilogue on a stand-in of DeepSpeed's ZeRO optimizer (this machine's accelerator has no
    streams; the real one on CUDA is in test_bf16_reduction_path_equals_deepspeeds_bitwise): inside the epilogue
    DeepSpeed's `synchronize()` becomes the compute stream waiting on the reduction stream, outside it the
    accelerator's own `synchronize` is back; nothing is installed with CPU offload or without overlap_comm."""
    require("deepspeed")
    from deepspeed.accelerator import get_accelerator

    from sail_dist.backends.gpu import zero_step

    acc, calls = get_accelerator(), []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits on {other.name}")

    compute = Stream("compute")
    monkeypatch.setattr(type(acc), "resolves_data_dependency", lambda self: False)
    monkeypatch.setattr(type(acc), "current_stream", lambda self, device_index=None: compute)
    monkeypatch.setattr(type(acc), "synchronize", lambda self, device_index=None: calls.append("host waits"))

    class Zero:  # DeepSpeed 0.19's epilogue, reduced to its synchronize
        overlap_comm, cpu_offload, reduction_stream = True, False, Stream("reduction")

        def independent_gradient_partition_epilogue(self):
            calls.append("reduce last bucket")
            get_accelerator().synchronize()
            calls.append("release buckets")
            return "done"

    zero = Zero()
    assert zero_step.install_epilogue(zero)
    assert zero.independent_gradient_partition_epilogue() == "done"
    assert calls == ["reduce last bucket", "compute waits on reduction", "release buckets"]
    calls.clear()
    acc.synchronize()
    assert calls == ["host waits"] and "synchronize" not in vars(acc)
    calls.clear()
    zero_step.remove_epilogue(zero)  # (the benchmark's anchor: DeepSpeed's own end of backward again)
    zero.independent_gradient_partition_epilogue()
    assert calls == ["reduce last bucket", "host waits", "release buckets"]
    for attr, value in (("cpu_offload", True), ("overlap_comm", False), ("reduction_stream", None)):
        other = Zero()
        setattr(other, attr, value)
        assert not zero_step.install_epilogue(other), attr
        assert "independent_gradient_partition_epilogue" not in vars(other)
