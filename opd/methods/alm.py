"""ALM: approximate likelihood matching, on-policy distillation from a teacher with another tokenizer by chunk
likelihoods."""

from __future__ import annotations

import torch

from opd.losses.alm import binary_kl_of_likelihoods, chunk_logprobs
from opd.methods.cross_tokenizer import AlignedGroupsMethod
from opd.registry import METHODS
from opd.types import RetokenizedTeacher


@METHODS.register("alm")
class ALM(AlignedGroupsMethod):
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

    loss_metric, groups_metric = "loss/alm", "alm/chunks_per_token"

    def __init__(self, temperature: float = 100.0, lmbda: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(lmbda)
        self.temperature = temperature

    def row_group_losses(self, student_logprobs: torch.Tensor, student_ids: torch.Tensor,
                         teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor, groups: list[tuple[range, range]],
                         teacher: RetokenizedTeacher) -> torch.Tensor:
        """``[G]``: the binary KL of each chunk's two tempered likelihoods (the sampled tokens' log-probs summed)."""
        student_tokens = student_logprobs.gather(-1, student_ids.unsqueeze(-1)).squeeze(-1)  # [n]
        teacher_tokens = teacher_logprobs.gather(-1, teacher_ids.unsqueeze(-1)).squeeze(-1)  # [m]
        student = chunk_logprobs(student_tokens, [g[0] for g in groups])
        teacher_chunks = chunk_logprobs(teacher_tokens, [g[1] for g in groups])
        return binary_kl_of_likelihoods(teacher_chunks, student, self.temperature)
