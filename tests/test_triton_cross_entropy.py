"""The vocab-chunked linear cross-entropy's Triton row kernels (sail_dist/kernels/triton/cross_entropy.py) against the
reference OpSet: loss and both gradients, fp32 to 1e-5 relative, vocabulary blocks wider and narrower than the
kernels' 2048-column tile, ignored labels, labels in the first and last block.

Without CUDA the kernels run in Triton's interpreter, which must be on before triton is imported: as in
tests/test_triton_moe.py, the file then re-runs itself in a child pytest process with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import pytest
import torch

from conftest import run_in_triton_interpreter
from sail_dist.kernels import gpu
from sail_dist.kernels import reference as ref
from sail_dist.kernels.triton import interpreting

CUDA = torch.cuda.is_available()
RUN_HERE = CUDA or interpreting()
here = pytest.mark.skipif(not RUN_HERE, reason="CPU: runs in the interpreter child (test_interpreter_child)")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.skipif(RUN_HERE, reason="the tests run in this process")
def test_interpreter_child():
    """CPU: this file's tests, in a child process with Triton's interpreter on from the start."""
    run_in_triton_interpreter(__file__)


def _run(fn, h, w, labels, dloss):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * dloss.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@here
@pytest.mark.parametrize("V,chunk", [(5000, 3000), (5000, None), (300, 77), (129, 1)])
def test_triton_rows_match_reference_fp32(V, chunk):
    from sail_dist.kernels.triton import cross_entropy as k

    assert gpu._ce_row_ops(torch.empty(1, device=DEVICE))[0] is k.lse_target_  # the kernels, not the torch path
    g = torch.Generator().manual_seed(V)
    T, D = 37, 16
    h = torch.randn(T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    labels = torch.randint(0, V, (T,), generator=g)
    labels[0], labels[1], labels[::5] = 0, V - 1, -100
    dloss = torch.randn(T, generator=g)
    want = _run(ref.cross_entropy, h.double(), w.double(), labels, dloss.double())
    got = _run(lambda a, b, c: gpu.cross_entropy(a, b, c, chunk_size=chunk),
               *(t.to(DEVICE) for t in (h, w, labels, dloss)))
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        assert a.dtype == torch.float32, name
        assert _rel(a.cpu(), b) <= 1e-5, f"{name}: {_rel(a.cpu(), b):.2e}"
    assert (got[0].cpu()[labels == -100] == 0).all()
