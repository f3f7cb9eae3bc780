"""On-policy distillation as RL with a per-token reverse-KL advantage (Thinking Machines / Tinker cookbook)."""

from __future__ import annotations

import torch

from opd.losses.divergences import masked_reduce
from opd.losses.sampled import discounted_returns, policy_gradient_loss, sampled_log_ratio
from opd.methods.base import LossOutput, Method
from opd.methods.common import (
    check_positive,
    check_unit,
    policy_logprobs,
    reward_logprobs,
    server_temperature_blocker,
    teacher_token_logprobs,
)
from opd.registry import METHODS
from opd.sampling.behaviour import StudentPolicy
from opd.types import RolloutBatch, SparseTeacherLogprobs


@METHODS.register("tm_opd")
class TMOPD(Method):
    """On-policy distillation (Lu et al., Thinking Machines blog "On-Policy Distillation", Oct 2025; tinker-cookbook).

    Blog/recipe (``distillation/train_on_policy.py::incorporate_kl_penalty`` and the
    ``importance_sampling`` loss): the student samples, the teacher scores the sampled tokens, and the
    per-token sampled reverse KL becomes a negative advantage:
        A_t  = −c · (log q_old(y_t) − log p_T(y_t))                       (detached; c = kl_coef)
        L_t  = −exp(log q_θ(y_t) − log q_old(y_t)) · A_t                  (unclipped importance sampling)
    with q_old the sampler's probability. With ``kl_discount_factor`` γ > 0 the advantage is replaced by
    the discounted future sum Σ_{t'≥t} γ^{t'−t} A_{t'} (the recipe's option; default 0, "we generally do
    not observe this to improve performance"). Token sum over the step divided by its completion tokens.
    The expected gradient is the per-token reverse-KL gradient; at ratio 1 it is −A_t·∇log q_θ(y_t).
    No paper/code disagreement: the blog describes the cookbook's loss.

    Stale rollouts (``trainer.max_staleness > 0``, docs/methods.md): the ratio is PPO-clipped at ``clip_eps`` (required
    then) and the advantage's log q is the current student's, log q_θ(y_t) detached
    (:func:`~opd.methods.common.reward_logprobs`); on fresh rollouts both are as above.

    Needs only log p_T(y_t): runs from a teacher server (``teacher=vllm_server``, any
    ``teacher.server_top_k``, temperature 1).

    Sampling: temperature sampling only. The ratio and reward use the untruncated student's log-probs at the
    sampling temperature, which top-p/top-k samples are not drawn from, so top-p < 1 or top-k > 0 is
    refused at start-up (:meth:`Method.check_sampler`).

    Args:
        kl_coef: c > 0, the weight of the reverse-KL advantage (recipe ``kl_penalty_coef`` 1.0).
        kl_discount_factor: γ in [0, 1]; 0 = per-token advantage (recipe default).
        clip_eps: PPO clip range ε > 0 of the ratio, or null for the recipe's unclipped importance sampling (exact
            on fresh rollouts, where the ratio is 1; stale ones, ``trainer.max_staleness > 0``, need the clip).
        temperature: loss temperature of the teacher's log-probs (the recipe scores at 1).
    """

    uses_sampled_token_logprobs = True
    teacher_inputs = "sparse"

    def __init__(self, kl_coef: float = 1.0, kl_discount_factor: float = 0.0, temperature: float = 1.0,
                 clip_eps: float | None = None) -> None:
        check_positive("kl_coef", kl_coef)
        check_unit("kl_discount_factor", kl_discount_factor)
        check_positive("temperature", temperature)
        check_positive("clip_eps", clip_eps, allow_none=True)
        self.kl_coef, self.kl_discount_factor, self.temperature = kl_coef, kl_discount_factor, temperature
        self.clip_eps = clip_eps
        self.policy = StudentPolicy()

    def teacher_input_blocker(self, output: str) -> str | None:
        reason = super().teacher_input_blocker(output)
        return reason if reason or output != "sparse" else server_temperature_blocker(self.temperature)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor | SparseTeacherLogprobs | None, num_tokens: int) -> LossOutput:
        mask = batch.completion_mask
        logq, logq_old = policy_logprobs(batch, student_logits)
        logp_teacher = teacher_token_logprobs(teacher_logits, batch.completion_ids, self.temperature)
        reverse_kl = sampled_log_ratio(reward_logprobs(batch, logq, logq_old), logp_teacher)
        adv = -self.kl_coef * reverse_kl
        if self.kl_discount_factor > 0:
            adv = discounted_returns(adv, mask, gamma=self.kl_discount_factor, include_current=True)
        loss = masked_reduce(policy_gradient_loss(logq, logq_old, adv, self.clip_eps), mask, num_tokens)
        return LossOutput(loss, {"tm_opd/reverse_kl": masked_reduce(reverse_kl, mask, num_tokens).item(),
                                 "tm_opd/advantage_mean": masked_reduce(adv, mask, num_tokens).item()})
