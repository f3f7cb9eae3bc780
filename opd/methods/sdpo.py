"""SDPO: reinforcement learning with a self-distillation term from the model re-prompted with feedback."""

from __future__ import annotations

import dataclasses

import torch

from opd.losses.divergences import masked_reduce
from opd.losses.sampled import policy_gradient_loss
from opd.losses.self_distillation import MODES
from opd.methods.base import LossOutput, Method
from opd.methods.common import (
    check_choice,
    check_positive,
    check_template,
    check_unit,
    policy_logprobs,
    privileged_prompt,
)
from opd.methods.sdft import SELF_TEACHERS, self_distillation_terms
from opd.registry import METHODS
from opd.sampling.behaviour import StudentPolicy
from opd.sampling.tokenize import encode_prompts
from opd.types import Example, RolloutBatch

#: how rewards are scaled into advantages (TRL ``scale_rewards``): by the group's standard deviation, the batch's, or not
REWARD_SCALINGS = ("group", "batch", "none")
#: added to the standard deviation before dividing (TRL's GRPO constant)
STD_EPS = 1e-4


@dataclasses.dataclass
class GroupContext:
    """What SDPO reads off a batch of grouped rollouts (rows of one prompt next to each other, ``sampler.n`` each).

    Attributes:
        rewards: ``[B]`` the task's score of each completion.
        advantages: ``[B]`` (reward − its group's mean) / (the scale + 1e-4).
        reprompts: per row, the teacher's prompt text, or None where the row has neither a successful sibling nor
            feedback (its self-distillation term is then left out).
        successful_groups: groups with at least one reward >= the success threshold.
        groups: groups in the batch.
    """

    rewards: torch.Tensor
    advantages: torch.Tensor
    reprompts: list[str | None]
    successful_groups: int
    groups: int


def group_bounds(examples: list[Example]) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the runs of equal consecutive examples: the groups of a sampler's ``n`` rows per prompt."""
    bounds, start = [], 0
    for i in range(1, len(examples) + 1):
        if i == len(examples) or examples[i] != examples[start]:
            bounds.append((start, i))
            start = i
    return bounds


@METHODS.register("sdpo")
class SDPO(Method):
    """SDPO, Self-Distilled Policy Optimization (Hübotter et al., arXiv:2601.20802, "Reinforcement Learning via
    Self-Distillation"): a group-relative policy gradient whose dense signal comes from the model itself, re-prompted
    with what its group learnt: a sibling's successful answer, or the task checker's feedback on its own failed one.

        L(θ) = (1 − w)·L_PG(θ) + w·L_SD(θ)
        L_PG = −Σ_t min(r_t·A, clip(r_t, 1 − ε, 1 + ε)·A),  r_t = q_θ(y_t)/q_old(y_t),  A = (R − mean_g R)/(std_g R + 1e-4)
        L_SD = Σ_t m · D_α(q_θ(·|x, ŷ_<t), sg[π(·|x', ŷ_<t)])          (the SDFT term, :func:`self_distillation_terms`)

    with R the task's reward (``Task.score``, the reasoning_gym verifier's for ``data=gym``), groups the ``sampler.n``
    rows of one prompt, x' the reprompt and m = 1 on rows that have one. The reprompt of row i (TRL 1.16's
    ``SDPOTrainer``): ``solution_template`` around the first sibling j ≠ i with R_j >= ``success_threshold`` (i itself
    too unless ``dont_reprompt_on_self_success``), and, for a failed row, ``feedback_template`` around the checker's
    feedback (``Task.feedback``: "Incorrect: ...; the expected answer is X"), both inside ``reprompt_template``.

    Defaults are TRL's ``SDPOConfig`` (w = 1, sampled-token reverse KL, IS clip 2, ε = 0.2, the EMA teacher) except
    ``include_feedback``: TRL reads feedback from a dataset column and is off by default; here it is the task's own
    checker and on, so a prompt whose group has no success still gets a teacher. Normalisation: both terms are token
    means over the step's completion tokens (TRL's ``loss_type="dapo"`` for L_PG; it averages L_SD per sequence).
    Set ``sampler.n`` (TRL ``num_generations`` 8): with one row per prompt every advantage is 0 and only feedback
    reprompts remain.

    Args:
        teacher_model: the teacher kind: ``ema`` (default), ``initial_student`` or ``live``.
        distillation_weight: w in [0, 1]; 0 = the plain group-relative policy gradient (SDPO's own baseline).
        mode, top_k, tail, alpha, is_clip: the self-distillation term, as in SDFT (opd/methods/sdft.py).
        clip_eps: PPO clip range ε of the policy term.
        scale_rewards: "group", "batch" (the micro-batch's std) or "none".
        success_threshold: a reward at or above it is a success (a demonstration for its siblings).
        dont_reprompt_on_self_success: a row is never its own demonstration.
        include_feedback: a failed row's reprompt carries the checker's feedback.
        feedback_only_without_solution: feedback only when no sibling succeeded.
        reprompt_template: the teacher's prompt (with ``chat_turn``: its user message): ``{prompt}``, ``{solution}``,
            ``{feedback}``.
        solution_template: ``{attempt}`` = the successful sibling's completion text.
        feedback_template: ``{feedback}`` = the checker's feedback text.
        chat_turn: the filled reprompt is the user turn of the tokenizer's chat template (``student.chat_template``).
    """

    #: the default (importance-weight clip) reads the sampled tokens' recorded log-probs; set per instance below
    uses_sampled_token_logprobs = True

    def __init__(self, teacher_model: str = "ema", distillation_weight: float = 1.0, mode: str = "sampled_token",
                 top_k: int = 20, tail: bool = False, alpha: float = 1.0, is_clip: float | None = 2.0,
                 clip_eps: float = 0.2, scale_rewards: str = "group", success_threshold: float = 1.0,
                 dont_reprompt_on_self_success: bool = True, include_feedback: bool = True,
                 feedback_only_without_solution: bool = False,
                 reprompt_template: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n",
                 solution_template: str = "\nCorrect solution:\n\n{attempt}\n\n",
                 feedback_template: str = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                                          "{feedback}\n\n",
                 chat_turn: bool = False) -> None:
        check_choice("teacher_model", teacher_model, SELF_TEACHERS)
        check_unit("distillation_weight", distillation_weight)
        check_choice("mode", mode, MODES)
        check_unit("alpha", alpha)
        check_positive("is_clip", is_clip, allow_none=True)
        check_positive("clip_eps", clip_eps)
        check_choice("scale_rewards", scale_rewards, REWARD_SCALINGS)
        if mode == "sampled_token" and alpha != 1.0:
            raise ValueError(f"mode sampled_token estimates the reverse KL only: set alpha=1.0 (got {alpha})")
        if mode == "topk_logits" and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        check_template("reprompt_template", reprompt_template, ("prompt",), ("prompt", "solution", "feedback"))
        check_template("solution_template", solution_template, ("attempt",), ("attempt",))
        check_template("feedback_template", feedback_template, ("feedback",), ("feedback",))
        self.teacher_kind, self.distillation_weight = teacher_model, distillation_weight
        self.mode, self.top_k, self.tail, self.alpha, self.is_clip = mode, top_k, tail, alpha, is_clip
        self.clip_eps, self.scale_rewards, self.success_threshold = clip_eps, scale_rewards, success_threshold
        self.dont_reprompt_on_self_success, self.include_feedback = dont_reprompt_on_self_success, include_feedback
        self.feedback_only_without_solution = feedback_only_without_solution
        self.reprompt_template, self.solution_template = reprompt_template, solution_template
        self.feedback_template, self.chat_turn = feedback_template, chat_turn
        self.uses_sampled_token_logprobs = True  # the policy term's ratio (and the IS clip)
        self.task, self.tokenizer = None, None  # set by bind()
        self.policy = StudentPolicy()

    def bind(self, task, tokenizer) -> None:
        self.task, self.tokenizer = task, tokenizer

    def check_vocabulary(self, vocab_size: int) -> None:
        if self.mode == "topk_logits" and self.top_k > vocab_size:
            raise ValueError(f"method.top_k = {self.top_k} exceeds the vocabulary size V = {vocab_size}; set "
                             f"method.top_k <= {vocab_size}")

    # ------------------------------------------------------------------ rewards and reprompts
    def group_context(self, batch: RolloutBatch) -> GroupContext:
        """Rewards, advantages and reprompts of ``batch`` (whose groups must be whole: the trainer never splits one)."""
        if self.task is None:
            raise RuntimeError("SDPO needs the run's task for its rewards: call bind(task, tokenizer) first")
        texts = [self.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
                 for ids, mask in zip(batch.completion_ids, batch.completion_mask)]
        rewards = torch.tensor([float(self.task.score(text, ex)) for text, ex in zip(texts, batch.examples)])
        advantages = torch.zeros_like(rewards)
        reprompts: list[str | None] = [None] * len(texts)
        bounds = group_bounds(batch.examples)
        batch_std = rewards.std() if len(rewards) > 1 else torch.tensor(0.0)
        successful_groups = 0
        for start, end in bounds:
            group = rewards[start:end]
            std = group.std() if len(group) > 1 else torch.tensor(0.0)
            scale = {"group": std, "batch": batch_std, "none": torch.tensor(1.0)}[self.scale_rewards]
            advantages[start:end] = (group - group.mean()) / (scale + STD_EPS)
            successes = [j for j in range(start, end) if rewards[j] >= self.success_threshold]
            successful_groups += bool(successes)
            for i in range(start, end):
                demos = [j for j in successes if not (self.dont_reprompt_on_self_success and j == i)]
                failed = rewards[i] < self.success_threshold
                use_feedback = self.include_feedback and failed and not (self.feedback_only_without_solution and demos)
                if not demos and not use_feedback:
                    continue
                solution = self.solution_template.replace("{attempt}", texts[demos[0]]) if demos else ""
                feedback = self.feedback_template.replace(
                    "{feedback}", self.task.feedback(texts[i], batch.examples[i])) if use_feedback else ""
                reprompts[i] = privileged_prompt(self.reprompt_template, batch.examples[i],
                                                 {"solution": solution, "feedback": feedback}, self.tokenizer,
                                                 self.chat_turn)
        return GroupContext(rewards, advantages, reprompts, successful_groups, len(bounds))

    def _cached(self, batch: RolloutBatch, context: GroupContext | None = None) -> dict[str, torch.Tensor]:
        """``[B]`` rewards, advantages and the reprompted rows of ``batch``, computed once and kept in its extras (so a
        row selected from it keeps its own)."""
        if "sdpo_advantage" not in batch.extras:
            context = context or self.group_context(batch)
            device = batch.completion_ids.device
            batch.extras.update({"sdpo_reward": context.rewards.to(device),
                                 "sdpo_advantage": context.advantages.to(device),
                                 "sdpo_reprompted": torch.tensor([r is not None for r in context.reprompts],
                                                                 dtype=torch.float32, device=device)})
        return batch.extras

    def teacher_prompt(self, batch: RolloutBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """The reprompts, and the student's own prompt on rows without one (scored, then masked out)."""
        context = self.group_context(batch)
        self._cached(batch, context)
        texts = [reprompt if reprompt is not None else ex.prompt for reprompt, ex in zip(context.reprompts,
                                                                                         batch.examples)]
        return encode_prompts(tokenizer, texts, batch.prompt_ids.device)

    # ------------------------------------------------------------------ the loss
    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        extras = self._cached(batch)
        mask = batch.completion_mask
        w = self.distillation_weight
        metrics = {"sdpo/reward": masked_reduce(extras["sdpo_reward"][:, None].expand_as(mask), mask, num_tokens).item(),
                   "sdpo/reprompted": masked_reduce(extras["sdpo_reprompted"][:, None].expand_as(mask), mask,
                                                    num_tokens).item()}
        loss = student_logits.new_zeros((), dtype=torch.float32)
        if w < 1.0:
            logq, logq_old = policy_logprobs(batch, student_logits)
            advantages = extras["sdpo_advantage"][:, None].expand_as(logq)
            policy = masked_reduce(policy_gradient_loss(logq, logq_old, advantages, self.clip_eps), mask, num_tokens)
            loss = loss + (1.0 - w) * policy
            metrics["loss/policy"] = policy.item()
        if w > 0.0:
            per_token, _ = self_distillation_terms(self, batch, student_logits, teacher_logits)
            distill = masked_reduce(per_token, mask * extras["sdpo_reprompted"][:, None].to(mask.dtype), num_tokens)
            loss = loss + w * distill
            metrics["loss/self_distillation"] = distill.item()
        return LossOutput(loss, metrics)
