"""MiniLLM: sequence-level reverse KL by policy gradient on teacher-mixed samples."""

from __future__ import annotations

import torch

from opd.losses.divergences import forward_kl, masked_reduce, reverse_kl
from opd.losses.sampled import discounted_returns, masked_whiten, policy_gradient_loss
from opd.methods.base import AuxiliaryContext, LossOutput, Method
from opd.methods.common import check_positive, check_unit, completion_cross_entropy, policy_logprobs
from opd.models.scoring import token_logprobs
from opd.registry import METHODS
from opd.sampling.behaviour import TeacherMixedPolicy
from opd.sampling.tokenize import encode_targets
from opd.types import RolloutBatch


@METHODS.register("minillm")
class MiniLLM(Method):
    """MiniLLM (Gu et al., ICLR 2024, arXiv:2306.08543): reverse KL(q_θ‖p_T) minimised by policy gradient.

    Per completion token t of a rollout drawn from the teacher-mixed p̃ = α·p_T + (1−α)·q_θ (Eq. 4,
    :class:`TeacherMixedPolicy`), with q_old the student when it sampled:
        r_t      = log p_T(y_t) − log q_old(y_t)                          (reward, Eq. 2)
        R_{t+1}  = (1/n) Σ_{t'>t} γ^{t'−t−1} r_{t'}, n = tokens summed    (length-normalised return, Eq. 6)
        A_t      = whiten(R_{t+1}) over the batch's real tokens, detached
        w_t      = q_old(y_t) / p̃(y_t)                                   (single-step importance weight, after Eq. 4)
        ρ_t      = exp(log q_θ(y_t) − log q_old(y_t)) · w_t
        L_pg     = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))               (PPO clip ε = 0.2)
        L_reg    = w_t · Σ_v q_θ(v)(log q_θ(v) − log p_T(v))              (exact single-step term, Eq. 3)
    summed over real completion tokens and divided by the step's token count (the code's token mean).

    Paper (default) vs official code (``microsoft/LMOps/minillm``), each code behaviour an option:
      * γ: Eq. 6 has no discount (``gamma: 1.0``); the code uses ``--gamma 0.95``.
      * return: the paper's R_{t+1} excludes r_t (whose gradient the exact single-step term carries);
        the code sums from r_t itself (``include_current_reward: true``).
      * single-step term: the paper's final gradient multiplies it by w_t; the code does not
        (``reg_importance_weighted: false``).
      * rewards: the paper uses them as they are; the scripts divide by ``--reward-scaling 0.5`` and clip
        to ±``--cliprange-reward 100`` (``reward_scaling: 0.5``, ``reward_clip: 100``). With whitening on,
        the scaling cancels (up to the whitening epsilon).
      * whitening: the code whitens the advantage (not stated in the paper; on here, over real tokens
        only, which also removes the code's leak of padding positions into the statistics).
      * L_PT: the paper adds a pretraining LM loss on a plain-text corpus, the code (1−kd_ratio)·CE +
        kd_ratio·word-level forward KL on it with ``--lm-coef 1`` and kd_ratio 0.5 (``lm_kd_ratio``). Our
        tasks ship no pretraining corpus, so the term is computed on the task's reference completions of
        the same prompts (teacher-forced), the token mean over each global micro-batch (all processes) divided
        by the accumulation steps, so N processes give the single-process value; off by default (``lm_coef: 0``).
    Not reproduced: the code's 4 PPO epochs over a 256-rollout store; here each rollout batch is used
    for one update (so ρ_t = w_t up to sampling-time vs training-time numerics).

    Sampling: temperature sampling only. The ratio and reward use the untruncated student's log-probs at the
    sampling temperature, and the teacher-mixed decoding draws from the untruncated mixture (it would ignore
    ``sampler.top_p``/``top_k``), so top-p < 1 or top-k > 0 is refused at start-up (:meth:`Method.check_sampler`).

    Args:
        alpha: teacher weight α of the sampling mixture, in [0, 1] (0.2 in all experiments).
        gamma: discount γ in [0, 1].
        include_current_reward: the return at t includes r_t (code) or starts at t+1 (paper).
        length_normalize: divide each return by the number of rewards it sums (Eq. 6; always on in the code).
        whiten_advantages: whiten the returns over the micro-batch's real tokens.
        clip_eps: PPO clip range ε > 0, or null for the unclipped importance-weighted surrogate.
        single_step_reg: add the exact single-step reverse-KL term L_reg.
        reg_importance_weighted: multiply L_reg by w_t (paper) or not (code).
        reward_scaling: rewards are divided by it (> 0).
        reward_clip: rewards are clipped to ±reward_clip after scaling, or null for no clip.
        lm_coef: weight of the LM term L_PT (0 = off; the official scripts use 1).
        lm_kd_ratio: share of word-level forward KL (vs cross-entropy) inside L_PT, in [0, 1] (code: 0.5).
        temperature: loss temperature for the teacher log-probs and L_reg (the code divides all logits by
            the sampling temperature: keep it equal to ``sampler.temperature``).
    """

    uses_sampled_token_logprobs = True
    batch_dependent = {"whiten_advantages": False}  # whitening statistics of one micro-batch

    def __init__(self, alpha: float = 0.2, gamma: float = 1.0, include_current_reward: bool = False,
                 length_normalize: bool = True, whiten_advantages: bool = True, clip_eps: float | None = 0.2,
                 single_step_reg: bool = True, reg_importance_weighted: bool = True, reward_scaling: float = 1.0,
                 reward_clip: float | None = None, lm_coef: float = 0.0, lm_kd_ratio: float = 0.5,
                 temperature: float = 1.0) -> None:
        check_unit("alpha", alpha)
        check_unit("gamma", gamma)
        check_positive("clip_eps", clip_eps, allow_none=True)
        check_positive("reward_scaling", reward_scaling)
        check_positive("reward_clip", reward_clip, allow_none=True)
        check_positive("temperature", temperature)
        if lm_coef < 0:
            raise ValueError(f"lm_coef must be >= 0, got {lm_coef}")
        check_unit("lm_kd_ratio", lm_kd_ratio)
        self.lm_coef, self.lm_kd_ratio = lm_coef, lm_kd_ratio
        self.alpha, self.gamma, self.include_current_reward = alpha, gamma, include_current_reward
        self.length_normalize, self.whiten_advantages, self.clip_eps = length_normalize, whiten_advantages, clip_eps
        self.single_step_reg, self.reg_importance_weighted = single_step_reg, reg_importance_weighted
        self.reward_scaling, self.reward_clip, self.temperature = reward_scaling, reward_clip, temperature
        self.policy = TeacherMixedPolicy(alpha)

    @staticmethod
    def importance_weights(batch: RolloutBatch) -> torch.Tensor:
        """``[B, T]`` w_t = q_old(y_t)/p̃(y_t) from the sampler's records; 1 at padding or without a mixture record."""
        mask = batch.completion_mask.bool()
        mix = batch.extras.get("mix_logprobs")
        if mix is None or batch.sampler_logprobs is None:
            return torch.ones(mask.shape, device=mask.device)
        w = torch.exp(batch.sampler_logprobs.float() - mix.float())
        return torch.where(mask, w, torch.ones_like(w))

    def advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` detached advantages from per-token rewards (returns, then optional whitening); 0 at padding."""
        returns = discounted_returns(rewards, mask, gamma=self.gamma, length_normalize=self.length_normalize,
                                     include_current=self.include_current_reward)
        return (masked_whiten(returns, mask) if self.whiten_advantages else returns).detach()

    def auxiliary_loss(self, batch: RolloutBatch, ctx: AuxiliaryContext) -> LossOutput | None:
        """L_PT on the reference completions of the batch's prompts: lm_coef·((1−r)·CE + r·FKL), r = lm_kd_ratio."""
        if self.lm_coef == 0:
            return None
        lm_batch = encode_targets(ctx.tokenizer, batch.examples, ctx.device)
        student_logits = ctx.student_logits(lm_batch)
        # the global micro-batch's token mean (all ranks), averaged over the step's micro-batches
        tokens = ctx.sum_over_ranks(lm_batch.num_tokens) * ctx.grad_accum
        ce = completion_cross_entropy(lm_batch, student_logits, tokens)
        term = (1.0 - self.lm_kd_ratio) * ce
        metrics = {"minillm/lm_ce": ce.item()}
        if self.lm_kd_ratio > 0:
            fkl = masked_reduce(forward_kl(student_logits, ctx.teacher_logits(lm_batch), self.temperature),
                                lm_batch.completion_mask, tokens)
            term = term + self.lm_kd_ratio * fkl
            metrics["minillm/lm_fkl"] = fkl.item()
        loss = self.lm_coef * term
        metrics["minillm/lm_loss"] = loss.item()
        return LossOutput(loss, metrics)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        mask = batch.completion_mask
        logq, logq_old = policy_logprobs(batch, student_logits)
        logp_teacher = token_logprobs(teacher_logits, batch.completion_ids, self.temperature)
        raw_rewards = logp_teacher - logq_old
        rewards = raw_rewards / self.reward_scaling
        if self.reward_clip is not None:
            rewards = rewards.clamp(-self.reward_clip, self.reward_clip)
        adv = self.advantages(rewards, mask)
        w = self.importance_weights(batch)

        pg_loss = masked_reduce(policy_gradient_loss(logq, logq_old, adv, self.clip_eps, w), mask, num_tokens)
        reg = reverse_kl(student_logits, teacher_logits, self.temperature)
        if self.reg_importance_weighted:
            reg = reg * w
        reg_loss = masked_reduce(reg, mask, num_tokens)
        loss = pg_loss + reg_loss if self.single_step_reg else pg_loss
        return LossOutput(loss, {
            "minillm/pg_loss": pg_loss.item(),
            "minillm/reg_loss": reg_loss.item(),
            "minillm/reward_mean": masked_reduce(raw_rewards.detach(), mask, num_tokens).item(),
            "minillm/is_weight_mean": masked_reduce(w, mask, num_tokens).item(),
        })
