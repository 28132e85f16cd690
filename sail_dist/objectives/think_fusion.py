"""Think-Fusion SFT's dual target (SAIL-VL2 report, sec. 4.2, Eq. 3): learn the thought and the answer of a CoT
sample, only the answer of a direct one.

Per token t of a sample s, with m_t = 1 where the token has a label and, for a direct sample, its target is not in
the think block:

    m_t = [labels_t != -100] * (1 - thought_t * (1 - is_cot_s))

and the step objective, over every token of every micro-batch on every data-parallel rank,

    L = sum_t w_t * m_t * ce_t  /  sum_t w_t * m_t

where w_t is the data's reduction (`data.loss_reduction`) over the masked tokens of the sample: token 1,
sample 1/n_s, square 1/sqrt(n_s) with n_s = sum of m over s. For a direct sample the empty think block the
template writes (`<think>\\n\\n</think>`, Qwen3's non-thinking layout) is context, not target, so the model keeps
opening `<think>` by default and answers directly when the empty block is given; for a CoT sample the whole answer,
think block included, is the target. The report's Eq. 3 could not be read here (only the report's opening page is
stored); the normalisation above is the `sft` objective's token mean over the supervised tokens of the step (see
docs/data.md).

Inputs (built by SampleBuilder.collate under data.think_format=fusion): extras["thought_T"] (1 where the target
labels[t] is a think-block token, tags included) and extras["is_cot_S"] (1 for a CoT sample).
Metric "cot_fraction": the share of the step's samples (those with a supervised token) that are CoT: the realised
direct / CoT split (the 90 / 10 mix of the stage's two sources).
"""
from __future__ import annotations

import torch

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.data.template import reduction_weight
from sail_dist.model.sailvl import ModelOutput
from sail_dist.objectives.base import AllReduce, LossShare, Objective


def _seq_index(batch: PackedBatch, device: torch.device) -> torch.Tensor:
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long().to(device)
    return torch.repeat_interleave(torch.arange(batch.num_samples, device=device), lens)


class ThinkFusionObjective(Objective):
    name = "think_fusion"
    metrics = ("cot_fraction",)

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        self.reduction = cfg.data.loss_reduction if cfg is not None else "token"
        self.weight_sum = float("nan")
        self.n_samples = float("nan")

    def _marks(self, batch: PackedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_T per-token weight, seq_T sample index per token, has_S whether a sample has a target), in float64."""
        labelled_T = batch.labels.to(device) != -100
        if "thought_T" not in batch.extras or "is_cot_S" not in batch.extras:
            if bool(labelled_T.any()):
                raise RuntimeError("train.objective=think_fusion needs the batch's extras thought_T and is_cot_S, "
                                   "which SampleBuilder.collate builds under data.think_format=fusion: set it")
            z = torch.zeros(batch.num_tokens, dtype=torch.float64, device=device)
            return z, _seq_index(batch, device), torch.zeros(batch.num_samples, dtype=torch.float64, device=device)
        seq_T = _seq_index(batch, device)
        cot_T = batch.extras["is_cot_S"].to(device=device, dtype=torch.float64)[seq_T]
        thought_T = batch.extras["thought_T"].to(device=device, dtype=torch.float64)
        m_T = labelled_T.double() * (1.0 - thought_T * (1.0 - cot_T))
        n_S = torch.zeros(batch.num_samples, dtype=torch.float64, device=device).index_add(0, seq_T, m_T)
        w_S = reduction_weight(n_S.clamp_min(1.0), self.reduction)  # (samples with no target: m_T is 0 there)
        return m_T * w_S[seq_T], seq_T, (n_S > 0).double()

    def begin_step(self, micro_batches: list[PackedBatch], all_reduce: AllReduce) -> None:
        local = torch.zeros(2, dtype=torch.float64)
        for mb in micro_batches:
            w_T, _, has_S = self._marks(mb, torch.device("cpu"))
            local[0] += w_T.sum()
            local[1] += has_S.sum()
        self.weight_sum, self.n_samples = (float(v) for v in all_reduce(local))
        if self.weight_sum <= 0:
            raise RuntimeError("this optimizer step has no Think-Fusion target on any rank (no answer token in any "
                               "sample): check the data (assistant turns carry the labels)")

    def loss(self, out: ModelOutput, batch: PackedBatch) -> LossShare:
        ce_T = out.loss_T
        w_T, _, has_S = self._marks(batch, ce_T.device)
        loss = (ce_T * w_T.to(ce_T.dtype)).sum() / self.weight_sum
        cot_S = batch.extras["is_cot_S"].to(device=ce_T.device, dtype=torch.float64) if "is_cot_S" in batch.extras \
            else torch.zeros_like(has_S)
        cot = (cot_S * has_S).sum() / self.n_samples
        return LossShare(loss, {"cot_fraction": cot.to(ce_T.dtype).detach()})
