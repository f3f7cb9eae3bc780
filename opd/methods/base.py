"""The interface every distillation method implements, and what its loss returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from opd.losses.chunked import HeadInputs
from opd.sampling.base import RolloutBatch
from opd.sampling.behaviour import BehaviourPolicy, StudentPolicy
from opd.teachers.base import SparseTeacherLogprobs

#: ``teacher.backend`` values: a local Hugging Face model (full logits) or a vLLM server (sparse log-probs)
TEACHER_BACKENDS = ("hf", "vllm_server")


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
        sum_over_ranks: a count -> its sum over all processes (the count itself in one process). A
            collective: every rank calls :meth:`Method.auxiliary_loss` for every micro-batch, so it is safe
            there. Normalising by a global count makes the rank-summed loss (what the DeepSpeed backend
            trains on: each rank's loss times the world size, averaged) equal the single-process loss.
    """

    tokenizer: Any
    device: Any
    student_logits: Callable[[RolloutBatch], torch.Tensor]
    teacher_logits: Callable[[RolloutBatch], torch.Tensor]
    grad_accum: int
    sum_over_ranks: Callable[[int], int] = int


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
    #: what :meth:`loss` can take as the teacher: "logits" (``[B, T, V]`` only) or "sparse" (also a
    #: :class:`SparseTeacherLogprobs`, top-k and sampled-token log-probs from ``teacher.backend=vllm_server``).
    teacher_inputs: ClassVar[str] = "logits"
    #: config keys whose default makes the loss depend on how a step's batch is split into micro-batches or
    #: ranks (a statistic over the micro-batch), each mapped to the value that makes it split-invariant.
    #: ``tests/test_pitfalls.py`` checks invariance with these values and that the default really differs.
    batch_dependent: ClassVar[dict[str, Any]] = {}
    #: the loss reads the sampled tokens' log-probs under the sampling distribution, log q_old(y_t) and
    #: log q_θ(y_t) (an importance ratio or a reward log p_T − log q): the policy-gradient methods.
    #: :meth:`check_sampler` then refuses top-p/top-k truncated sampling.
    uses_sampled_token_logprobs: ClassVar[bool] = False

    policy: BehaviourPolicy = StudentPolicy()

    @property
    def requires_teacher_model(self) -> bool:
        """Whether the ``teacher`` model must be loaded: for the loss or for sampling, unless it is the student's copy."""
        return (self.needs_teacher or self.policy.uses_teacher) and not self.teacher_is_initial_student

    def teacher_prompt(self, batch: RolloutBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``([B, P'], [B, P'])`` left-padded prompt the teacher is conditioned on instead of the batch's own
        (privileged information, OPSD); None = the same prompt as the student."""
        return None

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor | SparseTeacherLogprobs | None, num_tokens: int) -> LossOutput:
        """The loss on completion tokens.

        Args:
            batch: the rollouts (``completion_mask`` ``[B, T]`` marks the tokens that count).
            student_logits: ``[B, T, V]`` student logits at completion positions (with gradient).
            teacher_logits: ``[B, T, V]`` teacher logits at the same positions (no gradient); a
                :class:`SparseTeacherLogprobs` for methods with ``teacher_inputs == "sparse"`` under
                ``teacher.backend=vllm_server``; or None when ``needs_teacher`` is False.
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

    def check_sampler(self, temperature: float, top_p: float, top_k: int) -> None:
        """Whether the method can train on completions sampled with these settings; called at start-up.

        A method with ``uses_sampled_token_logprobs`` refuses top-p < 1 and top-k > 0: its ratio
        q_θ(y)/q_old(y) and reward log p_T(y) − log q(y) are those of the untruncated student at the
        sampling temperature, but a truncated sampler draws y from another distribution (renormalised
        on a subset of the vocabulary, which never proposes the tokens outside it), so both would be
        biased. vLLM's ``processed_logprobs`` are the truncated ones and do not fix this: the ratio then
        compares a truncated q_old with an untruncated q_θ, and the reverse KL is the untruncated student's.

        Raises:
            ValueError: one line naming the settings to change.
        """
        if self.uses_sampled_token_logprobs and (top_p < 1.0 or top_k > 0):
            name = getattr(type(self), "registry_name", type(self).__name__)
            raise ValueError(f"method {name!r} is a policy-gradient method (importance ratio and reward on the sampled "
                             f"tokens' untruncated log-probs) and cannot train on top-p/top-k truncated samples; set "
                             f"sampler.top_p=1.0 and sampler.top_k=0 (got top_p={top_p}, top_k={top_k})")

    def sparse_teacher_top_k(self) -> int:
        """The fewest top-k teacher log-probs per position the sparse loss needs (0: the sampled token's only)."""
        return 0

    def sparse_teacher_blocker(self) -> str | None:
        """Why this configuration needs full teacher logits although ``teacher_inputs == "sparse"``, or None."""
        return None

    def check_teacher_backend(self, backend: str, top_k: int | None = None) -> None:
        """Whether the method can run with ``teacher.backend``; called at start-up, before any model loads.

        ``vllm_server`` returns only the top-k and sampled-token log-probs, at temperature 1, and cannot
        sample: it needs ``teacher_inputs == "sparse"``, no blocker, a behaviour policy that does not
        sample from the teacher, and ``top_k >= sparse_teacher_top_k()``.

        Args:
            backend: one of :data:`TEACHER_BACKENDS`.
            top_k: the server's k (``teacher.server_top_k``), or None to skip that check.
        Raises:
            ValueError: one line naming the problem (and, for a method that needs logits, those that work).
        """
        if backend not in TEACHER_BACKENDS:
            raise ValueError(f"teacher.backend must be one of {TEACHER_BACKENDS}, got {backend!r}")
        if backend == "hf" or not (self.needs_teacher or self.policy.uses_teacher):
            return
        name = getattr(type(self), "registry_name", type(self).__name__)
        if self.teacher_is_initial_student:
            raise ValueError(f"method {name!r} distils from a frozen copy of the student, not a teacher server; "
                             "use teacher.backend=hf")
        if self.policy.uses_teacher:
            raise ValueError(f"method {name!r} samples completions from the teacher ({type(self.policy).__name__}), "
                             "which teacher.backend=vllm_server cannot do; use teacher.backend=hf")
        if self.teacher_inputs != "sparse":
            raise ValueError(f"method {name!r} needs the teacher's full logits; teacher.backend=vllm_server works with "
                             f"methods: {', '.join(sparse_teacher_methods())}")
        blocker = self.sparse_teacher_blocker()
        if blocker:
            raise ValueError(f"method {name!r} with teacher.backend=vllm_server: {blocker}")
        need = self.sparse_teacher_top_k()
        if top_k is not None and top_k < need:
            raise ValueError(f"method {name!r} needs the teacher's top-{need} log-probs; set teacher.server_top_k >= {need} "
                             f"(got {top_k})")

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


def sparse_teacher_methods() -> list[str]:
    """Registered methods whose loss can run from :class:`SparseTeacherLogprobs` (some only in some settings)."""
    import opd.methods  # noqa: F401  (registers every method)
    from opd.registry import METHODS

    return [name for name in METHODS if getattr(METHODS.get(name), "teacher_inputs", "logits") == "sparse"]
