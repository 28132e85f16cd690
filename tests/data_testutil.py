"""Shared helpers for the data pipeline tests (tests/test_data_*.py)."""
from __future__ import annotations

import json
import os

from sail_dist.config import Config, load_config
from sail_dist.data.demo import DEMO_TOKENS

TOKEN_OVERRIDES = [f"model.tokens.{k}={v}" for k, v in DEMO_TOKENS.__dict__.items()]


def tiny_config(*overrides: str, demo_dir: str | None = None) -> Config:
    """A small data setup: 56 px tiles of 14 px patches (4 vision tokens per tile), 512-token packs."""
    base = TOKEN_OVERRIDES + ["model.vit.image_size=56", "model.vit.patch_size=14", "model.llm.vocab_size=1000",
                              "data.max_tiles=4", "data.pack_tokens=512", "data.buffer_size=32",
                              "train.micro_batches=2", "data.num_workers=0"]
    if demo_dir is not None:
        base += ["data.demo=true", f"data.demo_dir={demo_dir}"]
    return load_config(None, base + list(overrides))


def write_jsonl(path: str, records: list) -> str:
    """Write records (dicts, or raw strings written verbatim) one per line."""
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def qa(question: str, answer: str, **media) -> dict:
    return {**media, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def save_png(path: str, size=(64, 48), colour=(200, 30, 30)) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path
