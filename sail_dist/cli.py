"""`sail-train --config FILE [key.sub=value ...]` (also `python -m sail_dist`).

Launch one process per device with torchrun (launch/gpu_sft.sh, launch/npu_pretrain.sh do that); a
plain invocation is a world of one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from sail_dist.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sail-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="YAML config (may inherit with `base:`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.llm.num_layers=4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"sail-train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from sail_dist.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from sail_dist.train.checkpoint import CheckpointError
    from sail_dist.train.trainer import train

    try:
        summary = train(cfg)
    except CheckpointError as e:  # a refused or unreadable resume: the message says what to do
        print(f"sail-train: {e}", file=sys.stderr)
        return 1
    if summary.pop("is_main"):
        print(json.dumps(_finite(summary), default=str, allow_nan=False))
    return 0


def _finite(x):
    """The summary with every non-finite float as null: the last line is strict JSON (no NaN / Infinity)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


if __name__ == "__main__":
    sys.exit(main())
