"""The teacher interface (:class:`Teacher`, one subclass per ``teacher.kind``) and what a sparse teacher returns."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from opd.models.scoring import completion_hidden_states, completion_logits, trim_vocabulary
from opd.types import RolloutBatch, SparseTeacherLogprobs

#: what a teacher can give for a batch of completions: full logits ``[B, T, V]``, final hidden states with the output
#: head (:class:`opd.models.scoring.HeadInputs`, for the chunked loss), or top-k log-probs (:class:`SparseTeacherLogprobs`)
TEACHER_OUTPUTS = ("logits", "hidden", "sparse")


class Teacher:
    """A teacher kind (``teacher.kind``): scores a batch of completions, optionally under another prompt.

    A kind is one file, ``opd/teachers/<kind>.py``, registered with ``@TEACHERS.register("<kind>")``, plus one config
    entry ``conf/teacher/<name>.yaml`` with ``kind: <kind>``. Its ``Config`` dataclass is its schema (the keys of
    ``teacher.*``). It declares what it provides; the engine (:func:`opd.engine.loss_paths.select_loss_path`) picks the
    loss path from that and from what the method reads, and refuses impossible pairs at start-up.

    Life cycle: ``__init__`` (config only, before any model loads) -> :meth:`check` (cheap checks: paths exist) ->
    :meth:`setup` (loads, once the student is loaded) -> :meth:`score` per micro-batch.

    Attributes:
        provides: a subset of :data:`TEACHER_OUTPUTS`.
        model: the local ``nn.Module`` (sampling, evaluation, DeepSpeed), or None for a remote teacher.
        top_k: k of a sparse teacher (``provides`` has "sparse"), else 0.
        vocab_size: the vocabulary shared with the student, set by :meth:`setup`.
        chat_template: whether the teacher reads prompts through the chat template (must match the student's), or
            None when the teacher takes the student's token ids as they are (a server, the student's own copy).
        dtype: the model's ``dtype`` setting (DeepSpeed's teacher engine), or None.
        other_tokenizer: whether the teacher's tokenizer differs from the student's (known after :meth:`setup`).
    """

    Config: ClassVar[type] = None  # type: ignore[assignment]  (set by every kind: its dataclass schema)
    #: a model in this process: the behaviour policy can sample from it (SeqKD, MiniLLM) and evaluation can decode it
    local: ClassVar[bool] = True
    #: :meth:`score` needs nothing held by this process (a served teacher's HTTP client), so another process, the
    #: rollout worker of ``trainer.max_staleness``, may call it on a pickled copy
    scores_in_any_process: ClassVar[bool] = False
    provides: frozenset[str] = frozenset()
    model: torch.nn.Module | None = None
    top_k: int = 0
    chat_template: bool | None = None
    dtype: str | None = None
    #: the teacher's tokenizer is not the student's (set by :meth:`setup`): it then scores only the completion texts in
    #: its own tokenization (``provides == {"retokenized"}``), for the cross-tokenizer methods
    other_tokenizer: bool = False

    #: the teacher's ``model`` is the student's own module (``live``): the engine builds no DeepSpeed engine and no
    #: compiled copy for it, and the student's own engine runs it
    shares_student: ClassVar[bool] = False
    #: :meth:`after_update` reads every tensor of the student into the teacher's own copy (``ema``): refused where a
    #: process holds only a partition of either (ZeRO-3)
    averages_student: ClassVar[bool] = False
    #: score a prompt that several rows repeat once (``trainer.share_prompts``, set by the trainer)
    share_prompts: bool = False

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = self.Config() if cfg is None else cfg
        self.model = None
        self.vocab_size: int | None = None

    @property
    def kind(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def check(self) -> None:
        """Checks before any model loads (a path that does not exist). Raises a one-line ``OPDError``."""

    def check_sources(self, sources: set[str]) -> None:
        """Checks against the training data's sources (``Example.source``): several teachers route on them."""

    def setup(self, student: torch.nn.Module, tokenizer: Any, device: torch.device) -> int:
        """Load the teacher beside the loaded ``student``; return the vocabulary size the pair shares."""
        raise NotImplementedError

    def after_update(self, student: torch.nn.Module, steps_done: int) -> None:
        """Called after every optimizer update that changed the student's weights, ``steps_done`` steps into the run
        (an EMA teacher follows the student here); nothing by default."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the teacher besides its config (an EMA teacher's weights); empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a checkpoint of a run without teacher state gives ``{}``)."""

    def context_length(self) -> int | None:
        """The teacher's context in tokens (prompt + completion), or None when it declares none."""
        value = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    def score(self, batch: RolloutBatch, output: str, prompt: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The teacher on the batch's completion tokens, as ``output`` (one of ``provides``), no gradient.

        Args:
            batch: the rollouts.
            output: "logits" -> ``[B, T, V]``; "hidden" -> ``HeadInputs`` (``[B, T, H_t]`` and the head cut to
                ``vocab_size`` rows); "sparse" -> :class:`SparseTeacherLogprobs` (top-``top_k``, temperature 1).
            prompt: ``([B, P'], [B, P'])`` a left-padded prompt to condition on instead of the batch's own (OPSD).
        """
        if output not in self.provides:
            raise ValueError(f"teacher kind {self.kind!r} provides {sorted(self.provides)}, not {output!r}")
        with torch.no_grad():
            return getattr(self, f"_{output}")(batch, prompt)

    def _logits(self, batch: RolloutBatch, prompt) -> torch.Tensor:
        return trim_vocabulary(completion_logits(self.model, batch, *(prompt or (None, None)),
                                                 share_prompts=self.share_prompts), self.vocab_size)

    def _hidden(self, batch: RolloutBatch, prompt):
        return completion_hidden_states(self.model, batch, *(prompt or (None, None)),
                                        share_prompts=self.share_prompts).first_rows(self.vocab_size)

    def _sparse(self, batch: RolloutBatch, prompt) -> SparseTeacherLogprobs:
        raise NotImplementedError
