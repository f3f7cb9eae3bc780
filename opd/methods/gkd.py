"""GKD: generalized knowledge distillation on student-generated sequences."""

from __future__ import annotations

import torch

from opd.losses.chunked import HeadInputs, chunked_divergence_loss
from opd.losses.divergences import generalized_jsd, masked_reduce
from opd.methods.base import LossOutput, Method
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.sampling.behaviour import DatasetPolicy, LambdaMixture, TeacherPolicy


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

    Args:
        beta: JSD interpolation β in [0, 1]; 0 = forward KL(T‖S), 1 = reverse KL(S‖T).
        lmbda: λ in [0, 1], probability that a batch is student-sampled (1 = fully on-policy).
        temperature: loss temperature applied to both logits (independent of sampling temperature).
        off_policy_source: where non-student batches come from: "dataset" or "teacher".
    """

    supports_hidden_loss = True

    def __init__(self, beta: float = 0.5, lmbda: float = 1.0, temperature: float = 1.0,
                 off_policy_source: str = "dataset") -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if off_policy_source not in ("dataset", "teacher"):
            raise ValueError(f"off_policy_source must be 'dataset' or 'teacher', got {off_policy_source!r}")
        self.beta, self.lmbda, self.temperature = beta, lmbda, temperature
        self.policy = LambdaMixture(lmbda, DatasetPolicy() if off_policy_source == "dataset" else TeacherPolicy())

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        per_token = generalized_jsd(student_logits, teacher_logits, beta=self.beta, temperature=self.temperature)
        loss = masked_reduce(per_token, batch.completion_mask, num_tokens)
        return LossOutput(loss, {"loss/jsd": loss.item(), f"gkd/{batch.source}_batches": 1.0})

    def loss_from_hidden(self, batch: RolloutBatch, student: HeadInputs, teacher: HeadInputs | None, num_tokens: int,
                         chunk_size: int) -> LossOutput:
        loss = chunked_divergence_loss(student.hidden, student.weight, teacher.hidden, teacher.weight, batch.completion_mask,
                                       generalized_jsd, num_tokens, chunk_size=chunk_size, temperature=self.temperature,
                                       student_bias=student.bias, teacher_bias=teacher.bias, beta=self.beta)
        return LossOutput(loss, {"loss/jsd": loss.item(), f"gkd/{batch.source}_batches": 1.0})
