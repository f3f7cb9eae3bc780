"""GKD: generalized knowledge distillation on student-generated sequences."""

from __future__ import annotations

import torch

from opd.losses.divergences import generalized_jsd
from opd.losses.topk import SPARSE_MODES
from opd.methods.base import LossOutput, Method
from opd.methods.common import check_choice, sparse_forward_kl, sparse_mode_blocker
from opd.registry import METHODS
from opd.sampling.behaviour import DatasetPolicy, LambdaMixture, TeacherPolicy
from opd.types import RolloutBatch, SparseTeacherLogprobs


@METHODS.register("gkd")
class GKD(Method):
    """GKD (Agarwal et al., ICLR 2024, arXiv:2306.13649): generalized JSD(β) on a λ-mix of student and fixed data.

    Objective (paper Eq. 3 with Eq. 1 as D):
        L(θ) = (1−λ)·E_{(x,y)~data}[D_JSD(β)] + λ·E_{x~data, y~q_θ(·|x)}[D_JSD(β)]
    Algorithm 1: each batch flips a coin; with probability λ its completions are sampled from the
    current student (no gradient through sampling), otherwise they come from the off-policy source
    (dataset answers, or teacher samples for the SeqKD-style variant). D is computed exactly over the
    full vocabulary at every completion token and averaged over all completion tokens of the step
    (TRL's token mean; the paper averages per sequence first). β = 0 / 1 are exactly forward / reverse
    KL, as in TRL.

    With a teacher server (``teacher.kind: vllm_server``, β = 0 only) the teacher is known by its
    top-k log-probs, and D is the forward KL on that support (:func:`opd.losses.topk.sparse_topk_forward_kl`):
    ``sparse_mode: tail`` adds a bucket for the mass outside the top-k (the full forward KL at k = V),
    ``renorm`` renormalises both distributions on the top-k.

    Args:
        beta: JSD interpolation β in [0, 1]; 0 = forward KL(T‖S), 1 = reverse KL(S‖T).
        lmbda: λ in [0, 1], probability that a batch is student-sampled (1 = fully on-policy).
        temperature: loss temperature applied to both logits (independent of sampling temperature).
        off_policy_source: where non-student batches come from: "dataset" or "teacher".
        sparse_mode: top-k forward KL from a teacher server: "tail" or "renorm" (unused with full logits).
    """

    teacher_inputs = "sparse"

    def __init__(self, beta: float = 0.5, lmbda: float = 1.0, temperature: float = 1.0,
                 off_policy_source: str = "dataset", sparse_mode: str = "tail") -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if off_policy_source not in ("dataset", "teacher"):
            raise ValueError(f"off_policy_source must be 'dataset' or 'teacher', got {off_policy_source!r}")
        check_choice("sparse_mode", sparse_mode, SPARSE_MODES)
        self.beta, self.lmbda, self.temperature, self.sparse_mode = beta, lmbda, temperature, sparse_mode
        self.policy = LambdaMixture(lmbda, DatasetPolicy() if off_policy_source == "dataset" else TeacherPolicy())

    def staleness_handling(self) -> str:
        """β = 0 is the forward KL, used as is on stale rollouts; any β > 0 has a student side, recomputed."""
        return "as_is" if self.beta == 0.0 else "recompute"

    def sparse_teacher_top_k(self) -> int:
        return 1

    def teacher_input_blocker(self, output: str) -> str | None:
        reason = super().teacher_input_blocker(output)
        if reason or output != "sparse":
            return reason
        if self.beta != 0.0:
            return (f"method.beta={self.beta}: the JSD needs the teacher's full distribution; only beta=0 (forward KL "
                    "on the teacher's top-k) runs from a sparse teacher")
        return sparse_mode_blocker(self.sparse_mode, self.temperature)

    def token_divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Generalized JSD(β) at temperature τ (paper Eq. 1)."""
        return generalized_jsd(student_logits, teacher_logits, beta=self.beta, temperature=self.temperature)

    def sparse_token_divergence(self, student_logits: torch.Tensor, teacher: SparseTeacherLogprobs) -> torch.Tensor:
        """β = 0 only: the forward KL on the teacher's top-k (the JSD needs the full teacher distribution)."""
        blocker = self.teacher_input_blocker("sparse")
        if blocker:
            raise ValueError(f"gkd: {blocker}")
        return sparse_forward_kl(student_logits, teacher, self.sparse_mode, self.temperature)

    def divergence_loss(self, batch: RolloutBatch, divergence: torch.Tensor, student_logits: torch.Tensor | None,
                        num_tokens: int) -> LossOutput:
        return LossOutput(divergence, {"loss/jsd": divergence.item(), f"gkd/{batch.source}_batches": 1.0})
