"""`sail-data SUBCOMMAND ...`: offline data tools, one module each (each exposes `main(argv) -> int`)."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "balance": ("sail_dist.data.ngram_weights", "n-gram linguistic balancing: per-record sampling weights"),
    "longcot": ("sail_dist.data.longcot", "normalise, validate, de-duplicate and length-balance LongCoT JSONL"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = "\n".join(f"  {k:<10} {v[1]}" for k, v in SUBCOMMANDS.items())
        bad = f"sail-data: unknown subcommand {argv[0]!r}\n" if argv and argv[0] not in ("-h", "--help") else ""
        print(f"{bad}usage: sail-data SUBCOMMAND [args]\n\nsubcommands:\n{lines}", file=sys.stderr if bad else sys.stdout)
        return 2 if bad else 0
    return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
