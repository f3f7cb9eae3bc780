"""Datasets from the Hugging Face hub (need network or a local cache), loaded through ``datasets``."""

from __future__ import annotations

from opd.data.base import Task, without_prompts
from opd.data.metrics import math_answers_equal
from opd.errors import DataError
from opd.registry import DATASETS
from opd.types import Example


def load_hub_split(path: str, config: str | None, split: str):
    """``datasets.load_dataset`` with a one-line error when the hub is unreachable or the split is missing."""
    import datasets

    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types for "offline"
        raise DataError(f"could not load dataset {path!r} (config={config!r}, split={split!r}): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                        "It needs network access to the Hugging Face hub or a local cache "
                        "(HF_DATASETS_OFFLINE=1 uses the cache only).") from None


@DATASETS.register("gsm8k")
class GSM8K(Task):
    """GSM8K grade-school math (Cobbe et al. 2021); the answer after '####', judged by math-verify against the gold."""

    def __init__(self, path: str = "openai/gsm8k", config: str = "main", train_split: str = "train",
                 eval_split: str = "test", num_eval: int | None = None,
                 prompt_template: str = "Question: {question}\nAnswer:") -> None:
        if "{question}" not in prompt_template:
            raise ValueError("prompt_template must contain the placeholder {question}")
        rows = {name: load_hub_split(path, config, split) for name, split in (("train", train_split), ("eval", eval_split))}
        for name, data in rows.items():
            examples = []
            for i, row in enumerate(data):
                if not row.get("question") or "####" not in (row.get("answer") or ""):
                    raise DataError(f"{path}:{name} row {i} has no question or no '####' answer: {row!r:.200}")
                answer = row["answer"].split("####")[-1].strip().replace(",", "")
                examples.append(Example(prompt_template.format(question=row["question"]), " " + row["answer"], answer))
            setattr(self, name, examples)
        if num_eval is not None:
            self.eval = self.eval[:num_eval]
        # the test split stays whole; training rows that repeat one of its questions are dropped (with a warning)
        self.train = without_prompts(self.train, self.eval, f"data: gsm8k {train_split!r} rows")

    def is_correct(self, completion: str, example: Example) -> bool:
        """The number after '####' equals the gold answer by math-verify (``72.0`` = ``72``)."""
        predicted = self.extract_answer(completion)
        return predicted is not None and math_answers_equal(predicted, example.answer)
