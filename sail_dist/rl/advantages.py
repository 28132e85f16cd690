"""From rewards to advantages: group normalisation, DAPO's overlong shaping and dynamic sampling.

- `group_advantages`: GRPO / DAPO / GSPO outcome advantages without a critic: per prompt group of G rollouts,
  A_i = (r_i - mean(r)) / (std(r) + eps). `std` is the Bessel-corrected (unbiased, /(G-1)) standard deviation,
  as `torch.std` gives it and as veRL's `compute_grpo_outcome_advantage`, EasyR1 and TRL's GRPO trainer use; a
  group of one rollout has advantage 0. A group whose rewards are all equal has advantage 0 everywhere (no signal).
- `overlong_penalty`: DAPO's soft overlong punishment (DAPO paper, arXiv 2503.14476, eq. 13), added to the reward:

      R_length(y) = 0                                 if |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                  = -1                                if L_max < |y|

  with L_max = max_new_tokens and L_cache = the buffer, scaled by `penalty` (veRL / EasyR1 `overlong_penalty_factor`:
  `min(-(len - (L_max - L_cache)) / L_cache * factor, 0)`, the same line; a truncated response has |y| = L_max and
  gets -factor).
- `DynamicSampling`: DAPO's dynamic sampling: a group whose rewards are all equal (all right or all wrong) has zero
  advantage and only dilutes the batch, so it is dropped and more prompts are drawn (a new generation round) until
  the batch holds the wanted number of informative groups or the round limit is reached (veRL's
  `max_num_gen_batches`; here the episode then goes on with the groups it has, and the shortfall is reported).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import torch


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[P, G] rewards (P prompt groups of G rollouts) -> [P, G] advantages (r - mean) / (std + eps), float64.

    std is unbiased (Bessel, as torch.std / veRL / TRL); G = 1 gives 0."""
    r = rewards_PG.double()
    if r.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(r.shape)}")
    mean = r.mean(dim=1, keepdim=True)
    if r.shape[1] < 2:
        return torch.zeros_like(r)
    std = r.std(dim=1, unbiased=True, keepdim=True)
    return (r - mean) / (std + eps)


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment for a response of `length` tokens (eq. 13; 0 when `buffer` is 0)."""
    if buffer <= 0:
        return 0.0
    if buffer > max_new_tokens:
        raise ValueError(f"overlong buffer {buffer} exceeds max_new_tokens {max_new_tokens}")
    expected = max_new_tokens - buffer
    if length <= expected:
        return 0.0
    if length > max_new_tokens:
        return -penalty
    return (expected - length) / buffer * penalty


def informative(rewards: Sequence[float]) -> bool:
    """A group carries a learning signal when its rewards are not all equal."""
    return len(rewards) > 1 and max(rewards) != min(rewards)


G = TypeVar("G")


@dataclass
class SamplingRound(Generic[G]):
    """What dynamic sampling kept over an episode's generation rounds."""

    kept: list[G]  # informative groups, at most `want`, in draw order
    drawn: int = 0  # groups generated over all rounds
    dropped: int = 0  # groups dropped because all their rewards were equal
    surplus: int = 0  # informative groups generated beyond `want` (not trained: the batch is full)
    rounds: int = 0
    dropped_ids: list = field(default_factory=list)

    @property
    def drop_rate(self) -> float:
        return self.dropped / self.drawn if self.drawn else 0.0


class DynamicSampling:
    """Fill an episode with `want` informative groups, drawing at most `max_rounds` generation rounds.

    `draw(n) -> list[group]` generates n more prompt groups; `rewards_of(group)` gives a group's rewards. With
    `enabled=False` it is one round, nothing dropped (plain GRPO). Each round draws the number still missing."""

    def __init__(self, want: int, max_rounds: int, enabled: bool = True) -> None:
        if want < 1 or max_rounds < 1:
            raise ValueError(f"want ({want}) and max_rounds ({max_rounds}) must be >= 1")
        self.want, self.max_rounds, self.enabled = want, max_rounds, enabled

    def run(self, draw: Callable[[int], list[G]], rewards_of: Callable[[G], Sequence[float]],
            id_of: Callable[[G], object] = lambda g: None) -> SamplingRound[G]:
        out: SamplingRound[G] = SamplingRound(kept=[])
        while len(out.kept) < self.want and out.rounds < (self.max_rounds if self.enabled else 1):
            groups = draw(self.want - len(out.kept))
            out.rounds += 1
            if not groups:
                break  # the prompt source is exhausted
            out.drawn += len(groups)
            for g in groups:
                if self.enabled and not informative(rewards_of(g)):
                    out.dropped += 1
                    out.dropped_ids.append(id_of(g))
                elif len(out.kept) < self.want:
                    out.kept.append(g)
                else:
                    out.surplus += 1
        return out
