"""DistiLLM-2: contrastive distillation, skew FKL on teacher responses and skew RKL on student responses."""

from __future__ import annotations

import math
from typing import Any

import torch

from opd.losses.divergences import masked_reduce, skew_forward_kl, skew_reverse_kl
from opd.methods.base import LossOutput, Method
from opd.registry import METHODS
from opd.sampling.behaviour import BehaviourPolicy, RolloutContext, StudentPolicy, TeacherPolicy
from opd.types import Example, RolloutBatch


def skew_reverse_kl_detached(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
                             temperature: float = 1.0) -> torch.Tensor:
    """KL(q ‖ (1−α)·p + α·sg[q]) per position: skew reverse KL whose mixture holds a detached student copy.

    Args:
        student_logits, teacher_logits: ``[..., V]``.
        alpha: student weight α of the mixture, in [0, 1).
    Returns:
        ``[...]`` the divergence; gradients flow only through the leading q and its log.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if alpha == 0.0:
        log_mix = log_p
    else:
        log_mix = torch.logsumexp(torch.stack([log_p + math.log1p(-alpha), log_q.detach() + math.log(alpha)]), dim=0)
    q = log_q.exp()
    terms = q * (log_q - log_mix)
    return torch.where(q > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


class ContrastivePolicy(BehaviourPolicy):
    """Each micro-batch is written either by the teacher or by the current student (or by both, paired).

    Args:
        schedule: "paired" (default): both write a completion for every prompt, in one batch of 2B rows
            whose ``extras["from_teacher"]`` ``[2B, T]`` marks the teacher rows (the paper's pairs);
            "alternate": teacher, student, teacher, ... per micro-batch (resumable counter);
            "coin": a fair coin per micro-batch (the trainer's seeded policy RNG). With these two an
            optimizer step has both terms only if ``trainer.grad_accum`` is even ("alternate") or by chance ("coin").
    """

    def __init__(self, schedule: str = "paired") -> None:
        if schedule not in ("alternate", "coin", "paired"):
            raise ValueError(f"schedule must be 'alternate', 'coin' or 'paired', got {schedule!r}")
        self.schedule, self.calls = schedule, 0
        self.teacher, self.student = TeacherPolicy(), StudentPolicy()
        self.uses_teacher = True

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        self.calls += 1
        if self.schedule == "paired":
            return _stack(self.teacher.collect(ctx, examples), self.student.collect(ctx, examples),
                          ctx.tokenizer.pad_token_id)
        use_teacher = (self.calls % 2 == 1) if self.schedule == "alternate" else ctx.rng.random() < 0.5
        return (self.teacher if use_teacher else self.student).collect(ctx, examples)

    def async_blocker(self) -> str | None:
        """Alternating or coin batches: the student's go to the worker; paired ones are stacked as they are drawn."""
        if self.schedule == "paired":
            return ("schedule=paired stacks a teacher and a student completion of each prompt into one batch as they "
                    "are drawn; use method.schedule=alternate or coin")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state.get("calls", 0)


def _stack(teacher: RolloutBatch, student: RolloutBatch, pad_token_id: int) -> RolloutBatch:
    """One batch of the teacher's rows then the student's (same prompts), completions right-padded to one width."""
    width = max(teacher.completion_ids.shape[1], student.completion_ids.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    ids = torch.cat([pad(teacher.completion_ids, pad_token_id), pad(student.completion_ids, pad_token_id)])
    mask = torch.cat([pad(teacher.completion_mask, 0), pad(student.completion_mask, 0)])
    from_teacher = torch.zeros_like(mask)
    from_teacher[: teacher.completion_ids.shape[0]] = 1
    batch = RolloutBatch(torch.cat([teacher.prompt_ids, student.prompt_ids]),
                         torch.cat([teacher.prompt_mask, student.prompt_mask]), ids, mask,
                         teacher.examples + student.examples, "paired", temperature=student.temperature)
    batch.extras["from_teacher"] = from_teacher
    return batch


@METHODS.register("distillm2")
class DistiLLM2(Method):
    """DistiLLM-2 (Ko et al., ICML 2025, arXiv:2503.07067, Sec. 3): SKL on teacher outputs + SRKL on student outputs.

    Objective: the paper's contrastive loss, SKL on teacher-generated plus SRKL on student-generated
    responses (Sec. 3; equation number not checked against the PDF), weighted as the official
    ``distillm_trainer.py`` does (``(2−β)·tea_pos_kl + β·ref_pos_kl``, β = 1: equal weights):
        L = (2−β)·E_{y~p_T}[ KL(p ‖ α·p + (1−α)·q_θ) ] + β·E_{y~q_θ}[ KL(q_θ ‖ (1−α)·p + α·sg[q_θ]) ]
    per completion token over the full vocabulary, α = 0.1 for both terms. The SKL term on
    teacher responses raises the student's likelihood of them (gradient through q in the mixture);
    the SRKL term on the student's own responses pushes down what the teacher does not support.

    Paper vs official code: the student part of the SRKL mixture is detached in the official code
    (``detach_mixture: true``, our default, which is what the method is known to have run with);
    ``false`` keeps the gradient through it, the skew reverse KL of DistiLLM (Eq. 5 there). The paper's
    curriculum (adaptive α per batch, gradually rising β) is switched off in the official code
    (``update_alpha``/``gradual_beta`` hard-coded False) and is not implemented: α and β are fixed.

    Batches: the paper trains on pairs, a teacher response and a student response to the same prompt
    in the same batch, so every gradient step sums both terms. ``schedule: paired`` (default) does
    that: both write a completion for the same prompts in one micro-batch of twice the size (2B rows).
    How it still differs: the paper generates the responses offline with vLLM once per epoch
    ("batched on-policy"); ours are fresh every step. The other schedules draw each micro-batch from
    one policy: ``alternate`` takes teacher and student micro-batches in turn, ``coin`` flips a fair
    coin; with the default ``trainer.grad_accum: 1`` each optimizer step then trains only one of the
    two terms, so they need ``grad_accum`` even (``alternate``: as many of each per step, on different
    prompts). The official code averages per sequence first; we take the token mean over the
    optimizer step, as every method here.

    Args:
        beta: β in [0, 2]; teacher-response terms weigh (2−β), student-response terms β.
        skl_alpha: α of the skew forward KL on teacher responses, in [0, 1).
        srkl_alpha: α of the skew reverse KL on student responses, in [0, 1).
        temperature: loss temperature on both logits.
        detach_mixture: stop the gradient through the student inside the SRKL mixture (official code).
        schedule: "paired" (both terms in every micro-batch), "alternate" or "coin"; see :class:`ContrastivePolicy`.
    """

    def __init__(self, beta: float = 1.0, skl_alpha: float = 0.1, srkl_alpha: float = 0.1, temperature: float = 1.0,
                 detach_mixture: bool = True, schedule: str = "paired") -> None:
        if not 0.0 <= beta <= 2.0:
            raise ValueError(f"beta must be in [0, 2], got {beta}")
        for name, alpha in (("skl_alpha", skl_alpha), ("srkl_alpha", srkl_alpha)):
            if not 0.0 <= alpha < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.beta, self.skl_alpha, self.srkl_alpha = beta, skl_alpha, srkl_alpha
        self.temperature, self.detach_mixture = temperature, detach_mixture
        self.policy = ContrastivePolicy(schedule)

    def srkl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` skew reverse KL per token, with the mixture's student part detached or not."""
        if self.detach_mixture:
            return skew_reverse_kl_detached(student_logits, teacher_logits, self.srkl_alpha, self.temperature)
        return skew_reverse_kl(student_logits, teacher_logits, self.srkl_alpha, self.temperature)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        if batch.source == "paired":
            from_teacher = batch.extras["from_teacher"]
        elif batch.source in ("teacher", "student"):
            from_teacher = torch.full_like(batch.completion_mask, int(batch.source == "teacher"))
        else:
            raise ValueError(f"distillm2 trains on teacher or student completions, got a {batch.source!r} batch")
        teacher_mask, student_mask = batch.completion_mask * from_teacher, batch.completion_mask * (1 - from_teacher)
        metrics: dict[str, float] = {}
        loss = student_logits.new_zeros(())
        if teacher_mask.any() or not student_mask.any():  # (an empty batch still returns a differentiable 0)
            skl = masked_reduce(skew_forward_kl(student_logits, teacher_logits, self.skl_alpha, self.temperature),
                                teacher_mask, num_tokens)
            loss = loss + (2.0 - self.beta) * skl
            metrics.update({"loss/skl": skl.item(), "distillm2/teacher_batches": 1.0})
        if student_mask.any():
            srkl = masked_reduce(self.srkl(student_logits, teacher_logits), student_mask, num_tokens)
            loss = loss + self.beta * srkl
            metrics.update({"loss/srkl": srkl.item(), "distillm2/student_batches": 1.0})
        return LossOutput(loss, metrics)
