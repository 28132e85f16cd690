"""The GPU OpSet (sail_dist/kernels/gpu.py) against the reference OpSet.

No test compares the reference with itself. Where the OpSet IS the reference (rms_norm / rope / swiglu always,
attention on CPU tensors or fp32, where no flash kernel applies, the Triton experts on CPU without Triton's
interpreter) the tests assert that binding or dispatch once; the numerics are tested where the OpSet's own code
runs.

CPU (CI): the chunked linear cross-entropy (values and gradients, any chunking, ignored labels) and the loop and
grouped_mm experts (zero-token experts, a hot expert) against the reference. The Triton experts and the
cross-entropy's Triton row kernels: the same tests again in Triton's interpreter, in a child process
(test_interpreter_child), the Triton experts checked not to fall back. CUDA only (`gpu` marker, skipped
elsewhere): bf16 against an fp32 reference to 1e-2 (relative Frobenius error) for the three expert
implementations, attention (flash / torch varlen) and cross-entropy, the Triton experts with their buffers
NaN-poisoned.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_in_triton_interpreter
from sail_dist.config import ConfigError, KernelConfig, load_config
from sail_dist.kernels import get_opset, gpu, opset_for_backend
from sail_dist.kernels import reference as ref
from sail_dist.kernels.triton import interpreting

CUDA = torch.cuda.is_available()
INTERPRET = interpreting()  # this process runs Triton's interpreter: the child of test_interpreter_child
parent_only = pytest.mark.skipif(INTERPRET, reason="no Triton kernel involved: runs in the parent process only")


def cuda(test):
    """GPU-only: the `gpu` marker, and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))


@pytest.mark.skipif(CUDA or INTERPRET, reason="CUDA: the Triton kernels run compiled in the gpu tests; "
                    "interpreter: this is the child")
def test_interpreter_child():
    """CPU: this file's tests that reach a Triton kernel (the Triton experts, the cross-entropy's row kernels), in
    a child process with Triton's interpreter on from the start; the others skip there."""
    run_in_triton_interpreter(__file__)


def _rel_max(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _rel_fro(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if torch.isnan(a).any():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# OpSet plumbing
# --------------------------------------------------------------------------------------------------
@parent_only
def test_opset_options():
    for impl in gpu.MOE_IMPLS:
        ops = get_opset("gpu", moe_impl=impl)
        assert ops.name == f"gpu[{impl}]"
    with pytest.raises(ValueError):
        get_opset("gpu", moe_impl="nope")
    with pytest.raises(ValueError):
        get_opset("gpu", attention_impl="nope")
    assert get_opset("gpu", attention_impl="reference").attention.impl == "reference"
    if gpu._flash_attn_fn() is None:
        with pytest.raises(ImportError):
            get_opset("gpu", attention_impl="flash_attn")
    auto = get_opset("gpu").attention.impl
    assert auto in ("triton", "flash_attn", "aten_flash", "torch_varlen", "reference")


@parent_only
def test_kernel_switches_from_the_config():
    """`backend.kernels` reaches the Triton experts through opset_for_backend (what the engines call); a switch
    nothing would read, an unknown name and a non-boolean are config errors. (Each switch's effect on the
    kernels: tests/test_triton_moe.py.)"""
    assert get_opset("gpu").moe_experts.keywords["opts"] == KernelConfig()
    cfg = load_config(None, ["data.demo=true", "backend.kernels.moe_grouped_mm=false",
                             "backend.kernels.moe_autotune=false"])
    ops = opset_for_backend("gpu", cfg.backend)
    assert ops.moe_experts.func is gpu.moe_experts_triton
    assert ops.moe_experts.keywords["opts"] == KernelConfig(moe_grouped_mm=False, moe_autotune=False)
    assert opset_for_backend("gpu", load_config(None, ["data.demo=true", "backend.moe_impl=loop"]).backend
                             ).moe_experts is gpu.moe_experts_loop
    with pytest.raises(ConfigError, match=r"'backend.kernels.moe_fused_route' \(from command line\): only the GPU "
                                          r"backend's Triton experts read it .*moe_impl=grouped_mm"):
        load_config(None, ["data.demo=true", "backend.moe_impl=grouped_mm", "backend.kernels.moe_fused_route=false"])
    with pytest.raises(ConfigError, match=r"'backend.kernels.moe_weight_tma'.*not name=npu"):
        load_config(None, ["data.demo=true", "backend.name=npu", "backend.kernels.moe_weight_tma=false"])
    with pytest.raises(ConfigError, match=r"did you mean 'backend.kernels.moe_gather_kernel'"):
        load_config(None, ["data.demo=true", "backend.kernels.moe_gather=false"])
    with pytest.raises(ConfigError, match=r"'backend.kernels.moe_autotune'.*expected true or false, got 0"):
        load_config(None, ["data.demo=true", "backend.kernels.moe_autotune=0"])
    # the element-wise switch: read wherever the GPU OpSet runs, whatever the experts
    assert not load_config(None, ["data.demo=true", "backend.moe_impl=grouped_mm",
                                  "backend.kernels.elementwise=false"]).backend.kernels.elementwise
    assert not load_config(None, ["data.demo=true", "backend.name=npu", "backend.opset=gpu",
                                  "backend.kernels.elementwise=false"]).backend.kernels.elementwise
    with pytest.raises(ConfigError, match=r"'backend.kernels.elementwise'.*only the GPU OpSet reads it"):
        load_config(None, ["data.demo=true", "backend.name=npu", "backend.kernels.elementwise=false"])
    assert opset_for_backend("gpu", load_config(None, ["data.demo=true", "backend.attention_impl=reference"]).backend
                             ).attention.impl == "reference"
    with pytest.raises(ConfigError, match=r"'backend.attention_impl'.*only the GPU OpSet reads it"):
        load_config(None, ["data.demo=true", "backend.name=npu", "backend.attention_impl=reference"])


@parent_only
def test_pointwise_ops_off_cuda_are_the_reference():
    """rms_norm / rope / swiglu: with `backend.kernels.elementwise: false` the reference's functions themselves; with
    the Triton kernels on (the default), CPU tensors outside the interpreter still get the reference's exact values.
    The kernels' numerics: tests/test_triton_elementwise.py."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 4, 16, generator=g), torch.randn(16, generator=g)
    cos, sin = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    for impl in gpu.MOE_IMPLS:
        off = get_opset("gpu", moe_impl=impl, kernels=KernelConfig(elementwise=False))
        assert off.rms_norm is ref.rms_norm and off.rope is ref.rope and off.swiglu is ref.swiglu
        on = get_opset("gpu", moe_impl=impl)
        assert on.rms_norm is not ref.rms_norm
        assert torch.equal(on.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
        assert torch.equal(on.rope(x, cos, sin), ref.rope(x, cos, sin))
        assert torch.equal(on.swiglu(x), ref.swiglu(x))


@parent_only
@pytest.mark.parametrize("causal", [True, False])
def test_attention_off_cuda_is_the_reference(monkeypatch, causal):
    """CPU tensors (and fp32 ones on CUDA, which the flash kernels lack) go to the reference unchanged, whichever
    implementation was picked: the dispatch, asserted through a stand-in for the reference. The flash / varlen
    kernels' numerics: test_attention_cuda_bf16 (GPU only)."""
    calls = []

    def stand_in(*args):
        calls.append(args)
        return "reference's result"

    monkeypatch.setattr(ref, "attention", stand_in)
    cu = torch.tensor([0, 5, 12, 13, 20], dtype=torch.int32)
    q, k, v = torch.zeros(20, 4, 8), torch.zeros(20, 2, 8), torch.zeros(20, 2, 8)
    impls = ["auto", "reference"] + [i for i, fn in (("flash_attn", gpu._flash_attn_fn),
                                                     ("torch_varlen", gpu._torch_varlen_fn)) if fn() is not None]
    cases = [("cpu", torch.float32), ("cpu", torch.bfloat16)] + ([("cuda", torch.float32)] if CUDA else [])
    for impl in impls:
        attention = get_opset("gpu", attention_impl=impl).attention
        for device, dtype in cases:
            calls.clear()
            args = [t.to(device, dtype) for t in (q, k, v)]
            assert attention(*args, cu, 7, causal) == "reference's result" and len(calls) == 1, (impl, device, dtype)
            assert all(a is b for a, b in zip(calls[0], (*args, cu, 7, causal))), (impl, device, dtype)


# --------------------------------------------------------------------------------------------------
# Chunked cross-entropy
# --------------------------------------------------------------------------------------------------
def _ce_case(T=29, D=12, V=37, seed=0, dtype=torch.float64, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::ignore_every] = -100
    dloss = torch.randn(T, generator=g, dtype=torch.float64)
    return h, w, labels, dloss


def _ce_run(fn, h, w, labels, dloss):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * dloss.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 29, 1000, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_cross_entropy_matches_reference(chunk, dtype):
    """The tiled linear cross-entropy on its torch row ops (parent) or, fp32 in the interpreter child, on the
    Triton row kernels."""
    if INTERPRET and dtype == torch.float64:
        pytest.skip("fp64 takes the torch row ops: runs in the parent process only")
    case = _ce_case(dtype=dtype)
    assert (gpu._ce_row_ops(case[0]) is not gpu.TORCH_ROW_OPS) == INTERPRET  # which row ops this run tests
    want = _ce_run(ref.cross_entropy, *case)
    got = _ce_run(lambda h, w, y: gpu.cross_entropy(h, w, y, chunk_size=chunk), *case)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        assert a.dtype == b.dtype, name
        assert _rel_max(a, b) <= tol, f"{name}: {_rel_max(a, b):.2e}"
    assert (got[0][case[2] == -100] == 0).all()


def test_chunked_cross_entropy_all_ignored_and_bf16():
    h, w, labels, dloss = _ce_case(T=9)
    labels[:] = -100
    loss, dh, dw = _ce_run(lambda a, b, c: gpu.cross_entropy(a, b, c, chunk_size=4), h, w, labels, dloss)
    assert loss.abs().max() == 0 and dh.abs().max() == 0 and dw.abs().max() == 0
    # bf16 in -> fp32 loss, close to the fp32 reference on the same (rounded) inputs.
    h, w, labels, dloss = _ce_case(T=40, D=32, V=64, dtype=torch.bfloat16)
    assert (gpu._ce_row_ops(h) is not gpu.TORCH_ROW_OPS) == INTERPRET
    loss = gpu.cross_entropy(h, w, labels, chunk_size=16)
    assert loss.dtype == torch.float32
    assert _rel_fro(loss, ref.cross_entropy(h.float(), w.float(), labels)) <= 1e-2


@parent_only
def test_opset_cross_entropy_is_chunked_default():
    case = _ce_case(T=300, V=50)
    want = _ce_run(ref.cross_entropy, *case)
    got = _ce_run(get_opset("gpu").cross_entropy, *case)
    assert all(_rel_max(a, b) <= 1e-12 for a, b in zip(got, want))


# --------------------------------------------------------------------------------------------------
# MoE experts on CPU: loop and grouped_mm here, Triton in the interpreter child (its kernels' own tests, every
# switch: tests/test_triton_moe.py)
# --------------------------------------------------------------------------------------------------
def _moe_case(T=40, K=2, E=6, H=16, F=8, seed=0, empty=(1,), hot=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    if hot is not None:
        idx[:, 0] = torch.where((idx == hot).any(1), idx[:, 0], hot)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    wgu = torch.randn(E, H, 2 * F, generator=g, dtype=torch.float64) / H ** 0.5
    wd = torch.randn(E, F, H, generator=g, dtype=torch.float64) / F ** 0.5
    dy = torch.randn(T, H, generator=g, dtype=torch.float64)
    return x, idx, w, wgu, wd, dy


def _moe_run(fn, x, idx, w, wgu, wd, dy, dtype, device="cpu"):
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (x, w, wgu, wd)]
    y = fn(leaves[0], idx.to(device), leaves[1], leaves[2], leaves[3])
    y.backward(dy.to(device=device, dtype=dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "triton"])
def test_moe_experts_cpu_match_reference(impl, monkeypatch):
    """Each implementation's own code on CPU tensors (none may call the reference): loop and grouped_mm here, the
    Triton kernels in the interpreter child (without the interpreter they fall back to the reference:
    test_moe_triton_on_cpu_without_interpreter_is_the_reference)."""
    if (impl == "triton") != INTERPRET:
        pytest.skip("the Triton experts on CPU run in the interpreter child" if impl == "triton"
                    else "plain torch: runs in the parent process only")
    case = _moe_case()
    want = _moe_run(ref.moe_experts, *case, torch.float64)

    def no_fallback(*args):
        raise AssertionError(f"gpu[{impl}] experts fell back to the reference")

    monkeypatch.setattr(ref, "moe_experts", no_fallback)
    got = _moe_run(get_opset("gpu", moe_impl=impl).moe_experts, *case, torch.float32)
    for name, a, b in zip(("y", "dx", "dw", "dgu", "ddn"), got, want):
        assert _rel_max(a, b) <= 1e-5, f"{impl} {name}: {_rel_max(a, b):.2e}"
    assert got[3][1].abs().max() == 0  # the empty expert


@parent_only
def test_moe_triton_on_cpu_without_interpreter_is_the_reference(monkeypatch):
    """Off CUDA and outside Triton's interpreter the Triton experts hand their arguments to the reference as they
    are (the dispatch, through a stand-in); their numerics run in the interpreter child and on CUDA."""
    calls = []

    def stand_in(*args):
        calls.append(args)
        return "reference's result"

    monkeypatch.setattr(ref, "moe_experts", stand_in)
    args = [t.float() if t.is_floating_point() else t for t in _moe_case()[:5]]
    assert get_opset("gpu", moe_impl="triton").moe_experts(*args) == "reference's result"
    assert len(calls) == 1 and all(a is b for a, b in zip(calls[0], args))


@parent_only
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-machine check; on a GPU the benchmark itself runs "
                    "(and Triton 3.6's interpreter, on the GPU machine, fails on a kernel that 3.9's runs)")
def test_moe_bench_cpu_smoke():
    """`python -m sail_dist.bench.moe --cpu-smoke`: the whole benchmark script (checks, timings, breakdown,
    table, JSON line) at a tiny shape in Triton's interpreter, in its own process (it sets TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "sail_dist.bench.moe", "--cpu-smoke"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    tiny = result["shapes"]["tiny"]
    assert set(tiny["impls"]) == {"loop", "grouped_mm", "grouped_mm_cm", "triton", "grouped_mm_bare",
                                  "grouped_mm_bare_pad16"}
    # The bar does ours' work exactly (T*K rows); the old padded bar more.
    rows = tiny["rows"]
    assert rows["ours"] == rows["grouped_mm_bare"] == tiny["T"] * tiny["K"] < rows["grouped_mm_bare_pad16"]
    assert all(r.get("rel_err", {"ok": True})["ok"] for r in tiny["impls"].values())
    assert "bwd_wgrad_gate_up" in tiny["triton_breakdown"]
    # Ours and the bare bar are timed in paired rounds (3 under --cpu-smoke): median inside its quartiles.
    for name in ("triton", "grouped_mm_bare", "grouped_mm_bare_pad16"):
        r = tiny["impls"][name]
        assert r["timing"] == "paired, 3 rounds"
        for key in ("fwd", "fwdbwd"):
            lo, hi = r[f"{key}_iqr"]
            assert 0 < lo <= r[f"{key}_ms"] <= hi
    assert tiny["speedup_vs_grouped_mm_bare"]["fwdbwd"] > 0
    assert result["kernels"] == dataclasses.asdict(KernelConfig())  # ours ran on the default switches
    assert tiny["shape_ceiling_tflops"] >= 0


# --------------------------------------------------------------------------------------------------
# CUDA: bf16 against an fp32 reference, outputs poisoned
# --------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("impl", ["triton", "grouped_mm", "loop"])
@pytest.mark.parametrize("shape", [(256, 2, 8, 128, 64), (200, 4, 16, 96, 40), (130, 1, 4, 64, 128)])
def test_moe_experts_cuda_bf16(impl, shape):
    from sail_dist.kernels.triton import moe as tmoe

    T, K, E, H, F = shape
    case = _moe_case(T, K, E, H, F, empty=(1,), hot=2)
    want = _moe_run(ref.moe_experts, *case, torch.float32, "cuda")
    with tmoe.poison_outputs():
        got = _moe_run(get_opset("gpu", moe_impl=impl).moe_experts, *case, torch.bfloat16, "cuda")
    for name, a, b in zip(("y", "dx", "dw", "dgu", "ddn"), got, want):
        assert _rel_fro(a, b) <= 1e-2, f"{impl} {name}: {_rel_fro(a, b):.2e}"


@cuda
def test_moe_triton_cuda_fresh_inputs_repeatable():
    """Same inputs twice -> bitwise the same result (no atomics, no races); poisoned both times."""
    from sail_dist.kernels.triton import moe as tmoe

    case = _moe_case(512, 8, 32, 128, 64, seed=11, empty=(3, 7), hot=5)
    with tmoe.poison_outputs():
        a = _moe_run(tmoe.moe_experts, *case, torch.bfloat16, "cuda")
        b = _moe_run(tmoe.moe_experts, *case, torch.bfloat16, "cuda")
    for u, v in zip(a, b):
        assert not torch.isnan(u).any() and torch.equal(u, v)


@cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["auto", "triton", "aten_flash", "torch_varlen", "flash_attn"])
def test_attention_cuda_bf16(causal, impl):
    """Each varlen kernel against the fp32 reference: output and dq / dk / dv, GQA (8 query heads on 2 kv heads),
    q / k / v as strided views of one projection (the ViT's layout)."""
    try:
        ops = get_opset("gpu", attention_impl=impl)
    except ImportError as e:
        pytest.skip(str(e))
    if ops.attention.impl == "reference":
        pytest.skip("neither flash-attn nor torch's flash kernels here: the OpSet's attention is the reference")
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 100, 229, 230, 512], dtype=torch.int32)
    qkv = torch.randn(512, 12, 64, generator=g)
    dout = torch.randn(512, 8, 64, generator=g)

    def run(fn, dtype):
        x = qkv.cuda().to(dtype).requires_grad_()
        q, k, v = x[:, :8], x[:, 8:10], x[:, 10:]
        out = fn(q, k, v, cu.cuda(), 282, causal)
        out.backward(dout.cuda().to(dtype))
        return out.float(), x.grad.float()

    # The op allocates its own output: poison the caching allocator's blocks of that size instead.
    torch.full((512, 8, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    got, want = run(ops.attention, torch.bfloat16), run(ref.attention, torch.float32)
    for name, a, b in zip(("out", "dqkv"), got, want):
        assert _rel_fro(a, b) <= 1e-2, f"{ops.attention.impl} {name}: {_rel_fro(a, b):.2e}"


@cuda
def test_cross_entropy_cuda_bf16():
    h, w, labels, dloss = _ce_case(T=1000, D=256, V=5000, dtype=torch.float32)
    # Realistic logit scale (std ~1): like the reference, the op rounds the lm-head GEMM's output to the
    # input dtype before its fp32 math, so logits of std 16 would carry bf16 errors of ~0.03 by design.
    h, w = h.cuda().bfloat16(), (w / 256 ** 0.5).cuda().bfloat16()
    want = _ce_run(ref.cross_entropy, h.float(), w.float(), labels.cuda(), dloss.cuda())
    got = _ce_run(lambda a, b, c: gpu.cross_entropy(a, b, c, chunk_size=300), h, w, labels.cuda(), dloss.cuda())
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        assert _rel_fro(a, b) <= 1e-2, f"{name}: {_rel_fro(a, b):.2e}"
