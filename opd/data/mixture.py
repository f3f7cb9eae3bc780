"""Several registered tasks mixed into one, each example tagged with its source task (multi-teacher distillation).

Each source is any ``data`` node (``{name: arithmetic, ...}``) built through ``DATASETS``; its examples keep their
prompt, target and answer and gain ``Example.source = <key>``. The key is what a multi-teacher run routes on
(one teacher per source) and what per-source accuracy is reported under (``eval/accuracy/<source>``). Scoring stays
each source's own: :meth:`Mixture.is_correct`, :meth:`Mixture.score` and :meth:`Mixture.extract_answer` dispatch on
``example.source``::

    data: {name: mixture, tasks: {arithmetic: {name: arithmetic}, multiplication: {name: multiplication}}}
    Example("12+7-30=", "12+7=19;19-30=-11;#-11", "-11", source="arithmetic")
    Example("15*43=", "15*40=600;15*3=45;600+45=645;#645", "645", source="multiplication")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from opd.data.base import Task, without_prompts
from opd.registry import DATASETS
from opd.types import Example


def tag(examples: Sequence[Example], source: str) -> list[Example]:
    """``examples`` with ``source`` set (the frozen dataclass is copied, not mutated)."""
    return [dataclasses.replace(ex, source=source) for ex in examples]


def interleave(groups: Sequence[Sequence[Example]]) -> list[Example]:
    """Round-robin over ``groups`` (a0, b0, a1, b1, ..., then the longer ones' rest): every prefix is balanced."""
    out: list[Example] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def per_source_accuracy(examples: Sequence[Example], correct: Sequence[bool]) -> tuple[dict[str, float], dict[str, int]]:
    """(accuracy per source, examples per source) over ``examples`` with a non-empty ``source``.

    Args:
        examples: the scored examples.
        correct: ``correct[i]`` is whether the completion for ``examples[i]`` was right (same length).
    """
    if len(examples) != len(correct):
        raise ValueError(f"{len(examples)} examples but {len(correct)} correctness flags")
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for example, ok in zip(examples, correct):
        if example.source:
            counts[example.source] = counts.get(example.source, 0) + 1
            hits[example.source] = hits.get(example.source, 0) + bool(ok)
    return {source: hits[source] / counts[source] for source in sorted(counts)}, {s: counts[s] for s in sorted(counts)}


def merge_per_source(parts: Sequence[tuple[dict[str, float], dict[str, int]]]) -> tuple[dict[str, float], dict[str, int]]:
    """Example-weighted merge of several (accuracy, count) per-source pairs, e.g. the shares of several ranks."""
    hits: dict[str, float] = {}
    counts: dict[str, int] = {}
    for accuracy, count in parts:
        for source, n in count.items():
            counts[source] = counts.get(source, 0) + n
            hits[source] = hits.get(source, 0.0) + accuracy[source] * n
    return {s: hits[s] / counts[s] for s in sorted(counts) if counts[s]}, {s: counts[s] for s in sorted(counts)}


@DATASETS.register("mixture")
class Mixture(Task):
    """The union of several tasks' splits, each example tagged with its source; scoring is routed per source.

    Args:
        tasks: source name -> that task's ``data`` node (``{name: <registered task>, <its arguments>}``). The
            source name is free (two differently configured ``arithmetic`` tasks may be two sources).
        max_train_per_source: keep at most this many training examples of each source (the first ones, so a run
            is deterministic); 0 keeps all.

    ``train`` is the sources' training splits concatenated in the order of ``tasks`` (training shuffles it).
    ``eval`` interleaves the sources' eval splits round-robin, so a prefix cap (``trainer.eval_examples``) keeps every
    source. ``validation`` interleaves the sources' own validation splits when every source has one, else it is None
    (then ``trainer.validation_examples`` are carved from the mixed ``train``, so every source can be chosen).
    Each source keeps its splits apart, but two sources may share prompts (two ``arithmetic`` sources with nearby
    seeds): training examples whose prompt is another source's eval or validation prompt, and validation examples
    whose prompt is an eval prompt, are dropped with a warning (before ``max_train_per_source``).

    Raises:
        ValueError: no sources, an empty source name, or an unknown example source at scoring time.
    """

    def __init__(self, tasks: dict[str, Any] | None = None, max_train_per_source: int = 0) -> None:
        if not tasks:
            raise ValueError("data.tasks is empty: give at least one source, e.g. {arithmetic: {name: arithmetic}}")
        if max_train_per_source < 0:
            raise ValueError(f"max_train_per_source must be >= 0, got {max_train_per_source}")
        self.sources: dict[str, Task] = {}
        for source, node in tasks.items():
            if not source:
                raise ValueError("data.tasks has an empty source name")
            if node is None or node.get("name") == "mixture":
                raise ValueError(f"data.tasks.{source} must be a registered task other than mixture, got {node!r}")
            self.sources[source] = DATASETS.build(node, f"data.tasks.{source}")
        self.eval = interleave([tag(task.eval, source) for source, task in self.sources.items()])
        own = [task.validation for task in self.sources.values()]
        self.validation = None
        if all(own):
            self.validation = without_prompts(interleave([tag(t.validation, s) for s, t in self.sources.items()]),
                                              self.eval, "data: mixture validation examples")
        held_out = self.eval + (self.validation or [])
        self.train = []
        for source, task in self.sources.items():
            train = without_prompts(task.train, held_out, f"data: mixture source {source!r} training examples")
            self.train += tag(train[:max_train_per_source] if max_train_per_source else train, source)
        names = {task.score_name for task in self.sources.values()}
        self.score_name = names.pop() if len(names) == 1 else "score"  # a mixed headline metric: each source's own

    def task_of(self, example: Example) -> Task:
        """The source task that scores ``example``."""
        task = self.sources.get(example.source)
        if task is None:
            raise ValueError(f"example source {example.source!r} is not one of this mixture's sources "
                             f"{sorted(self.sources)}: {example.prompt!r}")
        return task

    def extract_answer(self, completion: str, example: Example | None = None) -> str | None:
        """The final answer by ``example``'s source task; without an example, by the shared rule if all sources agree."""
        if example is not None:
            return self.task_of(example).extract_answer(completion)
        extractors = {(type(t).extract_answer, t.answer_pattern) for t in self.sources.values()}
        if len(extractors) != 1:
            raise ValueError("the mixture's sources extract answers differently: pass the example")
        return next(iter(self.sources.values())).extract_answer(completion)

    def is_correct(self, completion: str, example: Example) -> bool:
        """``example``'s source task's own check."""
        return self.task_of(example).is_correct(completion, example)

    def score(self, completion: str, example: Example) -> float:
        """``example``'s source task's own headline metric."""
        return self.task_of(example).score(completion, example)

    def feedback(self, completion: str, example: Example) -> str:
        """``example``'s source task's own feedback."""
        return self.task_of(example).feedback(completion, example)
