"""Rollout batches and the sampler interface shared by every behaviour policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from opd.data.base import Example


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
            (:class:`~opd.teachers.base.SparseTeacherLogprobs`) when the rollout worker already asked a served
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
        from opd.teachers.base import SparseTeacherLogprobs

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


def check_sampling_params(temperature: float, top_p: float, top_k: int, max_new_tokens: int, n: int = 1) -> None:
    """The sampling settings every sampler shares, checked at config time.

    Raises:
        ValueError: naming the first value out of range.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy evaluation for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")


def eos_token_ids(tokenizer, *models: torch.nn.Module) -> list[int]:
    """Every token id that ends a sequence: the tokenizer's EOS plus each model's declared ones.

    A model declares EOS in ``generation_config.eos_token_id`` and/or ``config.eos_token_id``, an int
    or a list (Qwen3 instruct: ``<|im_end|>`` and ``<|endoftext|>``). Generation stops at, and
    ``truncate_after_eos`` masks after, the first of *any* of them; stopping at the tokenizer's EOS
    alone would train on text after the end. Pass the model that writes the completions (each
    model stops at its own set); with several models (joint decoding) the union of their sets.

    Returns:
        the ids, deduplicated, the tokenizer's first.
    """
    declared: list[Any] = [tokenizer.eos_token_id]
    for model in models:
        for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            declared.append(getattr(config, "eos_token_id", None))
    ids: list[int] = []
    for entry in declared:
        for token in ([] if entry is None else [entry] if isinstance(entry, int) else list(entry)):
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def eos_id_tensor(eos_token_id: int | Sequence[int], device: torch.device | str) -> torch.Tensor:
    """``[E]`` long tensor of the EOS id(s), for ``torch.isin`` against generated tokens."""
    return torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long,
                           device=device)


def truncate_after_eos(completion_ids: torch.Tensor, eos_token_id: int | Sequence[int], pad_token_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask everything after each row's first EOS (any of ``eos_token_id``: see :func:`eos_token_ids`).

    Args:
        completion_ids: ``[B, T]`` generated tokens.
    Returns:
        ``(ids, mask)``, both ``[B, T]``: ids with pad after the first EOS; mask 1 up to and including it.
    """
    is_eos = torch.isin(completion_ids, eos_id_tensor(eos_token_id, completion_ids.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after_eos).long()
    return completion_ids.masked_fill(after_eos, pad_token_id), mask


def unfinished_rows(batch: RolloutBatch, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """``[B]`` bool: rows whose completion holds no EOS (any of ``eos_token_id``), i.e. cut by the length budget
    (an empty row, all padding, counts as unfinished too)."""
    is_eos = torch.isin(batch.completion_ids, eos_id_tensor(eos_token_id, batch.completion_ids.device))
    return ~(is_eos & batch.completion_mask.bool()).any(dim=1)


def repeat_per_example(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, examples: list[Example], n: int
                       ) -> tuple[torch.Tensor, torch.Tensor, list[Example]]:
    """Prompts ``[B, P]`` and examples repeated for ``n`` samples each, grouped by example (rows ``[B·n, P]``)."""
    if n == 1:
        return prompt_ids, prompt_mask, list(examples)
    return (prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0),
            [ex for ex in examples for _ in range(n)])


class Sampler(Protocol):
    """Writes completions for prompts with the current student (the on-policy behaviour policy)."""

    max_new_tokens: int

    def generate(self, model: torch.nn.Module, tokenizer, examples: list[Example], greedy: bool = False,
                 n: int | None = None) -> RolloutBatch:
        """Sample ``n`` completions per example (the sampler's ``n`` when None; one when ``greedy``); the batch's
        rows and ``examples`` are grouped by example: ``[e0, e0, ..., e1, e1, ...]``."""
        ...
