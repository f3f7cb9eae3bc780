"""The interface every distillation method implements, and what its loss returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from opd.losses.chunked import HeadInputs
from opd.sampling.base import RolloutBatch
from opd.sampling.behaviour import BehaviourPolicy, StudentPolicy


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


@dataclasses.dataclass
class AuxiliaryContext:
    """What :meth:`Method.auxiliary_loss` may use besides the rollouts.

    Attributes:
        tokenizer: the shared tokenizer.
        device: where the models are.
        student_logits: batch -> ``[B, T, V]`` student logits at its completion positions (with gradient).
        teacher_logits: batch -> the teacher's (no gradient).
        grad_accum: micro-batches per optimizer step (to normalise a per-micro-batch mean).
    """

    tokenizer: Any
    device: Any
    student_logits: Callable[[RolloutBatch], torch.Tensor]
    teacher_logits: Callable[[RolloutBatch], torch.Tensor]
    grad_accum: int


class Method:
    """A distillation method: a behaviour policy (who writes the completions) and a loss on them.

    Subclasses register with ``@METHODS.register("<name>")``; their ``__init__`` keyword arguments
    are the method's config keys (``conf/method/<name>.yaml``), checked by name and type at start-up.
    ``__init__`` sets ``self.policy`` (on-policy student sampling unless it says otherwise).
    """

    #: whether the loss needs teacher logits (SFT does not).
    needs_teacher: ClassVar[bool] = True
    #: the teacher is a frozen copy of the student at step 0 instead of the ``teacher`` model (OPSD).
    teacher_is_initial_student: ClassVar[bool] = False
    #: the trainer computes a validation loss at each evaluation and passes it to ``on_evaluate``.
    needs_validation_loss: ClassVar[bool] = False
    #: :meth:`loss_from_hidden` computes the same loss from hidden states without full logits (``trainer.loss_chunk_size``).
    supports_hidden_loss: ClassVar[bool] = False

    policy: BehaviourPolicy = StudentPolicy()

    @property
    def requires_teacher_model(self) -> bool:
        """Whether the ``teacher`` model must be loaded: for the loss or for sampling, unless it is the student's copy."""
        return (self.needs_teacher or self.policy.uses_teacher) and not self.teacher_is_initial_student

    def teacher_prompt(self, batch: RolloutBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``([B, P'], [B, P'])`` left-padded prompt the teacher is conditioned on instead of the batch's own
        (privileged information, OPSD); None = the same prompt as the student."""
        return None

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

    def loss_from_hidden(self, batch: RolloutBatch, student: HeadInputs, teacher: HeadInputs | None, num_tokens: int,
                         chunk_size: int) -> LossOutput:
        """The same loss as :meth:`loss`, from final hidden states and output heads, ``chunk_size`` positions of
        logits at a time (only called when ``supports_hidden_loss``).

        Args:
            student: ``[B, T, H]`` student hidden states at completion positions (with gradient) and its head.
            teacher: the teacher's (no gradient), or None when ``needs_teacher`` is False.
        """
        raise NotImplementedError

    def check_vocabulary(self, vocab_size: int) -> None:
        """Checks that need the vocabulary size, called once the models are loaded (e.g. top-K <= V).

        Raises:
            ValueError: naming the ``method.<key>`` that does not fit.
        """

    def auxiliary_loss(self, batch: RolloutBatch, ctx: AuxiliaryContext) -> LossOutput | None:
        """An extra term on sequences other than the rollouts (MiniLLM's language-modelling term); none by default.

        Added to :meth:`loss` of the same micro-batch before the backward pass; its metrics are logged too.
        """
        return None

    def on_evaluate(self, validation_loss: float | None) -> dict[str, float]:
        """Called after each evaluation; returns metrics to log. Forwards to the behaviour policy."""
        return self.policy.on_evaluate(validation_loss) if validation_loss is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (replay buffers, schedules)."""
        return {"policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state.get("policy", {}))
