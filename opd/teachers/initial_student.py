"""``teacher.kind: initial_student``: the frozen step-0 copy of the student (self-distillation, OPSD)."""

from __future__ import annotations

import copy
import dataclasses

import torch

from opd.models.lora import AdaptersOff, has_adapters
from opd.registry import TEACHERS
from opd.teachers.base import Teacher


@dataclasses.dataclass
class InitialStudentConfig:
    """No keys: the teacher is a deep copy of the student as loaded (before the first update)."""


@TEACHERS.register("initial_student")
class InitialStudentTeacher(Teacher):
    """The student at step 0, frozen: full logits, or hidden states with its output head (OPSD's teacher)."""

    Config = InitialStudentConfig
    provides = frozenset({"logits", "hidden"})

    def setup(self, student: torch.nn.Module, tokenizer, device: torch.device) -> int:
        """A frozen deep copy of the student; for a LoRA student, the student itself with its adapters off (its base
        weights are frozen and are the step-0 function: no second copy in memory)."""
        self.model = AdaptersOff(student) if has_adapters(student) else copy.deepcopy(student).eval().requires_grad_(False)
        self.vocab_size = student.get_output_embeddings().weight.shape[0]
        return self.vocab_size
