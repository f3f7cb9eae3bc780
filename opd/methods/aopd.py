"""AOPD: policy gradient where the teacher favours the sampled token, teacher top-K forward KL where it does not."""

from __future__ import annotations

import torch

from opd.losses.divergences import generalized_jsd, masked_reduce
from opd.losses.sampled import policy_gradient_loss
from opd.losses.topk import FORWARD_MODES, topk_forward_kl
from opd.methods.base import LossOutput, Method
from opd.methods.common import (
    check_choice,
    check_k_fits,
    check_positive,
    check_unit,
    policy_logprobs,
    reward_logprobs,
)
from opd.models.scoring import token_logprobs
from opd.registry import METHODS
from opd.sampling.behaviour import StudentPolicy
from opd.types import RolloutBatch


@METHODS.register("aopd")
class AOPD(Method):
    """Asymmetric OPD (Jia et al., arXiv:2605.06387), Eq. 10: L = (1/|y|) Σ_t [G_t·L_t^FKL + (1−G_t)·L_t^OPD].

    Per completion token of a student rollout (Eqs. 1–2, 7, 9–11 as quoted by two audits):
        A_t     = sg[log p_T(y_t) − log q_old(y_t)]
        G_t     = 1[A_t ≤ τ]                                           (non-positive advantage: the teacher disagrees)
        L^OPD   = −A_t·q_θ(y_t)/q_old(y_t)                             (ratio form of −A_t·log q_θ; same gradient)
        L^FKL   = Σ_{v∈TopK(p_T)} p_T(v)(log p_T(v) − log q_θ(v))      (teacher top-K forward KL)
    Positive-advantage tokens keep the exploiting policy-gradient update; the others, whose PG update
    would only push the sampled token down (spreading its mass by the student's own prior), are pulled
    directly towards the teacher. Token sum over the step divided by its completion tokens (the paper's
    1/|y| per sequence becomes the step's token mean).

    Options and unverified choices (no PDF, no public code): ``divergence: jsd`` replaces L^FKL by the
    generalized JSD(β) of the two distributions renormalised on the teacher's top-K (the paper mentions
    JSD as an alternative; this form is ours). ``gate_on: prob_diff`` gates on p_T(y_t) − q_old(y_t) ≤ τ,
    the form in one note where τ = −1 recovers OPD and τ = 1 forward KL everywhere (GKD-like); with
    τ = 0 both gates agree. K, the top-K normalisation (``fkl_mode``; "raw" = the formula as quoted) and
    the optional PPO clip of L^OPD are ours.

    Sampling: temperature sampling only. The ratio and reward use the untruncated student's log-probs at the
    sampling temperature, which top-p/top-k samples are not drawn from, so top-p < 1 or top-k > 0 is
    refused at start-up (:meth:`Method.check_sampler`).

    Args:
        tau: gate threshold τ (default 0); any real with ``gate_on: log_ratio``, in [−1, 1] with ``prob_diff``.
        gate_on: "log_ratio" (A_t ≤ τ) or "prob_diff" (p_T(y_t) − q_old(y_t) ≤ τ).
        k: teacher top-K support size, >= 1 (must not exceed the vocabulary; checked at the first loss).
        divergence: gated-token loss, "fkl" (top-K forward KL) or "jsd" (top-K renormalised JSD(β)).
        fkl_mode: top-K forward KL estimator, "raw", "renorm" or "tail".
        jsd_beta: β in (0, 1) of the JSD option (0 / 1 would be forward / reverse KL).
        clip_eps: PPO clip range ε > 0 of L^OPD, or null (default: no clip).
        temperature: loss temperature of the teacher log-probs and of the gated divergence.
    """

    uses_sampled_token_logprobs = True

    def __init__(self, tau: float = 0.0, gate_on: str = "log_ratio", k: int = 16, divergence: str = "fkl",
                 fkl_mode: str = "raw", jsd_beta: float = 0.5, clip_eps: float | None = None,
                 temperature: float = 1.0) -> None:
        check_choice("gate_on", gate_on, ("log_ratio", "prob_diff"))
        if gate_on == "prob_diff" and not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [-1, 1] with gate_on=prob_diff (a probability difference), got {tau}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        check_choice("divergence", divergence, ("fkl", "jsd"))
        check_choice("fkl_mode", fkl_mode, FORWARD_MODES)
        check_unit("jsd_beta", jsd_beta, low_open=True, high_open=True)
        check_positive("clip_eps", clip_eps, allow_none=True)
        check_positive("temperature", temperature)
        self.tau, self.gate_on, self.k, self.divergence, self.fkl_mode = tau, gate_on, k, divergence, fkl_mode
        self.jsd_beta, self.clip_eps, self.temperature = jsd_beta, clip_eps, temperature
        self.policy = StudentPolicy()

    def gated_divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` the loss of gated tokens: top-K forward KL or top-K renormalised JSD."""
        if self.divergence == "fkl":
            return topk_forward_kl(student_logits, teacher_logits, self.k, self.fkl_mode, self.temperature)
        ids = teacher_logits.topk(self.k, dim=-1).indices
        return generalized_jsd(student_logits.gather(-1, ids), teacher_logits.gather(-1, ids), self.jsd_beta,
                               self.temperature)

    def check_vocabulary(self, vocab_size: int) -> None:
        check_k_fits(self.k, vocab_size)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        check_k_fits(self.k, student_logits.shape[-1])
        mask = batch.completion_mask
        logq, logq_old = policy_logprobs(batch, student_logits)
        logp_teacher = token_logprobs(teacher_logits, batch.completion_ids, self.temperature)
        logq_reward = reward_logprobs(batch, logq, logq_old)
        adv = logp_teacher - logq_reward
        gate_value = adv if self.gate_on == "log_ratio" else logp_teacher.exp() - logq_reward.exp()
        gated = (gate_value <= self.tau) & mask.bool()

        pg = policy_gradient_loss(logq, logq_old, adv, self.clip_eps)
        div = self.gated_divergence(student_logits, teacher_logits)
        pg_loss = masked_reduce(torch.where(gated, torch.zeros_like(pg), pg), mask, num_tokens)
        div_loss = masked_reduce(torch.where(gated, div, torch.zeros_like(div)), mask, num_tokens)
        return LossOutput(pg_loss + div_loss, {
            "aopd/pg_loss": pg_loss.item(),
            "aopd/fkl_loss": div_loss.item(),
            "aopd/fkl_fraction": gated.sum().item() / max(num_tokens, 1),
            "aopd/reverse_kl": masked_reduce(-adv, mask, num_tokens).item(),
        })
