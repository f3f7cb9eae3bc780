"""The toy task: worked solutions are right, answers are extracted, the prompt stream is deterministic."""

from __future__ import annotations

import pytest

from opd.data.arithmetic import ChainArithmetic, worked_solution
from opd.data.base import Example, PromptIterator, Task


def test_worked_solution_steps_and_answer():
    prompt, target, answer = worked_solution("12 + 7 - 30")
    assert (prompt, target, answer) == ("12+7-30=", "12+7=19;19-30=-11;#-11", "-11")


def test_every_generated_problem_agrees_with_python_arithmetic():
    task = ChainArithmetic(num_train=500, num_eval=50, max_terms=5, max_digits=3, seed=3)
    for ex in task.train + task.eval:
        assert int(ex.answer) == eval(ex.prompt.rstrip("="))  # noqa: S307 - digits and +/- only
        # every step's left operand is the previous step's result
        steps = ex.target.split(";")[:-1]
        for prev, nxt in zip(steps, steps[1:]):
            assert nxt.startswith(prev.split("=")[1])
        assert task.is_correct(ex.target, ex)
    assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}


def test_answer_extraction_and_exact_match():
    task = Task()
    ex = Example("1+2=", "1+2=3;#3", "3")
    assert task.extract_answer("1+2=3;#3") == "3"
    assert task.extract_answer("#### 1,234") == "1234"
    assert task.extract_answer("no answer") is None
    assert task.is_correct("1+2=3;#3", ex) and task.is_correct("#03", ex)
    assert not task.is_correct("1+2=4;#4", ex) and not task.is_correct("1+2=3", ex)


def test_bad_task_parameters_fail_clearly():
    with pytest.raises(ValueError, match="min_terms"):
        ChainArithmetic(min_terms=5, max_terms=3)
    with pytest.raises(ValueError, match="not a chain"):
        worked_solution("3 * 4")


def test_prompt_iterator_is_deterministic_and_resumable():
    examples = [Example(str(i), "", "") for i in range(10)]
    a = PromptIterator(examples, batch_size=4, seed=7)
    first = [next(a) for _ in range(2)]
    state = a.state_dict()
    rest = [next(a) for _ in range(3)]
    b = PromptIterator(examples, batch_size=4, seed=7)
    assert [next(b) for _ in range(2)] == first
    c = PromptIterator(examples, batch_size=4, seed=7)
    c.load_state_dict(state)
    assert [next(c) for _ in range(3)] == rest
    # an epoch covers every example exactly once
    d = PromptIterator(examples, batch_size=5, seed=0)
    assert sorted(e.prompt for e in next(d) + next(d)) == sorted(e.prompt for e in examples)
