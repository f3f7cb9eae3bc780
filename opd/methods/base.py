"""The interface every distillation method implements, and what its loss returns."""

from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

import torch

from opd.sampling.base import RolloutBatch


@dataclasses.dataclass
class LossOutput:
    """A micro-batch's loss contribution.

    Attributes:
        loss: scalar to back-propagate, already divided by the step's global completion-token
            count, so the micro-batch losses of one optimizer step add up to the step's loss.
        metrics: values on the same scale (additive over micro-batches), e.g. ``{"loss/jsd": ...}``.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Method:
    """A distillation method: who writes the completions (behaviour policy) and the loss on them.

    Subclasses register with ``@METHODS.register("<name>")``; their ``__init__`` keyword arguments
    are the method's config keys (``conf/method/<name>.yaml``), checked by name and type at start-up.
    """

    #: whether the loss needs teacher logits (SFT does not).
    needs_teacher: ClassVar[bool] = True

    def behaviour(self, rng: random.Random) -> str:
        """Who writes this micro-batch's completions: "student", "teacher" or "dataset"."""
        return "student"

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             num_tokens: int) -> LossOutput:
        """The loss on completion tokens.

        Args:
            batch: the rollouts (``completion_mask`` ``[B, T]`` marks the tokens that count).
            student_logits: ``[B, T, V]`` student logits at completion positions (with gradient).
            teacher_logits: ``[B, T, V]`` teacher logits at the same positions (no gradient), or
                None when ``needs_teacher`` is False.
            num_tokens: completion tokens in the whole optimizer step (the normaliser).
        """
        raise NotImplementedError
