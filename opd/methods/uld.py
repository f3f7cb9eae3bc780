"""ULD and GOLD's hybrid: on-policy distillation from a teacher with another tokenizer."""

from __future__ import annotations

import torch

from opd.losses.uld import hybrid_uld, merge_groups, sorted_l1
from opd.methods.cross_tokenizer import AlignedGroupsMethod
from opd.registry import METHODS
from opd.types import RetokenizedTeacher


@METHODS.register("uld")
class ULD(AlignedGroupsMethod):
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

    groups_metric = "uld/groups_per_token"

    def __init__(self, hybrid: bool = False, beta: float = 0.5, matched_weight: float | None = None,
                 lmbda: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if matched_weight is not None and not 0.0 <= matched_weight <= 1.0:
            raise ValueError(f"matched_weight must be in [0, 1] or null, got {matched_weight}")
        super().__init__(lmbda)
        self.hybrid, self.beta, self.matched_weight = hybrid, beta, matched_weight

    @property
    def loss_metric(self) -> str:
        return "loss/gold_hybrid" if self.hybrid else "loss/uld"

    def row_group_losses(self, student_logprobs: torch.Tensor, student_ids: torch.Tensor,
                         teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor, groups: list[tuple[range, range]],
                         teacher: RetokenizedTeacher) -> torch.Tensor:
        """``[G]``: each side's group merged into one vector by the chain rule (:func:`merge_groups`), then ULD, or
        GOLD's hybrid on the byte-shared entries."""
        student = merge_groups(student_logprobs, student_ids, [g[0] for g in groups])
        teacher_merged = merge_groups(teacher_logprobs, teacher_ids, [g[1] for g in groups])
        if self.hybrid:
            device = student.device
            return hybrid_uld(student, teacher_merged, teacher.student_shared.to(device),
                              teacher.teacher_shared.to(device), self.beta, self.matched_weight)
        return sorted_l1(student, teacher_merged)
