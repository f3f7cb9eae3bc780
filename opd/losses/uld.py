"""Losses between next-token distributions over two different vocabularies (cross-tokenizer distillation).

Inputs are one completion's aligned groups (:mod:`opd.crosstok.alignment`): consecutive tokens of the student and
of the teacher that cover the same bytes. Each side's group becomes one vector over its own vocabulary
(:func:`merge_groups`), and the two vectors are compared:

* **ULD** (Boizard et al. 2024, arXiv:2402.12030, Eq. 3): the L1 distance between the two vectors sorted in
  descending order, the shorter one padded with zeros. It needs no correspondence between the vocabularies, so it
  only compares the shapes of the two distributions.
* **Hybrid** (GOLD, Patiño et al. 2025; TRL ``uld_use_hybrid_loss``): a divergence on the entries that both
  vocabularies share (the same bytes), plus ULD on the rest of each vocabulary.

A group of several tokens becomes, by the chain rule, the joint probability of its earlier actual tokens times the
distribution at its last position: entry ``v`` is ``p(t_1 .. t_{k-1}, v)``, so the entry of the actual last token
is the probability of the group's whole text (GOLD's "bayesian" merge). Everything is kept in log space.
"""

from __future__ import annotations

import torch

from opd.losses.divergences import generalized_jsd_of_logprobs


def merge_groups(logprobs: torch.Tensor, token_ids: torch.Tensor, groups: list[range]) -> torch.Tensor:
    """One unnormalised log-probability vector per aligned group.

    Args:
        logprobs: ``[T, V]`` log-softmax at each completion position (row ``k`` predicts token ``k``).
        token_ids: ``[T]`` the completion's actual tokens.
        groups: ``G`` consecutive, non-empty position ranges (one side of the alignment).
    Returns:
        ``[G, V]``: ``logprobs[last] + sum(logprobs[k, token_ids[k]] for k in group[:-1])``.
    """
    token_logprobs = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # [T]
    last = torch.tensor([g.stop - 1 for g in groups], device=logprobs.device)
    earlier = group_sums(token_logprobs, [range(g.start, g.stop - 1) for g in groups])  # [G]: all but the last token
    return logprobs[last] + earlier.unsqueeze(-1)


def group_sums(values: torch.Tensor, groups: list[range]) -> torch.Tensor:
    """``[G]`` the sum of ``values`` (``[T]``) over each range (empty ranges sum to 0), by one prefix sum."""
    before = torch.cat([values.new_zeros(1), values.cumsum(0)])  # [T + 1]: sum of the first k
    first = torch.tensor([g.start for g in groups], device=values.device)
    stop = torch.tensor([g.stop for g in groups], device=values.device)
    return before[stop] - before[first]


def sorted_l1(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """ULD's distance per row: ``sum |sort(p_s) - sort(p_t)|`` over the zero-padded, descending-sorted probabilities.

    Args:
        student_logprobs: ``[G, V_s]``; teacher_logprobs: ``[G, V_t]`` (log-probabilities, possibly unnormalised).
    Returns:
        ``[G]``.
    """
    student = student_logprobs.exp().sort(dim=-1, descending=True).values
    teacher = teacher_logprobs.exp().sort(dim=-1, descending=True).values
    width = max(student.shape[-1], teacher.shape[-1])
    student = torch.nn.functional.pad(student, (0, width - student.shape[-1]))
    teacher = torch.nn.functional.pad(teacher, (0, width - teacher.shape[-1]))
    return (student - teacher).abs().sum(-1)


def hybrid_terms(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, student_shared: torch.Tensor,
                 teacher_shared: torch.Tensor, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """GOLD's two terms per row: the generalized JSD on the shared entries and ULD on the others.

    Args:
        student_logprobs: ``[G, V_s]``; teacher_logprobs: ``[G, V_t]``.
        student_shared, teacher_shared: ``[M]`` ids of the entries both vocabularies share, pairwise
            (:func:`opd.crosstok.vocabulary.shared_vocabulary`).
        beta: the JSD's mixture weight (0: forward KL, 1: reverse KL; GKD, Agarwal et al. 2024, Eq. 1).
    Returns:
        ``(matched [G], unmatched [G])``. The shared entries are compared as they are, not renormalised: when the
        two vocabularies are one, ``matched`` is the same-tokenizer JSD and ``unmatched`` is 0.
    """
    if len(student_shared):
        matched = generalized_jsd_of_logprobs(student_logprobs[:, student_shared], teacher_logprobs[:, teacher_shared],
                                              beta)
    else:
        matched = student_logprobs.new_zeros(student_logprobs.shape[0])
    keep_student = torch.ones(student_logprobs.shape[-1], dtype=torch.bool, device=student_logprobs.device)
    keep_teacher = torch.ones(teacher_logprobs.shape[-1], dtype=torch.bool, device=teacher_logprobs.device)
    keep_student[student_shared] = False
    keep_teacher[teacher_shared] = False
    if keep_student.any() or keep_teacher.any():
        unmatched = sorted_l1(student_logprobs[:, keep_student], teacher_logprobs[:, keep_teacher])
    else:
        unmatched = student_logprobs.new_zeros(student_logprobs.shape[0])
    return matched, unmatched


def hybrid_uld(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, student_shared: torch.Tensor,
               teacher_shared: torch.Tensor, beta: float = 0.5, matched_weight: float | None = None) -> torch.Tensor:
    """GOLD's hybrid loss per row: ``w * matched + (1 - w) * unmatched`` (:func:`hybrid_terms`).

    Args:
        matched_weight: ``w``; None = the share of the teacher's vocabulary that is shared (GOLD's adaptive weight).
    Returns:
        ``[G]``.
    """
    matched, unmatched = hybrid_terms(student_logprobs, teacher_logprobs, student_shared, teacher_shared, beta)
    weight = len(teacher_shared) / teacher_logprobs.shape[-1] if matched_weight is None else matched_weight
    if weight == 0.0:
        return unmatched
    return weight * matched + (1.0 - weight) * unmatched
