"""Approximate likelihood matching (ALM; Minixhofer, Vulić and Ponti 2025, arXiv:2503.20083, Sec. 3).

Cross-tokenizer distillation by likelihoods instead of next-token distributions. The two tokenizations of one text are
cut into *chunks* that cover the same bytes on both sides (the byte-aligned groups of :mod:`opd.crosstok.alignment`,
the paper's "unconstrained" chunks). A chunk's likelihood is the product of its tokens' probabilities, so it is
comparable across vocabularies::

    log p(chunk) = sum of log p(t_k | t_<k) over the chunk's tokens          (each side in its own tokenization)

Each chunk's likelihood is raised to ``1/τ`` (the paper's binarisation temperature; τ = 100 in the official code, which
keeps the powers away from 0 for long chunks) and read as a Bernoulli probability, and the two Bernoullis are compared
with a binary KL divergence. The official code's default difference is the binary cross-entropy; the binary KL is it
minus the teacher Bernoulli's entropy, which does not depend on the student: the same gradient, and 0 when the student
matches the teacher.
"""

from __future__ import annotations

import math

import torch

from opd.losses.uld import group_sums

#: the official code's shift of both sides' tempered log-likelihoods below 0 (``epsilon=1e-6``): a chunk of likelihood
#: 1 would make log(1 − p) infinite
LOG_SHIFT = 1e-6


def chunk_logprobs(token_logprobs: torch.Tensor, groups: list[range]) -> torch.Tensor:
    """Each chunk's log-likelihood: the sum of its tokens' log-probabilities.

    Args:
        token_logprobs: ``[T]`` log-probability of each actual token of the text (one side's tokenization).
        groups: ``G`` consecutive, non-empty position ranges of that side.
    Returns:
        ``[G]``, clamped at 0 from above (float rounding of a sum of log-probabilities of nearly certain tokens).
    """
    return group_sums(token_logprobs, groups).clamp(max=0.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of log ½ (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))")."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binary_kl_of_likelihoods(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                             temperature: float = 100.0) -> torch.Tensor:
    """ALM's per-chunk distance: ``KL(Bern(p_T^{1/τ}) ‖ Bern(p_S^{1/τ}))``.

    Args:
        teacher_logprobs, student_logprobs: ``[G]`` chunk log-likelihoods (:func:`chunk_logprobs`), ≤ 0.
        temperature: τ; the tempered log-likelihoods are ``log p / τ − 1e-6``.
    Returns:
        ``[G]``, ≥ 0, and 0 where the two likelihoods are equal.
    """
    teacher = teacher_logprobs / temperature - LOG_SHIFT
    student = student_logprobs / temperature - LOG_SHIFT
    p_teacher = teacher.exp()
    return p_teacher * (teacher - student) - torch.expm1(teacher) * (log1mexp(teacher) - log1mexp(student))
