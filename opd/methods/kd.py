"""KD: word-level knowledge distillation on the dataset's reference completions (off-policy baseline)."""

from __future__ import annotations

import torch

from opd.losses.divergences import forward_kl
from opd.losses.topk import SPARSE_MODES
from opd.methods.base import LossOutput, Method
from opd.methods.common import check_choice, mix_with_cross_entropy, sparse_forward_kl, sparse_mode_blocker
from opd.registry import METHODS
from opd.sampling.behaviour import DatasetPolicy
from opd.types import RolloutBatch, SparseTeacherLogprobs


@METHODS.register("kd")
class KD(Method):
    """Word-level KD (Hinton et al. 2015, arXiv:1503.02531; Kim & Rush 2016 Sec. 3.1) on dataset answers.

    Objective, per completion token of the dataset's reference answer (teacher forcing):
        L = (1 − w)·τ²·KL(p_T^τ ‖ q_θ^τ) + w·CE(y_t, q_θ)
    where ``p^τ = softmax(z/τ)`` is Hinton et al.'s softened distribution (Sec. 2, Eq. 1) and the
    soft-target term is multiplied by τ² because its gradients scale as 1/τ² (Sec. 2, end); at the
    default τ = 1 the factor is 1. The cross-entropy term is on the hard reference tokens at τ = 1.
    Reduction: token mean over all completion tokens of the optimizer step.

    Default w = 0: pure KD, which is what the divergence axis of the other methods is compared with.
    MiniLLM's KD baseline (Gu et al. 2024, Sec. 4.1; ``--kd-ratio 0.5`` in its ``kd_base.sh``) mixes
    0.5·CE + 0.5·KD, i.e. ``ce_weight: 0.5`` here. That code writes the soft-target term as the
    teacher cross-entropy −Σ p_T log q_θ, which differs from KL(p_T‖q_θ) only by the teacher's entropy
    (a constant: the same gradient), and has no τ² factor (it trains at τ = 1 where the two agree).

    With a teacher server (``teacher.kind: vllm_server``) the KL is the forward KL on the teacher's
    top-k (:func:`opd.losses.topk.sparse_topk_forward_kl`; ``sparse_mode`` "tail" or "renorm", τ ≠ 1
    only with "renorm").

    Args:
        temperature: loss temperature τ on both logits (> 0).
        ce_weight: w in [0, 1], the weight of the hard-label cross-entropy (1 = SFT).
        scale_by_t2: multiply the soft-target term by τ² (Hinton et al.); irrelevant at τ = 1.
        sparse_mode: top-k forward KL from a teacher server: "tail" or "renorm" (unused with full logits).
    """

    teacher_inputs = "sparse"

    def __init__(self, temperature: float = 1.0, ce_weight: float = 0.0, scale_by_t2: bool = True,
                 sparse_mode: str = "tail") -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
        check_choice("sparse_mode", sparse_mode, SPARSE_MODES)
        self.temperature, self.ce_weight, self.scale_by_t2 = temperature, ce_weight, scale_by_t2
        self.sparse_mode = sparse_mode
        self.policy = DatasetPolicy()

    def staleness_handling(self) -> str:
        return "as_is"  # forward KL(p_T‖q_θ): the teacher's distribution weighs each position

    def sparse_teacher_top_k(self) -> int:
        return 1

    def teacher_input_blocker(self, output: str) -> str | None:
        reason = super().teacher_input_blocker(output)
        if reason:
            return reason
        if output == "hidden" and self.ce_weight > 0:
            return (f"method.ce_weight={self.ce_weight}: the cross-entropy term needs the student's full logits "
                    "(the chunked path computes teacher-vs-student divergences only)")
        return sparse_mode_blocker(self.sparse_mode, self.temperature) if output == "sparse" else None

    def token_divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """KL(p_T^τ ‖ q_θ^τ) (Hinton et al. Sec. 2); the τ² factor is applied in :meth:`divergence_loss`."""
        return forward_kl(student_logits, teacher_logits, self.temperature)

    def sparse_token_divergence(self, student_logits: torch.Tensor, teacher: SparseTeacherLogprobs) -> torch.Tensor:
        """The forward KL on the teacher's top-k (another estimator of the same KL, exact at k = V in "tail" mode)."""
        return sparse_forward_kl(student_logits, teacher, self.sparse_mode, self.temperature)

    def divergence_loss(self, batch: RolloutBatch, divergence: torch.Tensor, student_logits: torch.Tensor | None,
                        num_tokens: int) -> LossOutput:
        fkl = divergence * (self.temperature ** 2 if self.scale_by_t2 else 1.0)
        metrics = {"loss/fkl": fkl.item()}
        if student_logits is None:  # the chunked path (ce_weight == 0)
            return LossOutput(fkl, metrics)
        return LossOutput(mix_with_cross_entropy(batch, student_logits, fkl, self.ce_weight, num_tokens, metrics), metrics)
