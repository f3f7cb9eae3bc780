"""SFT: the supervised baseline every distillation method is compared with."""

from __future__ import annotations

import torch

from opd.methods.base import LossOutput, Method
from opd.methods.common import completion_cross_entropy
from opd.registry import METHODS
from opd.sampling.behaviour import DatasetPolicy
from opd.types import RolloutBatch


@METHODS.register("sft")
class SFT(Method):
    """Supervised fine-tuning: token-level cross-entropy on the dataset's reference completions (no teacher).

    Args:
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.policy = DatasetPolicy()

    def staleness_handling(self) -> str:
        return "as_is"  # cross-entropy on given tokens: nothing of the student's sampling enters it

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        loss = completion_cross_entropy(batch, student_logits, num_tokens, self.label_smoothing)
        return LossOutput(loss, {"loss/ce": loss.item()})
