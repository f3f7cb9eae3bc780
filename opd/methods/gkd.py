"""GKD: generalized knowledge distillation on student-generated sequences."""

from __future__ import annotations

import torch

from opd.losses.chunked import HeadInputs, chunked_divergence_loss
from opd.losses.divergences import generalized_jsd, masked_reduce
from opd.losses.topk import SPARSE_MODES
from opd.methods.base import LossOutput, Method
from opd.methods.common import check_choice, sparse_forward_kl, sparse_mode_blocker
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.sampling.behaviour import DatasetPolicy, LambdaMixture, TeacherPolicy
from opd.teachers.base import SparseTeacherLogprobs


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

    With a teacher server (``teacher.backend=vllm_server``, β = 0 only) the teacher is known by its
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

    supports_hidden_loss = True
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

    def sparse_teacher_top_k(self) -> int:
        return 1

    def sparse_teacher_blocker(self) -> str | None:
        if self.beta != 0.0:
            return (f"method.beta={self.beta}: the JSD needs the teacher's full distribution; only beta=0 (forward KL "
                    "on the teacher's top-k) runs from a server")
        return sparse_mode_blocker(self.sparse_mode, self.temperature)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor | SparseTeacherLogprobs | None, num_tokens: int) -> LossOutput:
        if isinstance(teacher_logits, SparseTeacherLogprobs):
            blocker = self.sparse_teacher_blocker()
            if blocker:
                raise ValueError(f"gkd: {blocker}")
            per_token = sparse_forward_kl(student_logits, teacher_logits, self.sparse_mode, self.temperature)
        else:
            per_token = generalized_jsd(student_logits, teacher_logits, beta=self.beta, temperature=self.temperature)
        loss = masked_reduce(per_token, batch.completion_mask, num_tokens)
        return LossOutput(loss, {"loss/jsd": loss.item(), f"gkd/{batch.source}_batches": 1.0})

    def loss_from_hidden(self, batch: RolloutBatch, student: HeadInputs, teacher: HeadInputs | None, num_tokens: int,
                         chunk_size: int) -> LossOutput:
        loss = chunked_divergence_loss(student.hidden, student.weight, teacher.hidden, teacher.weight, batch.completion_mask,
                                       generalized_jsd, num_tokens, chunk_size=chunk_size, temperature=self.temperature,
                                       student_bias=student.bias, teacher_bias=teacher.bias, beta=self.beta)
        return LossOutput(loss, {"loss/jsd": loss.item(), f"gkd/{batch.source}_batches": 1.0})
