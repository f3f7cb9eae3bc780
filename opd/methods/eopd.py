"""EOPD: sampled-token reverse-KL OPD plus a teacher top-K forward KL where the teacher is uncertain."""

from __future__ import annotations

import torch

from opd.losses.divergences import entropy, masked_reduce
from opd.losses.sampled import policy_gradient_loss
from opd.losses.topk import FORWARD_MODES, topk_forward_kl
from opd.methods.base import LossOutput, Method
from opd.methods.common import check_choice, check_k_fits, check_positive, policy_logprobs, reward_logprobs
from opd.models.scoring import token_logprobs
from opd.registry import METHODS
from opd.sampling.behaviour import StudentPolicy
from opd.types import RolloutBatch


@METHODS.register("eopd")
class EOPD(Method):
    """Entropy-Aware OPD (Jin et al., ICML 2026, arXiv:2603.07079): L_t = L_t^OPD + α·1[H(p_T) > τ]·L_t^FKL.

    Per completion token of a student rollout (the paper's per-token objective as quoted by two
    independent audits, research notes §8.1; the PDF itself was not available):
        A_t     = sg[log p_T(y_t) − log q_old(y_t)]
        L^OPD   = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)),  ρ_t = q_θ(y_t)/q_old(y_t)   (clipped sampled-token RKL)
        H_t     = −Σ_v p_T(v) log p_T(v)                                                  (teacher entropy, nats)
        L^FKL   = Σ_{v∈TopK(p_T)} p_T(v)(log p_T(v) − log q_θ(v))                         (teacher top-K forward KL)
    Both terms act at high-entropy positions (an added term, not a switch from RKL to FKL, which is how
    some summaries describe it). Token sum over the step divided by its completion tokens.

    Unverified (official code ``WLS04/EOPD`` not readable here): τ, α, K, ε, and whether the top-K
    forward KL is renormalised or carries a tail bucket; the default ``fkl_mode: raw`` is the formula as
    quoted (unnormalised teacher mass; its gradient is the teacher-top-K-weighted cross-entropy),
    ``renorm`` and ``tail`` are the alternatives of :func:`topk_forward_kl`.

    Sampling: temperature sampling only. The ratio and reward use the untruncated student's log-probs at the
    sampling temperature, which top-p/top-k samples are not drawn from, so top-p < 1 or top-k > 0 is
    refused at start-up (:meth:`Method.check_sampler`).

    Args:
        tau: teacher-entropy threshold τ >= 0 in nats (at the loss temperature).
        alpha: weight α >= 0 of the gated forward-KL term.
        k: teacher top-K support size, >= 1 (must not exceed the vocabulary; checked at the first loss).
        clip_eps: PPO clip range ε > 0 of the OPD term, or null for the unclipped surrogate.
        fkl_mode: top-K forward KL estimator: "raw", "renorm" or "tail".
        temperature: loss temperature of the teacher log-probs, entropy and the forward-KL term.
    """

    uses_sampled_token_logprobs = True

    def __init__(self, tau: float = 0.5, alpha: float = 1.0, k: int = 16, clip_eps: float | None = 0.2,
                 fkl_mode: str = "raw", temperature: float = 1.0) -> None:
        if tau < 0:
            raise ValueError(f"tau must be >= 0 (an entropy in nats), got {tau}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        check_positive("clip_eps", clip_eps, allow_none=True)
        check_choice("fkl_mode", fkl_mode, FORWARD_MODES)
        check_positive("temperature", temperature)
        self.tau, self.alpha, self.k, self.clip_eps = tau, alpha, k, clip_eps
        self.fkl_mode, self.temperature = fkl_mode, temperature
        self.policy = StudentPolicy()

    def check_vocabulary(self, vocab_size: int) -> None:
        check_k_fits(self.k, vocab_size)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        check_k_fits(self.k, student_logits.shape[-1])
        mask = batch.completion_mask
        logq, logq_old = policy_logprobs(batch, student_logits)
        adv = token_logprobs(teacher_logits, batch.completion_ids, self.temperature) - reward_logprobs(batch, logq, logq_old)
        opd = policy_gradient_loss(logq, logq_old, adv, self.clip_eps)

        teacher_entropy = entropy(teacher_logits.detach(), self.temperature)
        gated = (teacher_entropy > self.tau) & mask.bool()
        fkl = topk_forward_kl(student_logits, teacher_logits, self.k, self.fkl_mode, self.temperature)
        fkl = torch.where(gated, fkl, torch.zeros_like(fkl))

        opd_loss = masked_reduce(opd, mask, num_tokens)
        fkl_loss = masked_reduce(fkl, mask, num_tokens)
        return LossOutput(opd_loss + self.alpha * fkl_loss, {
            "eopd/opd_loss": opd_loss.item(),
            "eopd/fkl_loss": fkl_loss.item(),
            "eopd/gated_fraction": gated.sum().item() / max(num_tokens, 1),
            "eopd/teacher_entropy": masked_reduce(teacher_entropy, mask, num_tokens).item(),
            "eopd/reverse_kl": masked_reduce(-adv, mask, num_tokens).item(),
        })
