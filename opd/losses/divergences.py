"""Divergences between teacher and student next-token distributions, and one masked reduction.

Every divergence takes ``student_logits`` and ``teacher_logits`` of shape ``[..., V]`` and returns
the divergence at each position, shape ``[...]`` (summed over the vocabulary, not over positions).
Logits are divided by ``temperature`` and normalised in float32 whatever their input dtype, so
bfloat16 inputs are safe. Vocabulary entries with ``-inf`` logits (masked tokens) contribute 0 where
the distribution in front of the log has no mass there.

Notation: T = teacher distribution p_T, S = student distribution q_θ, KL(P‖Q) = Σ_v P (log P − log Q).
"""

from __future__ import annotations

import math

import torch


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 log-softmax of ``logits / temperature``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·P + (1−w)·Q) for 0 < w < 1, in log space.

    Entries that are −inf in both (masked vocabulary) stay −inf in value, but logsumexp's backward
    would be NaN there, so such entries are fed to it as a finite floor (their gradient is unused).
    """
    both_masked = torch.isneginf(log_p) & torch.isneginf(log_q)
    floor = torch.finfo(log_p.dtype).min / 4
    log_p, log_q = (torch.where(both_masked, torch.full_like(x, floor), x) for x in (log_p, log_q))
    return torch.logsumexp(torch.stack([log_p + math.log(weight_p), log_q + math.log(1.0 - weight_p)]), dim=0)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) per position from log-probabilities ``[..., V]``; terms with P = 0 count as 0."""
    p = log_p.exp()
    # mask inside the product: 0 * (-inf - x) would be NaN in the backward pass even when masked after
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum(dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(T‖S), the mode-covering direction of word-level KD (Hinton et al. 2015)."""
    return _kl_from_log_probs(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL(S‖T), the mode-seeking direction (MiniLLM, on-policy distillation)."""
    return _kl_from_log_probs(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, GKD (Agarwal et al. 2024, arXiv:2306.13649) Eq. 1.

    JSD(β) = β·KL(T‖M) + (1−β)·KL(S‖M) with M = β·T + (1−β)·S, the mixture formed in log space.
    As in TRL, the endpoints are the plain KLs: β = 0 returns forward KL(T‖S) exactly and β = 1
    reverse KL(S‖T) (the unscaled JSD itself tends to 0 at both ends).
    """
    return generalized_jsd_of_logprobs(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature),
                                       beta)


def generalized_jsd_of_logprobs(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                                beta: float = 0.5) -> torch.Tensor:
    """:func:`generalized_jsd` of log-probabilities ``[..., V]`` taken as they are, not renormalised.

    GOLD's hybrid loss compares the part of two vocabularies they share this way (``opd.losses.uld``); on full,
    normalised distributions it equals :func:`generalized_jsd` of the logits.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    wide = torch.promote_types(student_logprobs.dtype, torch.float32)  # float32, or float64 kept
    log_s, log_t = student_logprobs.to(wide), teacher_logprobs.to(wide)
    if beta == 0.0:
        return _kl_from_log_probs(log_t, log_s)
    if beta == 1.0:
        return _kl_from_log_probs(log_s, log_t)
    log_m = _log_mixture(log_t, log_s, beta)
    return beta * _kl_from_log_probs(log_t, log_m) + (1.0 - beta) * _kl_from_log_probs(log_s, log_m)


def _skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(P‖α·P + (1−α)·Q), the mixture formed in log space; gradients flow through both arguments."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return _kl_from_log_probs(log_p, log_q)
    if alpha == 1.0:
        return torch.zeros(log_p.shape[:-1], device=log_p.device)
    return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, alpha))


def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
                    temperature: float = 1.0) -> torch.Tensor:
    """Skew forward KL, KL(T‖α·T + (1−α)·S) (DistiLLM, Ko et al. 2024, Eq. 4); α = 0 is forward KL.

    Gradients flow through S inside the mixture, as in the official code.
    """
    return _skew_kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature), alpha)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
                    temperature: float = 1.0) -> torch.Tensor:
    """Skew reverse KL, KL(S‖α·S + (1−α)·T) (DistiLLM, Ko et al. 2024, Eq. 5); α = 0 is reverse KL."""
    return _skew_kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature), alpha)


def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance ½·Σ_v |T(v) − S(v)| (in [0, 1])."""
    diff = _log_probs(teacher_logits, temperature).exp() - _log_probs(student_logits, temperature).exp()
    return 0.5 * diff.abs().sum(dim=-1)


def clipped_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, clip: float = 0.05,
                       temperature: float = 1.0) -> torch.Tensor:
    """Forward KL with each vocabulary entry's term T(v)·(log T(v) − log S(v)) clipped above at ``clip``
    before the sum (OPSD, arXiv 2601.18734, official code's ``jsd_token_clip``); entries at the cap pass no gradient."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    log_t, log_s = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    t = log_t.exp()
    terms = t * torch.where(t > 0, log_t - log_s, torch.zeros_like(t))
    return terms.clamp(max=clip).sum(dim=-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy −Σ_v P(v) log P(v) of ``softmax(logits / temperature)`` per position, in nats."""
    log_p = _log_probs(logits, temperature)
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(p))).sum(dim=-1)


def masked_reduce(values: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Sum ``values`` over positions where ``mask`` is set, divided by ``num_tokens``.

    Passing the number of completion tokens in the *whole optimizer step* (all micro-batches, all
    ranks) as ``num_tokens`` makes the summed micro-batch losses equal the token mean of one big
    batch, so gradient accumulation and world size do not change the loss.

    Args:
        values: ``[...]`` per-position values.
        mask: ``[...]`` 1 where the position counts, 0 elsewhere (padding, prompt).
        num_tokens: the normaliser; ``mask.sum()`` (this batch's own count) when None.
    Returns:
        A scalar tensor.
    """
    mask = mask.to(values.dtype)
    total = (torch.where(mask > 0, values, torch.zeros_like(values)) * mask).sum()
    denom = mask.sum() if num_tokens is None else num_tokens
    if isinstance(denom, torch.Tensor):
        return total / denom.clamp(min=1)
    return total / max(float(denom), 1.0)
