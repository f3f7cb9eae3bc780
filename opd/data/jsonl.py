"""A task read from local JSON-lines files: one ``{"prompt": ..., "answer": ..., "target": ...}`` object per line.

Example file::

    {"prompt": "12+7-30=", "answer": "-11", "target": "12+7=19;19-30=-11;#-11"}
    {"prompt": "3+4=", "answer": 7}

``answer`` may be a string or a number; ``target`` (the reference completion used by off-policy
methods and as privileged information) is optional and falls back to ``default_target``. Rows that
are not valid JSON objects, miss the prompt or answer, leave them empty, or give them the wrong
type are skipped with one warning that counts them and names the first offending lines. A missing
or unreadable file, or one without a single valid row, stops the run with a :class:`DataError`
that names the path.
"""

from __future__ import annotations

import json
import re
import string
import warnings
from pathlib import Path
from typing import Any

from opd.data.base import Task, without_prompts
from opd.errors import DataError
from opd.registry import DATASETS
from opd.types import Example

#: how many offending lines a warning or error lists before "...".
_MAX_LISTED = 5


@DATASETS.register("jsonl")
class JsonlTask(Task):
    """Local JSON-lines files with prompt / answer / optional target per line; exact match via ``answer_pattern``.

    Args:
        train_path: training rows (``.jsonl``), relative to the launch directory or absolute; required
            (a default of None only because config schemas list the keys after ``name``).
        eval_path: held-out rows; when None the last ``num_holdout`` valid rows of ``train_path``
            are held out instead. Either way, training rows whose prompt is a held-out prompt are dropped
            (with a warning that counts them): the held-out rows stay whole and are never trained on.
        num_holdout: rows held out from the end of ``train_path`` when ``eval_path`` is None.
        prompt_key: row key of the prompt text.
        answer_key: row key of the gold final answer (a string or a number).
        target_key: row key of the optional reference completion.
        prompt_template: the model's prompt; ``{prompt}`` is replaced by the row's prompt.
        default_target: reference completion of rows without a target; ``{answer}`` is replaced by
            the row's answer.
        answer_pattern: regular expression whose first group is the final answer in a completion.

    Raises:
        ValueError: for inconsistent arguments (reported as a config error by the registry).
        DataError: for a missing or unreadable file, or one without a valid row.
    """

    def __init__(self, train_path: str | None = None, eval_path: str | None = None, num_holdout: int = 100,
                 prompt_key: str = "prompt", answer_key: str = "answer", target_key: str = "target",
                 prompt_template: str = "{prompt}", default_target: str = "#{answer}",
                 answer_pattern: str = r"#+\s*(-?[\d,]*\.?\d+)") -> None:
        if not train_path:
            raise ValueError("train_path is required: data.train_path=path/to/train.jsonl")
        _check_template(prompt_template, "prompt_template", "prompt")
        _check_template(default_target, "default_target", "answer", required=False)
        try:
            compiled = re.compile(answer_pattern)
        except re.error as err:
            raise ValueError(f"answer_pattern {answer_pattern!r} is not a valid regular expression: {err}") from None
        if compiled.groups < 1:
            raise ValueError(f"answer_pattern {answer_pattern!r} needs a capturing group around the answer")
        if eval_path is None and num_holdout < 1:
            raise ValueError(f"num_holdout must be >= 1 when eval_path is null, got {num_holdout}")
        if len({prompt_key, answer_key, target_key}) < 3:
            raise ValueError(f"prompt_key, answer_key and target_key must differ, got "
                             f"{prompt_key!r}, {answer_key!r}, {target_key!r}")
        self.answer_pattern = answer_pattern
        self._keys = (prompt_key, answer_key, target_key)
        self._prompt_template, self._default_target = prompt_template, default_target

        train = self._read(train_path, "data.train_path")
        if eval_path is not None:
            self.eval = self._read(eval_path, "data.eval_path")
        elif len(train) <= num_holdout:
            raise DataError(f"data.train_path: {train_path!r} has {len(train)} valid rows; holding out "
                            f"data.num_holdout={num_holdout} for evaluation leaves none for training. "
                            "Set data.eval_path or lower data.num_holdout.")
        else:
            train, self.eval = train[:-num_holdout], train[-num_holdout:]
        self.train = without_prompts(train, self.eval, "data: jsonl training rows")
        if not self.train:
            raise DataError(f"data.train_path: every training row of {train_path!r} repeats a held-out prompt "
                            f"({'data.eval_path' if eval_path is not None else 'data.num_holdout'}); nothing is left to "
                            "train on")

    def _read(self, path: str, key: str) -> list[Example]:
        """The valid rows of one file as examples; malformed rows are skipped with a warning.

        Args:
            path: the JSON-lines file.
            key: the config key that named it (``data.train_path``), for messages.

        Raises:
            DataError: if the file is missing, unreadable or holds no valid row.
        """
        file = Path(path).expanduser()
        if not file.exists():
            raise DataError(f"{key}: no file at {path!r}")
        try:
            raw_lines = file.read_bytes().splitlines()
        except OSError as err:  # a directory, no permission, an I/O error
            raise DataError(f"{key}: cannot read {path!r}: {err.strerror or err}") from None

        examples: list[Example] = []
        problems: list[str] = []  # "line N: reason" per malformed row, in file order
        for number, raw in enumerate(raw_lines, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            example, problem = self._parse(raw, first_line=number == 1)
            if example is not None:
                examples.append(example)
            else:
                problems.append(f"line {number}: {problem}")

        if not examples:
            detail = f"{len(problems)} malformed: {_listing(problems)}" if problems else "the file is empty"
            raise DataError(f"{key}: {path!r} has no valid row ({detail}); each line must be a JSON object with a "
                            f"non-empty {self._keys[0]!r} and {self._keys[1]!r}")
        if problems:
            warnings.warn(f"{key}: skipped {len(problems)} malformed row(s) of {len(problems) + len(examples)} in "
                          f"{path!r}: {_listing(problems)}", UserWarning, stacklevel=3)
        return examples

    def _parse(self, raw: bytes, first_line: bool) -> tuple[Example | None, str]:
        """(example, "") for a valid row, else (None, why it is malformed)."""
        try:
            text = raw.decode("utf-8-sig" if first_line else "utf-8")
        except UnicodeDecodeError:
            return None, "not UTF-8 text"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            return None, f"not valid JSON ({err.msg} at column {err.colno})"
        if not isinstance(row, dict):
            return None, f"not a JSON object (got {type(row).__name__})"

        prompt_key, answer_key, target_key = self._keys
        prompt, problem = _text_field(row, prompt_key, numbers_ok=False)
        if problem:
            return None, problem
        answer, problem = _text_field(row, answer_key, numbers_ok=True)
        if problem:
            return None, problem
        if row.get(target_key) is None:
            target = self._default_target.format(answer=answer)
        else:
            target, problem = _text_field(row, target_key, numbers_ok=False)
            if problem:
                return None, problem
        return Example(self._prompt_template.format(prompt=prompt), target, answer), ""


def _text_field(row: dict[str, Any], key: str, numbers_ok: bool) -> tuple[str, str]:
    """(value as text, "") when ``row[key]`` is a non-empty string (or a number if allowed), else ("", why not)."""
    if key not in row or row[key] is None:
        return "", f"missing {key!r}"
    value = row[key]
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), ""
    if not isinstance(value, str):
        expected = "a string or a number" if numbers_ok else "a string"
        return "", f"{key!r} must be {expected}, got {type(value).__name__}"
    if not value.strip():
        return "", f"empty {key!r}"
    return value, ""


def _check_template(template: str, key: str, placeholder: str, required: bool = True) -> None:
    """``template`` may only use ``{placeholder}`` (and must, if ``required``).

    Raises:
        ValueError: naming ``key`` for other placeholders, a missing one, or broken braces.
    """
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as err:
        raise ValueError(f"{key} {template!r} is not a valid template: {err}") from None
    if fields - {placeholder}:
        raise ValueError(f"{key} may only use the placeholder {{{placeholder}}}, got {sorted(fields - {placeholder})}")
    if required and placeholder not in fields:
        raise ValueError(f"{key} must contain the placeholder {{{placeholder}}}, got {template!r}")


def _listing(problems: list[str]) -> str:
    """The first few problems joined with "; ", and how many more there are."""
    shown = "; ".join(problems[:_MAX_LISTED])
    return shown + (f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
