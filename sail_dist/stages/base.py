"""A stage of the SAIL-VL2 recipe: its defaults, its objective, how it runs and what it needs of a backend.

A stage's `defaults` are config values (nested, as YAML gives them) applied UNDER the user's config: dataclass
defaults < stage defaults < the user's YAML < command-line overrides. `runner` is the function that runs a Config
of this stage ("module:function", Config -> summary dict): the SFT trainer for the supervised stages, the RL loop
for the RL ones. `check` refuses a combination the stage cannot run (e.g. a backend that lacks a capability) with
the reason and the fix.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from sail_dist.config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line: what the stage does and where its values come from (report table / section)
    defaults: dict[str, Any] = field(default_factory=dict)
    runner: str = "sail_dist.train.trainer:train"
    backends: tuple[str, ...] = ("gpu", "npu")

    def check(self, cfg: Config, err: Callable[[str, str], None]) -> None:
        """Call `err(key, message)` for a setting this stage cannot run with (message: reason and fix)."""
        if cfg.backend.name not in self.backends:
            err("backend.name", f"stage {self.name!r} does not run on backend {cfg.backend.name!r} (it runs on "
                f"{', '.join(self.backends)}): set backend.name={self.backends[0]}")

    def run(self, cfg: Config) -> dict:
        module, attr = self.runner.split(":")
        return getattr(importlib.import_module(module), attr)(cfg)
