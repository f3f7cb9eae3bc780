"""``teacher.kind: hf``: a local Hugging Face causal LM (full logits, hidden states + head for the chunked loss, or
its own tokenization of the completion texts for the cross-tokenizer methods)."""

from __future__ import annotations

import dataclasses

import torch

from opd.config import ModelConfig
from opd.crosstok.alignment import align_texts
from opd.crosstok.vocabulary import shared_vocabulary
from opd.data.chat import chat_prompt
from opd.errors import ConfigError, ModelLoadError
from opd.models.loading import check_model_path, check_same_vocabulary, load_model, load_tokenizer
from opd.registry import TEACHERS
from opd.teachers.base import Teacher
from opd.types import Example, RetokenizedTeacher, RolloutBatch


@dataclasses.dataclass
class HFTeacherConfig(ModelConfig):
    """The keys of a local model: the student's (``opd.config.ModelConfig``), loaded by the same code."""


@TEACHERS.register("hf")
class HFTeacher(Teacher):
    """A local causal LM loaded with ``AutoModelForCausalLM``: full logits, or hidden states with its output head; and,
    for the cross-tokenizer methods, its log-probabilities on the completion texts in its own tokenization.

    With a tokenizer other than the student's it provides only the latter (``retokenized``); a method that needs one
    shared vocabulary is then refused at start-up (:func:`opd.engine.loss_paths.check_pair`).
    """

    Config = HFTeacherConfig
    provides = frozenset({"logits", "hidden", "retokenized"})

    def __init__(self, cfg: HFTeacherConfig) -> None:
        super().__init__(cfg)
        self.chat_template, self.dtype = cfg.chat_template, cfg.dtype
        self.tokenizer = self.student_tokenizer = None
        #: the teacher's tokenizer differs from the student's (set by :meth:`setup`)
        self.other_tokenizer = False

    def check(self) -> None:
        if self.cfg.lora.enabled:
            raise ConfigError("teacher.lora.r is set, but a teacher is frozen: LoRA adapters train the student "
                              "(student.lora.r); leave teacher.lora.r null")
        check_model_path(self.cfg, "teacher")

    def setup(self, student: torch.nn.Module, tokenizer, device: torch.device) -> int:
        """Load the model and its tokenizer. With the student's vocabulary (up to padding rows of the heads): the
        shared size. With another tokenizer: the student's rows, and only ``retokenized`` is provided."""
        self.tokenizer = load_tokenizer(self.cfg, "teacher")
        self.student_tokenizer = tokenizer
        declared = student.generation_config.eos_token_id
        #: the ids that end a student's completion (its tokenizer's EOS and its model's declared ones)
        self._student_eos = {tokenizer.eos_token_id} | set([declared] if isinstance(declared, int) else declared or [])
        self.model = load_model(self.cfg, "teacher", device)
        self.model.eval().requires_grad_(False)
        if self.tokenizer.get_vocab() != tokenizer.get_vocab():
            self.other_tokenizer = True
            self.provides = frozenset({"retokenized"})
            #: the teacher's logits are cut to its tokenizer's ids (rows past them are padding, never a token)
            self._own_rows = max(len(self.tokenizer), max(self.tokenizer.get_vocab().values()) + 1)
            self._shared = shared_vocabulary(tokenizer, self.tokenizer)
            return student.get_output_embeddings().weight.shape[0]
        self.vocab_size = self._own_rows = check_same_vocabulary(self.tokenizer, tokenizer, self.model, student)
        rows = torch.arange(self.vocab_size)
        self._shared = (rows, rows)
        return self.vocab_size

    def _teacher_prompt(self, batch: RolloutBatch, row: int) -> list[int]:
        """Row ``row``'s prompt as the teacher reads it: the batch's own ids with one tokenizer; else
        :meth:`own_prompt` of its example."""
        if not self.other_tokenizer:
            return batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist()
        return self.own_prompt(batch.examples[row])

    def own_prompt(self, example: Example) -> list[int]:
        """``example``'s prompt in the teacher's own tokens (a teacher with another tokenizer: it scores, and writes
        SeqKD's completions, from it): the task's plain prompt, through the teacher's chat template when it uses one
        (else with the special tokens its tokenizer adds: Gemma's ``<bos>``)."""
        text = example.plain_prompt or example.prompt
        if self.chat_template:
            text = chat_prompt(self.tokenizer, text)
        return self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]

    def _retokenized(self, batch: RolloutBatch, prompt) -> RetokenizedTeacher:
        """Each row's counted completion as text (decoded from the student's ids), in the teacher's tokens with its EOS
        where the student's row ended, aligned by bytes; with one tokenizer, the student's ids themselves."""
        if prompt is not None:
            raise ModelLoadError("a teacher prompt other than the batch's (OPSD) is not supported across tokenizers")
        device = next(self.model.parameters()).device
        logprobs, token_ids, groups = [], [], []
        for row in range(batch.completion_ids.shape[0]):
            student_ids = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
            if not self.other_tokenizer:
                teacher_ids = student_ids
                row_groups = [(range(k, k + 1), range(k, k + 1)) for k in range(len(student_ids))]
            else:
                text = self.student_tokenizer.decode(student_ids, skip_special_tokens=True)
                teacher_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if student_ids and student_ids[-1] in self._student_eos:
                    teacher_ids = teacher_ids + [self.tokenizer.eos_token_id]
                row_groups = [(g.student, g.teacher) for g in align_texts(self.student_tokenizer, student_ids,
                                                                          self.tokenizer, teacher_ids)]
            prompt_ids = self._teacher_prompt(batch, row)
            ids = torch.tensor([prompt_ids + teacher_ids], device=device)
            logits = self.model(input_ids=ids, logits_to_keep=len(teacher_ids) + 1, use_cache=False).logits[0, :-1]
            logits = logits[:, : self._own_rows]  # the shared rows with one tokenizer; the teacher's ids with its own
            logprobs.append(torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1))
            token_ids.append(torch.tensor(teacher_ids, device=device, dtype=torch.long))
            groups.append(row_groups)
        return RetokenizedTeacher(logprobs, token_ids, groups, *self._shared)
