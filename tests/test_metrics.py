"""Evaluation metrics (ROUGE-L, pass@k, boxed-answer matching) against hand-computed values, and the tasks using them."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from opd.data.base import Example
from opd.data.instruct import InstructExample, InstructTask
from opd.data.math import MathTask
from opd.data.metrics import (
    extract_boxed,
    lcs_length,
    math_answer_score,
    math_answers_equal,
    mean_pass_at_k,
    normalize_math_answer,
    pass_at_k,
    rouge_l,
    rouge_l_max,
    rouge_tokenize,
    task_pass_at_k,
)
from opd.errors import DataError

# ----------------------------------------------------------------------------- ROUGE-L


def test_tokenizer_splits_on_whitespace_and_punctuation_and_lowercases():
    assert rouge_tokenize("Hello, World! It's 3.5-inch.") == ["hello", "world", "it", "s", "3", "5", "inch"]
    assert rouge_tokenize("  \n\t ") == [] and rouge_tokenize("...!?") == []
    assert rouge_tokenize("Café naïve") == ["café", "naïve"]


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("ABCBDAB", "BDCABA", 4),  # the textbook example (Cormen et al., §15.4): e.g. BCBA
    ("abc", "abc", 3), ("abc", "", 0), ("abc", "def", 0), ("aaaa", "aa", 2), ("axbycz", "abc", 3),
])
def test_lcs_length(a, b, expected):
    assert lcs_length(list(a), list(b)) == expected == lcs_length(list(b), list(a))


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    # 6 and 6 tokens, LCS "the cat on the mat" = 5: P = R = 5/6, F = 5/6
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
    # 4 and 6 tokens, LCS "the gunman" = 2: P = 1/2, R = 1/3, F = 2·(1/6)/(5/6) = 0.4
    ("police killed the gunman", "the gunman was shot by police", 0.4),
    # case and punctuation do not matter
    ("Hello, World!", "hello world", 1.0),
    # 3 and 5 tokens, LCS "a c" = 2 ("a b c" vs "a x c y z"): P = 2/3, R = 2/5, F = 2·(4/15)/(16/15) = 0.5
    ("a b c", "a x c y z", 0.5),
    ("", "anything", 0.0), ("some words", "", 0.0), ("apples", "oranges", 0.0),
])
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)
    assert rouge_l(reference, prediction) == pytest.approx(expected)  # F1 is symmetric


def test_rouge_l_takes_the_best_reference():
    assert rouge_l_max("the cat sat", ["a dog ran", "the cat sat down", "cat"]) == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l_max("anything", []) == 0.0


# ----------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
    (10, 3, 2, 1 - 21 / 45),  # 1 − C(7,2)/C(10,2) = 24/45
    (16, 4, 8, 1 - 495 / 12870),  # 1 − C(12,8)/C(16,8)
    (4, 0, 2, 0.0), (4, 4, 2, 1.0),
    (5, 4, 2, 1.0),  # n − c = 1 < k: every pair holds a correct sample
    (8, 1, 8, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_probability_that_a_random_k_subset_holds_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_for_large_n():
    for n, c, k in [(200, 7, 1), (200, 7, 10), (200, 7, 100), (1000, 3, 50), (100, 0, 10), (100, 95, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k():
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], k=1) == pytest.approx((0.4 + 0 + 1) / 3)
    with pytest.raises(ValueError):
        mean_pass_at_k([], k=1)


def test_task_pass_at_k_counts_correct_samples_per_example():
    task = MathTask.__new__(MathTask)  # only is_correct is used: no data needed
    examples = [Example("p1", "", "2"), Example("p2", "", "3")]
    completions = [["\\boxed{2}", "\\boxed{1}", "\\boxed{2.0}", "none"], ["\\boxed{4}"] * 4]
    # example 1: n = 4, c = 2; example 2: c = 0
    assert task_pass_at_k(task, examples, completions, k=1) == pytest.approx((0.5 + 0) / 2)
    assert task_pass_at_k(task, examples, completions, k=2) == pytest.approx((1 - 1 / 6 + 0) / 2)
    with pytest.raises(ValueError, match="2 examples but 1"):
        task_pass_at_k(task, examples, completions[:1], k=1)


# ----------------------------------------------------------------------------- boxed answers


@pytest.mark.parametrize(("text", "expected"), [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box, nested braces
    ("\\fbox{7}", "7"),
    ("\\boxed {x+1}", "x+1"),
    ("\\boxed{3} and an unclosed \\boxed{4", "3"),
    ("no box here", None), ("\\boxed{", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("\\dfrac{1}{2}", "1/2"), ("-\\frac{3}{6}", "-1/2"), ("\\frac12", "1/2"), ("0.50", "0.5"), (".5", "0.5"),
    ("5.0", "5"), ("007", "7"), ("1,000", "1000"), ("$10$", "10"), ("x = 5", "5"), ("90^\\circ", "90"),
    ("90^{\\circ}", "90"), ("50\\%", "50"), ("\\text{(C)}", "(C)"), ("\\textbf{Evelyn}", "Evelyn"), ("12.", "12"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("\\sqrt2", "\\sqrt{2}"), ("3\\sqrt{13}", "3\\sqrt{13}"),
])
def test_normalize_math_answer(raw, expected):
    assert normalize_math_answer(raw) == expected


@pytest.mark.parametrize(("a", "b", "equal"), [
    ("1/2", "0.5", True), ("\\frac12", "\\frac{1}{2}", True), ("2/4", "\\frac{1}{2}", True), ("10", "10.00", True),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True), ("3", "4", False), ("(1,2)", "(2,1)", False),
    ("\\sqrt{2}", "1.414", False),  # no symbolic or approximate equivalence
])
def test_math_answers_equal(a, b, equal):
    assert math_answers_equal(a, b) is equal and math_answers_equal(b, a) is equal


def test_math_answer_score():
    assert math_answer_score("... thus \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}") == 1.0
    assert math_answer_score("... thus 1/2", "\\frac{1}{2}") == 0.0  # no box, no answer
    assert math_answer_score("\\boxed{3}", "4") == 0.0


# ----------------------------------------------------------------------------- the tasks that use them


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_instruct_task_on_a_local_copy_of_the_release_layout(tmp_path):
    write_jsonl(tmp_path / "dolly" / "raw.jsonl", [
        {"instruction": "held out", "input": "", "output": "dev"},  # dev_num=1 drops it
        {"instruction": "Name a {color}.", "input": "", "output": "Blue."},
        {"instruction": "Summarise.", "input": "Text {here}.", "output": "Short."},
    ])
    write_jsonl(tmp_path / "sinst" / "11_" / "valid.jsonl", [
        {"prompt": "Say hi.<n>", "output": ["Hello there", "Hi there, friend"]},
    ])
    task = InstructTask(train_path=str(tmp_path / "dolly"), dev_num=1, eval_path=str(tmp_path / "sinst"),
                        eval_file="11_/valid.jsonl")
    assert [ex.target for ex in task.train] == ["Blue.", "Short."]
    assert task.train[0].prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                                    "completes the request.\n\n### Instruction:\nName a {color}.\n\n### Response:\n")
    assert task.train[1].prompt.endswith("### Instruction:\nSummarise.\n\n### Input:\nText {here}.\n\n### Response:\n")
    assert "paired with an input" in task.train[1].prompt
    (ex,) = task.eval
    assert ex.prompt == "Say hi.\n" and ex.references == ("Hello there", "Hi there, friend") and ex.target == "Hello there"
    # ROUGE-L against the best reference: "hi there" vs "hi there friend": P = 1, R = 2/3, F = 0.8
    assert task.score(" Hi there!", ex) == pytest.approx(0.8)
    assert task.is_correct("  hello, THERE ", ex) and not task.is_correct("hi there", ex)
    assert not task.is_correct("   ", ex) and task.extract_answer("  x ") == "x"
    assert task.score("anything", Example("p", "t", "a b")) == 0.0  # a plain Example: its answer is the reference


def test_instruct_task_rejects_rows_without_output(tmp_path):
    write_jsonl(tmp_path / "raw.jsonl", [{"instruction": "x", "output": ""}])
    with pytest.raises(DataError, match="no reference 'output'"):
        InstructTask(train_path=str(tmp_path / "raw.jsonl"), dev_num=0, eval_path=str(tmp_path / "raw.jsonl"))
    write_jsonl(tmp_path / "good" / "raw.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match="no file 'valid.jsonl'"):
        InstructTask(train_path=str(tmp_path / "good"), dev_num=0, eval_path=str(tmp_path / "good"))


def test_math_task_on_local_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "1+1?", "solution": "It is \\boxed{2}."},  # no answer field: taken from the box
        {"problem": "No box?", "solution": "Unknown."},
    ])
    evals = write_jsonl(tmp_path / "test.jsonl", [{"problem": "Half of 1?", "solution": "...", "answer": "\\frac{1}{2}"}])
    task = MathTask(train_path=str(train), eval_path=str(evals))
    assert [ex.answer for ex in task.train] == ["2", ""]
    assert task.train[0].target == " It is \\boxed{2}."
    (ex,) = task.eval
    assert ex.prompt == "Problem: Half of 1?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert task.is_correct("so \\boxed{0.5}", ex) and task.is_correct("\\boxed{\\dfrac{1}{2}}", ex)
    assert not task.is_correct("1/2", ex) and task.score("\\boxed{1/3}", ex) == 0.0 and task.score("\\boxed{2/4}", ex) == 1.0
    assert task.extract_answer("\\boxed{\\tfrac{2}{4}}") == "1/2" and task.extract_answer("none") is None
    # the directory form reads <split>.jsonl
    assert MathTask(train_path=str(tmp_path), eval_path=str(tmp_path)).eval == task.eval


def test_math_task_needs_gold_answers_for_evaluation(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(DataError, match="no 'answer' and no"):
        MathTask(train_path=str(rows), eval_path=str(rows))


def test_instruct_examples_are_examples():
    ex = InstructExample("p", "t", "a", ("a", "b"))
    assert isinstance(ex, Example) and ex.references == ("a", "b")


def test_evaluation_reports_the_task_score(tiny_model_dirs, tmp_path):
    """Instruction tasks log ROUGE-L (eval/rouge_l) beside exact match; exact-match tasks score = accuracy."""
    import json as _json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.data.base import Example
    from opd.data.instruct import InstructTask
    from opd.engine.evaluate import evaluate_accuracy

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["student"])
    task = InstructTask.__new__(InstructTask)  # the scoring methods need no loaded data
    examples = [Example("1+2=", "3", "3"), Example("4+4=", "8", "8")]
    result = evaluate_accuracy(model, tokenizer, task, examples, max_new_tokens=6, progress=False)
    completions = [c for _, c, _ in result.samples]
    expected = sum(task.score(c, ex) for c, ex in zip(completions, examples)) / 2
    assert result.score == pytest.approx(expected) and task.score_name == "rouge_l"
    assert _json.dumps(result.score)  # a plain float, loggable


def test_sampled_evaluation_reports_pass_at_k(compose_cfg, monkeypatch):
    """trainer.eval_samples=n logs eval/pass@k from n samples per prompt, equal to the estimator on the same samples."""
    import random as _random

    from opd.data.metrics import pass_at_k
    from opd.train import build_trainer

    trainer = build_trainer(compose_cfg("trainer.eval_samples=4", "trainer.eval_pass_k=[1,2,4]",
                                        "trainer.eval_examples=5"))
    outcomes = [_random.Random(i).random() < 0.4 for i in range(20)]
    calls = iter(outcomes)
    monkeypatch.setattr(trainer.task, "is_correct", lambda completion, example: next(calls))
    from opd.engine.evaluate import evaluate_pass_at_k

    got = evaluate_pass_at_k(trainer.student, trainer.tokenizer, trainer.task, trainer.eval_examples, trainer.sampler,
                             4, (1, 2, 4), progress=False)
    per_example = [sum(outcomes[i : i + 4]) for i in range(0, 20, 4)]
    for k in (1, 2, 4):
        assert got[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, c, k) for c in per_example) / 5)
    assert got["pass@1"] == pytest.approx(sum(outcomes) / 20)


def test_pass_k_values_are_validated(compose_cfg):
    from opd.errors import ConfigError
    from opd.train import build_trainer

    with pytest.raises(ConfigError, match="eval_pass_k"):
        build_trainer(compose_cfg("trainer.eval_samples=2", "trainer.eval_pass_k=[4]"))


def test_a_run_with_sampled_evaluation_logs_and_summarises_pass_at_k(compose_cfg, tmp_path):
    from opd.train import run

    summary = run(compose_cfg("trainer.eval_samples=2", "trainer.eval_pass_k=[1,2]", "trainer.max_steps=1"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/pass@2" in r for r in rows)
    assert 0.0 <= summary["student_pass@1_after"] <= summary["student_pass@2_after"] <= 1.0
