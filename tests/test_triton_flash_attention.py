"""The GPU OpSet's Triton varlen flash attention (sail_dist/kernels/triton/flash_attention.py) against the reference
attention in float64: output and the q / k / v gradients, fp32 to 1e-5 relative; on CUDA also bf16 against the
float64 reference (between 1e-3 and 1e-2) at the model's head dim. Packed sequences of uneven lengths (a length
of 1, lengths that end inside a tile, one longer than several tiles), causal and full, grouped-query heads, and
q / k / v as strided views of one projection, as the model passes them.

Without CUDA the kernels run in Triton's interpreter, which must be on before triton is imported: the file then
re-runs itself in a child pytest process with TRITON_INTERPRET=1 (as tests/test_triton_moe.py does).
"""
from __future__ import annotations

import pytest
import torch

from conftest import run_in_triton_interpreter
from sail_dist.bench.numerics import rel_err as _rel
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


def _case(lens, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    x = torch.randn(T, Hq + 2 * Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(T, Hq, D, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return x, dout, cu


def _run(attn, x, dout, cu, Hq, Hkv, max_len, causal):
    """Output and the gradient of the one leaf q / k / v are sliced from (strided views)."""
    x = x.detach().clone().requires_grad_()
    out = attn(x[:, :Hq], x[:, Hq:Hq + Hkv], x[:, Hq + Hkv:], cu.to(x.device), max_len, causal)
    out.backward(dout.to(out.dtype))
    return out.detach(), x.grad


def _check(lens, Hq, Hkv, D, causal, dtype, tol):
    from sail_dist.kernels.triton.flash_attention import flash_attention

    x, dout, cu = _case(lens, Hq, Hkv, D)
    want = _run(ref.attention, x, dout, cu, Hq, Hkv, max(lens), causal)
    got = _run(flash_attention, x.to(DEVICE, dtype), dout.to(DEVICE), cu, Hq, Hkv, max(lens), causal)
    for name, a, b in zip(("output", "grad"), got, want):
        err = _rel(a.cpu(), b)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"
    # each of q, k, v's gradients on its own, not only their concatenation
    for name, sl in (("dq", slice(0, Hq)), ("dk", slice(Hq, Hq + Hkv)), ("dv", slice(Hq + Hkv, None))):
        err = _rel(got[1][:, sl].cpu(), want[1][:, sl])
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


LENS = [1, 37, 64, 19, 130]  # (one token; inside a tile; exactly tiles; several tiles with a partial last one)


@here
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 16), (4, 2, 32), (8, 2, 16)], ids=["mha", "gqa2", "gqa4"])
def test_fp32_matches_the_reference(causal, Hq, Hkv, D):
    _check(LENS, Hq, Hkv, D, causal, torch.float32, 1e-5)


@here
def test_a_lone_long_sequence_and_empty_ones():
    """Lengths of zero in cu_seqlens (repeated offsets) launch nothing; max_seqlen above every length is fine."""
    from sail_dist.kernels.triton.flash_attention import flash_attention

    lens = [0, 150, 0]
    x, dout, cu = _case(lens, 2, 1, 16, seed=1)
    want = _run(ref.attention, x, dout, cu, 2, 1, 150, True)
    got = _run(flash_attention, x.to(DEVICE, torch.float32), dout.to(DEVICE), cu, 2, 1, 200, True)
    assert _rel(got[0].cpu(), want[0]) <= 1e-5 and _rel(got[1].cpu(), want[1]) <= 1e-5


@here
def test_opset_routes_to_the_kernel_and_falls_back_for_other_head_dims(monkeypatch):
    from sail_dist.kernels.triton import flash_attention as fa

    calls = []
    real = fa.flash_attention
    monkeypatch.setattr(fa, "flash_attention", lambda *a: calls.append(1) or real(*a))
    attn = gpu.make_attention("triton")
    assert attn.impl == "triton"
    x, dout, cu = _case(LENS, 4, 2, 16)
    want = _run(ref.attention, x, dout, cu, 4, 2, max(LENS), True)
    got = _run(attn, x.to(DEVICE, torch.float32), dout.to(DEVICE), cu, 4, 2, max(LENS), True)
    assert calls and _rel(got[0].cpu(), want[0]) <= 1e-5 and _rel(got[1].cpu(), want[1]) <= 1e-5
    calls.clear()
    x, dout, cu = _case([5, 9], 2, 2, 24)  # head dim 24: not a power of 2, another kernel (or the reference) runs
    out = _run(attn, x.to(DEVICE, torch.float32), dout.to(DEVICE), cu, 2, 2, 9, True)[0]
    assert not calls and _rel(out.cpu(), ref.attention(x[:, :2], x[:, 2:4], x[:, 4:], cu, 9, True)) <= 1e-5


def test_bad_shapes_are_named():
    pytest.importorskip("triton")
    from sail_dist.kernels.triton import flash_attention as fa

    q, kv = torch.zeros(4, 3, 16), torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        fa.forward(q, kv, kv, torch.tensor([0, 4], dtype=torch.int32), 4, True)
    with pytest.raises(ValueError, match="head dims"):
        fa.forward(torch.zeros(4, 2, 48), torch.zeros(4, 2, 48), torch.zeros(4, 2, 48),
                   torch.tensor([0, 4], dtype=torch.int32), 4, True)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Hq,Hkv", [(16, 8), (32, 4), (12, 12)], ids=["2b", "a3b", "vit"])
def test_bf16_at_the_model_head_dim(causal, Hq, Hkv):
    """bf16 on tensor cores against float64, head dim 128, lengths around the tiles (64 / 128) and one of 700."""
    _check([1, 63, 128, 129, 700, 255], Hq, Hkv, 128, causal, torch.bfloat16, 1e-2)


@here
@pytest.mark.parametrize("model", ["tiny", pytest.param("tiny_moe", marks=cuda_only)])
def test_compiled_model_on_the_gpu_opset_equals_eager(model, monkeypatch):
    """The GPU OpSet with the Triton attention (custom ops inside the compiled layers), fp32, compiled per block as
    train.compile does: loss and every gradient equal the eager model's across two packed lengths. On CUDA the
    whole GPU OpSet (Triton experts and element-wise kernels where they run eagerly); on CPU, in Triton's
    interpreter, the attention alone is Triton (the other kernels there would only add interpreter minutes)."""
    import copy
    import os

    from conftest import ROOT
    from sail_dist.config import KernelConfig, load_config
    from sail_dist.data.synthetic import synthetic_batch
    from sail_dist.kernels import get_opset
    from sail_dist.model.build import build_model
    from sail_dist.parallel.compile import apply_compile

    cfg = load_config(os.path.join(ROOT, "configs", "model", f"{model}.yaml"), ["data.demo=true"])
    opts = {} if CUDA else {"moe_impl": "grouped_mm", "kernels": KernelConfig(elementwise=False)}
    eager = build_model(cfg.model, get_opset("gpu", attention_impl="triton", **opts), seed=0).to(DEVICE).train()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    g = cfg.model.vit.grid
    batches = [synthetic_batch(cfg.model, [70, 23, 31], [[(g, g)], [], [(g, g), (g, g + 2)]], seed=1),
               synthetic_batch(cfg.model, [57, 12], [[], [(g, g)]], seed=2)]
    from sail_dist.kernels.triton import flash_attention as fa

    launches = []
    real_forward = fa.forward
    monkeypatch.setattr(fa, "forward", lambda *a, **k: launches.append(1) or real_forward(*a, **k))
    for b in batches:
        b = b.to(DEVICE)
        for m in (eager, compiled):
            m.zero_grad()
            launches.clear()
            out = m(b)
            assert launches, "the Triton attention did not run"  # (not the reference, not another kernel)
            loss = out.loss_T.sum() + (out.aux_loss if out.aux_loss is not None else 0.0)
            loss.backward()
            m._loss = loss.detach()
        assert _rel(compiled._loss, eager._loss) <= 1e-5
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                assert _rel(q.grad, p.grad) <= 1e-5, name


@cuda_only
@pytest.mark.gpu
def test_compiled_call_equals_eager():
    """Inside torch.compile (the custom ops stay whole) the output and gradients equal the eager call's."""
    from sail_dist.kernels.triton.flash_attention import flash_attention

    x, dout, cu = _case([300, 77, 500], 16, 8, 128)
    x, dout = x.cuda().bfloat16(), dout.cuda()
    eager = _run(flash_attention, x, dout, cu, 16, 8, 500, True)
    compiled = _run(torch.compile(flash_attention, dynamic=True), x, dout, cu, 16, 8, 500, True)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
