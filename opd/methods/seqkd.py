"""SeqKD: sequence-level knowledge distillation, i.e. SFT on the teacher's own completions (baseline)."""

from __future__ import annotations

import torch

from opd.errors import TrainingError
from opd.methods.base import LossOutput, Method
from opd.methods.common import completion_cross_entropy
from opd.registry import METHODS
from opd.sampling.behaviour import RolloutContext, TeacherPolicy
from opd.types import Example, RolloutBatch


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
        return ctx.sample_teacher(examples, greedy=self.greedy)


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


class CorrectTeacherSamplePolicy(TeacherPolicy):
    """The teacher samples ``candidates`` completions per prompt; the first one the task judges correct is kept.

    A prompt with no correct candidate keeps its first candidate with an all-zero completion mask, so it adds no
    loss (and no token to the step's normaliser). ``extras["accepted"]`` (``[B]``, 1.0 or 0.0) says which rows count.

    Args:
        candidates: teacher samples drawn per prompt (one generate call with ``n`` = candidates).
    """

    #: the task's answer checker decides which samples are trained on (the shared checks give untrained tiny teachers,
    #: which are never right, a stand-in checker so that the loss is not empty)
    judges_samples = True

    def __init__(self, candidates: int) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.candidates = candidates

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        if ctx.teacher is None:
            raise TrainingError("rs_seqkd needs a teacher model to write completions, but teacher is null; "
                                "set teacher=<name> (e.g. teacher=toy)")
        if ctx.task is None:
            raise TrainingError("rs_seqkd needs the task's answer checker (RolloutContext.task) to judge samples")
        batch = ctx.sample_teacher(examples, n=self.candidates)
        texts = [ctx.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(batch.completion_ids, batch.completion_mask)]
        correct = [ctx.task.is_correct(text, example) for text, example in zip(texts, batch.examples)]
        rows, accepted = [], []
        for first in range(0, len(correct), self.candidates):  # rows are grouped by example
            group = correct[first : first + self.candidates]
            hit = next((i for i, ok in enumerate(group) if ok), None)
            rows.append(first + (hit if hit is not None else 0))
            accepted.append(hit is not None)
        batch = batch.select(torch.tensor(rows, device=batch.completion_ids.device))
        keep = torch.tensor(accepted, device=batch.completion_mask.device)
        batch.completion_mask = batch.completion_mask * keep.to(batch.completion_mask.dtype)[:, None]
        batch.extras["accepted"] = keep.float()
        return batch


@METHODS.register("rs_seqkd")
class RejectionSampledSeqKD(SeqKD):
    """Rejection-sampled SeqKD: cross-entropy on the teacher's *correct* samples only (rejection sampling
    fine-tuning, Yuan et al. 2023, arXiv:2308.01825 Sec. 3.3; the STaR filter, Zelikman et al. 2022, Sec. 3.1, with
    the teacher as the sampler). The teacher draws ``candidates`` completions per prompt at ``sampler.temperature``;
    the first that the task's checker accepts is the target, and prompts without one are left out of the step.
    Loss: token-level cross-entropy on the kept completions (EOS included), token mean over the step.

    Args:
        candidates: teacher samples per prompt (4 by default: the chance of at least one correct grows as 1-(1-p)^k).
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    def __init__(self, candidates: int = 4, label_smoothing: float = 0.0) -> None:
        super().__init__(greedy=False, label_smoothing=label_smoothing)
        self.candidates = candidates
        self.policy = CorrectTeacherSamplePolicy(candidates)

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        out = super().loss(batch, student_logits, teacher_logits, num_tokens)
        accepted = batch.extras.get("accepted")
        if accepted is not None:  # summed over micro-batches by the trainer: the step's count of accepted prompts
            out.metrics["rs_seqkd/accepted_prompts"] = float(accepted.sum())
        return out
