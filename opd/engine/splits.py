"""A run's splits, ready to train on: the chat template applied, the validation split carved out of train, and every
split cut to what fits the models' context."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from opd.config import TrainerConfig
from opd.data.base import Task, split_overlap, validation_split
from opd.data.chat import apply_chat_template
from opd.errors import DataError
from opd.types import Example


@dataclasses.dataclass
class RunSplits:
    """The examples a run trains on, reports on (``eval``: the validation split in a tuning run) and computes its
    validation loss on; ``overlap``: distinct prompts two splits share (all 0 for held-out splits)."""

    train: list[Example]
    eval: list[Example]
    validation: list[Example]
    overlap: dict[str, int]


def prepare_splits(task: Task, tokenizer, student: torch.nn.Module, teacher: Any, cfg: TrainerConfig, *,
                   chat_template: bool, max_new_tokens: int, needs_validation: bool) -> RunSplits:
    """The splits of ``task`` for a run (the task's prompts are formatted in place when ``chat_template``).

    Raises:
        DataError: a split is empty, or none of its prompts fits the models' context.
    """
    # prompt + completion must fit the position embeddings of both models (a served teacher: the server's context)
    limit = context_limit({"student": student})
    teacher_len = teacher.context_length() if teacher is not None else None
    if teacher_len is not None:
        role = "teacher" if teacher.local else "teacher server"
        if limit is None or teacher_len < limit[0]:
            limit = (teacher_len, role)
        elif teacher_len == limit[0]:
            limit = (teacher_len, f"{limit[1]} and {role}")
    if chat_template:  # every prompt formatted once, for sampling, scoring and evaluation alike
        apply_chat_template(task, tokenizer)
    # carved out of train before the prompt stream exists: validation examples are never trained on
    tuning = cfg.evaluate_on == "validation"  # hyperparameter search: score on validation, never on eval
    validation = validation_split(task, cfg.validation_examples) if needs_validation or tuning else []
    overlap = split_overlap(task, validation or None)
    if any(overlap.values()):
        warnings.warn(f"data: the splits share prompts {overlap}: accuracies on them are partly in-sample",
                      UserWarning, stacklevel=3)
    train = fit_to_context(task.train, tokenizer, limit, max_new_tokens, "training")
    evaluated = fit_to_context(validation if tuning else task.eval, tokenizer, limit, max_new_tokens,
                               "validation" if tuning else "evaluation")
    evaluated = evaluated[: cfg.eval_examples] if cfg.eval_examples else evaluated
    validation = fit_to_context(validation, tokenizer, limit, max_new_tokens, "validation") if validation else []
    return RunSplits(train, evaluated, validation, overlap)


def context_limit(models: dict[str, torch.nn.Module | None]) -> tuple[int, str] | None:
    """The smallest ``config.max_position_embeddings`` among ``models`` and the roles that have it.

    Args:
        models: role ("student", "teacher") -> model or None; models without the attribute are ignored.

    Returns:
        (limit, "student" / "teacher" / "student and teacher"), or None when no model declares a limit.
    """
    limits = {}
    for role, model in models.items():
        value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            limits[role] = value
    if not limits:
        return None
    limit = min(limits.values())
    return limit, " and ".join(role for role, value in limits.items() if value == limit)


def fit_to_context(examples: list[Example], tokenizer, limit: tuple[int, str] | None, max_new_tokens: int,
                   split: str) -> list[Example]:
    """The examples whose tokenized prompt plus ``max_new_tokens`` fits in the models' context.

    Prompts are tokenized as the samplers do (special tokens included). Those that do not fit are
    dropped with one warning giving their count.

    Args:
        examples: a split of the task.
        tokenizer: the student's tokenizer.
        limit: (context length in tokens, whose it is) from :func:`context_limit`; None keeps every example.
        max_new_tokens: the completion budget (``sampler.max_new_tokens``).
        split: "training" or "evaluation", for messages.

    Raises:
        DataError: if the split is empty or none of its prompts fits, naming the limit and the longest prompt.
    """
    if not examples:
        raise DataError(f"the task's {split} split is empty")
    if limit is None:
        return list(examples)
    limit, limit_source = limit
    lengths = [len(ids) for ids in tokenizer([ex.prompt for ex in examples])["input_ids"]]
    budget = limit - max_new_tokens
    kept = [ex for ex, length in zip(examples, lengths) if length <= budget]
    longest = max(range(len(examples)), key=lengths.__getitem__)
    arithmetic = (f"the {limit_source}'s context of {limit} tokens (max_position_embeddings) minus "
                  f"sampler.max_new_tokens={max_new_tokens} leaves {max(budget, 0)} tokens for a prompt")
    if not kept:
        raise DataError(f"no {split} prompt fits: {arithmetic}, but the shortest prompt has {min(lengths)} tokens and "
                        f"the longest {lengths[longest]} ({examples[longest].prompt[:80]!r}). "
                        "Lower sampler.max_new_tokens or shorten the prompts.")
    if len(kept) < len(examples):
        warnings.warn(f"skipping {len(examples) - len(kept)} of {len(examples)} {split} prompts that do not fit: "
                      f"{arithmetic}; the longest prompt has {lengths[longest]} tokens", UserWarning, stacklevel=3)
    return kept
