"""The policy the generation tools sample from: a SAIL-VL2 HF directory (or a run's `hf` export) on a RolloutEngine.

Shared by `sail-eval`, `sail-rl-filter`, `sail-rl-harvest` and the local judge. The architecture comes from the
checkpoint's config.json; special-token ids, vision and data settings from the run config (`--config` +
dotted overrides, as `sail-train`), because the HF config does not carry our token ids. The tokenizer is
`--tokenizer`, else the checkpoint's own tokenizer.json, else data.tokenizer (or the demo tokenizer).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

from sail_dist.config import Config, ConfigError, DataSource, load_config
from sail_dist.data.records import BadSampleError, BadSampleLog
from sail_dist.data.samples import SampleBuilder, default_tokenizer_dir
from sail_dist.model.hf import resolve_hf_dir
from sail_dist.rl.prompts import PromptItem, load_prompts
from sail_dist.rollout.engine import RolloutEngine, SamplingParams


@dataclass
class Policy:
    cfg: Config  # the run config with model = the checkpoint's architecture
    builder: SampleBuilder
    engine: RolloutEngine
    model: Any = None  # the SailVL behind the built-in sampler (None for an injected engine)


def _tokenizer_dir(cfg: Config, hf_dir: str, tokenizer: str) -> str:
    if tokenizer:
        return tokenizer
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return hf_dir
    return default_tokenizer_dir(cfg)


def default_engine(model, cfg: Config) -> RolloutEngine:
    """The built-in KV-cache sampler (sail_dist/rollout/sampler.py) over `model`: rl.rollout_batch slots, rl.sampling's
    engine knobs."""
    from sail_dist.rollout.sampler import Sampler

    return Sampler.from_config(model, cfg.rl.sampling, cfg.rl.rollout_batch)


def load_policy(cfg: Config, init_from: str, tokenizer: str = "",
                engine_factory: Callable[[Any, Config], RolloutEngine] | None = None) -> Policy:
    """Build model + sampler from an HF directory; on CUDA when available (bf16), else CPU (fp32)."""
    import torch

    from sail_dist.kernels.opset import get_opset, opset_for_backend
    from sail_dist.model.build import build_model
    from sail_dist.model.hf import model_config_from_hf

    hf_dir = resolve_hf_dir(init_from, what="--init-from")
    arch = model_config_from_hf(hf_dir)
    model_cfg = dataclasses.replace(cfg.model, vit=arch.vit, adapter=arch.adapter, llm=arch.llm)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    builder = SampleBuilder.from_config(cfg, _tokenizer_dir(cfg, hf_dir, tokenizer))
    cuda = torch.cuda.is_available()
    ops = opset_for_backend("gpu", cfg.backend) if cuda else get_opset("reference")
    model = build_model(model_cfg, ops, seed=cfg.train.seed, init_from=hf_dir)
    if cuda:
        model = model.to(device="cuda", dtype=torch.bfloat16)
    model.eval()
    engine = (engine_factory or default_engine)(model, cfg)
    return Policy(cfg, builder, engine, model)


def sampling_params(cfg: Config, stop_id: int, temperature: float | None = None, seed: int | None = None
                    ) -> SamplingParams:
    """SamplingParams from rl.sampling, stopping at `<|im_end|>`; `temperature` / `seed` override it."""
    s = cfg.rl.sampling
    return SamplingParams(temperature=s.temperature if temperature is None else temperature, top_p=s.top_p,
                          top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop_ids=(stop_id,),
                          max_context=s.max_context, seed=s.seed if seed is None else seed)


# ------------------------------------------------------------------------------------------- CLI pieces
def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="run YAML config (token ids, data/vision settings, "
                   "rl.sampling, rl.reward); may inherit with `base:`")
    p.add_argument("--init-from", required=True, help="SAIL-VL2 HF directory, or a run directory with an hf/ export")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: the checkpoint's, else "
                   "data.tokenizer)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rl.sampling.max_new_tokens=512")


def config_from_args(args: argparse.Namespace, prog: str) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"{prog}: {e}") from None


def split_prompt_files(args: argparse.Namespace) -> list[str]:
    """The positional arguments without '=' (prompt files; parse_intermixed_args lets them sit between options);
    `args.overrides` keeps the dotted key=value ones."""
    files = [a for a in args.overrides if "=" not in a]
    args.overrides = [a for a in args.overrides if "=" in a]
    return files


def prompt_sources(files: list[str], configured: list[DataSource], prog: str, key: str) -> list[DataSource]:
    """The files given, else the config's `key` sources; none at all is an error naming both."""
    sources = [DataSource(path=f) for f in files] or list(configured)
    if not sources:
        raise SystemExit(f"{prog}: no prompts: give FILE.jsonl arguments or set {key} in the config")
    return sources


def load_tool_prompts(cfg: Config, sources: list[DataSource], builder: SampleBuilder, prog: str
                      ) -> tuple[list[PromptItem], BadSampleLog]:
    """load_prompts for a command-line tool: a bad record (data.on_bad_sample=error), a missing file or a source
    name clash ends the tool with the message (exit status 1)."""
    try:
        return load_prompts(cfg, sources, builder)
    except (BadSampleError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{prog}: {e}") from None
