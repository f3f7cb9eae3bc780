"""The interface every distillation method implements, and what its loss returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from opd.losses.divergences import masked_reduce
from opd.sampling.behaviour import BehaviourPolicy, StudentPolicy
from opd.types import RolloutBatch, SparseTeacherLogprobs


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

    #: the config name (``method.name``) the class is registered under by ``METHODS.register``; a subclass starts
    #: with its class name, so an unregistered one (a test's) still has a name for messages
    registry_name: ClassVar[str] = "Method"
    #: whether the loss needs teacher logits (SFT does not).
    needs_teacher: ClassVar[bool] = True
    #: a teacher kind the method is defined by, used whatever ``teacher`` says (OPSD: "initial_student"); None = the
    #: configured teacher
    teacher_kind: ClassVar[str | None] = None
    #: the trainer computes a validation loss at each evaluation and passes it to ``on_evaluate``.
    needs_validation_loss: ClassVar[bool] = False
    #: what :meth:`loss` can take as the teacher: "logits" (``[B, T, V]`` only), "sparse" (also a
    #: :class:`SparseTeacherLogprobs`, top-k and sampled-token log-probs from a ``vllm_server`` teacher), or
    #: "retokenized" (only a :class:`RetokenizedTeacher`: the cross-tokenizer methods, any pair of tokenizers).
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

    #: the ways a loss can train on rollouts sampled by older weights (``trainer.max_staleness > 0``)
    STALENESS_HANDLINGS: ClassVar[tuple[str, ...]] = ("as_is", "recompute", "importance_ratio")


    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.registry_name = cls.__name__  # METHODS.register replaces it with the config name
    def staleness_handling(self) -> str:
        """How this loss, as configured, treats rollouts sampled by weights up to ``trainer.max_staleness`` steps old.

        - ``"as_is"``: a full-vocabulary forward KL (the teacher's distribution at each position weighs the
          student's log-probabilities): the stale tokens only set where it is measured, and it is used as is.
        - ``"recompute"``: a full-vocabulary divergence with a student side (reverse KL, JSD, skew KL) or a
          selection read off the student: every student quantity is recomputed from the current weights at
          learner time, never taken from the sampler (the AsyncOPD study finds reverse KL needs this).
        - ``"importance_ratio"``: a sampled-token / policy-gradient loss: the ratio q_θ(y)/q_old(y) against the
          behaviour log-probs the worker recorded, PPO-clipped, and the reward's student side from the
          current weights (:func:`opd.methods.common.reward_logprobs`).
        Listed per method in ``docs/methods.md`` ("Stale rollouts"). The default follows
        ``uses_sampled_token_logprobs``; methods whose divergence is a forward KL override it.
        """
        return "importance_ratio" if self.uses_sampled_token_logprobs else "recompute"

    def staleness_blocker(self) -> str | None:
        """Why this method, as configured, cannot train with ``trainer.max_staleness > 0``, or None. One line, read at
        start-up: the behaviour policy's reason (:meth:`BehaviourPolicy.async_blocker`), or an unclipped ratio."""
        reason = self.policy.async_blocker()
        if reason is not None:
            return reason
        if self.staleness_handling() == "importance_ratio" and getattr(self, "clip_eps", None) is None:
            return ("its importance ratio is unclipped (method.clip_eps=null): stale rollouts need the PPO clip; set "
                    "method.clip_eps (e.g. 0.2)")
        return None

    def bind(self, task: Any, tokenizer: Any) -> None:
        """Called once by the trainer before the first rollout, with the run's task (its answer checker, e.g. a
        reward) and the shared tokenizer; nothing by default."""

    def teacher_prompt(self, batch: RolloutBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``([B, P'], [B, P'])`` left-padded prompt the teacher is conditioned on instead of the batch's own
        (privileged information, OPSD); None = the same prompt as the student."""
        return None

    def loss(self, batch: RolloutBatch, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor | SparseTeacherLogprobs | None, num_tokens: int) -> LossOutput:
        """The loss on completion tokens.

        A method whose loss is a per-token divergence declares :meth:`token_divergence` (and, to run from a sparse
        teacher, :meth:`sparse_token_divergence`) and :meth:`divergence_loss` instead: this default then is its
        loss, and the engine derives the chunked hidden-state path from the same :meth:`token_divergence`.

        Args:
            batch: the rollouts (``completion_mask`` ``[B, T]`` marks the tokens that count).
            student_logits: ``[B, T, V]`` student logits at completion positions (with gradient).
            teacher_logits: ``[B, T, V]`` teacher logits at the same positions (no gradient); a
                :class:`SparseTeacherLogprobs` for methods with ``teacher_inputs == "sparse"`` under a sparse
                teacher (``teacher.kind: vllm_server``); or None when ``needs_teacher`` is False.
            num_tokens: completion tokens in the whole optimizer step (the normaliser).
        """
        if not self.has_token_divergence:
            raise NotImplementedError(f"{type(self).__name__} implements neither loss nor token_divergence")
        if isinstance(teacher_logits, SparseTeacherLogprobs):
            per_token = self.sparse_token_divergence(student_logits, teacher_logits)
        else:
            per_token = self.token_divergence(student_logits, teacher_logits)
        return self.divergence_loss(batch, masked_reduce(per_token, batch.completion_mask, num_tokens), student_logits,
                                    num_tokens)

    def token_divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``[...]`` the method's divergence D(teacher ‖ student) at each position, from ``[..., V]`` logits of both
        (the method's temperature and coefficients applied). Declared once: the full-logits loss and the chunked
        hidden-state loss (``trainer.loss_chunk_size``, :mod:`opd.engine.loss_paths`) both use it."""
        raise NotImplementedError

    def sparse_token_divergence(self, student_logits: torch.Tensor, teacher: SparseTeacherLogprobs) -> torch.Tensor:
        """``[B, T]`` the divergence from a sparse teacher's top-k log-probs (methods with ``teacher_inputs == "sparse"``).

        It stays a second function where the divergence needs the teacher's full distribution (a JSD, a skew KL):
        on the top-k support it is another estimator (:func:`opd.losses.topk.sparse_topk_forward_kl`), not the same
        formula on other inputs."""
        raise NotImplementedError

    def divergence_loss(self, batch: RolloutBatch, divergence: torch.Tensor, student_logits: torch.Tensor | None,
                        num_tokens: int) -> LossOutput:
        """The loss and metrics from the masked token sum of :meth:`token_divergence` divided by ``num_tokens``.

        Args:
            divergence: that scalar (with gradient), from any path.
            student_logits: ``[B, T, V]`` on the full-logits and sparse paths (e.g. for a cross-entropy term); None on
                the chunked hidden-state path, which :meth:`teacher_input_blocker` refuses for configurations needing it.
        """
        return LossOutput(divergence, {"loss/divergence": divergence.item()})

    @property
    def has_token_divergence(self) -> bool:
        """Whether the method declares :meth:`token_divergence` (its loss is a per-token divergence)."""
        return type(self).token_divergence is not Method.token_divergence

    def teacher_input_blocker(self, output: str) -> str | None:
        """Why the loss, as configured, cannot run from the teacher's ``output``, or None if it can.

        ``output`` is "logits" (full ``[B, T, V]``), "hidden" (the chunked path: hidden states and heads, needs
        :meth:`token_divergence`) or "sparse" (top-k log-probs, needs ``teacher_inputs == "sparse"``). Methods add
        their configuration-dependent reasons (``super()`` first). One line, read by
        :func:`opd.engine.loss_paths.check_pair` at start-up.
        """
        if output == "hidden" and not self.has_token_divergence:
            return "its loss is not a per-token divergence of the two distributions (no chunked hidden-state path)"
        if self.teacher_inputs == "retokenized":
            if output != "retokenized":
                return "it reads the teacher in the teacher's own tokenization, which only a local teacher (hf) gives"
            return None
        if output == "retokenized":
            return (f"the teacher's tokenizer differs from the student's and method {self.registry_name!r} needs one "
                    f"shared vocabulary; distil across tokenizers with a cross-tokenizer method: "
                    f"{', '.join(cross_tokenizer_methods())}, or train on the teacher's text (seqkd, rs_seqkd)")
        if output == "sparse" and self.teacher_inputs != "sparse":
            return (f"it needs the teacher's full logits; a sparse teacher works with methods: "
                    f"{', '.join(sparse_teacher_methods())}")
        return None

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
            raise ValueError(f"method {self.registry_name!r} is a policy-gradient method (importance ratio and reward on "
                             f"the sampled tokens' untruncated log-probs) and cannot train on top-p/top-k truncated samples; set "
                             f"sampler.top_p=1.0 and sampler.top_k=0 (got top_p={top_p}, top_k={top_k})")

    def sparse_teacher_top_k(self) -> int:
        """The fewest top-k teacher log-probs per position the sparse loss needs (0: the sampled token's only)."""
        return 0

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
    from opd.registry import METHODS  # every built-in is declared there and imported on first use

    return [name for name in METHODS if getattr(METHODS.get(name), "teacher_inputs", "logits") == "sparse"]


def cross_tokenizer_methods() -> list[str]:
    """The registered methods that learn from a teacher with another tokenizer (``teacher_inputs == "retokenized"``)."""
    from opd.registry import METHODS

    return [name for name in METHODS if getattr(METHODS.get(name), "teacher_inputs", "logits") == "retokenized"]
