"""The data types every layer shares: a task example, a batch of rollouts and a sparse teacher's log-probs.

They live below every other ``opd`` module (only torch and the standard library are imported here), so that data,
models, samplers, teachers and methods can all pass them around without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance.

    Attributes:
        prompt: the text the model is conditioned on (already formatted).
        target: a reference completion (worked solution + final answer), used by off-policy
            methods (SFT, dataset batches of GKD) and as privileged information (OPSD).
        answer: the gold final answer, compared by exact match after extraction.
        source: the task this example came from in a mixed dataset (``data=mixture``), which routes it to its
            teacher and its scoring; "" for a single task.
        plain_prompt: the prompt before the student's chat template, when one was applied.
    """

    prompt: str
    target: str
    answer: str
    #: keyword-only, so that subclasses' positional fields (InstructExample's references) keep their place
    source: str = dataclasses.field(default="", kw_only=True)
    #: the task's prompt before a chat template rewrote ``prompt`` ("" = ``prompt`` is the plain one): a teacher with
    #: another tokenizer renders it its own way (cross-tokenizer methods)
    plain_prompt: str = dataclasses.field(default="", kw_only=True)


@dataclasses.dataclass
class RolloutBatch:
    """Prompts and completions, laid out so that ``cat(prompt_ids, completion_ids)`` is the sequence.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompt tokens.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens, 0 on left padding.
        completion_ids: ``[B, T]`` right-padded completion tokens (EOS included when produced).
        completion_mask: ``[B, T]`` 1 on completion tokens the loss sees, 0 on padding after EOS.
        examples: the task examples the prompts came from (answers, reference solutions).
        source: who wrote the completions: "student", "teacher", "dataset", "mixed" or "replay".
        temperature: the sampling temperature the completions were drawn at (1.0 for given text).
        sampler_logprobs: ``[B, T]`` log-probability of each completion token under the student's
            sampling distribution at generation time (q_old for importance ratios), when known.
        extras: policy-specific per-token tensors (e.g. ``mix_logprobs`` of teacher-mixed sampling).
        policy_version: the optimizer step of the student weights that sampled the completions, when the
            rollout worker wrote them (``trainer.max_staleness > 0``); None for rollouts written in the step.
        staleness: optimizer steps between those weights and the ones that train on the batch (0 = fresh);
            set by the trainer when it takes the batch. Sampled-token methods then take the student's side
            of their reward from the current weights (:func:`opd.methods.common.reward_logprobs`).
        teacher_scores: the teacher's sparse log-probs on the completion tokens
            (:class:`SparseTeacherLogprobs`) when the rollout worker already asked a served
            teacher for them; None = the learner scores the batch.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    examples: list[Example]
    source: str
    sampler_logprobs: torch.Tensor | None = None
    temperature: float = 1.0
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    policy_version: int | None = None
    staleness: int = 0
    teacher_scores: Any = None

    @property
    def input_ids(self) -> torch.Tensor:
        """``[B, P+T]`` the full sequences."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, P+T]``: prompt padding masked, completion padding kept visible (it is never a query that counts)."""
        return torch.cat([self.prompt_mask, torch.ones_like(self.completion_mask)], dim=1)

    @property
    def num_tokens(self) -> int:
        """Completion tokens that the loss counts."""
        return int(self.completion_mask.sum().item())

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The rows ``rows`` (``[R]`` long) of every ``[B, ...]`` tensor and of ``examples``, widths unchanged."""
        pick = {f.name: getattr(self, f.name).index_select(0, rows) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **pick, examples=[self.examples[i] for i in rows.tolist()],
                                   extras={k: v.index_select(0, rows) for k, v in self.extras.items()},
                                   teacher_scores=None if self.teacher_scores is None else
                                   self.teacher_scores.select_rows(rows))

    def to(self, device: torch.device | str) -> RolloutBatch:
        move = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **move, extras={k: v.to(device) for k, v in self.extras.items()},
                                   teacher_scores=None if self.teacher_scores is None else self.teacher_scores.to(device))

    def state_dict(self) -> dict[str, Any]:
        """The batch as tensors and plain values (a checkpoint loads it with ``weights_only=True``)."""
        tensors = {f.name: getattr(self, f.name).cpu() for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        examples = [{"type": f"{type(e).__module__}.{type(e).__qualname__}", "fields": dataclasses.asdict(e)}
                    for e in self.examples]
        scores = None if self.teacher_scores is None else {
            f.name: getattr(self.teacher_scores, f.name).cpu() for f in dataclasses.fields(self.teacher_scores)}
        return {"tensors": tensors, "extras": {k: v.cpu() for k, v in self.extras.items()}, "examples": examples,
                "source": self.source, "temperature": self.temperature, "policy_version": self.policy_version,
                "teacher_scores": scores}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> RolloutBatch:
        """The batch :meth:`state_dict` wrote, its tensors on ``device``.

        Raises:
            ValueError: if an example's class is not a :class:`~opd.data.base.Example` subclass.
        """
        examples = [_example_from_state(entry) for entry in state["examples"]]
        tensors = {name: tensor.to(device) for name, tensor in state["tensors"].items()}
        scores = state.get("teacher_scores")
        return cls(**tensors, examples=examples, source=state["source"], temperature=state["temperature"],
                   extras={k: v.to(device) for k, v in state["extras"].items()}, policy_version=state["policy_version"],
                   teacher_scores=None if scores is None else SparseTeacherLogprobs(**scores).to(device))


def _example_from_state(entry: dict[str, Any]) -> Example:
    """An example from its class path and fields; only :class:`Example` and its subclasses are rebuilt."""
    import importlib

    module, _, name = entry["type"].rpartition(".")
    example_type = getattr(importlib.import_module(module), name, None)
    if not (isinstance(example_type, type) and issubclass(example_type, Example)):
        raise ValueError(f"{entry['type']!r} is not a task example class")
    return example_type(**entry["fields"])


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



@dataclasses.dataclass
class RetokenizedTeacher:
    """The teacher on a batch's completion *texts*, each re-tokenized with its own tokenizer (cross-tokenizer methods).

    Row ``i`` of the student's batch has ``n_i`` counted completion tokens; the teacher read the same text as
    ``m_i`` tokens of its own vocabulary (``V_t`` entries). ``groups[i]`` pairs consecutive student and teacher
    positions that cover the same bytes (:func:`opd.crosstok.alignment.align_texts`), every position of both in one
    group. ``student_shared`` / ``teacher_shared`` pair the vocabulary entries with the same bytes (GOLD's hybrid).

    Attributes:
        logprobs: per row, ``[m_i, V_t]``: position ``k`` is the teacher's log-softmax over its token ``k``.
        token_ids: per row, ``[m_i]`` the teacher's tokens of the text (its EOS after it when the student's row ended).
        groups: per row, ``(student positions, teacher positions)`` ranges.
        student_shared, teacher_shared: ``[M]`` ids of the shared entries, pairwise.
    """

    logprobs: list[torch.Tensor]
    token_ids: list[torch.Tensor]
    groups: list[list[tuple[range, range]]]
    student_shared: torch.Tensor
    teacher_shared: torch.Tensor

    @classmethod
    def from_logits(cls, batch: RolloutBatch, logits: torch.Tensor) -> RetokenizedTeacher:
        """The same-tokenizer case from ``[B, T, V]`` teacher logits on the batch's own tokens: every group is one
        token on each side, and every vocabulary entry is shared."""
        counts = batch.completion_mask.sum(dim=1).tolist()
        logprobs = [torch.log_softmax(logits[row, :n] if logits.dtype == torch.float64 else logits[row, :n].float(), -1)
                    for row, n in enumerate(counts)]
        groups = [[(range(k, k + 1), range(k, k + 1)) for k in range(n)] for n in counts]
        shared = torch.arange(logits.shape[-1], device=logits.device)
        return cls(logprobs, [batch.completion_ids[row, :n] for row, n in enumerate(counts)], groups, shared, shared)

    def map_logprobs(self, function) -> RetokenizedTeacher:
        """The same texts and groups with ``function`` applied to every row's ``[m_i, V_t]`` log-probabilities."""
        return dataclasses.replace(self, logprobs=[function(row) for row in self.logprobs])
