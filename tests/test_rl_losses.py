"""RL losses and advantages against hand-computed values (sail_dist/objectives/policy.py, sail_dist/rl/advantages.py).

DAPO: per-token clip-higher values and which tokens are clipped (zero gradient, checked on .grad), the token-mean
over the whole step independent of the micro-batch split. GSPO: the sequence ratio as the geometric mean of the
token ratios, sequence clipping, and the gradient of the written sequence-level formula (autograd in float64).
Advantages, overlong shaping and dynamic sampling's drop / refill against values worked out by hand.
"""
from __future__ import annotations

import math

import pytest
import torch

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.model.sailvl import ModelOutput
from sail_dist.objectives import build_objective
from sail_dist.rl.advantages import DynamicSampling, group_advantages, informative, overlong_penalty


def _batch(seqlens: list[int], resp: list[list[int]], old: list[float], adv: list[float]) -> PackedBatch:
    """A packed batch whose sequence s has `seqlens[s]` tokens; `resp[s]` lists its response positions."""
    T = sum(seqlens)
    mask = torch.zeros(T)
    off = 0
    for n, r in zip(seqlens, resp):
        for p in r:
            mask[off + p] = 1.0
        off += n
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(seqlens), 0)), dtype=torch.int32)
    labels = torch.where(mask > 0, torch.ones(T, dtype=torch.long), torch.full((T,), -100))
    return PackedBatch(input_ids=torch.zeros(T, dtype=torch.long), labels=labels,
                       position_ids=torch.cat([torch.arange(n) for n in seqlens]), cu_seqlens=cu,
                       max_seqlen=max(seqlens), loss_weight=mask.clone(),
                       extras={"old_logp": torch.tensor(old, dtype=torch.float64) * mask.double(),
                               "advantage": torch.tensor(adv, dtype=torch.float64) * mask.double(),
                               "response_mask": mask})


def _ident(x):
    return x


def _out(logp: list[float]) -> tuple[ModelOutput, torch.Tensor]:
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    return ModelOutput(loss_T=-lp, aux_loss=None), lp


def _cfg(**loss) -> Config:
    cfg = Config()
    for k, v in loss.items():
        setattr(cfg.rl.loss, k, v)
    return cfg


# --------------------------------------------------------------------------------------------- DAPO
def test_dapo_token_values_clipping_and_zero_gradient_of_clipped_tokens():
    # one sequence of 6 tokens: 0 = prompt, 1..5 response; ratios exp(logp - old) chosen around the clip edges
    log_r = [0.0, math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.5), math.log(0.9)]
    adv = [0.0, 2.0, 2.0, -1.0, -1.0, 3.0]
    old = [-1.0] * 6
    logp = [o + lr for o, lr in zip(old, log_r)]
    b = _batch([6], [[1, 2, 3, 4, 5]], old, adv)
    obj = build_objective("dapo", _cfg())
    obj.begin_step([b], _ident)
    out, lp = _out(logp)
    share = obj.loss(out, b)
    # by hand, eps 0.2 / 0.28: l = max(-A r, -A clip(r, 0.8, 1.28))
    #  t1 A=2 r=1.5: max(-3, -2.56) = -2.56 (clipped)   t2 A=2 r=0.5: max(-1, -1.6) = -1 (not clipped)
    #  t3 A=-1 r=1.1: max(1.1, 1.1) = 1.1 (inside)      t4 A=-1 r=1.5: max(1.5, 1.28) = 1.5 (not clipped)
    #  t5 A=3 r=0.9: -2.7 (inside)
    want = (-2.56 - 1.0 + 1.1 + 1.5 - 2.7) / 5
    assert share.loss.item() == pytest.approx(want, abs=1e-12)
    assert share.metrics["clip_frac"].item() == pytest.approx(1 / 5)
    assert share.metrics["response_tokens"].item() == 5
    share.loss.backward()
    g = lp.grad
    assert g[0] == 0 and g[1] == 0  # prompt token; clipped token: exactly zero gradient
    # unclipped tokens: d/dlogp (-A r)/5 = -A r / 5
    for t, r in ((2, 0.5), (3, 1.1), (4, 1.5), (5, 0.9)):
        assert g[t].item() == pytest.approx(-adv[t] * r / 5, rel=1e-12)
    # approx KL (k3): mean (r - 1) - log r over the 5 response tokens
    k3 = sum((math.exp(x) - 1 - x) for x in log_r[1:]) / 5
    assert share.metrics["approx_kl"].item() == pytest.approx(k3, rel=1e-12)


def test_dapo_token_mean_over_the_whole_step_is_independent_of_the_micro_batch_split():
    g = torch.Generator().manual_seed(0)
    seqlens = [7, 5, 9, 4]
    resp = [[3, 4, 5], [2, 3], [1, 2, 3, 4, 5, 6, 7], [3]]
    T = sum(seqlens)
    old = (torch.randn(T, generator=g) * 0.3 - 2).tolist()
    adv = torch.randn(T, generator=g).tolist()
    logp = (torch.tensor(old) + torch.randn(T, generator=g) * 0.3).tolist()
    whole = _batch(seqlens, resp, old, adv)
    obj = build_objective("dapo", _cfg())
    obj.begin_step([whole], _ident)
    out, lp = _out(logp)
    s = obj.loss(out, whole)
    s.loss.backward()
    # split: sequences {0, 1} and {2, 3} in two micro-batches (the same tokens); shares must add up
    cut = seqlens[0] + seqlens[1]
    parts = [_batch(seqlens[:2], resp[:2], old[:cut], adv[:cut]), _batch(seqlens[2:], resp[2:], old[cut:], adv[cut:])]
    obj2 = build_objective("dapo", _cfg())
    obj2.begin_step(parts, _ident)
    o1, l1 = _out(logp[:cut])
    o2, l2 = _out(logp[cut:])
    a, b = obj2.loss(o1, parts[0]), obj2.loss(o2, parts[1])
    (a.loss + b.loss).backward()
    assert (a.loss + b.loss).item() == pytest.approx(s.loss.item(), rel=1e-12)
    assert torch.allclose(torch.cat([l1.grad, l2.grad]), lp.grad, rtol=1e-12, atol=1e-15)
    # an all-reduce over "two ranks" holding one part each gives the same normaliser
    halves = [[parts[0]], [parts[1]]]
    counts = []
    for h in halves:
        o = build_objective("dapo", _cfg())
        o.begin_step(h, lambda t: counts.append(t.clone()) or t)
    total = sum(counts)
    o = build_objective("dapo", _cfg())
    o.begin_step([parts[0]], lambda t: t.copy_(total))
    assert o.n_tokens == float(whole.extras["response_mask"].sum()) == 13
    # token-mean differs from the per-sequence mean: the sequences have different lengths
    seq = build_objective("dapo", _cfg(loss_agg="seq-mean-token-mean"))
    seq.begin_step([whole], _ident)
    out3, _ = _out(logp)
    assert abs(seq.loss(out3, whole).loss.item() - s.loss.item()) > 1e-4


def test_dapo_kl_to_reference_is_off_by_default_and_adds_k3_when_on():
    b = _batch([4], [[1, 2, 3]], [-1.0] * 4, [0.0, 1.0, -1.0, 0.5])
    logp = [-1.0, -0.9, -1.2, -1.1]
    b.extras["ref_logp"] = torch.tensor([-1.0, -1.0, -1.0, -1.0]) * b.extras["response_mask"]
    off = build_objective("dapo", _cfg())
    off.begin_step([b], _ident)
    on = build_objective("dapo", _cfg(kl_coef=0.1))
    on.begin_step([b], _ident)
    s_off, s_on = off.loss(_out(logp)[0], b), on.loss(_out(logp)[0], b)
    kl = sum(math.exp(-1.0 - lp) - 1 - (-1.0 - lp) for lp in logp[1:]) / 3
    assert s_off.metrics["kl_ref"].item() == 0
    assert s_on.metrics["kl_ref"].item() == pytest.approx(kl, rel=1e-9)
    assert s_on.loss.item() - s_off.loss.item() == pytest.approx(0.1 * kl, rel=1e-9)
    del b.extras["ref_logp"]
    with pytest.raises(KeyError, match="ref_logp"):
        on.begin_step([b], _ident)


# --------------------------------------------------------------------------------------------- GSPO
def _gspo_reference(logp: torch.Tensor, old, adv_S, seqs, eps_low, eps_high):
    """The sequence-level GSPO objective as written in the paper (eq. 5-7): s_i = (prod_t r_t)^(1/|y_i|),
    J = mean_i min(s_i A_i, clip(s_i) A_i); loss = -J."""
    terms = []
    for (a, e), A in zip(seqs, adv_S):
        r = torch.exp(logp[a:e] - old[a:e])
        s = torch.prod(r) ** (1.0 / (e - a))
        terms.append(torch.minimum(s * A, s.clamp(1 - eps_low, 1 + eps_high) * A))
    return -torch.stack(terms).mean()


def test_gspo_ratio_is_the_geometric_mean_clipping_is_per_sequence_and_gradient_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    seqlens = [6, 5, 7]
    resp = [[2, 3, 4, 5], [1, 2, 3, 4], [3, 4, 5, 6]]
    T = sum(seqlens)
    old = (torch.randn(T, generator=g, dtype=torch.float64) * 0.5 - 2).tolist()
    adv_S = [1.5, -0.7, 0.9]
    adv = [adv_S[s] for s, n in enumerate(seqlens) for _ in range(n)]
    # seq 0: tiny drift (inside 3e-4 / 4e-4); seq 1: log s = -1e-3 with A < 0 (clipped); seq 2: + 1e-2 with A > 0
    drift = [1e-4, -1e-3, 1e-2]
    noise = torch.randn(T, generator=g, dtype=torch.float64) * 0.05
    logp = torch.tensor(old, dtype=torch.float64).clone()
    off = 0
    seqs = []
    for s, (n, r) in enumerate(zip(seqlens, resp)):
        idx = torch.tensor([off + p for p in r])
        z = noise[idx] - noise[idx].mean()  # token ratios vary; their geometric mean is exp(drift)
        logp[idx] += z + drift[s]
        seqs.append((off + r[0], off + r[-1] + 1))
        off += n
    b = _batch(seqlens, resp, old, adv)
    obj = build_objective("gspo", _cfg())
    obj.begin_step([b], _ident)
    lp = logp.clone().requires_grad_(True)
    share = obj.loss(ModelOutput(loss_T=-lp, aux_loss=None), b)
    share.loss.backward()
    # the ratio: exp(mean log r) == geometric mean of the token ratios == exp(drift)
    for (a, e), d in zip(seqs, drift):
        r = torch.exp(logp[a:e] - torch.tensor(old[a:e], dtype=torch.float64))
        assert float(torch.prod(r) ** (1 / (e - a))) == pytest.approx(math.exp(d), rel=1e-12)
    # sequences 1 and 2 are clipped (2 of 3), sequence 0 is not
    assert share.metrics["clip_frac"].item() == pytest.approx(2 / 3)
    assert share.metrics["sequences"].item() == 3
    # loss value and gradient vs autograd of the written sequence-level formula
    ref_lp = logp.clone().requires_grad_(True)
    ref = _gspo_reference(ref_lp, torch.tensor(old, dtype=torch.float64), adv_S, seqs, 3e-4, 4e-4)
    ref.backward()
    assert share.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(lp.grad, ref_lp.grad, rtol=1e-10, atol=1e-14)
    a, e = seqs[1]
    assert torch.all(lp.grad[a:e] == 0) and torch.all(lp.grad[seqs[2][0]:seqs[2][1]] == 0)  # clipped: no gradient
    a, e = seqs[0]
    assert torch.all(lp.grad[a:e] != 0)


def test_gspo_normalises_per_sequence_over_the_step():
    seqlens, resp = [5, 5, 5], [[1, 2, 3, 4], [2, 3], [4]]
    old = [-1.0] * 15
    adv = [1.0] * 5 + [2.0] * 5 + [-1.0] * 5
    b = _batch(seqlens, resp, old, adv)
    obj = build_objective("gspo", _cfg())
    obj.begin_step([b], _ident)
    s = obj.loss(_out(old)[0], b)  # logp == old: every ratio is 1, l_i = -A_i
    assert s.loss.item() == pytest.approx(-(1 + 2 - 1) / 3, rel=1e-12)
    parts = [_batch(seqlens[:1], resp[:1], old[:5], adv[:5]), _batch(seqlens[1:], resp[1:], old[5:], adv[5:])]
    obj.begin_step(parts, _ident)
    total = obj.loss(_out(old[:5])[0], parts[0]).loss + obj.loss(_out(old[5:])[0], parts[1]).loss
    assert total.item() == pytest.approx(s.loss.item(), rel=1e-12)


def test_missing_extras_are_named():
    b = _batch([3], [[1, 2]], [-1.0] * 3, [1.0] * 3)
    del b.extras["advantage"]
    with pytest.raises(KeyError, match="advantage"):
        build_objective("gspo", _cfg()).begin_step([b], _ident)


# --------------------------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    a = group_advantages(r, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(1/3): +-0.5 / 0.57735 = +-0.866025
    s = math.sqrt(1 / 3)
    assert torch.allclose(a[0], torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], dtype=torch.float64))
    assert torch.all(group_advantages(r)[1] == 0)  # all equal: no signal (eps keeps it finite)
    assert torch.allclose(a[2], torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64) / math.sqrt(2 / 3))
    assert torch.all(group_advantages(torch.tensor([[3.0], [1.0]])) == 0)  # G = 1


def test_overlong_penalty_follows_dapo_eq13():
    # L_max = 20, L_cache = 4: 0 up to 16, then (16 - |y|) / 4, -1 beyond 20
    assert [overlong_penalty(n, 20, 4) for n in (10, 16, 17, 18, 20, 21)] == [0, 0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(18, 20, 4, penalty=0.5) == -0.25
    assert overlong_penalty(25, 20, 0) == 0.0
    with pytest.raises(ValueError, match="exceeds max_new_tokens"):
        overlong_penalty(5, 4, 8)


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    # a scripted generator: each group is (id, rewards); ids 1, 3, 4 are all-equal (dropped)
    groups = [(0, [1, 0]), (1, [1, 1]), (2, [0, 1]), (3, [0, 0]), (4, [1, 1]), (5, [1, 0]), (6, [0, 1]), (7, [1, 0])]
    cursor = [0]
    draws = []

    def draw(n):
        draws.append(n)
        out = groups[cursor[0]:cursor[0] + n]
        cursor[0] += n
        return out

    res = DynamicSampling(want=4, max_rounds=5).run(draw, lambda g: g[1], lambda g: g[0])
    # round 1 draws 4 (0..3): keeps 0, 2; round 2 draws the 2 missing (4, 5): keeps 5; round 3 draws 1 (6)
    assert draws == [4, 2, 1]
    assert [g[0] for g in res.kept] == [0, 2, 5, 6]
    assert (res.drawn, res.dropped, res.rounds, res.dropped_ids) == (7, 3, 3, [1, 3, 4])
    assert res.drop_rate == pytest.approx(3 / 7)
    # the round limit: what it has after 1 round, the shortfall visible
    cursor[0] = 0
    short = DynamicSampling(want=4, max_rounds=1).run(draw, lambda g: g[1])
    assert len(short.kept) == 2 and short.rounds == 1 and short.dropped == 2
    # off: one round, nothing dropped
    cursor[0] = 0
    plain = DynamicSampling(want=4, max_rounds=3, enabled=False).run(draw, lambda g: g[1])
    assert len(plain.kept) == 4 and plain.dropped == 0 and plain.rounds == 1
    assert not informative([1.0]) and not informative([0.5, 0.5]) and informative([0.0, 0.5])


# --------------------------------------------------------------------------------------------- backend parity
def _engine_run(nproc: int, args: list[str], tmp_path, name: str) -> dict:
    import json
    import os
    import subprocess

    from conftest import ROOT, child_env, torchrun_cmd
    from dist.engine_run import grads_path

    out = tmp_path / name
    cmd = torchrun_cmd(nproc, os.path.join(ROOT, "tests", "dist", "rl_run.py"), str(out), *args)
    r = subprocess.run(cmd, env=child_env(LAYER_GRADS="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return {**json.loads(out.read_text()), "grads": torch.load(grads_path(str(out))),
            "logp": torch.load(str(out) + ".logp.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("objective,model,npu_layout", [
    ("dapo", "tiny.yaml", ["parallel.pp=2", "train.micro_batches=4"]),
    # MoE: the same DP layout as the GPU run (dp=2 x 2 micro-batches), experts split over ep=2: the load-balancing
    # loss counts tokens over the DP ranks of a micro-batch, so another DP size would be another aux loss
    ("gspo", "tiny_moe.yaml", ["parallel.ep=2", "train.micro_batches=2"])])
def test_one_rl_update_same_loss_and_gradients_on_both_backends(tmp_path, objective, model, npu_layout):
    """GPU backend (DeepSpeed ZeRO-2, 2 DP ranks x 2 micro-batches) vs NPU backend (Megatron, 2 ranks, emulated ops;
    dense: pp=2 x 4 micro-batches, MoE: ep=2): the same old log-probs from `token_logprobs` (NPU dense: forward-only
    through the pipeline), the same loss, metrics and every gradient tensor within 1e-5 of the largest (one update:
    the step's gradients)."""
    import os

    from conftest import ROOT, rel_err, require

    require("deepspeed", "megatron.core")
    cfg = os.path.join(ROOT, "configs", "model", model)
    common = [f"train.objective={objective}", "train.steps=1", "train.lr=5e-4", "train.warmup_steps=0",
              "train.grad_clip=0"]
    gpu = _engine_run(2, [cfg, "backend.name=gpu", "train.micro_batches=2", *common], tmp_path, "gpu.json")
    npu = _engine_run(2, [cfg, "backend.name=npu", *npu_layout, *common], tmp_path, "npu.json")
    assert set(gpu["logp"]) == set(npu["logp"]) and len(gpu["logp"]) == 4
    lp_err = max(rel_err(npu["logp"][k], gpu["logp"][k]) for k in gpu["logp"])  # max |diff| / max |gpu|
    assert lp_err <= 1e-5, lp_err
    for a, b in zip(gpu["steps"], npu["steps"]):
        assert not a["skipped"] and not b["skipped"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(abs(b["loss"]), 1e-3), (a["loss"], b["loss"])
        for name in ("clip_frac", "approx_kl", "response_tokens", "sequences"):
            assert abs(a["metrics"][name] - b["metrics"][name]) <= 1e-5 * max(abs(b["metrics"][name]), 1e-3), name
    m = gpu["steps"][0]["metrics"]
    assert 0 < m["clip_frac"] < 1, m  # the offsets put some tokens / sequences outside the clip range
    gg, ng = gpu["grads"], npu["grads"]
    assert set(gg) == set(ng) and len(gg) > 10
    errs = {k: rel_err(ng[k], gg[k]) for k in gg}
    worst = max(errs, key=errs.get)
    print(f"rl parity {objective}: {len(errs)} tensors, max grad rel {errs[worst]:.2e} at {worst}; logp {lp_err:.1e}")
    assert errs[worst] <= 1e-5, (worst, errs[worst])
