"""Evaluation metrics: our adapters against rouge-score / math-verify called directly, pass@k by hand, the tasks using them."""

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
    boxed_answer,
    math_answer_score,
    math_answers_equal,
    mean_pass_at_k,
    pass_at_k,
    rouge_l,
    rouge_l_max,
    task_pass_at_k,
)
from opd.errors import DataError

# ----------------------------------------------------------------------------- ROUGE-L (rouge-score)

PAIRS = [  # (prediction, reference)
    ("the cat sat on the mat", "the cat is on the mat"),
    ("police killed the gunman", "the gunman was shot by police"),
    ("The cats are running quickly", "a cat runs quick"),
    ("Hello, World! It's 3.5-inch.", "hello world it s 3 5 inch"),
    ("Café naïve", "cafe naive"), ("你好", "你好"), ("", "anything"), ("apples", "oranges"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_l_is_rouge_score_with_stemming(prediction, reference):
    from rouge_score import rouge_scorer

    library = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == library


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0  # identical texts
    assert rouge_l("Running", "run") == 1.0  # Porter stemming: MiniLLM / DistiLLM's use_stemmer=True
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)  # LCS 5 of 6 and 6
    assert rouge_l("", "x") == 0.0 and rouge_l("你好", "你好") == 0.0  # no [a-z0-9] token: nothing to score


def test_rouge_l_max_takes_the_best_reference_by_the_library():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    references = ["a dog ran", "the cats sat down", "cat"]
    expected = max(scorer.score(ref, "the cat sat")["rougeL"].fmeasure for ref in references)
    assert rouge_l_max("the cat sat", references) == expected > 0.8  # "cats" stems to "cat": 3 of 4 tokens
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


# ----------------------------------------------------------------------------- math answers (math-verify)

MATH_CASES = [  # (completion or answer, gold)
    ("so the answer is \\boxed{0.5}.", "\\frac{1}{2}"), ("\\boxed{\\dfrac{2}{4}}", "0.5"), ("\\boxed{10.00}", "10"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\frac{\\pi}{2})"), ("\\boxed{(2,1)}", "(1,2)"),
    ("\\boxed{3}", "4"), ("\\boxed{\\sqrt{2}}", "\\frac{2}{\\sqrt{2}}"), ("\\boxed{1.414}", "\\sqrt{2}"),
    ("the answer is 1/2", "\\frac{1}{2}"), ("no answer here", "7"), ("\\boxed{90^\\circ}", "90"),
]


@pytest.mark.parametrize(("completion", "gold"), MATH_CASES)
def test_math_answers_equal_is_math_verify(completion, gold):
    from math_verify import parse, verify

    assert math_answers_equal(completion, gold) is verify(parse("\\boxed{" + gold + "}"), parse(completion))
    assert math_answer_score(completion, gold) == float(math_answers_equal(completion, gold))


@pytest.mark.parametrize(("completion", "gold", "equal"), [
    ("so \\boxed{0.5}", "\\frac{1}{2}", True),  # by value
    ("\\boxed{\\sqrt{2}}", "\\frac{2}{\\sqrt{2}}", True),  # symbolic, which string normalisation cannot do
    ("\\boxed{(2,1)}", "(1,2)", False), ("\\boxed{3}", "4", False), ("no answer here", "7", False),
])
def test_math_answers_equal_known_values(completion, gold, equal):
    assert math_answers_equal(completion, gold) is equal


def test_math_verify_times_out_only_in_the_main_thread():
    """Its SIGALRM timeout needs the main thread; elsewhere the adapter runs it without one instead of raising."""
    import threading

    results = []
    worker = threading.Thread(target=lambda: results.append(math_answers_equal("\\boxed{0.5}", "\\frac{1}{2}")))
    worker.start()
    worker.join()
    assert results == [True]
    from math_verify import parse

    outside = []

    def direct():
        try:
            parse("\\boxed{1}")
        except ValueError as err:
            outside.append(str(err))

    worker = threading.Thread(target=direct)
    worker.start()
    worker.join()
    assert outside and "thread" in outside[0]  # the library itself refuses with its timeout on


@pytest.mark.parametrize(("text", "expected"), [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\fbox{7}", "7"), ("\\boxed {x+1}", "x+1"),
    ("no box here", None), ("\\boxed{", None),
])
def test_boxed_answer(text, expected):
    from latex2sympy2_extended.math_normalization import extract_boxed_content

    assert boxed_answer(text) == expected
    if expected is not None:
        assert expected == extract_boxed_content(text, mode="last")


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
    assert task.is_correct("1/2", ex)  # math-verify also reads an unboxed final expression
    assert task.score("\\boxed{1/3}", ex) == 0.0 and task.score("\\boxed{2/4}", ex) == 1.0
    assert task.extract_answer("\\boxed{\\tfrac{2}{4}}") == "1/2" and task.extract_answer("none") is None
    # the directory form reads <split>.jsonl
    assert MathTask(train_path=str(tmp_path), eval_path=str(tmp_path)).eval == task.eval


def test_gsm8k_judges_the_answer_after_hashes_by_math_verify():
    from opd.data.hub import GSM8K

    task = GSM8K.__new__(GSM8K)  # only the scoring methods: no hub download
    ex = Example("q", " ... #### 72", "72")
    assert task.is_correct("so #### 72.0", ex) and task.is_correct("#### 72", ex)
    assert not task.is_correct("#### 71", ex) and not task.is_correct("72", ex)  # no '####': no answer


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


def test_evaluation_keeps_each_examples_verdict_in_order_and_ranks_merge_back_to_it(tiny_model_dirs):
    """``EvalResult.correct`` is task.is_correct of each example's completion, in order (paired comparisons and
    re-scoring a record read it); merging strided rank shares restores that order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.data.base import Task
    from opd.engine.evaluate import evaluate_accuracy, merge_eval_results

    class OddAnswersCount(Task):  # a verdict that differs between examples whatever the untrained model writes
        def is_correct(self, completion: str, example: Example) -> bool:
            return int(example.answer) % 2 == 1

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["student"])
    task = OddAnswersCount()
    examples = [Example(f"{a}+{b}=", str(a + b), str(a + b)) for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7)]]
    whole = evaluate_accuracy(model, tokenizer, task, examples, max_new_tokens=4, num_samples=5, progress=False)
    texts = [completion for _, completion, _ in whole.samples]
    assert whole.correct == [task.is_correct(t, ex) for t, ex in zip(texts, examples)] == [True, True, False, False, True]
    assert sum(whole.correct) / 5 == whole.accuracy
    # two ranks' strided shares (examples 0, 2, 4 and 1, 3), as opd.distributed.strided_shard deals them
    parts = [evaluate_accuracy(model, tokenizer, task, examples[r::2], max_new_tokens=4, progress=False) for r in (0, 1)]
    assert merge_eval_results(parts).correct == whole.correct
