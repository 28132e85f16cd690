"""The Triton fused MoE experts (sail_dist/kernels/triton/moe.py) against the reference OpSet.

With CUDA the kernels run compiled (the fp32 dots in IEEE mode). Without CUDA they run in Triton's CPU
interpreter, which must be switched on (TRITON_INTERPRET=1) before triton itself is first imported: this
module then re-runs itself in a child pytest process with that variable set (test_interpreter_child), so
nothing else in the parent process ever runs in the interpreter. Either way: forward and all four
gradients equal the float64 reference to 1e-5 relative in fp32, with zero-token experts, a single hot
expert, K = 1, shapes that are and are not multiples of the tiles, library GEMMs or Triton only, and every
kernel-written buffer NaN-poisoned first; each `backend.kernels` switch takes its other path when off.
"""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_in_triton_interpreter
from sail_dist.config import KernelConfig, load_config
from sail_dist.kernels import opset_for_backend
from sail_dist.kernels import reference as ref
from sail_dist.kernels.triton import interpreting

CUDA = torch.cuda.is_available()
RUN_HERE = CUDA or interpreting()
here = pytest.mark.skipif(not RUN_HERE, reason="CPU: runs in the interpreter child (test_interpreter_child)")


@pytest.mark.skipif(RUN_HERE, reason="the tests run in this process")
def test_interpreter_child():
    """CPU: this file's tests, in a child process with Triton's interpreter on from the start."""
    run_in_triton_interpreter(__file__)


moe = importlib.import_module("sail_dist.kernels.triton.moe") if RUN_HERE else None
# One tile config per kernel: correctness, not speed (on a GPU fp32 IEEE candidates compile slowly).
OPTS = KernelConfig(moe_autotune=False)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL_FP32 = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (NaN if a has any NaN: an unwritten poisoned element)."""
    a, b = a.double().cpu(), b.double().cpu()
    if torch.isnan(a).any():
        return float("nan")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _routing(T, K, E, gen, empty=(), hot=None):
    """Random distinct top-k experts per token, avoiding `empty` experts; `hot` takes slot 0 everywhere."""
    allowed = [e for e in range(E) if e not in empty]
    idx = torch.empty(T, K, dtype=torch.long)
    for t in range(T):
        choice = torch.tensor(allowed)[torch.randperm(len(allowed), generator=gen)[:K]]
        if hot is not None and hot not in choice.tolist():
            choice[0] = hot
        idx[t] = choice
    return idx


def _case(T, K, E, H, F, seed=0, empty=(), hot=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    idx = _routing(T, K, E, gen, empty, hot)
    w = torch.rand(T, K, generator=gen, dtype=torch.float64)
    wgu = torch.randn(E, H, 2 * F, generator=gen, dtype=torch.float64) / H ** 0.5
    wd = torch.randn(E, F, H, generator=gen, dtype=torch.float64) / F ** 0.5
    dy = torch.randn(T, H, generator=gen, dtype=torch.float64)
    return x, idx, w, wgu, wd, dy


def _fwd_bwd(fn, x, idx, w, wgu, wd, dy, dtype, device):
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (x, w, wgu, wd)]
    y = fn(leaves[0], idx.to(device), leaves[1], leaves[2], leaves[3])
    y.backward(dy.to(device=device, dtype=dtype))
    return [y.detach()] + [t.grad for t in leaves]


class _AtenOps(TorchDispatchMode):
    """Records the names of the aten ops run inside it: which path a switch took (Triton launches are not
    aten ops, their torch fallbacks are)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _experts(opts: KernelConfig):
    """The Triton moe_experts on these switches, with the OpSet's signature."""
    return lambda *args: moe.moe_experts(*args, opts)


NAMES = ("y", "dx", "d_topk_weight", "d_w_gate_up", "d_w_down")
CASES = {
    # name: (T, K, E, H, F, kwargs)
    "zero_token_experts_ragged_dims": (40, 2, 8, 40, 24, dict(empty=(1, 5))),
    "single_hot_expert": (48, 2, 6, 32, 16, dict(empty=(4,), hot=2)),
    "top1_even_dims": (37, 1, 4, 32, 32, dict(empty=(0,))),
    "top4_many_experts": (20, 4, 16, 24, 20, dict()),
}


@here
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grouped_mm", [True, False] if not CUDA else [False])
def test_forward_and_grads_match_reference_fp32(case, grouped_mm):
    """Library GEMMs where they apply, or every GEMM in Triton (`moe_grouped_mm`). (On CUDA torch._grouped_mm
    takes bf16 only: fp32 runs every GEMM in Triton there, and the grouped_mm path is checked in bf16 by
    test_grouped_mm_path_bf16_cuda.)"""
    T, K, E, H, F, kw = CASES[case]
    inputs = _case(T, K, E, H, F, **kw)
    want = _fwd_bwd(ref.moe_experts, *inputs, torch.float64, "cpu")
    with moe.poison_outputs(), _AtenOps() as ops:
        got = _fwd_bwd(_experts(dataclasses.replace(OPTS, moe_grouped_mm=grouped_mm)), *inputs, torch.float32, DEVICE)
    assert ("_grouped_mm" in ops.names) == grouped_mm
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert _rel(g, w) <= TOL_FP32, f"{case}: {name} rel err {_rel(g, w):.2e}"
    # Experts nobody routed to get exactly zero weight gradients.
    for e in kw.get("empty", ()):
        assert got[3][e].abs().max() == 0 and got[4][e].abs().max() == 0


@here
def test_routing_metadata():
    gen = torch.Generator().manual_seed(3)
    idx = _routing(30, 3, 7, gen, empty=(2,), hot=5)
    r = moe.route(idx.to(DEVICE), 7)
    counts = torch.bincount(idx.reshape(-1), minlength=7)
    assert r.num_experts == 7 and r.num_rows == 90
    assert r.counts_E.cpu().tolist() == counts.tolist()
    assert r.offsets_E1.cpu().tolist() == [0] + torch.cumsum(counts, 0).tolist()
    pos, tok = r.pos_M.long().cpu(), r.tok_M.long().cpu()
    assert sorted(pos.tolist()) == list(range(90))  # a permutation of the (token, slot) pairs
    assert torch.equal(tok, pos // 3)
    assert torch.equal(r.perm_M.cpu(), pos)
    assert torch.equal(idx.reshape(-1)[pos], r.expert_M.long().cpu())  # rows sorted by expert...
    assert bool((r.expert_M[1:] >= r.expert_M[:-1]).all())


@here
@pytest.mark.parametrize("T,K,E,empty", [(30, 3, 7, (2, 6)), (700, 2, 300, ()), (5, 1, 4, (0, 3)), (0, 2, 4, ())])
def test_fused_route_equals_torch_route(T, K, E, empty):
    """The one-kernel routing (route_weights) gives exactly the torch ops' routing, scale and inverse
    (`moe_fused_route` off): empty experts at the start, middle and end, more experts than a uint8 key holds,
    no tokens. The row gather kernel equals index_select (`moe_gather_kernel` off)."""
    gen = torch.Generator().manual_seed(T)
    idx = _routing(T, K, E, gen, empty=empty).to(DEVICE)
    w = torch.rand(T, K, generator=gen, dtype=torch.float64).to(DEVICE)
    with moe.poison_outputs():
        got = moe.route_weights(idx, w, E, OPTS)
        want = moe.route_weights(idx, w, E, dataclasses.replace(OPTS, moe_fused_route=False))
    for field in ("offsets_E1", "pos_M", "tok_M", "expert_M", "perm_M"):
        a, b = getattr(got[0], field), getattr(want[0], field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    x = torch.randn(max(T, 1), 40, generator=gen).to(DEVICE)
    with moe.poison_outputs():
        rows = moe.gather_rows(x, got[0].tok_M, OPTS)
    assert torch.equal(rows, moe.gather_rows(x, got[0].tok_M, dataclasses.replace(OPTS, moe_gather_kernel=False)))


# switch -> an aten op that only its `false` path runs. Both paths of either switch compute exact copies (the
# routing, the row gathers), so the op's results are bitwise the same.
TORCH_PATH_OPS = {"moe_fused_route": "searchsorted", "moe_gather_kernel": "index_select"}


@here
@pytest.mark.parametrize("switch", list(TORCH_PATH_OPS))
def test_switch_off_takes_torch_path_with_identical_results(switch):
    """The whole op (forward and all four gradients) with a switch off: bitwise the default's results, through
    its torch path (bf16 on CUDA, where the row gathers run: fp32 there skips torch._grouped_mm)."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    inputs = _case(40, 2, 8, 32, 16, seed=2, empty=(5,))
    with _AtenOps() as on_ops:
        on = _fwd_bwd(_experts(OPTS), *inputs, dtype, DEVICE)
    with _AtenOps() as off_ops:
        off = _fwd_bwd(_experts(dataclasses.replace(OPTS, **{switch: False})), *inputs, dtype, DEVICE)
    op = TORCH_PATH_OPS[switch]
    assert op not in on_ops.names and op in off_ops.names
    for name, a, b in zip(NAMES, off, on):
        assert torch.equal(a, b), name


@here
def test_autotune_switch_picks_the_kernel():
    """`moe_autotune` picks, per launch, the kernel tuned over its candidate list or the one fixed at the
    list's first config (under the interpreter both hold the one small interpreter config)."""
    for kernel, configs in ((moe._gate_up_swiglu_fwd_kernel, moe._GATE_UP_CONFIGS),
                            (moe._grouped_gemm_kernel, moe._ROW_CONFIGS),
                            (moe._grouped_wgrad_kernel, moe._WGRAD_CONFIGS)):
        tuned, fixed = kernel.select(KernelConfig()), kernel.select(OPTS)
        assert tuned is kernel.autotuned and fixed is kernel.fixed and tuned is not fixed
        assert fixed.configs == tuned.configs[:1] and len(fixed.configs) == 1
        if not moe.INTERPRET:
            assert tuned.configs == configs


@here
@pytest.mark.parametrize("tma", [True, False])
def test_weight_tma_switch(tma):
    """`moe_weight_tma`: the gate_up kernel loads tile-aligned bf16 weights through TMA only when switched on
    and on Hopper or newer (pointer loads under the interpreter); h and act match the reference either way."""
    T, K, E, H, F = 64, 2, 4, 128, 128  # H, F multiples of the TMA tiles
    x, idx, w, wgu, _, _ = _case(T, K, E, H, F, seed=4, empty=(2,))
    x, wgu = x.to(DEVICE, torch.bfloat16), wgu.to(DEVICE, torch.bfloat16)
    opts = dataclasses.replace(OPTS, moe_weight_tma=tma)
    hopper = CUDA and torch.cuda.get_device_capability()[0] >= 9 and hasattr(moe.tl, "make_tensor_descriptor")
    assert moe._w_tma_ok(wgu, opts) == (tma and hopper)
    r = moe.route(idx.to(DEVICE), E)
    with moe.poison_outputs():
        h, act = moe.gate_up_fwd(x, wgu, r, opts)
    tok, expert = r.tok_M.long().cpu(), r.expert_M.long().cpu()
    want_h = torch.einsum("mh,mhf->mf", x.double().cpu()[tok], wgu.double().cpu()[expert])
    assert float((h.double().cpu() - want_h).norm() / want_h.norm()) <= 1e-2
    want_act = ref.swiglu(h.double().cpu())  # from the rounded h, as the kernel computes it
    assert float((act.double().cpu() - want_act).norm() / want_act.norm()) <= 1e-2


@here
def test_grads_only_where_needed_and_weight_dtype():
    """Frozen experts (no weight grads) and weights in another dtype than x (fp64 router weights)."""
    x, idx, w, wgu, wd, dy = _case(16, 2, 4, 16, 16, seed=5)
    xs = x.float().to(DEVICE).requires_grad_()
    ws = w.to(DEVICE).requires_grad_()  # float64 routing weights, fp32 activations
    y = moe.moe_experts(xs, idx.to(DEVICE), ws, wgu.float().to(DEVICE), wd.float().to(DEVICE))
    y.backward(dy.float().to(DEVICE))
    assert ws.grad.dtype == torch.float64 and xs.grad is not None
    want = _fwd_bwd(ref.moe_experts, x, idx, w, wgu, wd, dy, torch.float64, "cpu")
    assert _rel(xs.grad, want[1]) <= TOL_FP32 and _rel(ws.grad, want[2]) <= TOL_FP32


@here
@pytest.mark.parametrize("grouped_mm", ["true", "false"])
def test_gpu_opset_dispatches_to_triton(grouped_mm):
    """The config's `backend.kernels` reach the kernels through opset_for_backend."""
    cfg = load_config(None, ["data.demo=true", "backend.kernels.moe_autotune=false",
                             f"backend.kernels.moe_grouped_mm={grouped_mm}"])
    ops = opset_for_backend("gpu", cfg.backend)
    dtype = torch.bfloat16 if CUDA else torch.float32  # (torch._grouped_mm on CUDA: bf16 only)
    args = [t.to(dtype) if t.is_floating_point() else t for t in _case(24, 2, 5, 16, 8, seed=7, empty=(3,))[:5]]
    with _AtenOps() as ran:
        got = ops.moe_experts(*(t.to(DEVICE) for t in args))
    assert ("_grouped_mm" in ran.names) == (grouped_mm == "true")
    want = ref.moe_experts(*(t.double() if t.is_floating_point() else t for t in args))
    assert float((got.double().cpu() - want).norm() / want.norm()) <= (1e-2 if CUDA else TOL_FP32)


@pytest.mark.skipif(not CUDA, reason="torch._grouped_mm's CUTLASS path: CUDA bf16")
@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("autotune", [True, False])
def test_grouped_mm_path_bf16_cuda(grouped_mm, autotune):
    """bf16 on the GPU (the production path, torch._grouped_mm for most GEMMs, or all Triton; tuned or fixed
    tiles) against the float64 reference: 1e-2 relative (Frobenius), zero-token experts and a single hot
    expert with uneven, unaligned group sizes, Triton-written buffers poisoned; empty experts get exactly
    zero gradients."""
    opts = KernelConfig(moe_grouped_mm=grouped_mm, moe_autotune=autotune)
    empty = (1, 6, 11)
    inputs = _case(384, 4, 16, 256, 128, seed=11, empty=empty, hot=3)
    bf = [t.to(torch.bfloat16).double() if t.is_floating_point() else t for t in inputs]
    want = _fwd_bwd(ref.moe_experts, *bf, torch.float64, "cpu")  # same bf16-rounded inputs
    with moe.poison_outputs(), _AtenOps() as ops:
        got = _fwd_bwd(_experts(opts), *inputs, torch.bfloat16, DEVICE)
    assert ("_grouped_mm" in ops.names) == grouped_mm
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        err = float((g.double().cpu() - w).norm() / w.norm())
        assert err <= 1e-2, f"{name} rel err {err:.2e}"  # (NaN fails too)
    for e in empty:
        assert got[3][e].abs().max() == 0 and got[4][e].abs().max() == 0


