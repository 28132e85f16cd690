"""Rollout benchmark: generated tokens/s of the KV-cache Sampler against Hugging Face `generate` and the
memory-bandwidth bound, on the 2B shape (random weights, bf16, fixed output length: no stop tokens).

    python -m sail_dist.bench.rollout [--model configs/model/sailvl2_2b.yaml] [--batches 16,64,256]
        [--prompt 512] [--new 256] [--no-hf] [--no-eager] [--no-compile] [--profile] [--small]

Per batch B: B distinct random text prompts of --prompt tokens, one rollout each, --new tokens each, sampling at
temperature 1 (top-p 1, top-k off) for both engines. Figures are end-to-end generate() calls (prefill included)
after one warm-up call of the same shape (which also captures the sampler's CUDA graph):
  sampler     the Sampler with CUDA graphs; `decode` = its decode phase alone
  compiled    the Sampler with CUDA graphs and compile=True (the RL default on CUDA: rl.sampling.compile), on its
              own copy of the model; `x hf` and the bound fractions use the faster of the two
  eager       the Sampler without CUDA graphs (what the graphs buy)
  hf          transformers Qwen3ForCausalLM.generate (a config of the same shapes, random weights, SDPA attention,
              its default dynamic cache), min_new_tokens = max_new_tokens so it too runs the full length
  bound       the memory-bandwidth bound of decoding: every decode step reads the LLM weights and the batch's KV
              cache once at the card's bandwidth (BANDWIDTH table, by device name); prefill is not counted, so
              `fraction` (sampler / bound) is conservative.
--small: tiny shapes on CPU in seconds (the test suite's smoke run); its bandwidth is a nominal CPU figure.
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from sail_dist.config import load_config
from sail_dist.kernels import get_opset
from sail_dist.model.sailvl import SailVL
from sail_dist.rollout.engine import SamplingParams
from sail_dist.rollout.sampler import Sampler

# Peak memory bandwidth in bytes/s by device-name substring (vendor datasheets; SXM parts).
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "H20": 4.0e12, "A100": 2.039e12, "A800": 2.039e12,
             "L40S": 0.864e12, "B200": 8.0e12, "cpu": 50e9}


def bandwidth(device_name: str) -> float | None:
    for key, value in BANDWIDTH.items():
        if key.lower() in device_name.replace(" ", "").lower():
            return value
    return None


def random_prompts(cfg, batch: int, length: int, seed: int):
    """`batch` single-sample text prompts of random non-special ids."""
    from sail_dist.data.batch import PackedBatch

    g = torch.Generator().manual_seed(seed)
    low = max(cfg.tokens.__dict__.values()) + 1
    out = []
    for i in range(batch):
        ids = torch.randint(low, cfg.llm.vocab_size, (length,), generator=g)
        out.append(PackedBatch(input_ids=ids, labels=torch.full_like(ids, -100), position_ids=torch.arange(length),
                               cu_seqlens=torch.tensor([0, length], dtype=torch.int32), max_seqlen=length,
                               loss_weight=torch.zeros(length), sample_ids=[i]))
    return out


def decode_bound_s(model: SailVL, batch: int, prompt: int, new: int, bw: float) -> float:
    """Seconds for the decode steps at bandwidth `bw`: step s (1..new-1) reads the LLM weights once and the KV
    cache of B sequences of prompt + s tokens."""
    llm = model.cfg.llm
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    kv_per_token = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * model.llm.embed_tokens.weight.element_size()
    total = sum(weight_bytes + batch * (prompt + s) * kv_per_token for s in range(1, new))
    return total / bw


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sampler(model, prompts, params, graphs: bool, batch: int, seq: int, compile: bool = False) -> dict:
    sampler = Sampler(model, max_batch=batch, max_total_tokens=batch * seq, cuda_graphs=graphs, compile=compile)
    sampler.generate(prompts, params)  # warm-up (and graph capture) at this exact shape
    sync(model.llm.embed_tokens.weight.device)
    t = time.perf_counter()
    out = sampler.generate(prompts, params)
    sync(model.llm.embed_tokens.weight.device)
    wall = time.perf_counter() - t
    tokens = sum(len(c[0].tokens) for c in out)
    st = sampler.last_stats
    decode_tokens = tokens - len(prompts)  # token 0 of each sequence comes from the prefill
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "prefill_s": st["prefill_s"],
            "decode_tok_s": decode_tokens / max(st["decode_s"], 1e-9), "graphs": sampler.cuda_graphs}


@torch.no_grad()
def profile_decode(model, prompts, params, batch: int, seq: int, compile: bool = False, steps: int = 5,
                   top: int = 14) -> None:
    """Kernel times of `steps` decode steps run without the graph (which replays the same kernels), top `top` by
    device time."""
    from torch.profiler import ProfilerActivity, profile

    from dataclasses import replace

    sampler = Sampler(model, max_batch=batch, max_total_tokens=batch * seq, cuda_graphs=False, compile=compile,
                      seq_len_multiple=seq)
    sampler.generate(prompts, replace(params, max_new_tokens=2))  # sets up the state: cache of `seq` rows
    device = model.llm.embed_tokens.weight.device
    sampler.idle_decode_steps(params, 1)  # (warm)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sampler.idle_decode_steps(params, steps)
        sync(device)
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in rows) / steps / 1e3
    print(f"[rollout bench] B={batch} compile={compile} decode step kernels: {total:.3f} ms/step, "
          f"{sum(e.count for e in rows) // steps} kernels", flush=True)
    for e in rows[:top]:
        print(f"    {e.self_device_time_total / steps / 1e3:8.3f} ms  x{e.count // steps:<4} {e.key[:110]}", flush=True)


def compare_decode_attention(model, batch: int, prompt: int, new: int) -> dict:
    """The decode-attention op alone at this batch (one layer's cache of prompt + new rows, every sequence at the
    mean length of the run), per available GPU implementation: ms per call and GB/s of valid K/V rows read."""
    from sail_dist.kernels import gpu

    llm, dev = model.cfg.llm, model.llm.embed_tokens.weight.device
    S = -(-(prompt + new) // 64) * 64
    q = torch.randn(batch, llm.num_heads, llm.head_dim, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, S, llm.num_kv_heads, llm.head_dim, device=dev, dtype=torch.bfloat16) for _ in range(2))
    L = prompt + new // 2
    lengths = torch.full((batch,), L, device=dev, dtype=torch.long)
    valid_bytes = 2 * batch * L * llm.num_kv_heads * llm.head_dim * 2
    out = {}
    impls = ["sdpa", "triton"] + (["flash_attn"] if gpu._flash_kvcache_fn() is not None else [])
    for impl in impls:
        op = gpu.make_decode_attention(impl)
        for _ in range(3):
            op(q, k, v, lengths)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            op(q, k, v, lengths)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 20
        out[impl] = {"ms": round(ms, 4), "GB_s": round(valid_bytes / ms / 1e6, 1)}
    print(f"[rollout bench] B={batch} decode_attention op, {L} of {S} rows: {out}", flush=True)
    return out


def hf_model(cfg, device, dtype):
    import transformers

    from sail_dist.model.hf import _qwen3_hf_config

    hf_cfg = transformers.Qwen3Config.from_dict(_qwen3_hf_config(cfg.llm, cfg.tokens, "bfloat16"))
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_cfg)
    return model.to(dtype).eval()


@torch.no_grad()
def time_hf(model, prompts, new: int, device) -> dict:
    ids = torch.stack([p.input_ids for p in prompts]).to(device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
              pad_token_id=0)
    model.generate(ids, attention_mask=mask, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync(device)
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, **kw)
    sync(device)
    wall = time.perf_counter() - t
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/sailvl2_2b.yaml")
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    p.add_argument("--no-eager", action="store_true", help="skip the sampler without CUDA graphs")
    p.add_argument("--no-compile", action="store_true", help="skip the sampler with compile=True")
    p.add_argument("--compare-decode", action="store_true", help="time each decode-attention kernel alone (CUDA)")
    p.add_argument("--profile", action="store_true", help="print the decode step's top kernels per batch (CUDA)")
    p.add_argument("--small", action="store_true", help="tiny shapes on CPU (seconds): the smoke run")
    a = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if a.small:
        a.model, a.batches, a.prompt, a.new = os.path.join(root, "configs/model/tiny.yaml"), "2,4", 16, 8
    cfg = load_config(a.model if os.path.exists(a.model) else os.path.join(root, a.model), ["data.demo=true"])
    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = bandwidth(dev_name)
    batches = [int(b) for b in a.batches.split(",")]

    torch.manual_seed(0)
    model = SailVL(cfg.model, get_opset("gpu" if device.type == "cuda" else "reference"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model = model.to(device, dtype).eval()
    dec = getattr(model.llm.ops.decode_attention, "impl", "reference")
    print(f"[rollout bench] {dev_name}, bandwidth {bw / 1e12 if bw else float('nan'):.2f} TB/s, "
          f"decode attention {dec}, prompt {a.prompt}, new {a.new}", flush=True)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.new, seed=0)
    seq = -(-(a.prompt + a.new) // 64) * 64  # the sampler's cache rows (it rounds up to 64)
    rows = []
    hf = None if a.no_hf else hf_model(cfg.model, device, dtype)
    # compile_generation replaces the model's generation pieces in place: the compiled runs get their own copy
    compiled_model = None if a.no_compile or device.type != "cuda" else copy.deepcopy(model)
    for B in batches:
        prompts = random_prompts(cfg.model, B, a.prompt, seed=B)
        row: dict = {"batch": B}
        r = time_sampler(model, prompts, params, None if device.type == "cuda" else False, B, seq)
        row.update(sampler_tok_s=r["tok_s"], sampler_decode_tok_s=r["decode_tok_s"], sampler_wall_s=r["wall_s"],
                   prefill_s=r["prefill_s"], cuda_graphs=r["graphs"])
        print(f"[rollout bench] B={B} sampler {r}", flush=True)
        if a.compare_decode and device.type == "cuda":
            row["decode_attention_ops"] = compare_decode_attention(model, B, a.prompt, a.new)
        if compiled_model is not None:
            c = time_sampler(compiled_model, prompts, params, None, B, seq, compile=True)
            row.update(compiled_tok_s=c["tok_s"], compiled_decode_tok_s=c["decode_tok_s"], compiled_wall_s=c["wall_s"])
            print(f"[rollout bench] B={B} compiled {c}", flush=True)
        if a.profile and device.type == "cuda":
            profile_decode(model, prompts, params, B, seq)
            if compiled_model is not None:
                profile_decode(compiled_model, prompts, params, B, seq, compile=True)
        if not a.no_eager and device.type == "cuda":
            e = time_sampler(model, prompts, params, False, B, seq)
            row.update(eager_tok_s=e["tok_s"], eager_decode_tok_s=e["decode_tok_s"])
            print(f"[rollout bench] B={B} eager {e}", flush=True)
        if hf is not None:
            h = time_hf(hf, prompts, a.new, device)
            best = max(row["sampler_tok_s"], row.get("compiled_tok_s", 0.0))
            row.update(hf_tok_s=h["tok_s"], speedup_vs_hf=best / h["tok_s"])
            print(f"[rollout bench] B={B} hf {h}", flush=True)
        if bw:
            bound_tok_s = B * a.new / decode_bound_s(model, B, a.prompt, a.new, bw)
            row.update(bound_tok_s=bound_tok_s,
                       bound_fraction=max(row["sampler_tok_s"], row.get("compiled_tok_s", 0.0)) / bound_tok_s,
                       decode_bound_fraction=max(row["sampler_decode_tok_s"],
                                                 row.get("compiled_decode_tok_s", 0.0)) / bound_tok_s)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(f"Rollout on {dev_name}: {os.path.basename(a.model)}, bf16={dtype == torch.bfloat16}, prompt {a.prompt}, "
          f"{a.new} new tokens, sampling T=1; generated tokens/s (end to end, prefill included)")
    print(f"{'batch':>5} {'sampler':>9} {'decode':>9} {'compiled':>9} {'decode':>9} {'eager':>9} {'hf':>9} {'x hf':>6} "
          f"{'bound':>9} {'of bound':>8} {'decode of bound':>15}")
    for r in rows:
        def f(k, fmt="9.0f"):
            return format(r[k], fmt) if k in r else format("-", ">" + fmt.split(".")[0])
        print(f"{r['batch']:>5} {f('sampler_tok_s')} {f('sampler_decode_tok_s')} {f('compiled_tok_s')} "
              f"{f('compiled_decode_tok_s')} {f('eager_tok_s')} {f('hf_tok_s')} "
              f"{f('speedup_vs_hf', '6.1f')} {f('bound_tok_s')} {f('bound_fraction', '8.2f')} "
              f"{f('decode_bound_fraction', '15.2f')}")
    result = {"bench": "rollout", "device": dev_name, "model": os.path.basename(a.model), "prompt": a.prompt,
              "new": a.new, "batches": batches, "decode_attention": dec, "bandwidth": bw,
              "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    print(json.dumps(result, separators=(",", ":")))
    return result


if __name__ == "__main__":
    main()
