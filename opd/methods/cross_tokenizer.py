"""What every cross-tokenizer method shares: the teacher's scores in its own tokenization, and the loss as a sum over
each row's byte-aligned groups."""

from __future__ import annotations

import torch

from opd.methods.base import LossOutput, Method
from opd.sampling.behaviour import DatasetPolicy, LambdaMixture
from opd.types import RetokenizedTeacher, RolloutBatch


class AlignedGroupsMethod(Method):
    """A loss over the byte-aligned groups of each completion (:mod:`opd.crosstok.alignment`) against a teacher that
    read the completion's *text* in its own tokenization (never the student's ids).

    The student samples (λ = 1; with probability 1 − λ a batch holds the dataset's answers, as GKD's Algorithm 1).
    Each group's loss counts once per student token in it, and the sum is divided by the step's student completion
    tokens, so the loss is a token mean like every other method's. Subclasses give :meth:`row_group_losses` and the
    names of their two metrics.
    """

    teacher_inputs = "retokenized"
    #: the metric of the loss, and the metric of aligned groups per student token
    loss_metric, groups_metric = "loss/aligned", "aligned/groups_per_token"

    def __init__(self, lmbda: float = 1.0) -> None:
        self.policy = LambdaMixture(lmbda, DatasetPolicy())

    def row_group_losses(self, student_logprobs: torch.Tensor, student_ids: torch.Tensor,
                         teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor, groups: list[tuple[range, range]],
                         teacher: RetokenizedTeacher) -> torch.Tensor:
        """``[G]`` the loss of each of one row's ``G`` groups.

        Args:
            student_logprobs: ``[n, V_s]`` the student's log-softmax at the row's counted positions; student_ids:
                ``[n]`` its tokens.
            teacher_logprobs: ``[m, V_t]`` the teacher's, in its own tokenization; teacher_ids: ``[m]`` its tokens.
            groups: ``(student positions, teacher positions)`` ranges covering the same bytes.
            teacher: the whole batch's scores (for what does not depend on the row: shared vocabulary entries).
        """
        raise NotImplementedError

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
            raise TypeError(f"method {self.registry_name!r} reads a RetokenizedTeacher, "
                            f"got {type(teacher_logits).__name__}")
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        total = student_logits.new_zeros((), dtype=dtype)
        groups_seen = 0
        for row, groups in enumerate(teacher_logits.groups):
            count = int(batch.completion_mask[row].sum())
            if not count or not groups:
                continue
            logprobs = torch.log_softmax(student_logits[row, :count].to(dtype), dim=-1)
            teacher_logprobs = teacher_logits.logprobs[row].to(device=logprobs.device, dtype=dtype)
            losses = self.row_group_losses(logprobs, batch.completion_ids[row, :count], teacher_logprobs,
                                           teacher_logits.token_ids[row].to(logprobs.device), groups, teacher_logits)
            weights = torch.tensor([len(g[0]) for g in groups], dtype=dtype, device=logprobs.device)
            total = total + (losses * weights).sum()
            groups_seen += len(groups)
        loss = total / max(num_tokens, 1)
        return LossOutput(loss, {self.loss_metric: loss.item(), self.groups_metric: groups_seen / max(num_tokens, 1)})
