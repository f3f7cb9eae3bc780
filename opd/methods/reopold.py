"""REOPOLD: sampled-token OPD as policy optimisation with a floored reward and an entropy-guided token mask."""

from __future__ import annotations

import math

import torch

from opd.losses.divergences import entropy, masked_reduce
from opd.losses.sampled import policy_gradient_loss
from opd.methods.base import LossOutput, Method
from opd.methods.common import (
    NORMALIZATIONS,
    check_choice,
    check_positive,
    check_unit,
    policy_logprobs,
    reward_logprobs,
    selected_mean,
    server_temperature_blocker,
    teacher_token_logprobs,
    top_fraction_mask,
)
from opd.registry import METHODS
from opd.sampling.behaviour import StudentPolicy
from opd.types import RolloutBatch, SparseTeacherLogprobs


@METHODS.register("reopold")
class REOPOLD(Method):
    """Relaxed On-Policy Distillation (Ko et al., arXiv:2603.11137), Eqs. 4–8 / Alg. 1, as quoted by two audits.

    Stop-gradient OPD is policy optimisation with the token reward R_t = sg[log p_T(y_t) − log q_old(y_t)]
    (Remark 3.1). REOPOLD maximises Σ_t ρ_t·R̂_t·M_t with
        R̂_t = max(R_t, log(λ/(1−λ)))              (mixture-based reward clipping: floors negative rewards)
        M_t  = 1 for the highest-entropy tokens     (entropy-guided dynamic sampling, keep fraction k)
        ρ_t  = q_θ(y_t)/q_old(y_t)                  (θ_old ← θ every step, Alg. 1; optionally PPO-clipped)
    i.e. per token the loss max(−R̂_t·ρ_t, −R̂_t·clip(ρ_t, 1−ε, 1+ε)) on kept tokens.

    Unverified (no PDF, no public code): λ, the mask fraction, which entropy (student here by default,
    teacher as an option), the mask scope (the micro-batch's tokens here; per sequence as an option),
    and the normalisation. ``normalize: kept`` divides the kept-token sum by k·N (N = the step's completion
    tokens): about the mean over kept tokens; ``all`` by N. Not implemented: the two-stage
    exploration-to-refinement schedule (weaker negative rewards early, sharper later); run it as two
    runs (resume from the first with a smaller λ / larger keep fraction).

    With ``entropy_source: student`` it needs only log p_T(y_t): runs from a teacher server
    (``teacher=vllm_server``, temperature 1).

    Sampling: temperature sampling only. The ratio and reward use the untruncated student's log-probs at the
    sampling temperature, which top-p/top-k samples are not drawn from, so top-p < 1 or top-k > 0 is
    refused at start-up (:meth:`Method.check_sampler`).

    Args:
        lmbda: λ in [0, 1); the reward floor is log(λ/(1−λ)) (λ = 0: no floor; λ > 0.5 gives a positive floor).
        keep_fraction: fraction k in (0, 1] of highest-entropy tokens that train (1 = no mask).
        entropy_source: whose entropy ranks the tokens, "student" or "teacher".
        mask_scope: rank over the micro-batch's tokens ("batch") or within each sequence ("sequence").
        normalize: "kept" or "all" (see above).
        clip_eps: PPO clip range ε > 0, or null for the unclipped ratio.
        temperature: loss temperature of the teacher log-probs and of the entropy.
    """

    uses_sampled_token_logprobs = True
    batch_dependent = {"mask_scope": "sequence"}  # mask_scope=batch ranks the micro-batch's tokens
    teacher_inputs = "sparse"

    def __init__(self, lmbda: float = 0.17, keep_fraction: float = 0.5, entropy_source: str = "student",
                 mask_scope: str = "batch", normalize: str = "kept", clip_eps: float | None = 0.2,
                 temperature: float = 1.0) -> None:
        check_unit("lmbda", lmbda, high_open=True)
        check_unit("keep_fraction", keep_fraction, low_open=True)
        check_choice("entropy_source", entropy_source, ("student", "teacher"))
        check_choice("mask_scope", mask_scope, ("batch", "sequence"))
        check_choice("normalize", normalize, NORMALIZATIONS)
        check_positive("clip_eps", clip_eps, allow_none=True)
        check_positive("temperature", temperature)
        self.lmbda, self.keep_fraction, self.entropy_source = lmbda, keep_fraction, entropy_source
        self.mask_scope, self.normalize, self.clip_eps, self.temperature = mask_scope, normalize, clip_eps, temperature
        self.floor = math.log(lmbda / (1.0 - lmbda)) if lmbda > 0 else float("-inf")
        self.policy = StudentPolicy()

    def teacher_input_blocker(self, output: str) -> str | None:
        reason = super().teacher_input_blocker(output)
        if reason or output != "sparse":
            return reason
        if self.entropy_source == "teacher":
            return "method.entropy_source=teacher needs the teacher's full distribution; use entropy_source=student"
        return server_temperature_blocker(self.temperature)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor | SparseTeacherLogprobs | None, num_tokens: int) -> LossOutput:
        mask = batch.completion_mask
        real = mask.bool()
        logq, logq_old = policy_logprobs(batch, student_logits)
        reward = teacher_token_logprobs(teacher_logits, batch.completion_ids, self.temperature) - reward_logprobs(
            batch, logq, logq_old)
        clipped = (reward < self.floor) & real
        reward_hat = reward.clamp(min=self.floor)

        if self.entropy_source == "teacher" and isinstance(teacher_logits, SparseTeacherLogprobs):
            raise ValueError(f"reopold: {self.teacher_input_blocker('sparse')}")
        ranked = student_logits if self.entropy_source == "student" else teacher_logits
        keep = top_fraction_mask(entropy(ranked.detach(), self.temperature), mask, self.keep_fraction,
                                 per_sequence=self.mask_scope == "sequence")
        per_token = policy_gradient_loss(logq, logq_old, reward_hat, self.clip_eps)
        loss = selected_mean(per_token, keep, num_tokens, self.keep_fraction, self.normalize)
        denom = max(num_tokens, 1)
        return LossOutput(loss, {"reopold/clipped_fraction": clipped.sum().item() / denom,
                                 "reopold/kept_fraction": keep.sum().item() / denom,
                                 "reopold/reward_mean": masked_reduce(reward, mask, num_tokens).item()})
