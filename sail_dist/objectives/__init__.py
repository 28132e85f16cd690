"""Training objectives behind one seam (objectives/base.py), picked by `train.objective`.

A new objective is one file (a subclass of `Objective`) plus one line in `OBJECTIVES`; code outside the package
(a test, a user's plugin) calls `register_objective`.
"""
from __future__ import annotations

from typing import Callable

from sail_dist.config import Config
from sail_dist.objectives.base import AllReduce, LossShare, Objective
from sail_dist.registry import Registry

OBJECTIVES = Registry("train.objective", {
    "sft": "sail_dist.objectives.sft:SFTObjective",
    "think_fusion": "sail_dist.objectives.think_fusion:ThinkFusionObjective",
    "dapo": "sail_dist.objectives.policy:DAPOObjective",
    "gspo": "sail_dist.objectives.policy:GSPOObjective",
})


def register_objective(name: str, factory: str | Callable[[Config | None], Objective]) -> None:
    """Register an objective under `name` (a class / factory, or a lazy "module:Class" string)."""
    OBJECTIVES.register(name, factory)


def available_objectives() -> list[str]:
    return OBJECTIVES.names()


def build_objective(name: str, cfg: Config | None = None) -> Objective:
    """A fresh instance of the objective registered as `name` (`train.objective`), given the run's config."""
    return OBJECTIVES.get(name)(cfg)


__all__ = ["AllReduce", "LossShare", "OBJECTIVES", "Objective", "available_objectives", "build_objective",
           "register_objective"]
