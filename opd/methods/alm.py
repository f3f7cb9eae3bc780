"""ALM: approximate likelihood matching, on-policy distillation from a teacher with another tokenizer by chunk
likelihoods."""

from __future__ import annotations

import torch

from opd.losses.alm import binary_kl_of_likelihoods, chunk_logprobs
from opd.methods.base import LossOutput, Method
from opd.registry import METHODS
from opd.sampling.behaviour import DatasetPolicy, LambdaMixture
from opd.types import RetokenizedTeacher, RolloutBatch


@METHODS.register("alm")
class ALM(Method):
    """Approximate likelihood matching (Minixhofer et al. 2025, arXiv:2503.20083, Sec. 3) on the student's own samples.

    The student samples (λ = 1; with probability 1 − λ a batch holds the dataset's answers, as GKD's Algorithm 1); the
    teacher reads each completion's *text* in its own tokenization, and the two token sequences are cut into chunks
    that cover the same bytes (:mod:`opd.crosstok.alignment`). Per chunk, each side's log-likelihood of the text is
    the sum of its tokens' log-probabilities, and the loss is the binary KL between the two likelihoods raised to
    ``1/τ`` (:func:`opd.losses.alm.binary_kl_of_likelihoods`). Unlike ULD it compares likelihoods of the same text,
    not the shapes of two next-token distributions, so it reads only the sampled tokens' log-probabilities; the
    student gets its gradient through its own tokens' log-probabilities alone.

    Each chunk's loss counts once per student token in it, and the sum is divided by the step's student completion
    tokens (a token mean, like every other method's; the official code averages chunks). With one tokenizer every
    chunk is one token on each side, and the two weightings agree.

    Args:
        temperature: the binarisation temperature τ (official default 100).
        lmbda: probability that a batch is student-sampled (1 = on-policy).
    """

    teacher_inputs = "retokenized"

    def __init__(self, temperature: float = 100.0, lmbda: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.policy = LambdaMixture(lmbda, DatasetPolicy())

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: RetokenizedTeacher | None,
             num_tokens: int) -> LossOutput:
        """Sum over rows and chunks of (chunk loss × student tokens in the chunk) / ``num_tokens``.

        Args:
            student_logits: ``[B, T, V_s]``; only each row's counted positions (``completion_mask``, a prefix) are read.
            teacher_logits: the teacher in its own tokenization (``teacher.score(batch, "retokenized")``), or its
                ``[B, T, V]`` logits on the student's tokens when the two share a tokenizer.
        """
        if isinstance(teacher_logits, torch.Tensor):  # [B, T, V] on the student's own tokens: one shared tokenizer
            teacher_logits = RetokenizedTeacher.from_logits(batch, teacher_logits)
        if not isinstance(teacher_logits, RetokenizedTeacher):
            raise TypeError(f"method 'alm' reads a RetokenizedTeacher, got {type(teacher_logits).__name__}")
        total = student_logits.new_zeros((), dtype=torch.float64 if student_logits.dtype == torch.float64
                                         else torch.float32)
        chunks_seen = 0
        for row, groups in enumerate(teacher_logits.groups):
            count = int(batch.completion_mask[row].sum())
            if not count or not groups:
                continue
            logits = student_logits[row, :count]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            ids = batch.completion_ids[row, :count]
            student_tokens = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [n_i]
            teacher_rows = teacher_logits.logprobs[row].to(device=logits.device, dtype=logits.dtype)
            teacher_ids = teacher_logits.token_ids[row].to(logits.device)
            teacher_tokens = teacher_rows.gather(-1, teacher_ids.unsqueeze(-1)).squeeze(-1)  # [m_i]
            student = chunk_logprobs(student_tokens, [g[0] for g in groups])
            teacher = chunk_logprobs(teacher_tokens, [g[1] for g in groups])
            weights = torch.tensor([len(g[0]) for g in groups], dtype=logits.dtype, device=logits.device)
            total = total + (binary_kl_of_likelihoods(teacher, student, self.temperature) * weights).sum()
            chunks_seen += len(groups)
        loss = total / max(num_tokens, 1)
        return LossOutput(loss, {"loss/alm": loss.item(), "alm/chunks_per_token": chunks_seen / max(num_tokens, 1)})
