"""Load and save between the native model and Hugging Face checkpoint directories (local paths only).

Layouts:
  * SAIL-VL2 release (`SAILVLModel`): `vision_model.preprocessor/trunk.*`, `mlp1.{0,1,3}`, `language_model.*`.
  * Qwen3 / Qwen3-MoE (`Qwen3ForCausalLM`, `Qwen3MoeForCausalLM`): the LLM alone; experts either per expert
    (`mlp.experts.N.{gate,up,down}_proj`, what checkpoints ship) or fused (`mlp.experts.gate_up_proj`, `down_proj`).
  * AIMv2 vision towers: Apple's original layout (`preprocessor.*`, `trunk.*`) is SAIL-ViT exactly; the
    transformers `Aimv2VisionModel` layout matches too when `is_native` is false (learned position table);
    its attention-pooling `head.*` is not part of SAIL-ViT and is reported as unused.

Every native tensor maps to one or more checkpoint tensors through a `Rule` (fused tensors are split and
concatenated here, never in the model). Loading is strict: missing or unexpected names raise, listing them.

Configs: every config.json field transformers honours is either implemented (read into the native config and
compared with the model's before any tensor is copied: a difference is a CheckpointMismatch naming each key) or
refused (UnsupportedConfig naming the field, its value and what to do): RoPE other than plain or linearly scaled
(rope_type dynamic / yarn / llama3 / ...), partial rotary, sliding-window layers, attention / MLP biases, dropout,
activations other than silu, quantized weights, shared experts, and SAIL-VL2's select_layer / ps_version /
template / force_image_size / pad2square / LoRA fields. Keys a config.json leaves out mean transformers' defaults.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sail_dist.config import AdapterConfig, LLMConfig, ModelConfig, TokenConfig, ViTConfig

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class CheckpointMismatch(ValueError):
    """Checkpoint tensors do not match the model (names listed)."""


@dataclass
class Rule:
    native: str
    hf: list[str]
    to_native: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]


def resolve_hf_dir(path: str, what: str = "checkpoint") -> str:
    """`path` itself when it holds config.json, else `<path>/hf` (a run directory's export): the one rule by which
    every tool (sail-eval, sail-rl-harvest, sail-soup, ...) takes "an HF directory or a run directory"."""
    for d in (path, os.path.join(path, "hf")):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise FileNotFoundError(f"{what} {path!r}: neither it nor {os.path.join(path, 'hf')!r} holds a config.json "
                            "(give a SAIL-VL2 HF directory, or a run directory whose training exported <out_dir>/hf)")


def _same(native: str, hf: str) -> Rule:
    return Rule(native, [hf], lambda ts: ts[0], lambda t: [t])


def _cat(native: str, hf: list[str], sizes: list[int], dim: int = 0) -> Rule:
    return Rule(native, hf, lambda ts: torch.cat(ts, dim), lambda t: list(t.split(sizes, dim)))


# --------------------------------------------------------------------------------------------- rules
def vit_rules(cfg: ViTConfig, native: str, hf: str, layout: str = "aimv2") -> list[Rule]:
    """layout "aimv2": Apple/SAIL names; "transformers": transformers' Aimv2VisionModel names."""
    D, F, ps = cfg.hidden_size, cfg.ffn_size, cfg.patch_size
    conv = Rule(f"{native}patch_embed.proj.weight", [], lambda ts: ts[0].reshape(D, 3 * ps * ps),
                lambda t: [t.reshape(D, 3, ps, ps)])
    pos = Rule(f"{native}pos_embed", [], lambda ts: ts[0].reshape(1, -1, D), lambda t: [t.reshape(-1, D)])
    if layout == "aimv2":
        conv.hf = [f"{hf}preprocessor.patchifier.proj.weight"]
        pos = _same(f"{native}pos_embed", f"{hf}preprocessor.pos_embed")
        rules = [conv, pos,
                 _same(f"{native}patch_embed.proj.bias", f"{hf}preprocessor.patchifier.proj.bias"),
                 _same(f"{native}patch_embed.norm.weight", f"{hf}preprocessor.patchifier.norm.weight"),
                 _same(f"{native}post_norm.weight", f"{hf}trunk.post_trunk_norm.weight")]
        for i in range(cfg.num_layers):
            n, h = f"{native}blocks.{i}.", f"{hf}trunk.blocks.{i}."
            rules += [_same(n + "norm_1.weight", h + "norm_1.weight"), _same(n + "norm_2.weight", h + "norm_2.weight"),
                      _same(n + "qkv.weight", h + "attn.qkv.weight"), _same(n + "proj.weight", h + "attn.proj.weight"),
                      _cat(n + "mlp_in.weight", [h + "mlp.fc1.weight", h + "mlp.fc3.weight"], [F, F]),
                      _same(n + "mlp_out.weight", h + "mlp.fc2.weight")]
        return rules
    if layout == "transformers":
        conv.hf = [f"{hf}embeddings.patch_embed.weight"]
        pos.hf = [f"{hf}embeddings.position_embedding.weight"]
        rules = [conv, pos,
                 _same(f"{native}patch_embed.proj.bias", f"{hf}embeddings.patch_embed.bias"),
                 _same(f"{native}patch_embed.norm.weight", f"{hf}embeddings.rms_norm.weight"),
                 _same(f"{native}post_norm.weight", f"{hf}rms_norm.weight")]
        for i in range(cfg.num_layers):
            n, h = f"{native}blocks.{i}.", f"{hf}encoder.layers.{i}."
            rules += [_same(n + "norm_1.weight", h + "rms_norm1.weight"), _same(n + "norm_2.weight", h + "rms_norm2.weight"),
                      _cat(n + "qkv.weight", [h + f"attention.{p}_proj.weight" for p in "qkv"], [D, D, D]),
                      _same(n + "proj.weight", h + "attention.out_proj.weight"),
                      _cat(n + "mlp_in.weight", [h + "ffn.gate_proj.weight", h + "ffn.up_proj.weight"], [F, F]),
                      _same(n + "mlp_out.weight", h + "ffn.down_proj.weight")]
        return rules
    raise ValueError(f"unknown ViT layout {layout!r}")


def adapter_rules(native: str, hf: str) -> list[Rule]:
    return [_same(f"{native}{n}.{p}", f"{hf}{i}.{p}") for n, i in (("norm", 0), ("fc1", 1), ("fc2", 3))
            for p in ("weight", "bias")]


def _experts_rules(cfg: LLMConfig, n: str, h: str, fused: bool) -> list[Rule]:
    E, F = cfg.num_experts, cfg.moe_ffn_size
    if fused:  # transformers >= 5 in-memory layout: gate_up_proj [E, 2F, D], down_proj [E, D, F]
        return [Rule(n + "experts.w_gate_up", [h + "experts.gate_up_proj"], lambda ts: ts[0].transpose(1, 2),
                     lambda t: [t.transpose(1, 2)]),
                Rule(n + "experts.w_down", [h + "experts.down_proj"], lambda ts: ts[0].transpose(1, 2),
                     lambda t: [t.transpose(1, 2)])]
    gate_up = [h + f"experts.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up")]
    down = [h + f"experts.{e}.down_proj.weight" for e in range(E)]
    return [Rule(n + "experts.w_gate_up", gate_up,
                 lambda ts: torch.stack([torch.cat([g, u], 0).t() for g, u in zip(ts[0::2], ts[1::2])]),
                 lambda t: [piece.t() for w in t for piece in w.split([F, F], dim=1)]),
            Rule(n + "experts.w_down", down, lambda ts: torch.stack([d.t() for d in ts]),
                 lambda t: [w.t() for w in t])]


def llm_rules(cfg: LLMConfig, native: str, hf: str, fused_experts: bool = False) -> list[Rule]:
    hd = cfg.head_dim
    rules = [_same(f"{native}embed_tokens.weight", f"{hf}model.embed_tokens.weight"),
             _same(f"{native}norm.weight", f"{hf}model.norm.weight")]
    if not cfg.tie_embeddings:
        rules.append(_same(f"{native}lm_head.weight", f"{hf}lm_head.weight"))
    for i in range(cfg.num_layers):
        n, h = f"{native}layers.{i}.", f"{hf}model.layers.{i}."
        rules += [_same(n + "input_norm.weight", h + "input_layernorm.weight"),
                  _same(n + "post_attn_norm.weight", h + "post_attention_layernorm.weight"),
                  _cat(n + "attn.qkv_proj.weight", [h + f"self_attn.{p}_proj.weight" for p in "qkv"],
                       [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd]),
                  _same(n + "attn.o_proj.weight", h + "self_attn.o_proj.weight"),
                  _same(n + "attn.q_norm.weight", h + "self_attn.q_norm.weight"),
                  _same(n + "attn.k_norm.weight", h + "self_attn.k_norm.weight")]
        if cfg.is_moe_layer(i):
            rules += [_same(n + "mlp.router.weight", h + "mlp.gate.weight")]
            rules += _experts_rules(cfg, n + "mlp.", h + "mlp.", fused_experts)
        else:
            rules += [_cat(n + "mlp.gate_up_proj.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
                           [cfg.ffn_size, cfg.ffn_size]),
                      _same(n + "mlp.down_proj.weight", h + "mlp.down_proj.weight")]
    return rules


def sailvl_rules(cfg: ModelConfig, fused_experts: bool = False) -> list[Rule]:
    return (vit_rules(cfg.vit, "vision.", "vision_model.") + adapter_rules("adapter.", "mlp1.")
            + llm_rules(cfg.llm, "llm.", "language_model.", fused_experts))


# ------------------------------------------------------------------------------------- file I/O
def read_tensors(path: str) -> Tensors:
    """All tensors of a checkpoint directory (single file or sharded with an index) or one .safetensors file."""
    if os.path.isfile(path):
        files = [path]
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (weights are read from local paths only)")
    elif os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{path}: the index names shards that are missing: {missing}")
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not supported; "
                                    "convert them with transformers' save_pretrained(safe_serialization=True))")
    out: Tensors = {}
    for fn in files:
        with safe_open(fn, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _save_shard(tensors: Tensors, file: str) -> None:
    """safetensors writes through a private temporary file (mode 0600); an export is for others to read: give it
    the mode a plain `open` would (0666 less the umask, 0644 by default)."""
    save_file(tensors, file, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def write_tensors(tensors: Tensors, path: str, max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write safetensors shards (+ model.safetensors.index.json when more than one) into directory `path`."""
    os.makedirs(path, exist_ok=True)
    shards: list[Tensors] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        _save_shard(shards[0], os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(shard, os.path.join(path, name))
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# --------------------------------------------------------------------------------- apply rules
def load_by_rules(module: nn.Module, tensors: Tensors, rules: list[Rule], source: str,
                  ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Copy checkpoint tensors into `module` (strict: every rule satisfied, every tensor used or ignored)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    wanted = {h for r in rules for h in r.hf}
    missing = sorted({h for h in wanted if h not in tensors})
    unexpected = sorted(k for k in tensors if k not in wanted and not ignore(k))
    if missing or unexpected:
        raise CheckpointMismatch(
            f"{source} does not match the model: {len(missing)} missing tensor(s) {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; {len(unexpected)} unexpected tensor(s) {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}. Check the model config (layers, experts, tie_embeddings) "
            "against the checkpoint's config.json.")
    for r in rules:
        if r.native not in params:
            raise CheckpointMismatch(f"rule for {r.native} has no parameter in the model")
        value = r.to_native([tensors[h] for h in r.hf])
        p = params[r.native]
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointMismatch(f"{source}: {r.hf[0]} gives shape {tuple(value.shape)} for {r.native}, "
                                     f"the model has {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value.to(p.dtype))


def export_by_rules(module: nn.Module, rules: list[Rule], dtype: torch.dtype | None = None) -> Tensors:
    params = dict(module.named_parameters(remove_duplicate=False))
    out: Tensors = {}
    for r in rules:
        t = params[r.native].detach().cpu()
        for name, piece in zip(r.hf, r.to_hf(t.to(dtype) if dtype else t)):
            out[name] = piece.contiguous().clone()
    return out


# ------------------------------------------------------------------------------------ configs
class UnsupportedConfig(ValueError):
    """A checkpoint's config.json asks for math sail_dist does not implement (names the field, value, what to do)."""


# transformers' class defaults (Qwen3Config, Qwen3MoeConfig, Aimv2VisionConfig: the same in 4.51 and 5.x) for
# keys a config.json leaves out: a missing key means what transformers would build. tests/test_model_hf.py checks
# these tables against the installed transformers' dataclass defaults.
QWEN3_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None,
    "attention_dropout": 0.0}
QWEN3_MOE_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
    "sliding_window": 4096, "attention_dropout": 0.0, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
    "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False, "output_router_logits": False,
    "router_aux_loss_coef": 0.001, "mlp_only_layers": None}
AIMV2_DEFAULTS = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 8,
    "num_channels": 3, "image_size": 224, "patch_size": 14, "hidden_act": "silu", "attention_dropout": 0.0,
    "rms_norm_eps": 1e-5, "qkv_bias": False, "mlp_bias": False, "use_head": True, "is_native": False}
ROPE_THETA_DEFAULT = 10_000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta (no theta anywhere)


def _getter(d: dict, defaults: dict) -> Callable[[str], object]:
    return lambda key: d[key] if key in d else defaults.get(key)


def _refuse(where: str, field: str, value: object, why: str) -> None:
    raise UnsupportedConfig(f"{where}: {field}={value!r}: {why}")


def _rope(d: dict, where: str, layer_types: list[str]) -> tuple[float, float]:
    """(rope_theta, linear factor) of a plain or linearly scaled RoPE config; any other RoPE is refused.

    transformers' order: `rope_scaling` (the 4.x key) replaces `rope_parameters` (5.x); the theta inside it wins
    over a top-level `rope_theta`, else 10000; `rope_type` wins over the 4.x `type`. `rope_parameters` may be nested
    per layer type (5.x). rope_type "linear" divides the inverse frequencies by `factor` (factor 1 for "default")."""
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = d.get(key) or {}
    if not isinstance(params, dict):
        _refuse(where, key, params, "expected a dict (rope_type, rope_theta, ...)")
    nested = [k for k in params if k in set(layer_types)]
    top_theta = d.get("rope_theta") if d.get("rope_theta") is not None else ROPE_THETA_DEFAULT
    ropes = set()
    for name, p in ([(f"{key}.{k}", params[k] or {}) for k in nested] or [(key, params)]):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "linear"):
            _refuse(where, f"{name}.rope_type", rope_type,
                    f"RoPE scaling ({p}) is not implemented: sail_dist computes plain RoPE (rope_type 'default') "
                    "and linear scaling ('linear') only, so this checkpoint's logits would be wrong. Use the "
                    "checkpoint without RoPE scaling (the base model's config), or extend model/qwen3.py "
                    "rope_cos_sin for this rope_type first")
        factor = 1.0
        if rope_type == "linear":
            factor = p.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                _refuse(where, f"{name}.factor", factor, "rope_type 'linear' needs a number factor > 0 (positions "
                        "are divided by it); transformers cannot build this config either")
        partial = p.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            _refuse(where, f"{name}.partial_rotary_factor", partial,
                    "sail_dist rotates the whole head_dim (partial rotary embeddings are not implemented)")
        ropes.add((float(p["rope_theta"] if p.get("rope_theta") is not None else top_theta), float(factor)))
    if len(ropes) > 1:
        _refuse(where, key, params, f"per-layer-type RoPE (base, linear factor) {sorted(ropes)}: sail_dist uses one "
                "RoPE for every layer")
    return ropes.pop()


def _layer_types(d: dict, get: Callable[[str], object], moe: bool, where: str) -> list[str]:
    """Full attention in every layer, as transformers decides it; sliding-window layers are refused."""
    L = int(get("num_hidden_layers"))
    window = get("sliding_window") if get("use_sliding_window") else None  # transformers' __post_init__
    how = f"(use_sliding_window={get('use_sliding_window')!r}, sliding_window={get('sliding_window')!r}"
    how += ")" if moe else f", max_window_layers={get('max_window_layers')!r})"
    fix = ("sail_dist's attention is full causal attention (sliding-window attention is not implemented); use a "
           "checkpoint configured for full attention")
    if moe:  # Qwen3-MoE: the window applies to every layer; layer_types / max_window_layers are not read
        if window is not None:
            _refuse(where, "use_sliding_window", get("use_sliding_window"), f"every layer slides {how}; {fix}")
        return ["full_attention"] * L
    types = d.get("layer_types") or [
        "sliding_attention" if window is not None and i >= int(get("max_window_layers")) else "full_attention"
        for i in range(L)]
    unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if len(types) != L or unknown:
        _refuse(where, "layer_types", types, f"expected {L} entries of 'full_attention' (unknown: {unknown})")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding:
        _refuse(where, "layer_types", types, f"layers {sliding} use sliding-window attention {how}; {fix}")
    return types


def llm_config_from_hf(d: dict, where: str = "config.json") -> LLMConfig:
    """Native LLMConfig from a Qwen3 / Qwen3-MoE config.json dict; every field whose math sail_dist does not
    implement is refused (UnsupportedConfig naming it), keys left out take transformers' defaults."""
    model_type = d.get("model_type", "qwen3")
    if model_type not in ("qwen3", "qwen3_moe"):
        _refuse(where, "model_type", model_type, "expected qwen3 or qwen3_moe")
    moe = model_type == "qwen3_moe"
    get = _getter(d, QWEN3_MOE_DEFAULTS if moe else QWEN3_DEFAULTS)
    if d.get("quantization_config"):
        _refuse(where, "quantization_config", d["quantization_config"],
                "quantized weights are not supported: load the unquantized (bf16/fp32) checkpoint")
    if get("hidden_act") != "silu":
        _refuse(where, "hidden_act", get("hidden_act"), "sail_dist's MLPs are SwiGLU (silu) only")
    if get("attention_bias"):
        _refuse(where, "attention_bias", True, "sail_dist's q/k/v/o projections have no bias")
    if float(get("attention_dropout") or 0.0):
        _refuse(where, "attention_dropout", get("attention_dropout"),
                "attention dropout (training-time math) is not implemented; set it to 0.0 in config.json to train "
                "without it (inference is unaffected by it)")
    if d.get("shared_expert_intermediate_size"):
        _refuse(where, "shared_expert_intermediate_size", d["shared_expert_intermediate_size"],
                "shared experts are not part of Qwen3-MoE and not implemented")
    types = _layer_types(d, get, moe, where)
    heads = int(get("num_attention_heads"))
    kv = get("num_key_value_heads")
    head_dim = d.get("head_dim", None if moe else QWEN3_DEFAULTS["head_dim"])  # MoE: getattr fallback D/H
    rope_theta, rope_factor = _rope(d, where, types)
    cfg = LLMConfig(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_layers=get("num_hidden_layers"),
                    num_heads=heads, num_kv_heads=heads if kv is None else kv,
                    head_dim=head_dim or get("hidden_size") // heads, ffn_size=get("intermediate_size"),
                    rope_theta=rope_theta, rope_linear_factor=rope_factor, rms_norm_eps=float(get("rms_norm_eps")),
                    max_position_embeddings=get("max_position_embeddings"),
                    tie_embeddings=bool(get("tie_word_embeddings")), num_experts=0)
    if moe:
        num_experts = d.get("num_experts", d.get("num_local_experts", QWEN3_MOE_DEFAULTS["num_experts"]))
        if get("decoder_sparse_step") is None or int(get("decoder_sparse_step")) < 1:
            _refuse(where, "decoder_sparse_step", get("decoder_sparse_step"),
                    "must be >= 1 (layer i is MoE when (i + 1) % decoder_sparse_step == 0)")
        cfg.num_experts, cfg.top_k = int(num_experts), int(get("num_experts_per_tok"))
        cfg.moe_ffn_size, cfg.norm_topk_prob = get("moe_intermediate_size"), bool(get("norm_topk_prob"))
        # A training setting (loading never compares it with the model config); output_router_logits only says
        # whether transformers' own forward returns router logits / adds the loss, and is not read.
        cfg.aux_loss_coeff = float(get("router_aux_loss_coef"))
        cfg.moe_layer_step = int(get("decoder_sparse_step"))
        cfg.dense_layers = list(get("mlp_only_layers") or [])
    return cfg


def _square(where: str, field: str, value: object) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            _refuse(where, field, value, "sail_dist's ViT needs square images and patches")
        value = value[0]
    return int(value)


def vit_config_from_hf(d: dict, where: str = "config.json") -> ViTConfig:
    """Native ViTConfig from an AIMv2 / SAIL-ViT vision config dict (Apple's AIMv2, transformers'
    Aimv2VisionConfig, SAIL-VL2's `vision_config`); unimplemented math is refused."""
    get = _getter(d, {**AIMV2_DEFAULTS, "use_bias": False, "projection_dropout": 0.0})
    if get("is_native"):
        _refuse(where, "is_native", True, "AIMv2 'native' models use sin-cos position embeddings for any resolution; "
                "SAIL-ViT needs the learned position table (a checkpoint with is_native: false)")
    for key, why in (("qkv_bias", "SAIL-ViT's qkv and output projections have no bias"),
                     ("mlp_bias", "SAIL-ViT's MLP has no bias"),
                     ("use_bias", "SAIL-ViT's projections and MLP have no bias")):
        if get(key):
            _refuse(where, key, get(key), why)
    for key in ("attention_dropout", "projection_dropout"):
        if float(get(key) or 0.0):
            _refuse(where, key, get(key), "dropout (training-time math) is not implemented in SAIL-ViT; set it to "
                    "0.0 in config.json to train without it")
    if get("hidden_act") != "silu":
        _refuse(where, "hidden_act", get("hidden_act"), "SAIL-ViT's MLP is SwiGLU (silu) only")
    if get("num_channels") != 3:
        _refuse(where, "num_channels", get("num_channels"), "SAIL-ViT takes RGB patches (3 channels)")
    if "layer_norm_eps" in d and "rms_norm_eps" not in d:
        _refuse(where, "layer_norm_eps", d["layer_norm_eps"], "AIMv2 / SAIL-ViT norms are RMSNorms read from "
                "rms_norm_eps; this config has no rms_norm_eps, so which eps the trunk uses is unknown")
    # use_head: the attention-pooling head's output is not what SAIL-VL consumes (the adapter takes the patch
    # features); its tensors are skipped by load_aimv2.
    return ViTConfig(num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
                     num_heads=get("num_attention_heads"), ffn_size=get("intermediate_size"),
                     patch_size=_square(where, "patch_size", get("patch_size")),
                     image_size=_square(where, "image_size", get("image_size")),
                     rms_norm_eps=float(get("rms_norm_eps")))


SAILVL_TEMPLATES = ("univl-chat",)  # the chat layout data/template.py writes


def _check_sailvl_top(d: dict, where: str, vit: ViTConfig) -> int:
    """SAIL-VL2's own fields; returns the adapter's downsample factor."""
    ratio = d.get("downsample_ratio", 0.5)
    downsample = round(1 / ratio) if ratio else 0
    if downsample < 1 or abs(1 / ratio - downsample) > 1e-6:
        _refuse(where, "downsample_ratio", ratio, "the pixel shuffle merges an integer n x n patches (ratio 1/n)")
    if d.get("select_layer", -1) != -1:
        _refuse(where, "select_layer", d["select_layer"], "sail_dist feeds the adapter the ViT's last layer "
                "(select_layer -1); other layers are not implemented")
    if d.get("ps_version") != "v2":
        _refuse(where, "ps_version", d.get("ps_version"), "only InternVL's pixel shuffle 'v2' is implemented "
                "(a missing ps_version means InternVL's default 'v1')")
    if d.get("template") is not None and d["template"] not in SAILVL_TEMPLATES:
        _refuse(where, "template", d["template"], f"sail_dist formats conversations as {SAILVL_TEMPLATES} "
                "(data/template.py); a model trained on another template would be fine-tuned on the wrong format")
    if d.get("force_image_size") not in (None, vit.image_size):
        _refuse(where, "force_image_size", d["force_image_size"], f"tiles are vision_config.image_size="
                f"{vit.image_size}; a different forced size (position table resized at load) is not implemented")
    if d.get("pad2square"):
        _refuse(where, "pad2square", d["pad2square"], "padding images to square is not implemented (tiles only)")
    for key in ("use_backbone_lora", "use_llm_lora"):
        if d.get(key):
            _refuse(where, key, d[key], "LoRA-wrapped weights are not supported: merge the LoRA weights into the "
                    "base weights and save without LoRA")
    return downsample


def sailvl_preprocessing(d: dict) -> dict[str, object]:
    """The image preprocessing a SAIL-VL2 config.json declares, as sail_dist data config keys (InternVL's
    dynamic tiling; with dynamic_image_size false one tile per image)."""
    dynamic = bool(d.get("dynamic_image_size", False))
    return {"data.min_tiles": int(d.get("min_dynamic_patch", 1)) if dynamic else 1,
            "data.max_tiles": int(d.get("max_dynamic_patch", 12)) if dynamic else 1,
            "data.use_thumbnail": bool(d.get("use_thumbnail", False)) and dynamic}


def _read_config(path: str) -> dict | None:
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else ""
    if not cfg_path or not os.path.exists(cfg_path):
        return None
    with open(cfg_path) as f:
        return json.load(f)


def model_config_from_hf(path: str) -> ModelConfig:
    """Native ModelConfig from a SAIL-VL2, Qwen3 / Qwen3-MoE or AIMv2 checkpoint directory's config.json
    (unimplemented math refused with UnsupportedConfig)."""
    d = _read_config(path)
    if d is None:
        raise FileNotFoundError(f"{path}: no config.json")
    where = os.path.join(path, "config.json")
    kind = d.get("model_type", "")
    if kind == "sailvl":
        vit = vit_config_from_hf(d["vision_config"], f"{where} vision_config")
        downsample = _check_sailvl_top(d, where, vit)
        llm = llm_config_from_hf(d["llm_config"], f"{where} llm_config")
        return ModelConfig(vit=vit, adapter=AdapterConfig(downsample=downsample, hidden_size=llm.hidden_size), llm=llm)
    if kind in ("qwen3", "qwen3_moe"):
        return ModelConfig(llm=llm_config_from_hf(d, where))
    if kind.startswith("aimv2"):
        return ModelConfig(vit=vit_config_from_hf(d.get("vision_config", d), where))
    raise UnsupportedConfig(f"{where}: model_type={kind!r} is neither sailvl, qwen3, qwen3_moe nor aimv2")


# native field -> the config.json key it comes from (named in mismatch messages)
_LLM_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "ffn_size": "intermediate_size", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
             "rope_linear_factor": "rope_parameters / rope_scaling factor with rope_type linear",
             "tie_embeddings": "tie_word_embeddings", "num_experts": "num_experts", "top_k": "num_experts_per_tok",
             "moe_ffn_size": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob"}
_VIT_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
             "ffn_size": "intermediate_size", "patch_size": "patch_size", "image_size": "image_size",
             "rms_norm_eps": "rms_norm_eps"}


def _llm_differences(ours: LLMConfig, ckpt: LLMConfig, prefix: str) -> list[tuple[str, object, object, str]]:
    moe_ours = [ours.is_moe_layer(i) for i in range(ours.num_layers)]
    moe_ckpt = [ckpt.is_moe_layer(i) for i in range(ckpt.num_layers)]
    skip = set()
    if all(moe_ours) and all(moe_ckpt):
        skip.add("ffn_size")  # no dense layer reads it
    if not ours.num_experts and not ckpt.num_experts:
        skip |= {"top_k", "moe_ffn_size", "norm_topk_prob"}
    out = [(f"{prefix}.{k}", getattr(ours, k), getattr(ckpt, k), h) for k, h in _LLM_KEYS.items()
           if k not in skip and getattr(ours, k) != getattr(ckpt, k)]
    if moe_ours != moe_ckpt and ours.num_layers == ckpt.num_layers:
        out.append((f"{prefix}.moe_layer_step / {prefix}.dense_layers",
                    f"{ours.moe_layer_step} / {ours.dense_layers}", f"{ckpt.moe_layer_step} / {ckpt.dense_layers}",
                    "decoder_sparse_step / mlp_only_layers"))
    return out


def _vit_differences(ours: ViTConfig, ckpt: ViTConfig, prefix: str) -> list[tuple[str, object, object, str]]:
    return [(f"{prefix}.{k}", getattr(ours, k), getattr(ckpt, k), h) for k, h in _VIT_KEYS.items()
            if getattr(ours, k) != getattr(ckpt, k)]


def _raise_differences(where: str, diffs: list[tuple[str, object, object, str]]) -> None:
    if diffs:
        lines = "; ".join(f"{name}={a!r} but the checkpoint has {b!r} ({key})" for name, a, b, key in diffs)
        sets = " ".join(f"{name}={b}" for name, _, b, _ in diffs if " / " not in name)
        raise CheckpointMismatch(f"{where}: the model config does not match the checkpoint's: {lines}. Set the model "
                                 f"config to the checkpoint's ({sets}) or load a checkpoint made for this config")


def _dtype_name(tensors: Tensors) -> str:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"the tensors to write have mixed dtypes {sorted(map(str, dtypes))}: pass dtype= to write one")
    return str(dtypes.pop()).removeprefix("torch.")


def _qwen3_hf_config(cfg: LLMConfig, tokens: TokenConfig, dtype: str) -> dict:
    """config.json that transformers 4.51+ and 5.x read as exactly this model (both RoPE keys, linear scaling in
    both when the factor is not 1, full attention in every layer spelled out; `torch_dtype` (4.x) and `dtype` (5.x) are the dtype of the tensors written)."""
    d = {"architectures": ["Qwen3MoeForCausalLM" if cfg.num_experts else "Qwen3ForCausalLM"],
         "model_type": "qwen3_moe" if cfg.num_experts else "qwen3", "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
         "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
         "rope_theta": cfg.rope_theta, "rope_scaling": None,
         "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
         "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
         "max_window_layers": cfg.num_layers, "layer_types": ["full_attention"] * cfg.num_layers,
         "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": tokens.pad, "eos_token_id": tokens.im_end,
         "pad_token_id": tokens.pad, "torch_dtype": dtype, "dtype": dtype}
    if cfg.rope_linear_factor != 1.0:
        # 4.x reads rope_scaling (+ the top-level theta); 5.x takes rope_scaling over rope_parameters, so both agree
        d["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_linear_factor}
        d["rope_parameters"] = {"rope_type": "linear", "factor": cfg.rope_linear_factor, "rope_theta": cfg.rope_theta}
    if cfg.num_experts:
        d.update({"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
                  "moe_intermediate_size": cfg.moe_ffn_size, "norm_topk_prob": cfg.norm_topk_prob,
                  "router_aux_loss_coef": cfg.aux_loss_coeff, "decoder_sparse_step": cfg.moe_layer_step,
                  "mlp_only_layers": list(cfg.dense_layers), "output_router_logits": False})
    return d


def _sailvl_hf_config(cfg: ModelConfig, dtype: str) -> dict:
    v = cfg.vit
    return {"architectures": ["SAILVLModel"], "model_type": "sailvl", "downsample_ratio": 1 / cfg.adapter.downsample,
            "ps_version": "v2", "select_layer": -1, "force_image_size": v.image_size, "dynamic_image_size": True,
            "use_thumbnail": True, "template": "univl-chat", "torch_dtype": dtype, "dtype": dtype,
            "llm_config": _qwen3_hf_config(cfg.llm, cfg.tokens, dtype),
            "vision_config": {"architectures": ["SAILViTModel"], "model_type": "sailvit", "hidden_size": v.hidden_size,
                              "intermediate_size": v.ffn_size, "num_hidden_layers": v.num_layers,
                              "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
                              "image_size": v.image_size, "rms_norm_eps": v.rms_norm_eps, "num_channels": 3,
                              "qkv_bias": False, "use_bias": False, "attention_dropout": 0.0,
                              "projection_dropout": 0.0, "torch_dtype": dtype, "dtype": dtype}}


# ------------------------------------------------------------------------------------ entry points
def _checkpoint_experts_fused(tensors: Tensors) -> bool:
    return any(k.endswith("mlp.experts.gate_up_proj") for k in tensors)


def load_sailvl(model: nn.Module, path: str) -> None:
    """Load a SAIL-VL2 HF checkpoint into a native SailVL model (strict). Its config.json is checked first:
    unimplemented math is refused (UnsupportedConfig), a config other than the model's is a CheckpointMismatch
    naming each key."""
    cfg = model.cfg
    d = _read_config(path)
    if d is not None:
        ckpt = model_config_from_hf(path)
        diffs = _vit_differences(cfg.vit, ckpt.vit, "model.vit") + _llm_differences(cfg.llm, ckpt.llm, "model.llm")
        if cfg.adapter.downsample != ckpt.adapter.downsample:
            diffs.append(("model.adapter.downsample", cfg.adapter.downsample, ckpt.adapter.downsample,
                          "downsample_ratio"))
        _raise_differences(os.path.join(path, "config.json"), diffs)
        log.info("%s declares the preprocessing %s", path, sailvl_preprocessing(d))
    tensors = read_tensors(path)
    rules = sailvl_rules(cfg, _checkpoint_experts_fused(tensors))
    tied_head = "language_model.lm_head.weight"
    # The release stores lm_head although the embeddings are tied; the tied model has one tensor for both.
    if cfg.llm.tie_embeddings and tied_head in tensors:
        emb = tensors["language_model.model.embed_tokens.weight"]
        if not torch.equal(tensors[tied_head], emb):
            log.warning("%s: lm_head differs from the tied embeddings; using the embeddings", path)
    load_by_rules(model, tensors, rules, path, ignore=lambda k: cfg.llm.tie_embeddings and k == tied_head)


def save_sailvl(model: nn.Module, path: str, dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write the model in the SAIL-VL2 HF layout (config.json + safetensors; lm_head written even when tied,
    as the release does; config dtype = the tensors' dtype)."""
    cfg = model.cfg
    tensors = export_by_rules(model, sailvl_rules(cfg), dtype)
    if cfg.llm.tie_embeddings:
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    write_tensors(tensors, path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_sailvl_hf_config(cfg, _dtype_name(tensors)), f, indent=2)


def load_qwen3(llm: nn.Module, path: str) -> None:
    """Load a Qwen3 / Qwen3-MoE transformers checkpoint into the native LLM (`model.llm`), strict; its config.json
    is checked first (as in load_sailvl)."""
    d = _read_config(path)
    if d is not None:
        where = os.path.join(path, "config.json")
        _raise_differences(where, _llm_differences(llm.cfg, llm_config_from_hf(d, where), "model.llm"))
    tensors = read_tensors(path)
    rules = llm_rules(llm.cfg, "", "", _checkpoint_experts_fused(tensors))
    # transformers omits lm_head for tied models; some exporters keep it.
    load_by_rules(llm, tensors, rules, path, ignore=lambda k: llm.cfg.tie_embeddings and k == "lm_head.weight")


def save_qwen3(llm: nn.Module, path: str, tokens: TokenConfig | None = None,
               dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write the native LLM as a transformers Qwen3 / Qwen3-MoE checkpoint (per-expert names; config dtype = the
    tensors' dtype)."""
    tensors = export_by_rules(llm, llm_rules(llm.cfg, "", ""), dtype)
    write_tensors(tensors, path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_qwen3_hf_config(llm.cfg, tokens or TokenConfig(), _dtype_name(tensors)), f, indent=2)


def load_aimv2(vit: nn.Module, path: str) -> None:
    """Load an AIMv2 vision checkpoint into the native SAIL-ViT (`model.vision`), strict.

    Apple's layout (`preprocessor.*`, `trunk.*`) or transformers' Aimv2VisionModel layout (with a learned
    position table: `is_native` false). Its config.json is checked first (as in load_sailvl). Tensors outside
    SAIL-ViT (the `head.*` pooling head, whose pooled output SAIL-VL does not consume; a CLIP text tower) are
    skipped.
    """
    d = _read_config(path)
    if d is not None:
        where = os.path.join(path, "config.json")
        _raise_differences(where, _vit_differences(vit.cfg, vit_config_from_hf(d.get("vision_config", d), where),
                                                   "model.vit"))
    tensors = read_tensors(path)
    if any(k.startswith("trunk.") for k in tensors):
        rules = vit_rules(vit.cfg, "", "", "aimv2")
    else:
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
        rules = vit_rules(vit.cfg, "", prefix, "transformers")
    load_by_rules(vit, tensors, rules, path, ignore=lambda k: k.split(".")[0] in ("head", "text_model")
                  or k.startswith(("vision_model.head.", "logit_scale", "visual_projection", "text_projection")))
