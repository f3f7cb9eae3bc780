"""ULD and GOLD's hybrid: on-policy distillation from a teacher with another tokenizer."""

from __future__ import annotations

import torch

from opd.losses.uld import hybrid_uld, merge_groups, sorted_l1
from opd.methods.base import LossOutput, Method
from opd.registry import METHODS
from opd.sampling.behaviour import DatasetPolicy, LambdaMixture
from opd.types import RetokenizedTeacher, RolloutBatch


@METHODS.register("uld")
class ULD(Method):
    """Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030, Eq. 3) on the student's own samples, with
    GOLD's byte alignment and hybrid loss (Patiño et al. 2025) as an option.

    The student samples (λ = 1; with probability 1 − λ a batch holds the dataset's answers, as GKD's Algorithm 1);
    the teacher reads each completion's *text* in its own tokenization (never the student's ids), and the two
    token sequences are grouped by byte offsets (:mod:`opd.crosstok.alignment`). Each group becomes one vector per
    side by the chain rule (:func:`opd.losses.uld.merge_groups`), and the loss per group is

    * ``hybrid: false``: ULD, the L1 distance between the two sorted probability vectors;
    * ``hybrid: true``: ``w · JSD(β)`` on the entries both vocabularies share (the same bytes) ``+ (1 − w) · ULD`` on
      the others, with ``w`` the shared share of the teacher's vocabulary unless ``matched_weight`` fixes it.

    Each group's loss counts once per student token in it, and the sum is divided by the step's student completion
    tokens, so the loss is a token mean like every other method's (TRL averages groups per sequence, then sequences;
    that mean depends on how a batch is split). With one tokenizer every group is one token on each side, and the
    hybrid loss is GKD's JSD(β).

    Args:
        hybrid: GOLD's hybrid loss instead of plain ULD.
        beta: the hybrid's JSD mixture weight (GKD Eq. 1): 0 = forward KL, 1 = reverse KL.
        matched_weight: the hybrid's weight of the shared entries; None = adaptive (shared / teacher vocabulary).
        lmbda: probability that a batch is student-sampled (1 = on-policy).
    """

    teacher_inputs = "retokenized"

    def __init__(self, hybrid: bool = False, beta: float = 0.5, matched_weight: float | None = None,
                 lmbda: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if matched_weight is not None and not 0.0 <= matched_weight <= 1.0:
            raise ValueError(f"matched_weight must be in [0, 1] or null, got {matched_weight}")
        self.hybrid, self.beta, self.matched_weight = hybrid, beta, matched_weight
        self.policy = LambdaMixture(lmbda, DatasetPolicy())

    def group_losses(self, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                     teacher: RetokenizedTeacher) -> torch.Tensor:
        """``[G]`` the loss of each aligned group from the merged ``[G, V_s]`` and ``[G, V_t]`` log-probabilities."""
        if self.hybrid:
            return hybrid_uld(student_logprobs, teacher_logprobs, teacher.student_shared.to(student_logprobs.device),
                              teacher.teacher_shared.to(student_logprobs.device), self.beta, self.matched_weight)
        return sorted_l1(student_logprobs, teacher_logprobs)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: RetokenizedTeacher | None,
             num_tokens: int) -> LossOutput:
        """Sum over rows and groups of (group loss × student tokens in the group) / ``num_tokens``.

        Args:
            student_logits: ``[B, T, V_s]``; only each row's counted positions (``completion_mask``, a prefix) are read.
            teacher_logits: the teacher in its own tokenization (``teacher.score(batch, "retokenized")``), or its
                ``[B, T, V]`` logits on the student's tokens when the two share a tokenizer.
        """
        if isinstance(teacher_logits, torch.Tensor):  # [B, T, V] on the student's own tokens: one shared tokenizer
            teacher_logits = RetokenizedTeacher.from_logits(batch, teacher_logits)
        if not isinstance(teacher_logits, RetokenizedTeacher):
            raise TypeError(f"method 'uld' reads a RetokenizedTeacher, got {type(teacher_logits).__name__}")
        total = student_logits.new_zeros(())
        groups_seen = 0
        for row, groups in enumerate(teacher_logits.groups):
            count = int(batch.completion_mask[row].sum())
            if not count or not groups:
                continue
            logprobs = torch.log_softmax(student_logits[row, :count].float() if student_logits.dtype != torch.float64
                                         else student_logits[row, :count], dim=-1)
            student = merge_groups(logprobs, batch.completion_ids[row, :count], [g[0] for g in groups])
            teacher = merge_groups(teacher_logits.logprobs[row].to(logprobs.dtype), teacher_logits.token_ids[row],
                                   [g[1] for g in groups])
            weights = torch.tensor([len(g[0]) for g in groups], dtype=logprobs.dtype, device=logprobs.device)
            total = total + (self.group_losses(student, teacher, teacher_logits) * weights).sum()
            groups_seen += len(groups)
        loss = total / max(num_tokens, 1)
        name = "loss/gold_hybrid" if self.hybrid else "loss/uld"
        return LossOutput(loss, {name: loss.item(), "uld/groups_per_token": groups_seen / max(num_tokens, 1)})
