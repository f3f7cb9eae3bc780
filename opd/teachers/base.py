"""The teacher interface (:class:`Teacher`, one subclass per ``teacher.kind``) and what a sparse teacher returns."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from opd.sampling.base import RolloutBatch


@dataclasses.dataclass
class SparseTeacherLogprobs:
    """The teacher's next-token log-probabilities at a RolloutBatch's completion positions, top-k only.

    Position ``t`` is the teacher's distribution over ``completion_ids[:, t]`` given everything before
    it, as in :func:`opd.models.scoring.completion_logits`. Log-probabilities are at temperature 1
    (a vLLM server's prompt log-probs are the log-softmax of the raw logits whatever the request's
    temperature).

    Padding (positions where ``completion_mask`` is 0 and that were not scored) holds finite
    placeholders, so that losses stay finite before masking: ``topk_ids`` = 0, 1, ..., k−1 with
    ``topk_logprobs`` = −log k each (a valid uniform distribution), and ``token_logprobs`` = 0 (like
    ``RolloutBatch.sampler_logprobs``). Losses must mask them with ``completion_mask``.

    Attributes:
        topk_ids: ``[B, T, k]`` long, the teacher's k most likely tokens, most likely first.
        topk_logprobs: ``[B, T, k]`` float32, their log-probabilities (descending; ``-inf`` allowed).
        token_logprobs: ``[B, T]`` float32, log p_T(completion_ids[:, t]), exact even when the token is
            not among the top-k.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor

    def __post_init__(self) -> None:
        if self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[:-1] != self.token_logprobs.shape:
            raise ValueError(f"SparseTeacherLogprobs: topk_ids {tuple(self.topk_ids.shape)}, topk_logprobs "
                             f"{tuple(self.topk_logprobs.shape)} and token_logprobs {tuple(self.token_logprobs.shape)} "
                             "must be [B, T, k], [B, T, k] and [B, T]")

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    def truncate(self, k: int) -> SparseTeacherLogprobs:
        """The first ``k`` entries (the teacher's top-k, since entries are sorted by descending log-prob)."""
        if not 0 <= k <= self.k:
            raise ValueError(f"cannot truncate a top-{self.k} teacher output to k = {k}")
        return dataclasses.replace(self, topk_ids=self.topk_ids[..., :k], topk_logprobs=self.topk_logprobs[..., :k])

    def select_rows(self, rows: torch.Tensor) -> SparseTeacherLogprobs:
        """The rows ``rows`` (``[R]`` long) of the batch."""
        return SparseTeacherLogprobs(self.topk_ids.index_select(0, rows), self.topk_logprobs.index_select(0, rows),
                                     self.token_logprobs.index_select(0, rows))

    def to(self, device: torch.device | str) -> SparseTeacherLogprobs:
        return SparseTeacherLogprobs(self.topk_ids.to(device), self.topk_logprobs.to(device), self.token_logprobs.to(device))

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, batch: RolloutBatch, k: int) -> SparseTeacherLogprobs:
        """What a server would return for ``batch``, from local full logits (tests, and a sparse local path).

        Args:
            teacher_logits: ``[B, T, V]`` teacher logits at the completion positions.
            batch: the rollouts (padding placeholders where ``completion_mask`` is 0).
            k: entries kept per position, 0 <= k <= V.
        """
        logp = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
        top = logp.topk(k, dim=-1)
        token = logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        pad = padding_like(batch.completion_ids, k)
        real = batch.completion_mask.bool()
        return cls(torch.where(real[..., None], top.indices, pad.topk_ids),
                   torch.where(real[..., None], top.values, pad.topk_logprobs),
                   torch.where(real, token, pad.token_logprobs))


def padding_like(completion_ids: torch.Tensor, k: int) -> SparseTeacherLogprobs:
    """``[B, T]``-shaped placeholders (see :class:`SparseTeacherLogprobs`) to be overwritten at scored positions."""
    b, t = completion_ids.shape
    ids = torch.arange(k, dtype=torch.long, device=completion_ids.device).expand(b, t, k).clone()
    lps = torch.full((b, t, k), -math.log(k) if k else 0.0, dtype=torch.float32, device=completion_ids.device)
    return SparseTeacherLogprobs(ids, lps, torch.zeros((b, t), dtype=torch.float32, device=completion_ids.device))


#: what a teacher can give for a batch of completions: full logits ``[B, T, V]``, final hidden states with the output
#: head (:class:`opd.losses.chunked.HeadInputs`, for the chunked loss), or top-k log-probs (:class:`SparseTeacherLogprobs`)
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
        from opd.models.scoring import completion_logits

        logits = completion_logits(self.model, batch, *(prompt or ()))
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]

    def _hidden(self, batch: RolloutBatch, prompt):
        from opd.losses.chunked import completion_hidden_states

        return completion_hidden_states(self.model, batch, *(prompt or ())).first_rows(self.vocab_size)

    def _sparse(self, batch: RolloutBatch, prompt) -> SparseTeacherLogprobs:
        raise NotImplementedError
