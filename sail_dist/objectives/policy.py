"""Critic-free PPO-style policy losses for RL: DAPO (token level, dense models) and GSPO (sequence level, MoE).

Inputs per token on `PackedBatch.extras` (the RL loop sets them, sail_dist/rl/loop.py):
  old_logp [T]       log pi_old(y_t) of the rollout policy, recomputed by the trainer's own forward (0 off-response)
  advantage [T]      the sequence's group-normalised advantage on each of its response tokens (0 elsewhere)
  response_mask [T]  1 where the label is a response token (the policy acts), 0 on prompt / padding tokens
  ref_logp [T]       only with rl.loss.kl_coef > 0: the reference policy's log-probs (low-variance k3 KL penalty)
The current policy's log-probs are -out.loss_T (labels are the response tokens, prompt labels -100).

DAPO (arXiv 2503.14476; veRL `compute_policy_loss_vanilla`, EasyR1 `compute_policy_loss`), with r_t = exp(logp_t -
old_t): per token l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)) (clip-higher: 0.20 / 0.28); the step
loss is "token-mean": sum of l_t over every response token of the step / their number, both over all micro-batches
on all data-parallel ranks (`begin_step`), so it does not depend on how the step is split. Where the clip binds
(l from the clipped branch strictly above the other) the token's gradient is zero. `rl.loss.loss_agg=
seq-mean-token-mean` gives GRPO's per-sequence mean instead.

GSPO (arXiv 2507.18071, section 4, "GSPO-token" form; veRL `compute_policy_loss_gspo`): the sequence ratio
s_i = exp(mean_{t in y_i} (logp_t - old_t)) (the geometric mean of the token ratios), clipped at the sequence
level with eps 3e-4 / 4e-4. Per token s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)] has the value s_i and the gradient
s_i * grad logp_t; l_i = mean_t max(-A_i s_i,t, -A_i clip(s_i,t, ...)), so grad l_i = -A_i grad s_i when
unclipped (the sequence-level objective's gradient) and 0 when the clip binds. The step loss is sum_i l_i over
the step's sequences / their number. The log ratio is clamped at 10 before exp (veRL) against overflow.

Metrics (step values; each micro-batch returns its share): pg_loss (the policy term, without KL), clip_frac (DAPO:
fraction of response tokens where the clip binds; GSPO: fraction of sequences), approx_kl (k3 estimate of
KL(pi_old || pi) = mean (r - 1) - log r over response tokens, r = pi / pi_old), ratio_mean (mean token ratio), kl_ref
(k3 KL to the reference, 0 when off), response_tokens and sequences (counts of the step).
"""
from __future__ import annotations

import torch

from sail_dist.config import Config
from sail_dist.data.batch import PackedBatch
from sail_dist.model.sailvl import ModelOutput
from sail_dist.objectives.base import AllReduce, LossShare, Objective

EXTRAS = ("old_logp", "advantage", "response_mask")


def _seq_index(batch: PackedBatch, device) -> torch.Tensor:
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long().to(device)
    return torch.repeat_interleave(torch.arange(batch.num_samples, device=device), lens)


def _check_extras(batch: PackedBatch, need_ref: bool) -> None:
    need = EXTRAS + (("ref_logp",) if need_ref else ())
    missing = [k for k in need if k not in batch.extras]
    if missing:
        raise KeyError(f"policy loss: micro-batch {batch.sample_ids[:3]}... lacks extras {missing}; the RL loop "
                       "(sail_dist/rl/loop.py) sets old_logp / advantage / response_mask (and ref_logp when "
                       "rl.loss.kl_coef > 0)")


def k3(logp: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(other || pi) per token, samples from `other`: exp(d) - 1 - d, d = logp - other."""
    d = logp - other
    return torch.exp(d) - 1.0 - d


class _PolicyObjective(Objective):
    metrics = ("pg_loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref", "response_tokens", "sequences")

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        from sail_dist.config import PolicyLossConfig

        self.knobs: PolicyLossConfig = cfg.rl.loss if cfg is not None else PolicyLossConfig()
        self.n_tokens = self.n_seqs = float("nan")

    def begin_step(self, micro_batches: list[PackedBatch], all_reduce: AllReduce) -> None:
        tok = seq = 0.0
        for mb in micro_batches:
            _check_extras(mb, self.knobs.kl_coef > 0)
            m = mb.extras["response_mask"].double()
            tok += float(m.sum())
            per_seq = torch.zeros(mb.num_samples, dtype=torch.float64).index_add(0, _seq_index(mb, m.device), m)
            seq += float((per_seq > 0).sum())
        local = torch.tensor([tok, seq], dtype=torch.float64)
        self.n_tokens, self.n_seqs = (float(x) for x in all_reduce(local).tolist())
        if self.n_tokens <= 0:
            raise RuntimeError("this RL step has no response token on any rank (response_mask all 0): every "
                               "rollout was empty or dropped")

    def _common(self, out: ModelOutput, batch: PackedBatch):
        logp = -out.loss_T
        dt = logp.dtype
        mask = batch.extras["response_mask"].to(dt)
        old = batch.extras["old_logp"].to(dt)
        adv = batch.extras["advantage"].to(dt)
        return logp, mask, old, adv

    def _extra_metrics(self, logp, mask, old, batch) -> tuple[torch.Tensor, dict]:
        """KL-to-reference term (token-mean over the step) and the shared metrics."""
        lr = (logp - old).detach()
        kl_loss = logp.new_zeros(())
        kl_ref = logp.new_zeros(())
        if self.knobs.kl_coef > 0:
            ref = batch.extras["ref_logp"].to(logp.dtype)
            kl_T = k3(ref, logp).clamp(-10, 10)  # KL(pi || ref), samples from pi (veRL low_var_kl)
            kl_loss = self.knobs.kl_coef * (kl_T * mask).sum() / self.n_tokens
            kl_ref = (kl_T.detach() * mask).sum() / self.n_tokens
        m = {"approx_kl": (k3(lr, torch.zeros_like(lr)) * mask).sum() / self.n_tokens,
             "ratio_mean": (torch.exp(lr) * mask).sum() / self.n_tokens, "kl_ref": kl_ref,
             "response_tokens": mask.sum().detach(),
             "sequences": (torch.zeros(batch.num_samples, dtype=mask.dtype, device=mask.device)
                           .index_add(0, _seq_index(batch, mask.device), mask) > 0).sum().to(mask.dtype)}
        return kl_loss, m


class DAPOObjective(_PolicyObjective):
    """DAPO: token-level clip-higher PPO loss, token-mean over all response tokens of the step."""

    name = "dapo"

    def loss(self, out: ModelOutput, batch: PackedBatch) -> LossShare:
        logp, mask, old, adv = self._common(out, batch)
        eps_low, eps_high = self.knobs.dapo_clip
        ratio = torch.exp(logp - old)
        l1 = -adv * ratio
        l2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        l_T = torch.maximum(l1, l2)
        clipped = (l2 > l1).to(logp.dtype) * mask
        if self.knobs.loss_agg == "token-mean":
            pg = (l_T * mask).sum() / self.n_tokens
        else:  # seq-mean-token-mean
            seq = _seq_index(batch, logp.device)
            zeros = torch.zeros(batch.num_samples, dtype=logp.dtype, device=logp.device)
            n_S = zeros.index_add(0, seq, mask)
            pg = (zeros.index_add(0, seq, l_T * mask) / n_S.clamp_min(1.0)).sum() / self.n_seqs
        kl_loss, m = self._extra_metrics(logp, mask, old, batch)
        return LossShare(pg + kl_loss, {"pg_loss": pg.detach(), "clip_frac": clipped.sum() / self.n_tokens, **m})


class GSPOObjective(_PolicyObjective):
    """GSPO: sequence-level importance ratio (geometric mean of token ratios) and clipping, mean over sequences."""

    name = "gspo"

    def loss(self, out: ModelOutput, batch: PackedBatch) -> LossShare:
        logp, mask, old, adv = self._common(out, batch)
        eps_low, eps_high = self.knobs.gspo_clip
        seq = _seq_index(batch, logp.device)
        zeros = torch.zeros(batch.num_samples, dtype=logp.dtype, device=logp.device)
        n_S = zeros.index_add(0, seq, mask)
        has_S = (n_S > 0).to(logp.dtype)
        n_S = n_S.clamp_min(1.0)
        log_s_S = zeros.index_add(0, seq, (logp - old) * mask) / n_S  # log of the geometric-mean ratio
        adv_S = zeros.index_add(0, seq, adv * mask) / n_S
        # GSPO-token: value s_i on every token, gradient s_i * grad logp_t
        log_s_T = (logp - logp.detach() + log_s_S.detach()[seq]).clamp(max=10.0)
        s_T = torch.exp(log_s_T)
        a_T = adv_S[seq]
        l1 = -a_T * s_T
        l2 = -a_T * s_T.clamp(1.0 - eps_low, 1.0 + eps_high)
        l_T = torch.maximum(l1, l2)
        l_S = zeros.index_add(0, seq, l_T * mask) / n_S
        pg = l_S.sum() / self.n_seqs
        s_S = torch.exp(log_s_S.detach())
        clipped_S = ((s_S < 1.0 - eps_low) & (adv_S < 0) | (s_S > 1.0 + eps_high) & (adv_S > 0)).to(logp.dtype)
        kl_loss, m = self._extra_metrics(logp, mask, old, batch)
        return LossShare(pg + kl_loss, {"pg_loss": pg.detach(), "clip_frac": (clipped_S * has_S).sum() / self.n_seqs,
                                        **m})
