"""Per-token terms of the self-distillation family (SDFT, arXiv:2601.19897; SDPO, arXiv:2601.20802).

The model is its own teacher under a privileged prompt; these are the distances between its two views on the same
completion tokens. Every function takes ``[..., V]`` logits already divided by the loss temperature and returns the
term at each position ``[...]`` (summed over the support, not over positions).

Notation: S = the student's distribution (the plain prompt), T = the teacher's (the privileged prompt), α the
divergence's interpolation: α = 0 is the forward KL(T‖S), α = 1 the reverse KL(S‖T), and in between the generalized
JSD (1−α)·KL(S‖M) + α·KL(T‖M) with M = (1−α)·S + α·T (GKD's JSD(β) at β = α: :func:`generalized_jsd_of_logprobs`).
"""

from __future__ import annotations

import torch

from opd.losses.divergences import generalized_jsd_of_logprobs
from opd.losses.sampled import _as_float
from opd.losses.topk import _log1mexp

#: how the self-distillation term reads the teacher: the student's top-k support, the whole vocabulary, or only the
#: sampled token (a REINFORCE surrogate of the reverse KL)
MODES = ("topk_logits", "full_logits", "sampled_token")
#: the largest log-mass a top-k support may hold before its tail bucket is formed: the tail keeps at least e^-1e-7 ≈ 1e-7
#: of mass, so its log stays finite when the support holds everything (the official code's clamp)
TAIL_LOG_MASS_CAP = -1e-7


def with_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` log-probabilities of a support -> ``[..., k + 1]``: the support plus one bucket holding the rest of
    the mass, log(1 − Σ_k p), so the k + 1 entries form a distribution."""
    captured = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=TAIL_LOG_MASS_CAP)
    return torch.cat([log_probs, _log1mexp(captured)], dim=-1)


def topk_self_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, alpha: float,
                           tail: bool) -> torch.Tensor:
    """The divergence on the **student's** top-k tokens (SDFT's default; TRL ``compute_topk_self_distillation_loss``).

    Both distributions are taken over the full vocabulary, then restricted to the k tokens the student ranks highest;
    the restriction is either renormalised (``tail=False``: the divergence of the two top-k conditionals) or completed
    by one tail bucket each (``tail=True``: k + 1 categories, the full divergence at k = V up to the cap).

    Args:
        student_logits, teacher_logits: ``[..., V]``.
        k: support size, 1 <= k <= V.
        alpha: the divergence's interpolation in [0, 1] (module docstring).
        tail: add the tail bucket instead of renormalising.
    Returns:
        ``[...]``.
    """
    log_s = torch.log_softmax(_as_float(student_logits), dim=-1)
    log_t = torch.log_softmax(_as_float(teacher_logits), dim=-1)
    ids = student_logits.detach().topk(k, dim=-1).indices
    support_s, support_t = log_s.gather(-1, ids), log_t.gather(-1, ids)
    if tail:
        support_s, support_t = with_tail_bucket(support_s), with_tail_bucket(support_t)
    else:
        support_s = support_s - torch.logsumexp(support_s, dim=-1, keepdim=True)
        support_t = support_t - torch.logsumexp(support_t, dim=-1, keepdim=True)
    return generalized_jsd_of_logprobs(support_s, support_t, alpha)


def full_self_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """The divergence over the whole vocabulary, ``[..., V]`` -> ``[...]``."""
    return generalized_jsd_of_logprobs(torch.log_softmax(_as_float(student_logits), dim=-1),
                                       torch.log_softmax(_as_float(teacher_logits), dim=-1), alpha)


def sampled_token_self_distillation(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` sg[log q(y) − log p_T(y)] · log q(y) on the sampled tokens y: its gradient is the per-token
    reverse-KL REINFORCE gradient on samples of q (SDPO's default); its value is not a KL.

    Args:
        student_logprobs: ``[B, T]`` log q_θ(y_t) (with gradient).
        teacher_logprobs: ``[B, T]`` log p_T(y_t).
    """
    student = _as_float(student_logprobs)
    return (student - _as_float(teacher_logprobs)).detach() * student


def importance_clip_weights(student_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, clip: float
                            ) -> torch.Tensor:
    """``[B, T]`` detached min(q_θ(y)/q_old(y), clip): the truncated importance weight of a sampled token, the log-ratio
    clamped to ±20 first so that it never overflows (SDFT/SDPO ``distillation_is_clip``)."""
    log_ratio = (_as_float(student_logprobs.detach()) - _as_float(behaviour_logprobs.detach())).clamp(-20.0, 20.0)
    return log_ratio.exp().clamp(max=clip)
