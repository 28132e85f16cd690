"""The GPU OpSet's Triton RMSNorm, RoPE and SwiGLU (sail_dist/kernels/triton/{rms_norm,rope,swiglu}.py) against the
reference OpSet in float64: output and every input gradient, fp32 to 1e-5 relative; on CUDA also bf16 against the
fp32 reference (between 1e-3 and 1e-2). Inputs include the strided views the model passes (q / k as slices of the
fused qkv projection), rows beyond one tile, a frozen norm weight (no weight gradient), and empty inputs.

Without CUDA the kernels run in Triton's interpreter, which must be on before triton is imported: the file then
re-runs itself in a child pytest process with TRITON_INTERPRET=1 (as tests/test_triton_moe.py does).
"""
from __future__ import annotations

import pytest
import torch

from conftest import run_in_triton_interpreter
from sail_dist.config import KernelConfig
from sail_dist.kernels import gpu
from sail_dist.kernels import reference as ref
from sail_dist.kernels.triton import interpreting

CUDA = torch.cuda.is_available()
RUN_HERE = CUDA or interpreting()
here = pytest.mark.skipif(not RUN_HERE, reason="CPU: runs in the interpreter child (test_interpreter_child)")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.skipif(RUN_HERE, reason="the tests run in this process")
def test_interpreter_child():
    """CPU: this file's tests, in a child process with Triton's interpreter on from the start."""
    run_in_triton_interpreter(__file__)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _grads(fn, inputs, grad_mask, dout):
    """fn's output and the gradients of the inputs marked in grad_mask under the cotangent dout."""
    leaves = [t.detach().clone().requires_grad_(m) for t, m in zip(inputs, grad_mask)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t, m in zip(leaves, grad_mask) if m]


def _check(op, ref_op, inputs, grad_mask, extra=(), dtype=torch.float32, tol=1e-5, g=None):
    """The Triton op on DEVICE in `dtype` against the reference in float64 on the same values."""
    g = g or torch.Generator().manual_seed(0)
    want_out = ref_op(*(t.double() if t.is_floating_point() else t for t in inputs), *extra)
    dout = torch.randn(want_out.shape, generator=g, dtype=torch.float64)
    want = _grads(lambda *a: ref_op(*a, *extra), [t.double() for t in inputs], grad_mask, dout)
    got = _grads(lambda *a: op(*a, *extra), [t.to(DEVICE, dtype) for t in inputs], grad_mask, dout.to(DEVICE))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = _rel(a.cpu(), b)
        assert err <= tol, f"{'output' if i == 0 else f'grad {i}'}: rel err {err:.2e} > {tol:.0e}"
    return got


def _triton(name):
    mod = __import__(f"sail_dist.kernels.triton.{name}", fromlist=[name])
    return getattr(mod, name)


# ----------------------------------------------------------------------------------------------------------------
@here
@pytest.mark.parametrize("shape", [(37, 96), (5, 3, 64), (300, 20), (0, 32)])
def test_rms_norm_matches_reference(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g)
    _check(_triton("rms_norm"), ref.rms_norm, [x, w], [True, True], extra=(1e-6,))


@here
def test_rms_norm_weight_gradient_alone():
    """A norm whose input takes no gradient (e.g. right after a frozen part): only the weight's, through the
    kernel's path without dx."""
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(70, 48, generator=g), 1 + 0.1 * torch.randn(48, generator=g)
    _check(_triton("rms_norm"), ref.rms_norm, [x, w], [False, True], extra=(1e-6,))


@here
def test_rms_norm_on_a_strided_qkv_slice_and_a_frozen_weight():
    """QK-norm: q is a [T, H, D] view into the fused qkv output (row stride of the whole projection); the frozen
    weight gets no gradient and x's still matches."""
    g = torch.Generator().manual_seed(2)
    T, Hq, Hkv, D = 19, 4, 2, 32
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    w = 1 + 0.1 * torch.randn(D, generator=g)
    k_slice = lambda t: t[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)  # noqa: E731
    got = _check(lambda t, wt: _triton("rms_norm")(k_slice(t), wt, 1e-6),
                 lambda t, wt: ref.rms_norm(k_slice(t), wt, 1e-6), [qkv, w], [True, False])
    assert got[1][:, :Hq * D].abs().max() == 0 and got[1][:, (Hq + Hkv) * D:].abs().max() == 0


@here
@pytest.mark.parametrize("T,H,D", [(23, 3, 16), (7, 20, 64), (0, 2, 8)])
def test_rope_matches_reference(T, H, D):
    from sail_dist.model.qwen3 import rope_cos_sin

    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, D, generator=g)
    cos, sin = rope_cos_sin(torch.randint(0, 4096, (T,), generator=g), D, 1e6, torch.float64)
    got = _grads(lambda t: _triton("rope")(t, cos.to(DEVICE, torch.float32), sin.to(DEVICE, torch.float32)),
                 [x.to(DEVICE)], [True], torch.ones(T, H, D, device=DEVICE))
    want = _grads(lambda t: ref.rope(t, cos, sin), [x.double()], [True], torch.ones(T, H, D, dtype=torch.float64))
    for a, b in zip(got, want):
        assert _rel(a.cpu(), b) <= 1e-5
    # a general cotangent and a strided view (q out of the qkv slice)
    qkv = torch.randn(T, 2 * H * D, generator=g)
    view = lambda t: t[:, H * D:].view(T, H, D)  # noqa: E731
    c32, s32 = cos.float(), sin.float()
    _check(lambda t: _triton("rope")(view(t), c32.to(t.device), s32.to(t.device)),
           lambda t: ref.rope(view(t), cos, sin), [qkv], [True])


@here
@pytest.mark.parametrize("shape", [(37, 2 * 48), (3, 5, 2 * 1500), (0, 8)])
def test_swiglu_matches_reference(shape):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g) * 2
    _check(_triton("swiglu"), ref.swiglu, [x], [True])


@here
def test_opset_routes_to_the_kernels_and_the_switch_turns_them_off():
    """The GPU OpSet uses the Triton ops on CUDA / interpreter tensors, the reference with `elementwise: false`."""
    on, off = gpu.opset(moe_impl="loop"), gpu.opset(moe_impl="loop", kernels=KernelConfig(elementwise=False))
    assert off.rms_norm is ref.rms_norm and off.rope is ref.rope and off.swiglu is ref.swiglu
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    y = on.rms_norm(x, torch.ones(16, device=DEVICE), 1e-6)
    assert type(y.grad_fn).__name__ == "_RMSNormBackward"
    assert type(on.swiglu(x).grad_fn).__name__ == "_SwiGLUBackward"
    # float64 has no kernel: the reference, same values
    xd = torch.randn(4, 16, dtype=torch.float64, device=DEVICE)
    assert torch.equal(on.swiglu(xd), ref.swiglu(xd))


# ----------------------------------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("op", ["rms_norm", "rope", "swiglu"])
def test_bf16_against_the_fp32_reference(op):
    """Production dtype on the device at the 2B shape's widths: bf16 lands within 1e-2 of the fp32 reference."""
    from sail_dist.model.qwen3 import rope_cos_sin

    g = torch.Generator().manual_seed(5)
    if op == "rms_norm":
        x, w = torch.randn(4096, 2048, generator=g), 1 + 0.1 * torch.randn(2048, generator=g)
        _check(_triton(op), ref.rms_norm, [x, w], [True, True], extra=(1e-6,), dtype=torch.bfloat16, tol=1e-2)
    elif op == "rope":
        cos, sin = rope_cos_sin(torch.arange(4096), 128, 1e6, torch.bfloat16)
        x = torch.randn(4096, 16, 128, generator=g)
        _check(lambda t: _triton(op)(t, cos.cuda(), sin.cuda()), lambda t: ref.rope(t, cos.double(), sin.double()),
               [x], [True], dtype=torch.bfloat16, tol=1e-2)
    else:
        _check(_triton(op), ref.swiglu, [torch.randn(4096, 2 * 6144, generator=g)], [True], dtype=torch.bfloat16,
               tol=1e-2)


@cuda_only
@pytest.mark.gpu
def test_compiled_code_traces_the_reference_without_graph_breaks():
    """Inside torch.compile the OpSet's ops trace as the reference's torch ops (Inductor fuses them); same values."""
    import torch._dynamo

    ops = gpu.opset(moe_impl="loop")
    x = torch.randn(256, 2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)

    def f(t):
        return ops.swiglu(ops.rms_norm(t, w, 1e-6).flatten(1))

    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    assert _rel(torch.compile(f)(x).float(), f(x).float()) <= 1e-2
