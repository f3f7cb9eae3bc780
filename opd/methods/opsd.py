"""OPSD: on-policy self-distillation from the initial student conditioned on the reference solution."""

from __future__ import annotations

import math

import torch

from opd.losses.divergences import clipped_forward_kl, entropy, generalized_jsd, masked_reduce
from opd.methods.base import LossOutput, Method
from opd.methods.common import check_choice, check_positive, check_unit, privileged_prompt
from opd.registry import METHODS
from opd.sampling.behaviour import StudentPolicy
from opd.sampling.tokenize import encode_prompts
from opd.types import Example, RolloutBatch


@METHODS.register("opsd")
class OPSD(Method):
    """On-Policy Self-Distillation (Zhao et al., arXiv:2601.18734, Eq. 6): the initial student, shown the solution, teaches.

    Objective (Eq. 6), on completions ŷ sampled from the current student given the problem x only:
        L(θ) = E_{(x,y*), ŷ~q_θ(·|x)} [ (1/|ŷ|) Σ_t D( sg[p_θ0(·|x, y*, ŷ_<t)] ‖ q_θ(·|x, ŷ_<t) ) ]
    The teacher is the frozen step-0 student (``teacher_kind = "initial_student"``, opd/teachers/initial_student.py: a copy of
    the student before training; the ``teacher`` config is not read; the official code gets the
    same weights by disabling the LoRA adapters) conditioned on privileged information: ``template``
    filled with ``{prompt}`` (the problem as the student sees it) and ``{solution}`` (the example's
    reference ``target``). With ``chat_turn`` the filled template is the teacher's user message in
    the tokenizer's chat template, as the official ``data_collator.py`` builds it, and ``{prompt}`` is
    the student's user message (its prompt without the chat template around it). Both views score
    the same completion tokens; the trainer aligns them although the prompts differ in length.

    D, per completion token over the full vocabulary, both logits divided by the loss temperature:
      * ``fkl_clip`` (default; current paper and official code, ``--beta 0 --jsd_token_clip 0.05``):
        forward KL(p_T‖q_θ) with every vocabulary entry's term p_T(v)·log(p_T(v)/q_θ(v)) clipped
        above at ``clip`` before the sum (``opsd_trainer.py::generalized_jsd_loss``), so no single
        token (e.g. "so", "wait") dominates; the sum can be negative, and entries at the cap pass no gradient;
      * ``jsd``: generalized JSD(β = ``jsd_beta`` = 0.5), unclipped: the first version of the paper and code
        (the current code would clip the JSD's entries too; no reported result uses that).
    Loss temperature = sampling temperature: the official code has one ``--temperature`` for the
    sampler and the loss (``self.temperature = args.temperature`` feeds both the generation config
    and the logits division). ``temperature: null`` (default) takes it from the batch (the
    sampler's), a number must equal ``sampler.temperature`` (refused at start-up otherwise).
    Normalisation: token mean over the step's completion tokens, as every method here; Eq. 6 and the
    official code at one sequence per device (paper Table 6) average per sequence first, so long
    completions weigh more here.

    Template: the default ``"{prompt}{solution} {prompt}"`` suits the toy char tokenizer (alphabet
    ``0123456789+-*/=;#.()? ``, anything else maps to <unk>): a solved instance, a space, and the
    problem again, so the completion continues the same text as in the student's view. Real-data
    configs use the official natural-language template with ``chat_turn: true``
    (``conf/experiment/real_opsd.yaml``, ``docs/opsd_protocol.md``). The official code gives the
    teacher a thinking-style chat template and the student none; we use one chat format for both views.

    Args:
        template: the teacher's prompt (with ``chat_turn``: its user message); must contain ``{prompt}`` and
            ``{solution}`` (other braces, e.g. ``\\boxed{}``, are kept as they are).
        divergence: "fkl_clip" or "jsd".
        clip: upper clip of each vocabulary entry's forward-KL term (``fkl_clip``), > 0.
        jsd_beta: β of the generalized JSD (``jsd``), in [0, 1].
        temperature: loss temperature on both logits, > 0, equal to ``sampler.temperature``; None = the batch's
            sampling temperature.
        chat_turn: the filled template is the user turn of the tokenizer's chat template (the student's prompts
            must be one user turn of it, ``student.chat_template: true``); False = the filled template is the prompt.
    """

    teacher_kind = "initial_student"

    def __init__(self, template: str = "{prompt}{solution} {prompt}", divergence: str = "fkl_clip", clip: float = 0.05,
                 jsd_beta: float = 0.5, temperature: float | None = None, chat_turn: bool = False) -> None:
        for placeholder in ("{prompt}", "{solution}"):
            if placeholder not in template:
                raise ValueError(f"template must contain the placeholder {placeholder}, got {template!r}")
        check_choice("divergence", divergence, ("fkl_clip", "jsd"))
        check_positive("clip", clip)
        check_unit("jsd_beta", jsd_beta)
        check_positive("temperature", temperature, allow_none=True)
        self.template, self.divergence, self.clip = template, divergence, clip
        self.jsd_beta, self.temperature, self.chat_turn = jsd_beta, temperature, chat_turn
        self.policy = StudentPolicy()

    def staleness_handling(self) -> str:
        """The clipped forward KL is used as is on stale rollouts; the JSD's student side is recomputed."""
        return "as_is" if self.divergence == "fkl_clip" else "recompute"

    def check_sampler(self, temperature: float, top_p: float, top_k: int) -> None:
        """A set loss temperature must be the sampling temperature (official code: one ``--temperature``).

        Top-p/top-k truncation is allowed: the official scripts sample with top_p 0.95, top_k 20, and the loss
        is the untruncated full-vocabulary divergence at the states the samples visit.
        """
        super().check_sampler(temperature, top_p, top_k)
        if self.temperature is not None and not math.isclose(self.temperature, temperature):
            raise ValueError(f"method.temperature={self.temperature} differs from sampler.temperature={temperature}: "
                             "OPSD's loss temperature is its sampling temperature (official code: one --temperature); "
                             "set them equal, or method.temperature=null to follow the sampler")

    def render(self, example: Example, tokenizer=None) -> str:
        """The teacher's prompt text for ``example`` (one pass, so a solution containing "{prompt}" stays literal).

        Raises:
            ConfigError: ``chat_turn`` without a tokenizer, or with a prompt that is not one user turn of its chat template.
        """
        return privileged_prompt(self.template, example, {"solution": example.target}, tokenizer, self.chat_turn)

    def teacher_prompt(self, batch: RolloutBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(tokenizer, [self.render(ex, tokenizer) for ex in batch.examples], batch.prompt_ids.device)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        temperature = batch.temperature if self.temperature is None else self.temperature
        if self.divergence == "fkl_clip":
            per_token = clipped_forward_kl(student_logits, teacher_logits, self.clip, temperature)
        else:
            per_token = generalized_jsd(student_logits, teacher_logits, self.jsd_beta, temperature)
        mask = batch.completion_mask
        loss = masked_reduce(per_token, mask, num_tokens)
        teacher_entropy = masked_reduce(entropy(teacher_logits, temperature), mask, num_tokens)
        return LossOutput(loss, {f"loss/{self.divergence}": loss.item(), "opsd/teacher_entropy": teacher_entropy.item()})
