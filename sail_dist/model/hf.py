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
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
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
def _qwen3_hf_config(cfg: LLMConfig, tokens: TokenConfig) -> dict:
    d = {"architectures": ["Qwen3MoeForCausalLM" if cfg.num_experts else "Qwen3ForCausalLM"],
         "model_type": "qwen3_moe" if cfg.num_experts else "qwen3", "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
         "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
         "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
         "bos_token_id": tokens.pad, "eos_token_id": tokens.im_end, "pad_token_id": tokens.pad, "torch_dtype": "bfloat16"}
    if cfg.num_experts:
        d.update({"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
                  "moe_intermediate_size": cfg.moe_ffn_size, "norm_topk_prob": cfg.norm_topk_prob,
                  "router_aux_loss_coef": cfg.aux_loss_coeff, "decoder_sparse_step": cfg.moe_layer_step,
                  "mlp_only_layers": list(cfg.dense_layers), "output_router_logits": False})
    return d


def llm_config_from_hf(d: dict) -> LLMConfig:
    if d.get("rope_scaling"):
        raise ValueError(f"rope_scaling {d['rope_scaling']} is not supported (plain RoPE only)")
    theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 1e6))
    cfg = LLMConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                    num_heads=d["num_attention_heads"], num_kv_heads=d["num_key_value_heads"],
                    head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                    ffn_size=d["intermediate_size"], rope_theta=float(theta), rms_norm_eps=d["rms_norm_eps"],
                    max_position_embeddings=d["max_position_embeddings"],
                    tie_embeddings=bool(d.get("tie_word_embeddings", False)))
    num_experts = d.get("num_experts") or d.get("num_local_experts")  # transformers 5 writes num_local_experts
    if num_experts:
        cfg.num_experts, cfg.top_k = num_experts, d["num_experts_per_tok"]
        cfg.moe_ffn_size, cfg.norm_topk_prob = d["moe_intermediate_size"], bool(d.get("norm_topk_prob", False))
        cfg.aux_loss_coeff = d.get("router_aux_loss_coef", 0.001)
        cfg.moe_layer_step = d.get("decoder_sparse_step", 1)
        cfg.dense_layers = list(d.get("mlp_only_layers") or [])
    return cfg


def model_config_from_hf(path: str) -> ModelConfig:
    """Native ModelConfig from a SAIL-VL2 or Qwen3 checkpoint directory's config.json."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    if d.get("model_type") == "sailvl":
        v, llm = d["vision_config"], d["llm_config"]
        if d.get("ps_version", "v2") != "v2":
            raise ValueError(f"{path}: ps_version {d.get('ps_version')} is not supported (only v2)")
        vit = ViTConfig(num_layers=v["num_hidden_layers"], hidden_size=v["hidden_size"],
                        num_heads=v["num_attention_heads"], ffn_size=v["intermediate_size"],
                        patch_size=v["patch_size"], image_size=v["image_size"], rms_norm_eps=v["rms_norm_eps"])
        llm_cfg = llm_config_from_hf(llm)
        return ModelConfig(vit=vit, adapter=AdapterConfig(downsample=round(1 / d["downsample_ratio"]),
                                                          hidden_size=llm_cfg.hidden_size), llm=llm_cfg)
    if d.get("model_type") in ("qwen3", "qwen3_moe"):
        return ModelConfig(llm=llm_config_from_hf(d))
    raise ValueError(f"{path}/config.json: model_type {d.get('model_type')!r} is neither sailvl, qwen3 nor qwen3_moe")


def _sailvl_hf_config(cfg: ModelConfig) -> dict:
    v = cfg.vit
    return {"architectures": ["SAILVLModel"], "model_type": "sailvl", "downsample_ratio": 1 / cfg.adapter.downsample,
            "ps_version": "v2", "select_layer": -1, "force_image_size": v.image_size, "dynamic_image_size": True,
            "use_thumbnail": True, "template": "univl-chat", "torch_dtype": "bfloat16",
            "llm_config": _qwen3_hf_config(cfg.llm, cfg.tokens),
            "vision_config": {"architectures": ["SAILViTModel"], "model_type": "sailvit", "hidden_size": v.hidden_size,
                              "intermediate_size": v.ffn_size, "num_hidden_layers": v.num_layers,
                              "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
                              "image_size": v.image_size, "rms_norm_eps": v.rms_norm_eps, "num_channels": 3,
                              "qkv_bias": False, "use_bias": False}}


# ------------------------------------------------------------------------------------ entry points
def _checkpoint_experts_fused(tensors: Tensors) -> bool:
    return any(k.endswith("mlp.experts.gate_up_proj") for k in tensors)


def load_sailvl(model: nn.Module, path: str) -> None:
    """Load a SAIL-VL2 HF checkpoint into a native SailVL model (strict)."""
    tensors = read_tensors(path)
    cfg = model.cfg
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
    as the release does)."""
    cfg = model.cfg
    tensors = export_by_rules(model, sailvl_rules(cfg), dtype)
    if cfg.llm.tie_embeddings:
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    write_tensors(tensors, path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_sailvl_hf_config(cfg), f, indent=2)


def load_qwen3(llm: nn.Module, path: str) -> None:
    """Load a Qwen3 / Qwen3-MoE transformers checkpoint into the native LLM (`model.llm`), strict."""
    tensors = read_tensors(path)
    rules = llm_rules(llm.cfg, "", "", _checkpoint_experts_fused(tensors))
    # transformers omits lm_head for tied models; some exporters keep it.
    load_by_rules(llm, tensors, rules, path, ignore=lambda k: llm.cfg.tie_embeddings and k == "lm_head.weight")


def save_qwen3(llm: nn.Module, path: str, tokens: TokenConfig | None = None,
               dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write the native LLM as a transformers Qwen3 / Qwen3-MoE checkpoint (per-expert names)."""
    write_tensors(export_by_rules(llm, llm_rules(llm.cfg, "", ""), dtype), path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_qwen3_hf_config(llm.cfg, tokens or TokenConfig()), f, indent=2)


def load_aimv2(vit: nn.Module, path: str) -> None:
    """Load an AIMv2 vision checkpoint into the native SAIL-ViT (`model.vision`), strict.

    Apple's layout (`preprocessor.*`, `trunk.*`) or transformers' Aimv2VisionModel layout (with a learned
    position table: `is_native` false). Tensors outside SAIL-ViT (the `head.*` pooling head) are skipped.
    """
    tensors = read_tensors(path)
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else ""
    if cfg_path and os.path.exists(cfg_path):
        with open(cfg_path) as f:
            d = json.load(f)
        d = d.get("vision_config", d)
        if d.get("is_native"):
            raise CheckpointMismatch(f"{path}: AIMv2 'native' models use sin-cos position embeddings for any "
                                     "resolution; SAIL-ViT needs the learned 448 table (is_native: false)")
        for key, want in (("hidden_size", vit.cfg.hidden_size), ("num_hidden_layers", vit.cfg.num_layers),
                          ("patch_size", vit.cfg.patch_size)):
            if key in d and d[key] != want:
                raise CheckpointMismatch(f"{path}: {key}={d[key]} but the SAIL-ViT config has {want}")
    if any(k.startswith("trunk.") for k in tensors):
        rules = vit_rules(vit.cfg, "", "", "aimv2")
    else:
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
        rules = vit_rules(vit.cfg, "", prefix, "transformers")
    load_by_rules(vit, tensors, rules, path, ignore=lambda k: k.split(".")[0] in ("head", "text_model")
                  or k.startswith(("vision_model.head.", "logit_scale", "visual_projection", "text_projection")))
