"""MoE expert-activation probe (SAIL-VL2 report sec. 2.2): `sail-probe` / `python -m sail_dist.probe.experts`.

Forward-only over a calibration JSONL (records as in data.sources), split automatically into text-only records and
multimodal ones (with images or a video), it sums each MoE layer's expert token-slot counts (`MoE.last_counts`,
what the trainer logs too) per group and prints, per MoE layer, the normalised activation entropy H(p) / log E
(1 = every expert equally used, 0 = one expert takes everything) and the load imbalance max_e / mean_e of the counts,
text-only and multimodal side by side. The report probes this to keep routing stable when a text MoE LLM starts
seeing vision tokens. The figures come from sail_dist/train/metrics.py (expert_load_entropy_per_layer,
expert_load_imbalance_per_layer), the functions the trainer's per-step logging uses. Ends with one JSON line.

    sail-probe --data calib.jsonl --config run.yaml [--init-from HF_DIR] [key=value ...]
    sail-probe --data calib.jsonl --init-from HF_DIR data.tokenizer=TOKENIZER_DIR   (model config from config.json)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field

import torch

from sail_dist.config import Config, DataSource, load_config
from sail_dist.data.records import BadSample, BadSampleLog, JsonlSource
from sail_dist.data.samples import SampleBuilder, SampleMeta, default_tokenizer_dir
from sail_dist.train.metrics import expert_load_entropy_per_layer, expert_load_imbalance_per_layer

log = logging.getLogger("sail_dist")
GROUPS = ("text", "multimodal")


@dataclass
class GroupStats:
    samples: int = 0
    tokens: int = 0
    counts: torch.Tensor | None = None  # [n_moe_layers, E] token-slot counts summed over the group

    def summary(self) -> dict:
        if self.counts is None:
            return {"samples": 0, "tokens": 0}
        h = expert_load_entropy_per_layer(self.counts)
        return {"samples": self.samples, "tokens": self.tokens, "entropy": h, "mean_entropy": sum(h) / len(h),
                "imbalance": expert_load_imbalance_per_layer(self.counts),
                "counts": self.counts.long().tolist()}


@dataclass
class ProbeResult:
    moe_layers: list[int]  # decoder layer index of each MoE layer
    groups: dict[str, GroupStats] = field(default_factory=lambda: {g: GroupStats() for g in GROUPS})
    bad: BadSampleLog = field(default_factory=BadSampleLog)


def group_of(meta: SampleMeta) -> str:
    return "multimodal" if meta.record.images or meta.record.video is not None else "text"


def _packs(metas: list[SampleMeta], pack_tokens: int) -> list[list[SampleMeta]]:
    """Consecutive samples up to pack_tokens per forward (a longer sample goes alone)."""
    packs, cur, n = [], [], 0
    for m in metas:
        if cur and n + m.n_tokens > pack_tokens:
            packs.append(cur)
            cur, n = [], 0
        cur.append(m)
        n += m.n_tokens
    if cur:
        packs.append(cur)
    return packs


@torch.no_grad()
def probe(model, builder: SampleBuilder, path: str, pack_tokens: int, max_samples: int = 0,
          device: torch.device | None = None) -> ProbeResult:
    """Forward every record of `path` (up to max_samples), summing each MoE layer's expert counts per group."""
    moe = model.moe_layers()
    if not moe:
        raise ValueError("the model has no MoE layers (model.llm.num_experts=0): nothing to probe")
    cfg = model.cfg.llm
    res = ProbeResult([i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)])
    src = JsonlSource(DataSource(path=path, name="calib"), 0)
    metas: dict[str, list[SampleMeta]] = {g: [] for g in GROUPS}
    for row in range(len(src)):
        if max_samples and sum(len(v) for v in metas.values()) >= max_samples:
            break
        try:
            meta = builder.describe(src.record(row), ("calib", row))
        except BadSample as e:  # skipped and counted: a probe reports, it does not stop on one record
            res.bad.add(e.reason, e.where, e.detail)
            continue
        metas[group_of(meta)].append(meta)
    model.eval()
    for g in GROUPS:
        st = res.groups[g]
        for pack in _packs(metas[g], pack_tokens):
            c = builder.collate(pack, res.bad)
            batch = c.batch.to(device) if device is not None else c.batch
            model.decode(model.embed(batch), batch)
            counts = torch.stack([m.last_counts.detach().float().cpu() for m in moe])
            st.counts = counts if st.counts is None else st.counts + counts
            st.samples += len(pack) - len(c.dropped)
            st.tokens += int(batch.input_ids.numel())
    return res


def build_config(args) -> Config:
    # JSON-quoted: a YAML flow scalar would split a path at ", " or ": "
    overrides = list(args.overrides) + [f"data.sources=[{{path: {json.dumps(args.data)}}}]"]
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    cfg = load_config(args.config or None, overrides)
    if args.init_from and not args.config:
        from sail_dist.model.hf import model_config_from_hf

        tokens = cfg.model.tokens
        cfg.model = model_config_from_hf(args.init_from)
        cfg.model.tokens = tokens  # special-token ids: the config's (Qwen3's by default; override model.tokens.*)
    return cfg


def format_table(res: ProbeResult) -> str:
    t, m = (res.groups[g].summary() for g in GROUPS)
    lines = [f"{'MoE layer':>9} | {'entropy text':>12} {'multimodal':>10} | {'imbalance text':>14} {'multimodal':>10}"]
    for i, layer in enumerate(res.moe_layers):
        et = f"{t['entropy'][i]:.4f}" if "entropy" in t else "-"
        em = f"{m['entropy'][i]:.4f}" if "entropy" in m else "-"
        it = f"{t['imbalance'][i]:.3f}" if "imbalance" in t else "-"
        im = f"{m['imbalance'][i]:.3f}" if "imbalance" in m else "-"
        lines.append(f"{layer:>9} | {et:>12} {em:>10} | {it:>14} {im:>10}")
    lines.append(f"{'samples':>9} | {t['samples']:>12} {m['samples']:>10} | tokens {t['tokens']} / {m['tokens']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Probe expert activation of a MoE model on calibration data; prints a per-layer table and one JSON line."""
    ap = argparse.ArgumentParser(prog="sail-probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="calibration JSONL (records as in data.sources)")
    ap.add_argument("--config", default="", help="run config YAML (model, tokens, data settings)")
    ap.add_argument("--init-from", default="", help="HF export to load (SAIL-VL2 layout); without --config its "
                    "config.json gives the model")
    ap.add_argument("--max-samples", type=int, default=0, help="probe at most this many records (0 = all)")
    ap.add_argument("--pack-tokens", type=int, default=0, help="tokens per forward (default: data.pack_tokens)")
    ap.add_argument("--device", default="cpu", help="torch device for the forward (cpu, cuda, ...)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.tokenizer=DIR")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = build_config(args)
        from sail_dist.kernels import get_opset
        from sail_dist.model.build import build_model

        if not cfg.train.init_from:
            log.warning("sail-probe: no --init-from (or train.init_from): probing a randomly initialised model")
        model = build_model(cfg.model, get_opset("reference"), seed=cfg.train.seed, init_from=cfg.train.init_from)
        device = torch.device(args.device)
        model.to(device)
        builder = SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg))
        res = probe(model, builder, args.data, args.pack_tokens or cfg.data.pack_tokens, args.max_samples,
                    device if device.type != "cpu" else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"sail-probe: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    if res.bad.total:
        print(f"skipped: {res.bad.summary()}", file=sys.stderr)
    print(json.dumps({"moe_layers": res.moe_layers, "experts": model.cfg.llm.num_experts, "top_k": model.cfg.llm.top_k,
                      **{g: res.groups[g].summary() for g in GROUPS}, "skipped": res.bad.total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
