"""The KV-cache Sampler (sail_dist/rollout/sampler.py) against the no-cache decode, and the decode_attention op.

The reference for generation is the training model's own full forward re-run over prompt + generated tokens at
every step (`SailVL.logits`, no cache): greedy tokens must agree token for token and the sampler's log-probs must
equal log_softmax of those logits. The decode-attention op is checked against a float64 attention written out here.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, make_sample, model_config, pack
from sail_dist.data.batch import PackedBatch
from sail_dist.kernels import get_opset
from sail_dist.model.sailvl import SailVL
from sail_dist.rollout.engine import SamplingParams
from sail_dist.rollout.sampler import Sampler, filter_logits, sample_tokens, sequence_key

CUDA = torch.cuda.is_available()


def cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny shapes: threads only contend (the CI box has 2 cores shared with other jobs).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(name: str, seed: int = 0, std: float = 0.08, opset: str = "reference", overrides: tuple[str, ...] = (),
               **options) -> SailVL:
    cfg = model_config(name, *overrides)
    model = SailVL(cfg, get_opset(opset, **options))
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def prompts_for(model: SailVL, specs, seed: int = 1) -> list[PackedBatch]:
    """One single-sample prompt per (text tokens, image grids) spec."""
    gen = torch.Generator().manual_seed(seed)
    return [pack([make_sample(model.cfg, n, grids, gen=gen)], sample_ids=[f"p{i}"]) for i, (n, grids) in
            enumerate(specs)]


MIXED = [(5, []), (11, [(4, 4)]), (3, []), (7, [(4, 4), (4, 8)])]  # text and image prompts, different lengths


def with_tokens(prompt: PackedBatch, tokens: list[int]) -> PackedBatch:
    ids = torch.cat([prompt.input_ids, torch.tensor(tokens, dtype=torch.long, device=prompt.input_ids.device)])
    n = len(ids)
    return PackedBatch(input_ids=ids, labels=torch.full((n,), -100), position_ids=torch.arange(n),
                       cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n, loss_weight=torch.zeros(n),
                       pixel_values=prompt.pixel_values, image_grid_hw=prompt.image_grid_hw).to(ids.device)


def no_cache_logp(model: SailVL, prompt: PackedBatch, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the full forward's logits at the positions that predict `tokens` [len(tokens), V]."""
    logits = model.logits(with_tokens(prompt, tokens[:-1] if tokens else []))
    return torch.log_softmax(logits[prompt.num_tokens - 1:].double(), -1)


def no_cache_greedy(model: SailVL, prompt: PackedBatch, steps: int, stop: tuple[int, ...] = ()) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        out.append(int(model.logits(with_tokens(prompt, out))[-1].argmax()))
        if out[-1] in stop:
            break
    return out


# --------------------------------------------------------------------------------------------------
# Greedy == no-cache decode, token for token (dense and MoE, text and image prompts, one batch, refills)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny_moe"])
def test_greedy_kv_cache_equals_no_cache_decode(name):
    model = tiny_model(name)
    prompts = prompts_for(model, MIXED)
    steps = 10
    # max_batch 3 < 4 prompts: the 4th is prefilled into the first slot that frees (continuous batching).
    out = Sampler(model, max_batch=3).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=steps))
    distinct = set()
    for p, (c,) in zip(prompts, out):
        ref = no_cache_greedy(model, p, steps)
        assert c.tokens == ref
        assert c.finish_reason == "length" and len(c.logprobs) == steps
        logp = no_cache_logp(model, p, ref)
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64),
                              logp.gather(1, torch.tensor(ref)[:, None]).squeeze(1), atol=2e-5)
        distinct |= set(ref)
    assert len(distinct) > 4  # the tokens are not one repeated id (the comparison has something to compare)


def test_greedy_kv_cache_with_linear_rope_equals_no_cache_decode():
    """Linear RoPE scaling (model.llm.rope_linear_factor) reaches prefill and KV-cache decode as it reaches the full
    forward: greedy tokens and log-probs equal the no-cache decode's; the factor changes the logits (so it is used)."""
    model = tiny_model("tiny", overrides=("model.llm.rope_linear_factor=4.0",))
    plain = tiny_model("tiny")  # the same weights (same seed), plain RoPE
    prompts = prompts_for(model, MIXED)
    steps = 10
    out = Sampler(model, max_batch=3).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=steps))
    for p, (c,) in zip(prompts, out):
        ref = no_cache_greedy(model, p, steps)
        assert c.tokens == ref
        logp = no_cache_logp(model, p, ref)
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64),
                              logp.gather(1, torch.tensor(ref)[:, None]).squeeze(1), atol=2e-5)
        full = with_tokens(p, ref)
        assert (model.logits(full) - plain.logits(full)).abs().max() > 1e-2


def test_stopping_per_sequence():
    model = tiny_model("tiny")
    prompts = prompts_for(model, MIXED)
    free = [no_cache_greedy(model, p, 8) for p in prompts]
    stop_id = free[0][3]  # prompt 0 stops at (or before) its 4th token; the others wherever the id comes up
    out = Sampler(model, max_batch=8).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8,
                                                                        stop_ids=(stop_id, 999_999)))
    for ref, (c,) in zip(free, out):
        want = ref[:ref.index(stop_id) + 1] if stop_id in ref else ref
        assert c.tokens == want
        assert c.finish_reason == ("stop" if stop_id in ref else "length")
    assert len(out[0][0].tokens) <= 4 and out[0][0].tokens[-1] == stop_id
    assert any(c.finish_reason == "length" for (c,) in out)  # the others went on after prompt 0 stopped


def test_max_context_finishes_with_context():
    model = tiny_model("tiny")
    prompts = prompts_for(model, [(6, []), (20, []), (30, [])])
    L = [p.num_tokens for p in prompts]
    cap = L[1] + 3  # prompt 0: max_new_tokens first; prompt 1: 3 tokens then the context; prompt 2: already over
    out = Sampler(model).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=5, max_context=cap))
    assert (len(out[0][0].tokens), out[0][0].finish_reason) == (5, "length")
    assert out[1][0].tokens == no_cache_greedy(model, prompts[1], 3) and out[1][0].finish_reason == "context"
    assert (out[2][0].tokens, out[2][0].finish_reason) == ([], "context")


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_independent_of_the_batch():
    model = tiny_model("tiny_moe")
    prompts = prompts_for(model, MIXED[:3])
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=7)

    def toks(out):
        return [[c.tokens for c in cs] for cs in out]

    a = Sampler(model, max_batch=16).generate(prompts, params, n=3)
    b = Sampler(model, max_batch=2).generate(prompts, params, n=3)  # other slots, refills, batch sizes
    assert toks(a) == toks(b)
    alone = Sampler(model).generate(prompts[:1], params, n=3)
    assert toks(alone)[0] == toks(a)[0]
    other = Sampler(model).generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, seed=8), n=3)
    assert toks(other) != toks(a)
    assert len({tuple(t) for t in toks(a)[0]}) == 3  # the rollouts of one prompt differ
    # The sampled tokens' log-probs are the no-cache model's (temperature 1), also off the greedy path.
    for p, cs in zip(prompts, a):
        for c in cs:
            logp = no_cache_logp(model, p, c.tokens)
            assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64),
                                  logp.gather(1, torch.tensor(c.tokens)[:, None]).squeeze(1), atol=2e-5)


def test_top_k_1_is_greedy():
    model = tiny_model("tiny")
    prompts = prompts_for(model, MIXED)
    greedy = Sampler(model).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    top1 = Sampler(model).generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=6, seed=3), n=2)
    for g, t in zip(greedy, top1):
        assert [c.tokens for c in t] == [g[0].tokens] * 2


def test_top_p_keeps_the_hand_computed_nucleus():
    p = torch.tensor([0.05, 0.5, 0.1, 0.15, 0.2], dtype=torch.float64)  # sorted: 0.5 0.2 0.15 0.1 0.05
    logits = p.log()[None]
    # top_p 0.75: mass before 0.5 is 0, before 0.2 is 0.5, before 0.15 is 0.7 (< 0.75: kept), before 0.1 is 0.85.
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))[0].tolist()
    assert kept == [False, True, False, True, True]
    assert torch.isfinite(filter_logits(logits, top_p=0.4))[0].tolist() == [False, True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=2))[0].tolist() == [False, True, False, False, True]
    # Draws follow the renormalised nucleus: 0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85.
    N = 20000
    keys = torch.tensor([sequence_key(0, i, 0) for i in range(N)])
    tok, lp = sample_tokens(logits.float().expand(N, -1), SamplingParams(temperature=1.0, top_p=0.75), keys,
                            torch.zeros(N, dtype=torch.long))
    freq = torch.bincount(tok, minlength=5).double() / N
    want = torch.tensor([0, 0.5, 0, 0.15, 0.2], dtype=torch.float64) / 0.85
    assert (freq - want).abs().max() < 0.015, freq
    assert torch.allclose(lp.double(), p.log()[tok], atol=1e-6)  # log p at temperature 1, unfiltered


def test_update_weights_and_bad_prompts():
    a, b = tiny_model("tiny", seed=0), tiny_model("tiny", seed=5)
    prompts = prompts_for(a, MIXED[:2])
    sampler = Sampler(a)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    sampler.generate(prompts, params)
    sampler.update_weights(b.state_dict())
    assert [c[0].tokens for c in sampler.generate(prompts, params)] == [no_cache_greedy(b, p, 5) for p in prompts]
    two = pack([make_sample(a.cfg, 4), make_sample(a.cfg, 5)])
    with pytest.raises(ValueError, match="prompt 1 .* 2 samples"):
        sampler.generate([prompts[0], two], params)
    with pytest.raises(ValueError, match="max_total_tokens"):
        Sampler(a, max_total_tokens=16).generate(prompts, params)


def test_idle_decode_steps_record_nothing():
    """The profiling hook (bench.rollout --profile) runs decode steps on the last generate's state with every slot
    idle: the next generate still equals the no-cache decode; before any generate it names the fix."""
    model = tiny_model("tiny")
    prompts = prompts_for(model, MIXED[:2])
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    sampler = Sampler(model)
    with pytest.raises(RuntimeError, match="call generate"):
        sampler.idle_decode_steps(params, 1)
    sampler.generate(prompts, params)
    st = sampler._state
    max_new = st.shape.max_new
    tokens, generated = st.out_tok[:, :max_new].clone(), st.gen_B.clone()
    st.active_B.fill_(True)  # even slots left active are idled first
    sampler.idle_decode_steps(params, 3)
    assert torch.equal(st.out_tok[:, :max_new], tokens) and torch.equal(st.gen_B, generated)  # (the scratch column only)
    assert [c[0].tokens for c in sampler.generate(prompts, params)] == [no_cache_greedy(model, p, 4) for p in prompts]


# --------------------------------------------------------------------------------------------------
# The decode_attention op
# --------------------------------------------------------------------------------------------------
def float64_decode_attention(q, k, v, lengths):
    """softmax(q k^T / sqrt(D)) v per sequence over its first lengths[b] rows, GQA head h -> kv head h // G."""
    B, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for h in range(Hq):
            kk, vv = k[b, :n, h // G].double(), v[b, :n, h // G].double()
            w = torch.softmax(kk @ q[b, h].double() / math.sqrt(D), 0)
            out[b, h] = w @ vv
    return out


def decode_case(dtype, device="cpu", B=5, S=37, Hq=8, Hkv=2, D=16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, D, generator=g)
    k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    lengths = torch.tensor([1, S, 17, 5, 30][:B])
    return [t.to(device, dtype) for t in (q, k, v)] + [lengths.to(device)]


@pytest.mark.parametrize("opset", ["reference", "npu_emulated", "gpu"])
def test_decode_attention_equals_float64_attention(opset):
    """On CPU: the reference, the NPU OpSet on the torch_npu emulation (npu_incre_flash_attention, BSND) and the
    GPU OpSet's CPU dispatch, in fp64 and fp32."""
    op = get_opset(opset).decode_attention
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        q, k, v, lengths = decode_case(dtype)
        out = op(q, k, v, lengths)
        assert out.dtype == dtype and out.shape == q.shape
        assert (out.double() - float64_decode_attention(q, k, v, lengths)).abs().max() < tol


def test_incre_flash_attention_emulation_conventions():
    from sail_dist.kernels.npu import emulation as npu

    q, k, v, lengths = decode_case(torch.float64)
    want = float64_decode_attention(q, k, v, lengths)
    kw = dict(actual_seq_lengths=lengths.tolist(), num_heads=8, num_key_value_heads=2, scale_value=1 / 4.0)
    bnsd = npu.npu_incre_flash_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), input_layout="BNSD", **kw)
    bsh = npu.npu_incre_flash_attention(q.reshape(5, 1, -1), k.flatten(2), v.flatten(2), input_layout="BSH", **kw)
    assert (bnsd[:, :, 0] - want).abs().max() < 1e-12 and (bsh.view(5, 8, 16) - want).abs().max() < 1e-12
    with pytest.raises(TypeError, match="host list"):
        npu.npu_incre_flash_attention(q[:, None], k, v, input_layout="BSND", **{**kw, "actual_seq_lengths": lengths})
    with pytest.raises(NotImplementedError, match="block_table"):
        npu.npu_incre_flash_attention(q[:, None], k, v, input_layout="BSND", block_table=lengths, **kw)


@cuda
@pytest.mark.parametrize("impl", ["sdpa", "flash_attn", "triton"])
def test_decode_attention_cuda(impl):
    from sail_dist.kernels import gpu

    if impl == "flash_attn" and gpu._flash_kvcache_fn() is None:
        pytest.skip("flash_attn.flash_attn_with_kvcache is not importable")
    op = gpu.make_decode_attention(impl)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        if impl == "flash_attn" and dtype == torch.float32:
            continue
        q, k, v, lengths = decode_case(dtype, "cuda", D=64)
        out = op(q, k, v, lengths)
        want = float64_decode_attention(*(t.cpu() for t in (q, k, v, lengths)))
        assert (out.double().cpu() - want).abs().max() < tol


TRITON_CHECK = """
import sys, torch
sys.path.insert(0, "tests")
from test_sampler import decode_case, float64_decode_attention
from sail_dist.kernels.triton import decode_attention as m
assert m.INTERPRET
for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
    for splits in (1, 3):
        q, k, v, L = decode_case(dtype, D=16, S=150)
        L = torch.tensor([1, 150, 17, 64, 65])  # one row, all rows, inside a block, block edges
        out = m.decode_attention(q, k, v, L, splits=splits).double()
        err = (out - float64_decode_attention(q, k, v, L)).abs().max()
        assert err < tol, (dtype, splits, float(err))
print("ok")
"""


@pytest.mark.skipif(CUDA, reason="CUDA: the kernel runs compiled in test_decode_attention_cuda[triton]")
def test_triton_decode_attention_in_the_interpreter():
    """The split-KV Triton kernel (1 and 3 splits, masked block edges) in Triton's CPU interpreter, in a child
    process (the interpreter must be on before triton is imported)."""
    from conftest import require

    require("triton", "numpy")
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=ROOT, env=child_env(TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


@cuda
def test_sampler_cuda_graphs_equal_eager_and_no_cache():
    model = tiny_model("tiny", opset="gpu").cuda()
    prompts = prompts_for(model, MIXED)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    eager = Sampler(model, cuda_graphs=False).generate(prompts, params)
    graphs = Sampler(model, cuda_graphs=True).generate(prompts, params)
    assert [c[0].tokens for c in eager] == [c[0].tokens for c in graphs]
    assert [c[0].tokens for c in eager] == [no_cache_greedy(model, p.to("cuda"), 8) for p in prompts]
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=1)
    assert ([[c.tokens for c in cs] for cs in Sampler(model, cuda_graphs=False).generate(prompts, sp, n=2)]
            == [[c.tokens for c in cs] for cs in Sampler(model, cuda_graphs=True).generate(prompts, sp, n=2)])
    # compile=True inside the graph (its own copy: compile_generation replaces the model's generation pieces)
    compiled = Sampler(copy.deepcopy(model), cuda_graphs=True, compile=True)
    assert [c[0].tokens for c in compiled.generate(prompts, params)] == [c[0].tokens for c in eager]
    assert ([[c.tokens for c in cs] for cs in compiled.generate(prompts, sp, n=2)]
            == [[c.tokens for c in cs] for cs in Sampler(model, cuda_graphs=False).generate(prompts, sp, n=2)])


# --------------------------------------------------------------------------------------------------
def test_rollout_bench_small_runs():
    out = subprocess.run([sys.executable, "-m", "sail_dist.bench.rollout", "--small"], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    rows = last["rows"]
    assert [r["batch"] for r in rows] == last["batches"] and all(r["sampler_tok_s"] > 0 for r in rows)
    assert all(r["hf_tok_s"] > 0 and 0 < r["bound_fraction"] for r in rows)


def test_gpu_masked_sdpa_decode_attention_on_cpu():
    """The GPU OpSet's SDPA path (the fallback without Triton / flash-attn) is plain torch: checked here on CPU, where
    the OpSet itself dispatches to the reference."""
    from sail_dist.kernels import gpu

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        q, k, v, lengths = decode_case(dtype)
        out = gpu._decode_attention_sdpa(q, k, v, lengths)
        assert out.dtype == dtype and (out.double() - float64_decode_attention(q, k, v, lengths)).abs().max() < tol
