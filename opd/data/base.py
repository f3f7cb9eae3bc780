"""What every task provides: formatted prompts, reference completions and an answer checker."""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence

from opd.types import Example as Example  # its home is opd.types (below every layer); re-exported


class Task:
    """A dataset split into ``train`` and ``eval`` examples plus its answer extraction.

    Subclasses fill ``self.train`` / ``self.eval`` and may override :meth:`extract_answer`. A task
    with an official development split (Dolly's held-out training rows) also fills ``self.validation``;
    for the others :func:`validation_split` carves one from ``train`` when a method needs it.
    ``eval`` is the reported split: nothing that steers training (a schedule, early stopping, a
    sweep's objective) may read it. No ``eval`` or ``validation`` prompt may occur in ``train``, and no
    ``validation`` prompt in ``eval`` (:func:`split_overlap` counts them; every built-in task keeps them at 0).
    """

    #: regex whose first group is the final answer in a completion (GSM8K-style ``#### 42``).
    answer_pattern: str = r"#+\s*(-?[\d,]*\.?\d+)"

    train: list[Example]
    eval: list[Example]
    #: the task's own development split (never trained on, never reported), or None
    validation: list[Example] | None = None

    def extract_answer(self, completion: str) -> str | None:
        """The final answer in ``completion`` (commas stripped), or None if there is none."""
        match = re.search(self.answer_pattern, completion)
        return match.group(1).replace(",", "") if match else None

    #: the name of :meth:`score` in logs and summaries (``eval/<name>``), e.g. "rouge_l"; exact match by default.
    score_name: str = "exact_match"

    def score(self, completion: str, example: Example) -> float:
        """The task's headline metric for one completion (ROUGE-L for instructions); exact match (0/1) by default."""
        return float(self.is_correct(completion, example))

    def feedback(self, completion: str, example: Example) -> str:
        """What the task's checker says of ``completion``, as text a model can read (SDPO's environment feedback):
        correct, or incorrect with the answer it found and the expected one."""
        if self.is_correct(completion, example):
            return "Your answer is correct."
        predicted = self.extract_answer(completion)
        found = "no final answer was found" if predicted is None else f"your answer {predicted} is incorrect"
        return f"Incorrect: {found}; the expected answer is {example.answer}."

    def is_correct(self, completion: str, example: Example) -> bool:
        """Exact match of the extracted answer against ``example.answer``."""
        predicted = self.extract_answer(completion)
        return predicted is not None and _normalise_number(predicted) == _normalise_number(example.answer)


def _normalise_number(text: str) -> str:
    """'042' -> '42', '3.50' -> '3.5', non-numbers unchanged, so exact match ignores formatting."""
    text = text.strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


class PromptIterator:
    """An endless, reshuffled-every-epoch stream of training examples in fixed-size batches.

    Its position (epoch, index) is part of the trainer state so a resumed run sees the same data.

    Args:
        examples: the training split.
        batch_size: examples per batch.
        seed: shuffling seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int) -> None:
        if not examples:
            raise ValueError("the training split is empty")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        batch = []
        while len(batch) < self.batch_size:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.examples[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffled(self.epoch)


def split_overlap(task: Task, validation: Sequence[Example] | None = None) -> dict[str, int]:
    """Distinct prompts shared by two splits; all 0 when the held-out splits are held out.

    Args:
        task: a built task (compare its prompts before or after the chat template, as long as all splits are alike).
        validation: the validation examples in use (one carved by :func:`validation_split`); ``task.validation``
            when None.
    Returns:
        ``{"train_eval": n, "train_validation": n, "eval_validation": n}``.
    """
    train, evaluation = {ex.prompt for ex in task.train}, {ex.prompt for ex in task.eval}
    held = {ex.prompt for ex in ((task.validation or []) if validation is None else validation)}
    return {"train_eval": len(train & evaluation), "train_validation": len(train & held),
            "eval_validation": len(evaluation & held)}


def without_prompts(examples: Sequence[Example], held_out: Iterable[Example], what: str) -> list[Example]:
    """``examples`` minus every one whose prompt is a ``held_out`` prompt, with one warning that counts them.

    For tasks whose evaluation set is fixed (a benchmark, a user's file): it stays whole, and the training (or
    development) rows that repeat one of its prompts are dropped instead.

    Args:
        examples: the split to clean (training or validation rows).
        held_out: the examples whose prompts ``examples`` must not contain.
        what: the split, for the warning (``data: instruct training rows``).
    """
    prompts = {ex.prompt for ex in held_out}
    kept = [ex for ex in examples if ex.prompt not in prompts]
    if len(kept) < len(examples):
        warnings.warn(f"{what}: dropped {len(examples) - len(kept)} of {len(examples)} whose prompt also occurs in a "
                      "held-out split", UserWarning, stacklevel=2)
    return kept


#: seed of the shuffle that carves a validation split out of ``train`` (fixed: every run and method gets the same split)
VALIDATION_SEED = 20240229


def validation_split(task: Task, size: int, seed: int = VALIDATION_SEED) -> list[Example]:
    """The examples that training decisions may read (DistiLLM's adaptive schedule), never ``task.eval``.

    The task's own ``validation`` split, cut to ``size``, when it has one. Otherwise ``size`` distinct
    training prompts chosen by a fixed-seed shuffle become the validation split, and every training
    example with one of those prompts (repeats included) is moved out of ``task.train`` (in place), so
    they are neither trained on nor evaluated; a prompt that is also an evaluation prompt is never chosen.

    Args:
        task: the built task; its ``train`` list may shrink.
        size: how many validation examples (``trainer.validation_examples``).
        seed: the carving shuffle's seed.
    Raises:
        DataError: when carving would leave no training example.
    """
    from opd.errors import DataError

    if task.validation:
        return list(task.validation[:size])
    eval_prompts = {ex.prompt for ex in task.eval}
    candidates = [i for i, ex in enumerate(task.train) if ex.prompt not in eval_prompts]
    random.Random(seed).shuffle(candidates)
    chosen: dict[str, int] = {}  # prompt -> the training index that represents it, in shuffled order
    for i in candidates:
        if len(chosen) == size:
            break
        chosen.setdefault(task.train[i].prompt, i)
    remaining = [ex for ex in task.train if ex.prompt not in chosen]
    if not remaining or not chosen:
        raise DataError(f"the task has no validation split, and carving trainer.validation_examples={size} out of its "
                        f"{len(task.train)} training examples leaves none to train on; lower trainer.validation_examples")
    keep = set(chosen.values())
    validation = [ex for i, ex in enumerate(task.train) if i in keep]
    task.train = remaining
    return validation
