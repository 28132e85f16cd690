"""The RolloutEngine seam: what RL, evaluation and rejection sampling ask of a generator.

The built-in implementation is `sail_dist.rollout.sampler.Sampler` (the project's own model with a KV cache);
an external engine (vLLM, vllm-ascend serving the HF export) is one more class with the same two methods.

A prompt is a single-sample `PackedBatch` as `SampleBuilder.prompt` builds it (chat template up to the assistant
header, images as patches; labels unused). `generate` returns, per prompt, `n` completions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from sail_dist.data.batch import PackedBatch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()  # generation of a sequence ends after it emits one of these (kept in tokens)
    max_context: int = 0  # prompt + generation cap; 0 = none beyond the engine's own
    seed: int = 0  # with the same seed, prompts and n the completions are the same


@dataclass
class Completion:
    tokens: list[int]  # generated ids, the stop token included when one ended the sequence
    logprobs: list[float]  # the engine's log p(token) under the model at temperature 1 (for the mismatch figure)
    finish_reason: Literal["stop", "length", "context"]  # stop token / max_new_tokens / max_context reached
    extra: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[PackedBatch], params: SamplingParams, n: int = 1,
                 prompt_ids: list[int] | None = None) -> list[list[Completion]]:
        """`n` completions for each prompt (outer list in prompt order). `prompt_ids[i]` (default i) is the index
        prompts[i]'s random draws are keyed by with params.seed: completions are a function of (seed, prompt id,
        rollout index), so a batch split over ranks, each passing its prompts' indices in the whole batch,
        reproduces the one-call result (what the RL loop relies on when every DP rank generates its share)."""
        ...

    def update_weights(self, state_dict: dict) -> None:
        """Load the policy's current weights (full, unsharded names of SailVL.state_dict())."""
        ...
