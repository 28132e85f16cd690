"""`sail-train [--stage NAME] --config FILE [key.sub=value ...]` (also `python -m sail_dist`).

`--stage` picks a stage of the SAIL-VL2 recipe (its defaults, objective and runner; `--list-stages` lists them,
docs/recipe.md describes them); the config and the overrides sit on top of the stage's defaults.

Launch one process per device with torchrun (launch/gpu_sft.sh, launch/npu_pretrain.sh do that); a
plain invocation is a world of one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

from sail_dist.config import ConfigError, load_config


# Known-harmless startup warnings, printed once per process otherwise (docs/configs.md, "Console output"): Megatron
# falls back to its local fused-op implementations without Transformer Engine / Apex, which the NPU backend never
# needs (its hot ops are torch_npu's; on CPU / CUDA the emulation's).
HARMLESS_WARNINGS = (r"Transformer Engine and Apex are not installed",)


def main(argv: list[str] | None = None) -> int:
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    p = argparse.ArgumentParser(prog="sail-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config (may inherit with `base:`)")
    p.add_argument("--stage", "-s", help="a stage of the SAIL-VL2 recipe (see --list-stages); also train.stage")
    p.add_argument("--list-stages", action="store_true", help="list the stages and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.llm.num_layers=4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    if args.list_stages:
        from sail_dist.stages import available_stages, get_stage

        for name in available_stages():
            print(f"{name:<20} {get_stage(name).summary}")
        return 0
    if not args.config and not args.stage:
        p.error("give --config FILE (and/or --stage NAME)")
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.overrides, stage=args.stage)
    except ConfigError as e:
        if rank == 0:  # every rank reads the same config: say it once
            print(f"sail-train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from sail_dist.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from sail_dist.train.checkpoint import CheckpointError

    if cfg.train.stage:
        from sail_dist.stages import get_stage

        run = get_stage(cfg.train.stage).run
    else:
        from sail_dist.train.trainer import train as run
    try:
        summary = run(cfg)
    except CheckpointError as e:  # a refused or unreadable resume, the same on every rank: the message says what to do
        if rank == 0:
            print(f"sail-train: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # one line on the failing rank; the traceback to a file, not the console
        report_failure(e, rank, cfg.train.out_dir)
        return 1
    if summary.pop("is_main"):
        print(json.dumps(finite(summary), default=str, allow_nan=False))
    return 0


# How a rank's collective fails when ANOTHER rank died first (gloo / NCCL / the c10d store): not the root cause.
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
                 "ProcessGroupNCCL", "Socket Timeout", "recvBytes", "sendBytes", "DistNetworkError", "DistStoreError")


def report_failure(e: BaseException, rank: int, out_dir: str) -> str:
    """Write the traceback to <out_dir>/logs/rank<R>.err and print one line naming the error and that file. A rank
    whose collective failed because a peer died first prints nothing (its peer's line is the root cause)."""
    import traceback

    path = os.path.join(out_dir, "logs", f"rank{rank}.err")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            traceback.print_exception(e, file=f)
    except OSError:
        path = "(unwritable: " + path + ")"
    text = f"{type(e).__name__}: {e}"
    if not any(m in text for m in _PEER_FAILURE) and not type(e).__name__.startswith("Dist"):
        where = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"sail-train: {where}{text} (traceback: {path})", file=sys.stderr, flush=True)
    return path


def finite(x):
    """`x` with every non-finite float as null, so a summary line is strict JSON (no NaN / Infinity); also used by
    sail-eval's report and summary line."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


if __name__ == "__main__":
    sys.exit(main())
