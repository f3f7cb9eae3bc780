"""``teacher.kind: hf``: a local Hugging Face causal LM (full logits, or hidden states + head for the chunked loss)."""

from __future__ import annotations

import dataclasses

import torch

from opd.config import ModelConfig
from opd.models.loading import check_model_path, check_same_vocabulary, load_model, load_tokenizer
from opd.registry import TEACHERS
from opd.teachers.base import Teacher


@dataclasses.dataclass
class HFTeacherConfig(ModelConfig):
    """The keys of a local model: the student's (``opd.config.ModelConfig``), loaded by the same code."""


@TEACHERS.register("hf")
class HFTeacher(Teacher):
    """A local causal LM loaded with ``AutoModelForCausalLM``: full logits, or hidden states with its output head."""

    Config = HFTeacherConfig
    provides = frozenset({"logits", "hidden"})

    def __init__(self, cfg: HFTeacherConfig) -> None:
        super().__init__(cfg)
        self.chat_template, self.dtype = cfg.chat_template, cfg.dtype

    def check(self) -> None:
        check_model_path(self.cfg, "teacher")

    def setup(self, student: torch.nn.Module, tokenizer, device: torch.device) -> int:
        """Load the model and its tokenizer; the pair must share a vocabulary (up to padding rows of the heads)."""
        teacher_tokenizer = load_tokenizer(self.cfg, "teacher")
        self.model = load_model(self.cfg, "teacher", device)
        self.model.eval().requires_grad_(False)
        self.vocab_size = check_same_vocabulary(teacher_tokenizer, tokenizer, self.model, student)
        return self.vocab_size
