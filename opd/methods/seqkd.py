"""SeqKD: sequence-level knowledge distillation, i.e. SFT on the teacher's own completions (baseline)."""

from __future__ import annotations

import torch

from opd.data.base import Example
from opd.errors import TrainingError
from opd.methods.base import LossOutput, Method
from opd.methods.common import completion_cross_entropy
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.sampling.behaviour import RolloutContext, TeacherPolicy


class TeacherDecodePolicy(TeacherPolicy):
    """The teacher writes the completions with the configured sampler, sampled or greedy.

    Args:
        greedy: decode the teacher greedily (beam size 1) instead of sampling at ``sampler.temperature``.
    """

    def __init__(self, greedy: bool = False) -> None:
        self.greedy = greedy

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        if ctx.teacher is None:
            raise TrainingError("seqkd needs a teacher model to write completions, but teacher is null; "
                                "set teacher=<name> (e.g. teacher=toy)")
        batch = ctx.sampler.generate(ctx.teacher, ctx.tokenizer, examples, greedy=self.greedy)
        batch.source = "teacher"
        batch.sampler_logprobs = None  # the teacher's log-probs; ``sampler_logprobs`` means the student's q_old
        return batch


@METHODS.register("seqkd")
class SeqKD(Method):
    """Sequence-level KD (Kim & Rush 2016, arXiv:1606.07947, Sec. 3.2): student cross-entropy on teacher outputs.

    Objective: L_SEQ-KD = −Σ_y p_T(y|x) log q_θ(y|x), which the paper approximates by the teacher's
    mode, L ≈ −log q_θ(ŷ|x) with ŷ the teacher's beam-search output, generated
    once, offline, for the training set. Here the teacher writes a fresh completion for every prompt
    of every micro-batch with the configured sampler (``sampler.temperature``, top-p, top-k): a
    Monte-Carlo estimate of the unapproximated objective. MiniLLM's SeqKD baseline (Gu et al. 2024,
    Sec. 4.1; ``generate_data_seqkd.sh``) also samples (temperature 1, top-p 1), but once per prompt,
    offline. ``greedy: true`` decodes the teacher greedily, the closest we have to the paper's beam
    search (beam size 1). So the default (sampling) departs from the paper's mode approximation on
    purpose; no beam search is offered. Loss: token-level cross-entropy on the teacher's completion
    tokens (EOS included), token mean over the step.

    The loss needs no teacher logits (``needs_teacher = False``: no teacher forward pass per
    micro-batch), but the policy needs the teacher model: the trainer loads it whenever the
    ``teacher`` config is set (the default ``teacher: toy``); without one (``~teacher``) the first
    rollout fails with a clear error.

    Args:
        greedy: decode the teacher greedily instead of sampling.
        label_smoothing: cross-entropy label smoothing in [0, 1) (0 in the paper).
    """

    needs_teacher = False

    def __init__(self, greedy: bool = False, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.greedy, self.label_smoothing = greedy, label_smoothing
        self.policy = TeacherDecodePolicy(greedy)

    def staleness_handling(self) -> str:
        return "as_is"  # cross-entropy on the teacher's tokens

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        loss = completion_cross_entropy(batch, student_logits, num_tokens, self.label_smoothing)
        return LossOutput(loss, {"loss/ce": loss.item(), f"seqkd/{batch.source}_batches": 1.0})
