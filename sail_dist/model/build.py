"""Build the model: seeded random init, or weights from a local HF checkpoint directory."""
from __future__ import annotations

import json
import logging
import os

import torch

from sail_dist.config import ModelConfig
from sail_dist.kernels.opset import OpSet
from sail_dist.model import hf
from sail_dist.model.sailvl import SailVL

log = logging.getLogger(__name__)


def _materialise(cfg: ModelConfig, ops: OpSet) -> SailVL:
    """The model with uninitialised host parameters: built on the meta device, then given empty CPU storage. This
    skips nn.Linear's own kaiming init, which `init_weights` overwrites (at 2B it cost more than the init itself);
    swapping the tensors in place keeps tied parameters (embeddings and lm head) one tensor."""
    with torch.device("meta"):
        model = SailVL(cfg, ops)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    return model


def build_model(cfg: ModelConfig, ops: OpSet, seed: int = 1234, init_from: str = "") -> SailVL:
    """Same weights on every rank: random init from `seed`, then `init_from` (SAIL-VL2, Qwen3 or AIMv2 dir) if given."""
    model = _materialise(cfg, ops)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    if init_from:
        cfg_file = os.path.join(init_from, "config.json")
        if not os.path.exists(cfg_file):
            raise FileNotFoundError(f"train.init_from={init_from}: no config.json there (expected a local HF "
                                    "checkpoint directory: SAIL-VL2, Qwen3/Qwen3-MoE or AIMv2)")
        with open(cfg_file) as f:
            kind = json.load(f).get("model_type", "")
        if kind == "sailvl":
            hf.load_sailvl(model, init_from)
        elif kind in ("qwen3", "qwen3_moe"):
            hf.load_qwen3(model.llm, init_from)
            log.info("loaded the LLM from %s; ViT and adapter are randomly initialised", init_from)
        elif kind.startswith("aimv2"):
            hf.load_aimv2(model.vision, init_from)
            log.info("loaded the ViT from %s; adapter and LLM are randomly initialised", init_from)
        else:
            raise ValueError(f"train.init_from={init_from}: model_type {kind!r} is not sailvl, qwen3, qwen3_moe or aimv2")
    return model
