"""Instruction following as in MiniLLM and DistiLLM: Dolly for training, five evaluation sets scored by ROUGE-L.

Data (MiniLLM release, https://huggingface.co/MiniLLM; layout read from the official
``microsoft/LMOps/minillm`` scripts, ``tools/process_data_dolly.py`` and ``data_utils/prompt_datasets.py``):

* ``MiniLLM/dolly`` — ``raw.jsonl`` (databricks-dolly-15k minus the test set; rows ``instruction``,
  ``input``, ``output``). The official processing holds out its first 1000 rows as the validation set
  (``--dev-num 1000``, used for checkpoint selection) and trains on the rest; ``valid.jsonl`` is
  DollyEval, the 500-example test set.
* ``MiniLLM/self-inst`` (SelfInst, 252), ``MiniLLM/Vicuna`` (VicunaEval, 80), ``MiniLLM/sinst``
  (S-NI; the evaluation uses the ``11_`` subset, responses of at least 11 tokens) and
  ``MiniLLM/uinst`` (UnNI, its ``11_`` subset, first 10,000 rows): ``valid.jsonl`` with a ready
  ``prompt`` (``<n>`` for newlines) and ``output`` (one reference or a list of them).

Prompt format (``process_data_dolly.py``, GPT-2/OPT/LLaMA variant)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:

and, for rows with a non-empty ``input``, "..., paired with an input that provides further context. ..."
with an ``### Input:`` section before ``### Response:``. Rows that carry a ``prompt`` field (the
evaluation files) use it as it is, as the official evaluation does.

Metrics: :meth:`InstructTask.score` is ROUGE-L from Google's ``rouge-score`` with ``use_stemmer=True``
(max over references, :func:`opd.data.metrics.rouge_l_max`), the papers' metric and scorer.
:meth:`InstructTask.is_correct`, which the trainer's evaluation reports as
accuracy, is a normalised exact match against any reference: a sanity number, not the paper's metric.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from opd.data.base import Task, without_prompts
from opd.data.metrics import normalize_text, rouge_l_max
from opd.errors import DataError
from opd.registry import DATASETS
from opd.types import Example

#: MiniLLM's Dolly prompt without and with an input (``tools/process_data_dolly.py``, non-Qwen models).
DOLLY_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
DOLLY_TEMPLATE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                        "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


def load_rows(path: str, data_file: str | None = None, config: str | None = None, split: str = "train",
              key: str = "data") -> list[dict[str, Any]]:
    """The rows of one split: from a local directory / JSON-lines file, or from the Hugging Face hub.

    Args:
        path: a local directory (``data_file`` inside it, else ``<split>.jsonl``), a local ``.jsonl``
            file, or a hub dataset id.
        data_file: a file inside the hub repository or local directory (e.g. ``raw.jsonl``); on the hub
            it becomes the ``train`` split of ``datasets.load_dataset(path, data_files=...)``.
        config: hub dataset config (ignored for local data).
        split: hub split when ``data_file`` is None.
        key: the config key that named ``path``, for messages.

    Raises:
        DataError: in one line, for a missing local file, a malformed JSON line, or a hub dataset that
            cannot be loaded (offline without a cache, unknown id, missing file or split).
    """
    local = Path(path).expanduser()
    if local.exists():
        file = local / (data_file or f"{split}.jsonl") if local.is_dir() else local
        if not file.is_file():
            raise DataError(f"{key}: no file {file.name!r} in the local directory {path!r}")
        rows = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{key}: {str(file)!r} line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{key}: {str(file)!r} line {number} is not a JSON object")
            rows.append(row)
        return rows

    import datasets

    try:
        if data_file is not None:
            data = datasets.load_dataset(path, config, data_files={"train": data_file}, split="train")
        else:
            data = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types for "offline"
        where = f"file={data_file!r}" if data_file is not None else f"config={config!r}, split={split!r}"
        raise DataError(f"{key}: could not load dataset {path!r} ({where}): {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}. It needs network access to the Hugging "
                        "Face hub or a local cache (HF_DATASETS_OFFLINE=1 uses the cache only), or point it at a "
                        "local copy (a directory or .jsonl file).") from None
    return [dict(row) for row in data]


@dataclasses.dataclass(frozen=True)
class InstructExample(Example):
    """An :class:`Example` with every reference response (S-NI / UnNI rows can have several).

    ``target`` and ``answer`` are the first reference.
    """

    references: tuple[str, ...] = ()


@DATASETS.register("instruct")
class InstructTask(Task):
    """Instruction following (MiniLLM / DistiLLM Dolly setup): ROUGE-L via ``score``, exact match via ``is_correct``.

    Args:
        train_path: training data: hub id (``MiniLLM/dolly``), local directory or ``.jsonl`` file.
        train_file: file of the training rows inside ``train_path`` (``raw.jsonl``); None = ``train_split``.
        train_split: hub split of the training rows when ``train_file`` is None.
        dev_num: leading training rows held out as the official validation set (``validation``: not trained on,
            not reported; read by DistiLLM's schedule; 1000). Rows whose prompt is an evaluation prompt are dropped
            from it (with a warning).
        num_train: cap on training rows after the hold-out; all when None. Rows whose prompt is an evaluation or
            validation prompt are dropped first (with a warning), so the evaluation set stays whole and held out.
        eval_path, eval_file, eval_split: the evaluation set, as for training (``valid.jsonl``).
        num_eval: the first ``num_eval`` evaluation rows; all when None (UnNI: 10,000 officially).
        prompt_template: prompt of rows without ``input``; must contain ``{instruction}``.
        prompt_template_input: prompt of rows with an ``input``; must contain ``{instruction}`` and ``{input}``.

    Raises:
        ValueError: for a template without its placeholders or a negative count.
        DataError: for data that cannot be loaded, or a row without instruction/prompt or output.
    """

    def __init__(self, train_path: str = "MiniLLM/dolly", train_file: str | None = "raw.jsonl",
                 train_split: str = "train", dev_num: int = 1000, num_train: int | None = None,
                 eval_path: str = "MiniLLM/dolly", eval_file: str | None = "valid.jsonl", eval_split: str = "test",
                 num_eval: int | None = None, prompt_template: str = DOLLY_TEMPLATE,
                 prompt_template_input: str = DOLLY_TEMPLATE_INPUT) -> None:
        if "{instruction}" not in prompt_template:
            raise ValueError(f"prompt_template must contain {{instruction}}, got {prompt_template!r}")
        if "{instruction}" not in prompt_template_input or "{input}" not in prompt_template_input:
            raise ValueError(f"prompt_template_input must contain {{instruction}} and {{input}}, got {prompt_template_input!r}")
        for name, value in (("dev_num", dev_num), ("num_train", num_train), ("num_eval", num_eval)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.templates = (prompt_template, prompt_template_input)
        all_rows = load_rows(train_path, train_file, None, train_split, "data.train_path")
        train_rows = all_rows[dev_num:]
        eval_rows = load_rows(eval_path, eval_file, None, eval_split, "data.eval_path")
        self.eval = [self.to_example(row, f"{eval_path}:eval row {i}") for i, row in enumerate(eval_rows)]
        if num_eval is not None:
            self.eval = self.eval[:num_eval]
        # the official dev split (MiniLLM/DistiLLM hold out the first dev_num rows): what DistiLLM's schedule reads
        self.validation = without_prompts(
            [self.to_example(row, f"{train_path}:dev row {i}") for i, row in enumerate(all_rows[:dev_num])], self.eval,
            "data: instruct validation rows (dev_num)")
        self.train = without_prompts(
            [self.to_example(row, f"{train_path}:train row {dev_num + i}") for i, row in enumerate(train_rows)],
            self.eval + self.validation, "data: instruct training rows")
        if num_train is not None:
            self.train = self.train[:num_train]
        if not self.train:
            raise DataError(f"data.train_path: {train_path!r} has no training rows after holding out dev_num={dev_num} "
                            "and the rows that repeat an evaluation or validation prompt")

    def to_example(self, row: dict[str, Any], where: str) -> InstructExample:
        """One row as an example: the row's ``prompt`` if it has one, else the template; ``output`` as references."""
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            prompt = row["prompt"].replace("<n>", "\n")
        elif isinstance(row.get("instruction"), str) and row["instruction"].strip():
            extra = row.get("input") if isinstance(row.get("input"), str) else ""
            template = self.templates[1] if extra.strip() else self.templates[0]
            values = {"instruction": row["instruction"], "input": extra}
            # one regex pass, not str.format: texts and templates may hold literal braces
            prompt = _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)
        else:
            raise DataError(f"{where} has neither a 'prompt' nor an 'instruction': {row!r:.200}")
        output = row.get("output")
        references = tuple(r for r in (output if isinstance(output, list) else [output]) if isinstance(r, str) and r.strip())
        if not references:
            raise DataError(f"{where} has no reference 'output': {row!r:.200}")
        return InstructExample(prompt, references[0], references[0], references)

    @staticmethod
    def references(example: Example) -> tuple[str, ...]:
        """Every reference response of ``example`` (its ``answer`` for a plain :class:`Example`)."""
        return getattr(example, "references", ()) or (example.answer,)

    def extract_answer(self, completion: str) -> str | None:
        """The whole response, stripped (the official evaluation cuts at end-of-text and strips); None if empty."""
        text = completion.strip()
        return text or None

    def is_correct(self, completion: str, example: Example) -> bool:
        """Normalised exact match (lower case, no punctuation, single spaces) against any reference."""
        predicted = self.extract_answer(completion)
        if predicted is None:
            return False
        return any(normalize_text(predicted) == normalize_text(ref) for ref in self.references(example))

    score_name = "rouge_l"  # logged as eval/rouge_l at every evaluation

    def score(self, completion: str, example: Example) -> float:
        """ROUGE-L F-measure in [0, 1], maximum over the references (papers report ×100)."""
        return rouge_l_max(completion.strip(), self.references(example))
