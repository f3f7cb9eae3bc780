"""The local JSON-lines dataset: rows, templates, hold-out, skipped malformed rows and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.data.base import Example
from opd.data.jsonl import JsonlTask
from opd.errors import ConfigError, DataError
from opd.registry import DATASETS
from opd.train import run


def write_lines(path: Path, *lines: str | bytes | dict) -> Path:
    """A file whose lines are ``lines``: dicts as JSON, bytes and strings as they are."""
    encoded = [line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode()
               for line in lines]
    path.write_bytes(b"\n".join(encoded) + b"\n")
    return path


def arithmetic_rows(n: int) -> list[dict]:
    """``n`` valid rows the tiny char tokenizer can spell: ``"i+1="`` -> ``i+1``."""
    return [{"prompt": f"{i}+1=", "answer": str(i + 1), "target": f"{i}+1={i + 1};#{i + 1}"} for i in range(n)]


def test_rows_become_examples_with_default_target_and_template(tmp_path):
    train = write_lines(tmp_path / "train.jsonl",
                        {"prompt": "2+3=", "answer": "5", "target": "2+3=5;#5"},
                        {"prompt": "4+4=", "answer": 8},  # a numeric answer, no target
                        "",  # blank lines are not rows
                        {"prompt": "1+1=", "answer": "2", "target": None})
    evals = write_lines(tmp_path / "eval.jsonl", {"prompt": "9-1=", "answer": "8"})
    task = JsonlTask(str(train), str(evals), prompt_template="Q: {prompt}")
    assert task.train == [Example("Q: 2+3=", "2+3=5;#5", "5"), Example("Q: 4+4=", "#8", "8"),
                          Example("Q: 1+1=", "#2", "2")]
    assert task.eval == [Example("Q: 9-1=", "#8", "8")]
    assert task.is_correct("9-1=8;#8", task.eval[0]) and not task.is_correct("#7", task.eval[0])


def test_keys_and_answer_pattern_are_configurable(tmp_path):
    train = write_lines(tmp_path / "t.jsonl", *({"q": f"capital {i}", "a": f"city{i}", "sol": f"answer: city{i}"}
                                                for i in range(5)))
    task = JsonlTask(str(train), num_holdout=2, prompt_key="q", answer_key="a", target_key="sol",
                     answer_pattern=r"answer:\s*(\w+)")
    assert [ex.answer for ex in task.train] == ["city0", "city1", "city2"]
    assert [ex.answer for ex in task.eval] == ["city3", "city4"]  # the last num_holdout rows are held out
    assert task.is_correct("so the answer: city3", task.eval[0])


def test_malformed_rows_are_skipped_with_count_and_line_numbers(tmp_path):
    train = write_lines(
        tmp_path / "train.jsonl",
        {"prompt": "1+1=", "answer": "2"},          # 1 ok
        '{"prompt": "2+2=", "answer": ',            # 2 bad JSON
        "[1, 2]",                                   # 3 not an object
        {"answer": "3"},                            # 4 missing prompt
        {"prompt": "3+3=", "answer": "  "},         # 5 empty answer
        {"prompt": 7, "answer": "7"},               # 6 prompt of the wrong type
        {"prompt": "5+5=", "answer": [10]},         # 7 answer of the wrong type
        {"prompt": "6+6=", "answer": True},         # 8 a boolean is not an answer
        {"prompt": "6+6=", "answer": "12", "target": 12},  # 9 target of the wrong type
        b"\xff\xfe not utf-8",                      # 10 undecodable bytes
        {"prompt": "8+8=", "answer": "16"},         # 11 ok
    )
    evals = write_lines(tmp_path / "eval.jsonl", {"prompt": "9+9=", "answer": "18"})
    with pytest.warns(UserWarning) as caught:
        task = JsonlTask(str(train), str(evals))
    message = str(caught[0].message)
    assert "data.train_path: skipped 9 malformed row(s) of 11" in message and str(train) in message
    for needle in ("line 2: not valid JSON", "line 3: not a JSON object", "line 4: missing 'prompt'",
                   "line 5: empty 'answer'", "line 6: 'prompt' must be a string, got int", "and 4 more"):
        assert needle in message
    assert [ex.prompt for ex in task.train] == ["1+1=", "8+8="]


@pytest.mark.parametrize(("contents", "needle"), [
    (None, "data.train_path: no file at"),
    (b"", "has no valid row (the file is empty)"),
    (b"\n\n", "has no valid row (the file is empty)"),
    (b'{"prompt": "1+1="}\nnot json\n',
     "has no valid row (2 malformed: line 1: missing 'answer'; line 2: not valid JSON"),
])
def test_missing_empty_or_all_malformed_files_raise_data_errors_naming_the_path(tmp_path, contents, needle):
    path = tmp_path / "train.jsonl"
    if contents is not None:
        path.write_bytes(contents)
    with pytest.raises(DataError) as info:
        JsonlTask(str(path), eval_path=str(path))
    assert needle in str(info.value) and str(path) in str(info.value)


def test_unreadable_path_and_bad_eval_file_name_their_key(tmp_path):
    with pytest.raises(DataError, match=r"data.train_path: cannot read .*"):
        JsonlTask(str(tmp_path))  # a directory
    train = write_lines(tmp_path / "train.jsonl", *arithmetic_rows(3))
    with pytest.raises(DataError, match=r"data.eval_path: no file at .*missing.jsonl"):
        JsonlTask(str(train), str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"3 valid rows; holding out data.num_holdout=3"):
        JsonlTask(str(train), num_holdout=3)


@pytest.mark.parametrize(("override", "needle"), [
    ({}, "data.train_path"),                                               # required, no default
    ({"answer_pattern": r"#\d+"}, "answer_pattern"),                       # no capturing group
    ({"answer_pattern": "(["}, "not a valid regular expression"),
    ({"prompt_template": "Question:"}, "placeholder {prompt}"),
    ({"prompt_template": "{question}"}, "may only use the placeholder {prompt}"),
    ({"default_target": "{target}"}, "default_target"),
    ({"num_holdout": 0}, "num_holdout must be >= 1"),
    ({"answer_key": "prompt"}, "must differ"),
    ({"num_holdout": "many"}, "data.num_holdout"),                         # wrong type
    ({"shuffle": True}, "data.shuffle"),                                   # unknown key
])
def test_bad_dataset_config_is_a_config_error_naming_the_key(tmp_path, override, needle):
    train = write_lines(tmp_path / "train.jsonl", *arithmetic_rows(4))
    node = {"name": "jsonl", **({"train_path": str(train)} if override else {}), **override}
    with pytest.raises(ConfigError) as info:
        DATASETS.build(node, "data")
    assert needle in str(info.value)


def test_jsonl_data_trains_end_to_end(compose_cfg, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", *arithmetic_rows(12), "oops")
    evals = write_lines(tmp_path / "eval.jsonl", *arithmetic_rows(4))
    with pytest.warns(UserWarning, match=r"skipped 1 malformed row\(s\) of 13 .*line 13"):
        summary = run(compose_cfg("data=jsonl", f"data.train_path={train}", f"data.eval_path={evals}",
                                  "trainer.max_steps=2", "trainer.batch_size=4"))
    assert summary["steps"] == 2 and summary["eval_examples"] == 4
