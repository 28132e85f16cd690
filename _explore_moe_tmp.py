"""TEMPORARY exploration script (deleted after use)."""
import json, os, sys, time
SMOKE = os.environ.get("EXPLORE_SMOKE") == "1"
if SMOKE: os.environ["TRITON_INTERPRET"] = "1"
import torch
from triton.testing import do_bench
from sail_dist.bench import moe as bm
from sail_dist.kernels.triton import moe as tm
from sail_dist.kernels import reference

OUT = os.environ.get("OUT", "/tmp")
t0 = time.time()
res = {}
def dump():
    with open(f"{OUT}/explore.json", "w") as f: json.dump(res, f, indent=1)
if SMOKE:
    bm.DEVICE = "cpu"; bm.SHAPES["a3b_8k"] = (64, 32, 16, 8, 8); bm.SHAPES["a3b_16k"] = (48, 32, 16, 8, 8)
    do_bench = lambda fn, **k: (fn(), 1.0)[1]
    torch.Tensor.cuda = lambda self: self
DEV = "cpu" if SMOKE else "cuda"
def B(fn): return round(float(do_bench(fn, warmup=10, rep=50, return_mode="median")), 4)
torch.backends.cuda.matmul.allow_tf32 = False
SW = ("WGRAD_IMPL", "DX_IMPL", "G_IMPL", "FWD_DOWN_IMPL")
def setsw(w, dx, g, fd):
    for n, v in zip(SW, (w, dx, g, fd)): setattr(tm, n, v)

# ---- Part A: stages at a3b_8k
T, H, F, E, K = bm.SHAPES["a3b_8k"]
x, idx, w, wgu, wd, dy = bm._inputs(T, H, F, E, K, torch.bfloat16)
M = T * K
r = tm.route(idx, E); scale = w.reshape(-1).index_select(0, r.perm_M); inv = tm.inverse_rows(r)
h, act = tm.gate_up_fwd(x, wgu, r)
xs = x.index_select(0, r.tok_M); dys = dy.index_select(0, r.tok_M)
dh, acts, _ = tm.down_dgrad_split(dy, wd, h, scale, r)
g = tm.grouped_gemm(dy, wd, r, M, transpose_w=True, gather_a=True)
A = {}
def st(name, fn, flops=0):
    ms = B(fn); A[name] = (ms, round(flops / ms / 1e9, 1) if flops else None); print("A", name, A[name], f"{time.time()-t0:.0f}s", flush=True)
st("route", lambda: tm.route(idx, E))
st("inverse_rows", lambda: tm.inverse_rows(r))
st("fwd_gate_up_triton", lambda: tm.gate_up_fwd(x, wgu, r), 2*M*H*2*F)
st("gather_x", lambda: x.index_select(0, r.tok_M))
st("gmm_gate_up_bare", lambda: torch._grouped_mm(xs, wgu, offs=r.offsets_E1[1:]), 2*M*H*2*F)
st("fwd_down_triton_scatter", lambda: tm.grouped_gemm(act, wd, r, M, scale_M=scale, scatter_out=True), 2*M*F*H)
y_MH = tm.grouped_gemm(act, wd, r, M, scale_M=scale, scatter_out=True)
st("combine", lambda: tm.combine(y_MH, T, K))
st("fwd_down_gmm", lambda: torch._grouped_mm(act, wd, offs=r.offsets_E1[1:]), 2*M*F*H)
ys = torch._grouped_mm(act, wd, offs=r.offsets_E1[1:])
st("gather_sum_scaled", lambda: tm.gather_sum(ys, inv, T, K, w.reshape(-1)))
A["fwd_down_agree"] = float((tm.gather_sum(ys, inv, T, K, w.reshape(-1)).float() - tm.combine(y_MH, T, K).float()).norm() / tm.combine(y_MH, T, K).float().norm())
st("gather_dy", lambda: dy.index_select(0, r.tok_M))
st("g_triton", lambda: tm.grouped_gemm(dy, wd, r, M, transpose_w=True, gather_a=True), 2*M*F*H)
st("g_gmm", lambda: torch._grouped_mm(dys, wd.transpose(1, 2), offs=r.offsets_E1[1:]), 2*M*F*H)
A["g_agree"] = float((torch._grouped_mm(dys, wd.transpose(1, 2), offs=r.offsets_E1[1:]).float() - g.float()).norm() / g.float().norm())
st("down_dgrad_split_total", lambda: tm.down_dgrad_split(dy, wd, h, scale, r))
st("dx_triton_scatter", lambda: tm.grouped_gemm(dh, wgu, r, M, transpose_w=True, scatter_out=True), 2*M*2*F*H)
st("dx_gmm", lambda: torch._grouped_mm(dh, wgu.transpose(1, 2), offs=r.offsets_E1[1:]), 2*M*2*F*H)
dxs = torch._grouped_mm(dh, wgu.transpose(1, 2), offs=r.offsets_E1[1:])
st("gather_sum", lambda: tm.gather_sum(dxs, inv, T, K))
st("wgrad_gu_triton", lambda: tm.grouped_wgrad(x, dh, r, wgu.dtype, a_idx=r.tok_M), 2*M*H*2*F)
st("wgrad_gu_gmm", lambda: torch._grouped_mm(xs.t(), dh, offs=r.offsets_E1[1:]), 2*M*H*2*F)
st("wgrad_dn_triton", lambda: tm.grouped_wgrad(acts, dy, r, wd.dtype, b_idx=r.tok_M), 2*M*F*H)
st("wgrad_dn_gmm", lambda: torch._grouped_mm(acts.t(), dys, offs=r.offsets_E1[1:]), 2*M*F*H)
a1 = tm.grouped_wgrad(x, dh, r, wgu.dtype, a_idx=r.tok_M); a2 = torch._grouped_mm(xs.t(), dh, offs=r.offsets_E1[1:])
A["wgrad_gu_agree"] = float((a1.float() - a2.float()).norm() / a1.float().norm())
# empty experts / hot expert with grouped_mm 2d-2d and unaligned groups
idx2 = idx.clone(); idx2[idx2 == 5] = 7; idx2[idx2 == 9] = 7; idx2[:, 0] = 3
r2 = tm.route(idx2, E)
cnt = r2.counts_E
xs2 = x.index_select(0, r2.tok_M); dh2 = torch.randn(M, 2*F, device=DEV, dtype=torch.bfloat16)
o = torch.full((E, H, 2*F), float("nan"), device=DEV, dtype=torch.bfloat16)
o = torch._grouped_mm(xs2.t(), dh2, offs=r2.offsets_E1[1:])
ref2 = tm.grouped_wgrad(x, dh2, r2, wgu.dtype, a_idx=r2.tok_M)
A["empty_experts"] = int((cnt == 0).sum()); A["unaligned_groups"] = int((cnt % 8 != 0).sum())
A["empty_grad_absmax"] = float(o[cnt == 0].abs().max()) if (cnt == 0).any() else None
A["hot_agree"] = float((o.float() - ref2.float()).norm() / ref2.float().norm())
res["stages_8k"] = A; dump()

# ---- Part B: whole op
combos = {"all_triton": ("triton",)*4, "wgrad": ("grouped_mm", "triton", "triton", "triton"),
          "wgrad_g": ("grouped_mm", "triton", "grouped_mm", "triton"),
          "wgrad_g_dx": ("grouped_mm", "grouped_mm", "grouped_mm", "triton"),
          "all_gmm": ("grouped_mm",)*4}
for shape in ("a3b_8k", "a3b_16k"):
    inputs = bm._inputs(*bm.SHAPES[shape], torch.bfloat16)
    ref_outs = bm._fwd_bwd(reference.moe_experts, *(t.float() if t.is_floating_point() else t for t in inputs))
    Ts, Hs, Fs, Es, Ks = bm.SHAPES[shape]; fwd_flops = 2 * Ts * Ks * Hs * 3 * Fs
    for name, c in combos.items():
        setsw(*c)
        rr = bm._measure(tm.moe_experts, inputs, fwd_flops, ref_outs, poison=True)
        res[f"{shape}/{name}"] = rr; dump()
        print("B", shape, name, rr, f"{time.time()-t0:.0f}s", flush=True)
    del inputs, ref_outs
    if not SMOKE: torch.cuda.empty_cache()
setsw(*combos["all_triton"])

# ---- Part C: extra Triton wgrad configs (gathered kernel), if time allows
C = {}
kern = tm._grouped_wgrad_kernel.fn
for (bm_, bn, bk, nw, ns) in ([(16, 16, 16, 1, 1)] if SMOKE else [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)]):
    if time.time() - t0 > 300: break
    dw = torch.empty(E, H, 2*F, device=DEV, dtype=torch.bfloat16)
    grid = (E * (H // bm_) * (2*F // bn),)
    fn = lambda: kern[grid](x, dh, dw, r.tok_M, r.tok_M, r.offsets_E1, H, 2*F, x.stride(0), dh.stride(0), dw.stride(0), dw.stride(1),
                            GROUP=8, GATHER_A=True, GATHER_B=False, DOT_PREC="upcast" if SMOKE else "tf32", BLOCK_M=bm_, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    try:
        fn(); ms = B(fn); C[str((bm_, bn, bk, nw, ns))] = (ms, round(2*M*H*2*F/ms/1e9, 1))
    except Exception as e:
        C[str((bm_, bn, bk, nw, ns))] = str(e)[:200]
    print("C", C, flush=True)
res["wgrad_gu_configs"] = C; dump()
print("DONE", f"{time.time()-t0:.0f}s")
