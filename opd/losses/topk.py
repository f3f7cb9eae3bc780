"""Top-k (truncated-support) estimators of forward and reverse KL.

Each estimator looks only at k vocabulary entries per position, the support S (the top-k of the
teacher or of the student), which is what a sparse teacher server returns and what keeps the loss
cheap at large V. Inputs are logits of shape ``[..., V]`` (or the teacher's top-k log-probabilities
and token ids, ``[..., k]``); outputs are per position, shape ``[...]``. As in
:mod:`opd.losses.divergences`, logits are divided by ``temperature`` and normalised in float32, and
``-inf`` vocabulary entries are safe in values and gradients.

Modes, with P the distribution in front of the log and Q the other one:

* ``"renorm"``: renormalise P and Q on S, then KL(P̄‖Q̄) over the k entries.
* ``"tail"``: a (k+1)-way distribution per model, the k entries of S plus a tail bucket holding the
  mass outside S (1 − Σ_S), then KL over the k+1 buckets (the tail-bucket idea of sparse-logit
  distillation, e.g. TRL's vLLM-server path). With k = V the tail is empty and this is the full KL.
* ``"raw"``: the unnormalised partial sum Σ_{v∈S} P(v)(log P(v) − log Q(v)). Biased, and it can be
  negative. For the reverse KL its gradient keeps a "+1" term, Σ_S ∇S(v), which does not vanish on a
  truncated support and collapses training (Zhu et al., "The Many Faces of On-Policy Distillation",
  arXiv 2605.11182, §Mechanism 2).
* ``"stopgrad"`` (reverse KL only): Σ_{v∈S} S(v)·sg(log S(v) − log T(v)). Same value as ``"raw"``;
  its gradient Σ_S ∇S(v)(log S(v) − log T(v)) drops the +1 term (Many Faces fix (b)).

Notation: T = teacher distribution p_T, S = student distribution q_θ, KL(P‖Q) = Σ_v P (log P − log Q).
"""

from __future__ import annotations

import math

import torch

from opd.losses.divergences import _log_probs

FORWARD_MODES = ("renorm", "tail", "raw")
REVERSE_MODES = ("renorm", "tail", "raw", "stopgrad")
SPARSE_MODES = ("renorm", "tail")
SUPPORTS = ("student", "teacher")
LOG_TAIL_FLOOR = math.log(1e-7)  # sparse tail mode: smallest tail mass, above float32 rounding of Σ_k T


def _check_k(k: int, vocab_size: int) -> None:
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must satisfy 1 <= k <= V = {vocab_size}, got k = {k}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-entry P·(log P − log Q), ``[..., n]``; entries with P = 0 are 0 with zero (not NaN) gradient."""
    p = log_p.exp()
    return p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))


def _renorm(log_p: torch.Tensor) -> torch.Tensor:
    """Renormalise log-probabilities ``[..., k]`` over their last dimension."""
    return log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)


def _outside_logsumexp(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{v∉ids} P(v), ``[..., 1]``, computed directly (no cancellation); ``-inf`` if that set has no mass.

    Args:
        log_p: ``[..., V]`` full log-probabilities.
        ids: ``[..., k]`` token ids of the support.
    """
    x = log_p.scatter(-1, ids, float("-inf"))
    empty = torch.isneginf(x).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(x.masked_fill(empty, 0.0), dim=-1, keepdim=True)  # finite gradients on empty rows
    return lse.masked_fill(empty, float("-inf"))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)), stable on both sides of −log 2 (Mächler 2012, "Accurately computing log(1 − exp(−|a|))").

    ``x >= 0`` (a top-k mass that rounds to 1 or above) gives ``-inf``: no mass left. Gradients stay finite.
    """
    has_mass = x < 0
    x = torch.where(has_mass, x, torch.full_like(x, -1.0))
    near_zero = torch.log(-torch.expm1(x.clamp(min=-math.log(2))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2))))
    out = torch.where(x > -math.log(2), near_zero, far)
    return torch.where(has_mass, out, torch.full_like(out, float("-inf")))


def _support_kl(log_p: torch.Tensor, log_q: torch.Tensor, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """The truncated KL(P‖Q) of ``mode`` on the support ``ids``.

    Args:
        log_p: ``[..., V]`` log-probabilities of the distribution in front of the log.
        log_q: ``[..., V]`` log-probabilities of the other distribution.
        ids: ``[..., k]`` support token ids.
    Returns:
        ``[...]``.
    """
    lp, lq = log_p.gather(-1, ids), log_q.gather(-1, ids)
    if mode == "renorm":
        return _kl_terms(_renorm(lp), _renorm(lq)).sum(dim=-1)
    if mode == "tail":
        lp = torch.cat([lp, _outside_logsumexp(log_p, ids)], dim=-1)
        lq = torch.cat([lq, _outside_logsumexp(log_q, ids)], dim=-1)
        return _kl_terms(lp, lq).sum(dim=-1)
    if mode == "raw":
        return _kl_terms(lp, lq).sum(dim=-1)
    p = lp.exp()  # stopgrad
    return (p * torch.where(p > 0, lp - lq, torch.zeros_like(lp)).detach()).sum(dim=-1)


def topk_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, mode: str = "renorm",
                    temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(T‖S) restricted to the teacher's top-k tokens.

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``.
        k: support size, 1 <= k <= V.
        mode: ``"renorm"`` (both renormalised on the support), ``"tail"`` (k + 1 buckets; k = V is the
            full forward KL) or ``"raw"`` (unnormalised partial sum; biased, can be negative).
        temperature: logits are divided by it before the softmax.
    Returns:
        ``[...]`` per-position estimate.
    """
    _check_choice("mode", mode, FORWARD_MODES)
    _check_k(k, teacher_logits.shape[-1])
    log_t, log_s = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    ids = log_t.topk(k, dim=-1).indices
    return _support_kl(log_t, log_s, ids, mode)


def topk_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, mode: str = "renorm",
                    support: str = "student", temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL(S‖T) restricted to the student's (or teacher's) top-k tokens.

    Zhu et al., "The Many Faces of On-Policy Distillation" (arXiv 2605.11182): the ``"raw"`` truncated
    reverse KL has gradient Σ_S ∇S(v)(log S(v) − log T(v) + 1), whose +1 term survives truncation and
    pushes a token up only when T(v) > e·S(v); ``"renorm"`` and ``"stopgrad"`` are their fixes.

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``.
        k: support size, 1 <= k <= V.
        mode: ``"renorm"``, ``"tail"`` (k = V is the full reverse KL), ``"raw"`` (biased) or
            ``"stopgrad"`` (value of ``"raw"``, gradient Σ_S ∇S(v)(log S(v) − log T(v))).
        support: whose top-k forms the support, ``"student"`` or ``"teacher"``.
        temperature: logits are divided by it before the softmax.
    Returns:
        ``[...]`` per-position estimate.
    """
    _check_choice("mode", mode, REVERSE_MODES)
    _check_choice("support", support, SUPPORTS)
    _check_k(k, student_logits.shape[-1])
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    ids = (log_s if support == "student" else log_t).topk(k, dim=-1).indices
    return _support_kl(log_s, log_t, ids, mode)


def sparse_topk_forward_kl(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                           teacher_topk_ids: torch.Tensor, mode: str = "renorm",
                           temperature: float = 1.0) -> torch.Tensor:
    """:func:`topk_forward_kl` when the teacher is known only by its top-k log-probs and token ids.

    For a teacher behind a server (e.g. vLLM returning top-k log-probs). The teacher's log-probs are
    taken as given: they must already be at ``temperature`` (which only divides the student's logits).
    In ``"tail"`` mode the teacher's tail is log(1 − Σ_k exp(log T)), computed stably, and both tails
    are floored at 1e-7, so float32 rounding of the teacher's top-k mass cannot make the KL infinite
    (e.g. k = V). Given the dense teacher's top-k, the result equals :func:`topk_forward_kl` up to
    that rounding (about 1e-6).

    Args:
        student_logits: ``[..., V]``.
        teacher_topk_logprobs: ``[..., k]`` teacher log-probabilities of its top-k tokens.
        teacher_topk_ids: ``[..., k]`` their token ids (distinct within a position).
        mode: ``"renorm"`` or ``"tail"``.
        temperature: the student's logits are divided by it before the softmax.
    Returns:
        ``[...]`` per-position estimate.
    """
    _check_choice("mode", mode, SPARSE_MODES)
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} and teacher_topk_ids "
                         f"{tuple(teacher_topk_ids.shape)} must have the same shape")
    if teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher top-k leading shape {tuple(teacher_topk_ids.shape[:-1])} does not match "
                         f"student_logits {tuple(student_logits.shape[:-1])}")
    _check_k(teacher_topk_ids.shape[-1], student_logits.shape[-1])
    log_s = _log_probs(student_logits, temperature)
    ids = teacher_topk_ids.long()
    lt, ls = teacher_topk_logprobs.float(), log_s.gather(-1, ids)
    if mode == "renorm":
        return _kl_terms(_renorm(lt), _renorm(ls)).sum(dim=-1)
    lt_tail = _log1mexp(torch.logsumexp(lt, dim=-1, keepdim=True)).clamp(min=LOG_TAIL_FLOOR)
    lt = torch.cat([lt, lt_tail], dim=-1)
    ls = torch.cat([ls, _outside_logsumexp(log_s, ids).clamp(min=LOG_TAIL_FLOOR)], dim=-1)
    return _kl_terms(lt, ls).sum(dim=-1)
