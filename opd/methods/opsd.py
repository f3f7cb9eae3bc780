"""OPSD: on-policy self-distillation from the initial student conditioned on the reference solution."""

from __future__ import annotations

import re

import torch

from opd.data.base import Example
from opd.losses.divergences import clipped_forward_kl, entropy, generalized_jsd, masked_reduce
from opd.methods.base import LossOutput, Method
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.sampling.behaviour import StudentPolicy
from opd.sampling.tokenize import encode_prompts

_PLACEHOLDER = re.compile(r"\{(prompt|solution)\}")


@METHODS.register("opsd")
class OPSD(Method):
    """On-Policy Self-Distillation (Zhao et al., arXiv:2601.18734, Eq. 6): the initial student, shown the solution, teaches.

    Objective (Eq. 6), on completions ŷ sampled from the current student given the problem x only:
        L(θ) = E_{(x,y*), ŷ~q_θ(·|x)} [ (1/|ŷ|) Σ_t D( sg[p_θ0(·|x, y*, ŷ_<t)] ‖ q_θ(·|x, ŷ_<t) ) ]
    The teacher is the frozen step-0 student (``teacher_kind = "initial_student"``, opd/teachers/initial_student.py: a copy of
    the student before training; the ``teacher`` config is not read; the official code gets the
    same weights by disabling the LoRA adapters) conditioned on privileged information: its prompt
    is ``template`` with ``{prompt}`` (the problem as the student sees it) and ``{solution}`` (the
    example's reference ``target``) filled in. Both views score the same completion tokens; the
    trainer aligns them although the prompts differ in length (``completion_logits``).

    D, per completion token over the full vocabulary, both logits divided by ``temperature``:
      * ``fkl_clip`` (default; current paper and official code, ``--jsd_token_clip 0.05``):
        forward KL(p_T‖q_θ) with every vocabulary entry's term p_T(v)·log(p_T(v)/q_θ(v)) clipped
        above at ``clip`` before the sum, so no single token (e.g. "so") dominates;
      * ``jsd``: generalized JSD(β = ``jsd_beta`` = 0.5), the first version of the paper and code.
    The loss temperature is the sampling temperature in the paper and code (1.1 in the official
    scripts; keep ``sampler.temperature`` equal to it). Token mean over the step's completion tokens
    (the official code's mean over response tokens; Eq. 6 averages per sequence first).

    Template: the default ``"{prompt}{solution} {prompt}"`` suits the toy char tokenizer (alphabet
    ``0123456789+-*/=;#.()? ``, anything else maps to <unk>): a solved instance, a space, and the
    problem again, so the completion continues the same text as in the student's view. Real-data
    configs should use the paper's natural-language template (in ``conf/method/opsd.yaml``). The
    official code additionally gives the teacher a thinking-style chat template and the student
    none; we use one prompt format for both views.

    Args:
        template: the teacher's prompt; must contain ``{prompt}`` and ``{solution}`` (other braces,
            e.g. ``\\boxed{}``, are kept as they are).
        divergence: "fkl_clip" or "jsd".
        clip: upper clip of each vocabulary entry's forward-KL term (``fkl_clip``), > 0.
        jsd_beta: β of the generalized JSD (``jsd``), in [0, 1].
        temperature: loss temperature on both logits, > 0.
    """

    teacher_kind = "initial_student"

    def __init__(self, template: str = "{prompt}{solution} {prompt}", divergence: str = "fkl_clip", clip: float = 0.05,
                 jsd_beta: float = 0.5, temperature: float = 1.1) -> None:
        for placeholder in ("{prompt}", "{solution}"):
            if placeholder not in template:
                raise ValueError(f"template must contain the placeholder {placeholder}, got {template!r}")
        if divergence not in ("fkl_clip", "jsd"):
            raise ValueError(f"divergence must be 'fkl_clip' or 'jsd', got {divergence!r}")
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.template, self.divergence, self.clip = template, divergence, clip
        self.jsd_beta, self.temperature = jsd_beta, temperature
        self.policy = StudentPolicy()

    def staleness_handling(self) -> str:
        """The clipped forward KL is used as is on stale rollouts; the JSD's student side is recomputed."""
        return "as_is" if self.divergence == "fkl_clip" else "recompute"

    def render(self, example: Example) -> str:
        """The teacher's prompt text for ``example`` (one pass, so a solution containing "{prompt}" stays literal)."""
        values = {"prompt": example.prompt, "solution": example.target}
        return _PLACEHOLDER.sub(lambda match: values[match.group(1)], self.template)

    def teacher_prompt(self, batch: RolloutBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(tokenizer, [self.render(ex) for ex in batch.examples], batch.prompt_ids.device)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        if self.divergence == "fkl_clip":
            per_token = clipped_forward_kl(student_logits, teacher_logits, self.clip, self.temperature)
        else:
            per_token = generalized_jsd(student_logits, teacher_logits, self.jsd_beta, self.temperature)
        mask = batch.completion_mask
        loss = masked_reduce(per_token, mask, num_tokens)
        teacher_entropy = masked_reduce(entropy(teacher_logits, self.temperature), mask, num_tokens)
        return LossOutput(loss, {f"loss/{self.divergence}": loss.item(), "opsd/teacher_entropy": teacher_entropy.item()})
