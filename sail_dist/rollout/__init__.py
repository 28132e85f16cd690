"""Generation for RL rollouts, evaluation and rejection sampling, behind the RolloutEngine seam (engine.py)."""
from sail_dist.rollout.engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
