"""Training objectives behind one seam (objectives/base.py), picked by `train.objective`.

A new objective is one file (a subclass of `Objective`) plus one line in `OBJECTIVES`; code outside the package
(a test, a user's plugin) calls `register_objective`.
"""
from __future__ import annotations

from typing import Callable

from sail_dist.objectives.base import AllReduce, LossShare, Objective
from sail_dist.registry import Registry

OBJECTIVES = Registry("train.objective", {
    "sft": "sail_dist.objectives.sft:SFTObjective",
})


def register_objective(name: str, factory: str | Callable[[], Objective]) -> None:
    """Register an objective under `name` (a class / factory, or a lazy "module:Class" string)."""
    OBJECTIVES.register(name, factory)


def available_objectives() -> list[str]:
    return OBJECTIVES.names()


def build_objective(name: str) -> Objective:
    """A fresh instance of the objective registered as `name` (`train.objective`)."""
    return OBJECTIVES.get(name)()


__all__ = ["AllReduce", "LossShare", "OBJECTIVES", "Objective", "available_objectives", "build_objective",
           "register_objective"]
