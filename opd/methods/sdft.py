"""SDFT: self-distillation fine-tuning, the model shown a demonstration teaches itself without it."""

from __future__ import annotations

import torch

from opd.losses.divergences import masked_reduce
from opd.losses.sampled import _as_float
from opd.losses.self_distillation import (
    MODES,
    full_self_distillation,
    importance_clip_weights,
    sampled_token_self_distillation,
    topk_self_distillation,
)
from opd.methods.base import LossOutput, Method
from opd.methods.common import (
    check_choice,
    check_positive,
    check_template,
    check_unit,
    policy_logprobs,
    privileged_prompt,
)
from opd.registry import METHODS
from opd.sampling.behaviour import BehaviourPolicy, RolloutContext, StudentPolicy
from opd.sampling.tokenize import encode_prompts
from opd.types import Example, RolloutBatch

#: the teacher kinds that are the student's own weights (opd/teachers/): its step-0 copy (TRL's "base"), the current
#: student, or an exponential moving average of it
SELF_TEACHERS = ("initial_student", "live", "ema")


class TeacherPromptedStudentPolicy(BehaviourPolicy):
    """The student samples from the teacher's prompt (SDFT's ``generate_from_teacher``); the batch then carries the
    student's own prompt, so the loss scores the completions under both views. No ``sampler_logprobs``: these samples
    are not the student's own (q_old of the plain prompt), so the importance clip is not applied to them."""

    def __init__(self, teacher_prompt) -> None:
        #: example -> the teacher's prompt text
        self.teacher_prompt = teacher_prompt

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        prompts = encode_prompts(ctx.tokenizer, [self.teacher_prompt(example) for example in examples], ctx.device)
        batch = ctx.sampler.generate(ctx.student, ctx.tokenizer, examples, prompts=prompts)
        own_ids, own_mask = encode_prompts(ctx.tokenizer, [example.prompt for example in batch.examples], ctx.device)
        batch.prompt_ids, batch.prompt_mask, batch.sampler_logprobs = own_ids, own_mask, None
        return batch

    def async_blocker(self) -> str | None:
        return "the student samples from the teacher's prompt (method.generate_from_teacher=true), which the rollout " \
               "worker does not build; set it false"


@METHODS.register("sdft")
class SDFT(Method):
    """SDFT, Self-Distillation Fine-Tuning (Shenfeld et al., arXiv:2601.19897, "Self-Distillation Enables Continual
    Learning"): the model conditioned on a demonstration is the teacher of the model without it, on the student's
    own samples.

        L(θ) = E_{x, ŷ~q_θ(·|x)} [ Σ_t w_t · D_α( q_θ(·|x, ŷ_<t) , sg[π(·|x, c, ŷ_<t)] ) ]

    with c the demonstration (the example's reference ``target``, in ``template``), π the teacher (``teacher_model``:
    the step-0 student, the live student or its EMA; opd/teachers/) and D_α the divergence of
    :mod:`opd.losses.self_distillation` (α = 0 forward KL, 1 reverse KL, else the JSD). The official code and TRL 1.16's
    ``SDFTTrainer`` expose the choices below; their defaults are TRL's (``SDFTConfig``) except
    ``top_k`` (20, Tinker's SDFT recipe, where TRL has 100: the toy vocabulary has 26 tokens):

    * ``mode``: ``topk_logits`` (the student's top-``top_k`` tokens, renormalised or with a ``tail`` bucket),
      ``full_logits`` (the whole vocabulary) or ``sampled_token`` (sg[log q − log π]·log q on the sampled token: the
      reverse-KL REINFORCE surrogate, α must be 1);
    * ``is_clip``: w_t = min(q_θ(y_t)/q_old(y_t), is_clip), detached, against the sampler's log-probs; exactly 1 on
      fresh rollouts scored by the weights that sampled them (then a no-op, as in TRL when rollouts are not reused),
      it truncates the weight of rollouts from older weights (``trainer.max_staleness > 0``); null = w_t = 1;
    * ``skip_tokens``: the first completion tokens are left out of the loss (teacher-prompt artefacts);
    * ``generate_from_teacher``: the student samples from the teacher's prompt instead of its own.

    Both logits are divided by the sampling temperature (TRL's ``_forward_logits``). Normalisation: the token mean over
    the step's completion tokens, as every method here; TRL averages per sequence first, then over sequences.

    Args:
        template: the teacher's prompt (with ``chat_turn``: its user message), with ``{prompt}`` (the problem as the
            student sees it) and ``{solution}`` (the demonstration: the example's ``target``).
        chat_turn: the filled template is the user turn of the tokenizer's chat template (prompts must be one user
            turn of it, ``student.chat_template=true``).
        teacher_model: the teacher kind: ``initial_student`` (TRL's "base", default), ``live`` or ``ema``
            (``teacher=ema`` with the same kind sets its ``update_rate`` and ``sync_every``).
        mode: one of :data:`~opd.losses.self_distillation.MODES`.
        top_k: support size of ``topk_logits``, <= V.
        tail: ``topk_logits`` adds a tail bucket instead of renormalising.
        alpha: the divergence's interpolation in [0, 1]; ``sampled_token`` needs 1.
        is_clip: the importance weight's upper clip (> 0), or null for none.
        skip_tokens: completion tokens at the start left out of the loss (>= 0).
        generate_from_teacher: sample the completions from the teacher's prompt.
    """

    #: the default (importance-weight clip) reads the sampled tokens' recorded log-probs; set per instance below
    uses_sampled_token_logprobs = True

    def __init__(self, template: str = "{prompt}{solution} {prompt}", chat_turn: bool = False,
                 teacher_model: str = "initial_student", mode: str = "topk_logits", top_k: int = 20,
                 tail: bool = False, alpha: float = 0.5, is_clip: float | None = 2.0, skip_tokens: int = 0,
                 generate_from_teacher: bool = False) -> None:
        check_template("template", template, ("prompt", "solution"), ("prompt", "solution"))
        check_choice("teacher_model", teacher_model, SELF_TEACHERS)
        check_choice("mode", mode, MODES)
        check_unit("alpha", alpha)
        check_positive("is_clip", is_clip, allow_none=True)
        if mode == "sampled_token" and alpha != 1.0:
            raise ValueError(f"mode sampled_token estimates the reverse KL only: set alpha=1.0 (got {alpha})")
        if mode == "topk_logits" and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if skip_tokens < 0:
            raise ValueError(f"skip_tokens must be >= 0, got {skip_tokens}")
        self.template, self.chat_turn, self.teacher_kind = template, chat_turn, teacher_model
        self.mode, self.top_k, self.tail, self.alpha = mode, top_k, tail, alpha
        self.is_clip, self.skip_tokens, self.generate_from_teacher = is_clip, skip_tokens, generate_from_teacher
        #: the importance weight and the sampled-token term read the sampled tokens' untruncated log-probs
        self.uses_sampled_token_logprobs = is_clip is not None or mode == "sampled_token"
        self.tokenizer = None  # set by bind(): the chat template of chat_turn
        self.policy = TeacherPromptedStudentPolicy(self.render) if generate_from_teacher else StudentPolicy()

    def bind(self, task, tokenizer) -> None:
        self.tokenizer = tokenizer

    def check_vocabulary(self, vocab_size: int) -> None:
        if self.mode == "topk_logits" and self.top_k > vocab_size:
            raise ValueError(f"method.top_k = {self.top_k} exceeds the vocabulary size V = {vocab_size}; set "
                             f"method.top_k <= {vocab_size}")

    def staleness_handling(self) -> str:
        return "importance_ratio" if self.is_clip is not None else "recompute"

    def staleness_blocker(self) -> str | None:
        return self.policy.async_blocker()

    def render(self, example: Example, tokenizer=None) -> str:
        """The teacher's prompt text for ``example``."""
        return privileged_prompt(self.template, example, {"solution": example.target}, tokenizer or self.tokenizer,
                                 self.chat_turn)

    def teacher_prompt(self, batch: RolloutBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(tokenizer, [self.render(ex, tokenizer) for ex in batch.examples], batch.prompt_ids.device)

    def loss_mask(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B, T]`` the completion mask without the first ``skip_tokens`` positions."""
        mask = batch.completion_mask
        if self.skip_tokens:
            positions = torch.arange(mask.shape[1], device=mask.device)
            mask = mask * (positions >= self.skip_tokens).to(mask.dtype)
        return mask

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        per_token, logq = self_distillation_terms(self, batch, student_logits, teacher_logits)
        mask = self.loss_mask(batch)
        loss = masked_reduce(per_token, mask, num_tokens)
        return LossOutput(loss, {f"loss/sdft_{self.mode}": loss.item()})


def self_distillation_terms(method, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T] per-token self-distillation term, [B, T] log q_θ(y_t))`` of ``method``'s ``mode``, ``top_k``, ``tail``,
    ``alpha`` and ``is_clip`` (SDFT's and SDPO's shared term; TRL's ``loss_utils.py`` is the same for both).

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` at the completion positions, before the temperature.
    """
    temperature = batch.temperature
    student, teacher = _as_float(student_logits) / temperature, _as_float(teacher_logits) / temperature
    logq = torch.log_softmax(student, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    if method.mode == "topk_logits":
        per_token = topk_self_distillation(student, teacher, method.top_k, method.alpha, method.tail)
    elif method.mode == "full_logits":
        per_token = full_self_distillation(student, teacher, method.alpha)
    else:
        logp = torch.log_softmax(teacher, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        per_token = sampled_token_self_distillation(logq, logp)
    if method.is_clip is not None and batch.sampler_logprobs is not None:  # none recorded: the weight is exactly 1
        # the ratio in float32 at the sampling temperature, as every importance ratio here (opd.methods.common)
        current, behaviour = policy_logprobs(batch, student_logits)
        per_token = per_token * importance_clip_weights(current, behaviour, method.is_clip)
    return per_token, logq
