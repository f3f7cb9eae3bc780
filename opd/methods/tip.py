"""TIP: full-vocabulary reverse KL on the tokens a Soft-OR of student entropy and divergence ranks highest."""

from __future__ import annotations

import torch

from opd.losses.divergences import entropy, masked_reduce, reverse_kl
from opd.methods.base import LossOutput, Method
from opd.methods.common import (
    NORMALIZATIONS,
    check_choice,
    check_positive,
    check_unit,
    selected_mean,
    top_fraction_mask,
)
from opd.registry import METHODS
from opd.sampling.behaviour import StudentPolicy
from opd.types import RolloutBatch


def minmax_per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` (x − min)/(max − min) over each row's real positions; 0 where a row is constant or padded."""
    real = mask.bool()
    x = values.detach().float()
    lo = x.masked_fill(~real, float("inf")).amin(dim=1, keepdim=True)
    hi = x.masked_fill(~real, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    ok = real & (span > 0)
    return torch.where(ok, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


@METHODS.register("tip")
class TIP(Method):
    """Token Importance in OPD (arXiv:2604.14084), Eqs. 7–9: reverse KL on the top-ρ tokens by Soft-OR score.

    For each student rollout y of m real tokens, with everything in the score detached:
        ĥ_t = minmax_t H(q_θ(·|c_t)),   δ̂_t = minmax_t KL(q_θ‖p_T)(c_t)     (min-max within the sequence)
        u_t = ĥ_t + δ̂_t − ĥ_t·δ̂_t = 1 − (1−ĥ_t)(1−δ̂_t)                    (Soft-OR)
        T   = the ⌊ρ·m⌋ positions with the largest u (at least 1; ties keep the earlier position)
        L   = (1/|T|) Σ_{t∈T} KL(q_θ(·|c_t) ‖ p_T(·|c_t))                    (full vocabulary, with gradient)
    The Soft-OR keeps uncertain tokens and low-entropy high-divergence ones (overconfident mistakes).

    Normalisation (ours, since a micro-batch only knows the step's total completion-token count N):
    ``normalize: kept`` (default) divides the kept-token sum by ρ·N, the step's kept-token count up to
    the floor / at-least-one rounding, approximating the paper's mean over kept tokens; ``all`` divides
    by N (dropped tokens count as 0, so the loss scale shrinks with ρ).

    Paper vs code: the public code (``HJSang/OPSD_OnPolicyDistillation``) has a different, unwired
    selector (multinomial sampling ∝ entropy^α·JSD^γ); the paper's deterministic Soft-OR top-ρ is what
    this implements. Default ρ and the min-max scope (per sequence here) are unverified.

    Args:
        rho: retention ratio ρ in (0, 1]; 1 keeps every token (plain full-vocabulary reverse-KL OPD).
        normalize: "kept" or "all" (see above).
        temperature: loss temperature of both distributions (score and loss).
    """

    def __init__(self, rho: float = 0.5, normalize: str = "kept", temperature: float = 1.0) -> None:
        check_unit("rho", rho, low_open=True)
        check_choice("normalize", normalize, NORMALIZATIONS)
        check_positive("temperature", temperature)
        self.rho, self.normalize, self.temperature = rho, normalize, temperature
        self.policy = StudentPolicy()

    def select(self, student_logits: torch.Tensor, rkl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool of the kept tokens, from the detached entropy and per-position reverse KL."""
        with torch.no_grad():
            h_hat = minmax_per_row(entropy(student_logits.detach(), self.temperature), mask)
            d_hat = minmax_per_row(rkl.detach(), mask)
            score = 1 - (1 - h_hat) * (1 - d_hat)  # = ĥ + δ̂ − ĥδ̂, exactly 1 at each row's max entropy / max KL (ties by position)
        return top_fraction_mask(score, mask, self.rho, per_sequence=True)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        mask = batch.completion_mask
        rkl = reverse_kl(student_logits, teacher_logits, self.temperature)
        keep = self.select(student_logits, rkl, mask)
        loss = selected_mean(rkl, keep, num_tokens, self.rho, self.normalize)
        return LossOutput(loss, {"tip/kept_fraction": keep.sum().item() / max(num_tokens, 1),
                                 "tip/reverse_kl": masked_reduce(rkl.detach(), mask, num_tokens).item()})
