"""``teacher.kind: live``: the current student itself, scored without gradient (SDFT/SDPO's live self-teacher)."""

from __future__ import annotations

import dataclasses

import torch

from opd.registry import TEACHERS
from opd.teachers.base import Teacher


@dataclasses.dataclass
class LiveStudentConfig:
    """No keys: the teacher is the student's own module, with the weights of the step being trained."""


@TEACHERS.register("live")
class LiveStudentTeacher(Teacher):
    """The student as it is now: full logits, or hidden states with its output head, under the teacher's prompt.

    No copy, nothing to checkpoint: the teacher is always the student's current weights (a LoRA student's with its
    adapters on). Scored under ``torch.no_grad``, so no gradient flows through the teacher's side, as in TRL's
    ``teacher_model_kind="live"``. Under DeepSpeed the student's own engine holds the module (ZeRO-3 gathers its
    partitions in the forward pass as it does for the student).
    """

    Config = LiveStudentConfig
    provides = frozenset({"logits", "hidden"})
    shares_student = True

    def setup(self, student: torch.nn.Module, tokenizer, device: torch.device) -> int:
        self.model = student
        self.vocab_size = student.get_output_embeddings().weight.shape[0]
        return self.vocab_size
