"""Any ``reasoning_gym`` task as natural-language prompts for a real (chat) model, scored by the library's verifier.

``reasoning_gym`` (offline, seeded, procedural) generates each problem with its own answer checker,
``dataset.score_answer(answer, entry)``; an answer counts as correct when that score is 1. The model's
free-form reply is reduced to an answer by one fixed rule per task (``answer_format``): "number" takes
the last number in the reply ("17 + 25 = 42." -> "42"), "line" the first non-empty line without a
trailing full stop. The reference completion (for SFT, KD and dataset batches) is the library's answer.

    prompt:  "Solve the following multiplication: 3 * 4. Give only the result as your final answer."
    target:  "12"
"""

from __future__ import annotations

import re
from typing import Any

from opd.data.base import Task
from opd.data.generated import describe_generator, held_out_splits, search_limit
from opd.registry import DATASETS
from opd.types import Example

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_FORMATS = ("number", "line")


def extract_reply_answer(reply: str, answer_format: str) -> str | None:
    """The answer part of a model's reply by the task's rule ("number" or "line"); None when there is none."""
    if answer_format == "number":
        numbers = _NUMBER.findall(reply.replace(",", ""))
        return numbers[-1] if numbers else None
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    return lines[0].rstrip(".").strip() if lines else None


@DATASETS.register("gym")
class GymTask(Task):
    """A ``reasoning_gym`` dataset: the library writes the problems and judges the answers.

    Args:
        dataset: the reasoning_gym dataset name (``reasoning_gym.factory.DATASETS``), e.g. "products".
        config: keyword arguments of that dataset's config (difficulty: digits, terms, word lengths ...).
        num_train: training problems.
        num_eval: held-out problems: the first ``num_eval`` distinct problems after train whose question does not
            occur in training (:func:`opd.data.generated.held_out_splits`).
        answer_format: how a reply is reduced to an answer: "number" (last number) or "line" (first line).
        num_validation: the task's own validation split (hyperparameter tuning: ``trainer.evaluate_on=validation``): the
            next ``num_validation`` distinct problems after eval, in neither train nor eval; 0 for none.
        instruction: appended to every question (a line asking for the bare answer); "" for none.
        seed: the generator seed.

    Raises:
        ValueError: an unknown dataset, config key or answer format, or non-positive counts.
        DataError: the dataset's config has too few distinct problems for ``num_eval`` unseen ones after ``num_train``.
    """

    score_name = "exact_match"

    def __init__(self, dataset: str = "products", config: dict[str, Any] | None = None, num_train: int = 2000,
                 num_eval: int = 100, answer_format: str = "number",
                 instruction: str = "Reply with the final answer only.", seed: int = 0,
                 num_validation: int = 0) -> None:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS as GYM

        if dataset not in GYM:
            raise ValueError(f"dataset {dataset!r} is not a reasoning_gym dataset; known: {', '.join(sorted(GYM))}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        if num_train < 1 or num_eval < 1 or num_validation < 0:
            raise ValueError(f"num_train and num_eval must be >= 1 and num_validation >= 0, got {num_train}, "
                             f"{num_eval}, {num_validation}")
        self.answer_format = answer_format
        config = dict(config or {})
        try:  # a virtual size: problems are generated on demand, entry i from (seed, i) alone
            self.source = reasoning_gym.create_dataset(dataset, size=search_limit(num_train, num_eval + num_validation),
                                                       seed=seed,
                                                       **config)
        except TypeError as err:  # an unknown config key of that dataset
            raise ValueError(f"config for reasoning_gym dataset {dataset!r}: {err}") from None
        self.entries: dict[str, dict[str, Any]] = {}

        def problem(index: int) -> Example:
            entry = self.source[index]
            prompt = entry["question"].strip() + (f"\n{instruction}" if instruction else "")
            self.entries.setdefault(prompt, entry)
            return Example(prompt, str(entry["answer"]), str(entry["answer"]))

        self.train, self.eval, validation = held_out_splits(problem, num_train, num_eval, num_validation,
                                                            describe_generator("gym", dataset, config, seed))
        self.validation = validation or None  # none: a method that needs one carves it from train

    def extract_answer(self, completion: str) -> str | None:
        return extract_reply_answer(completion, self.answer_format)

    def is_correct(self, completion: str, example: Example) -> bool:
        """reasoning_gym's own verifier gives the extracted answer full marks."""
        answer = self.extract_answer(completion)
        entry = self._entry(example)
        return answer is not None and float(self.source.score_answer(answer=answer, entry=entry)) == 1.0

    def _entry(self, example: Example) -> dict[str, Any]:
        """The library's record of ``example`` (the chat template may have wrapped the prompt since)."""
        entry = self.entries.get(example.prompt)
        if entry is None:
            entry = next(e for prompt, e in self.entries.items() if prompt in example.prompt)
            self.entries[example.prompt] = entry
        return entry
