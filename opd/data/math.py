"""Competition math with ``\\boxed{}`` final answers (MATH-500 style), for OPSD and EOPD.

Data:

* ``HuggingFaceH4/MATH-500`` (split ``test``; rows ``problem``, ``solution``, ``answer``, ``subject``,
  ``level``, ``unique_id``): the 500-problem subset of the MATH test set (Hendrycks et al. 2021) chosen
  by Lightman et al., "Let's Verify Step by Step" (2023). Evaluation only.
* Training problems: any hub dataset or local JSON-lines file with ``problem`` and ``solution``
  fields, e.g. ``siyanzhao/Openthoughts_math_30k_opsd`` (OPSD's training set, official README) or the
  MATH training split. Rows without an ``answer`` field get the last ``\\boxed{}`` of their solution
  (or an empty answer: training answers are never scored).

Prompt (OPSD's student prompt, official ``data_collator.py`` as recorded in the research notes §7.2)::

    Problem: {problem}

    Please reason step by step, and put your final answer within \\boxed{}.

Metrics: :meth:`MathTask.is_correct` (what the trainer's greedy evaluation reports as accuracy) and
:meth:`MathTask.score` are math-verify's verdict (:func:`opd.data.metrics.math_answers_equal`): it extracts the
completion's answer (a ``\\boxed{}`` first, else other LaTeX or a plain expression) and checks symbolic
equivalence with the gold answer.
The papers report average@16 (OPSD) or pass@8 / mean@8 (EOPD) over sampled completions:
:func:`opd.data.metrics.pass_at_k` computes the unbiased estimate from n samples per problem, but
sampled multi-completion evaluation is not wired into the trainer yet.
"""

from __future__ import annotations

from typing import Any

from opd.data.base import Task, without_prompts
from opd.data.instruct import load_rows
from opd.data.metrics import boxed_answer, math_answers_equal, parse_math
from opd.errors import DataError
from opd.registry import DATASETS
from opd.types import Example

#: OPSD's student prompt (official data_collator.py; research notes §7.2).
BOXED_PROMPT = "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@DATASETS.register("math")
class MathTask(Task):
    """Math word problems with ``\\boxed{}`` answers (MATH-500 style), judged by math-verify.

    Args:
        train_path: training problems: hub id, local directory (``<train_split>.jsonl``) or ``.jsonl`` file.
        train_config, train_split: hub config and split of the training problems.
        num_train: cap on training problems; all when None. Problems whose prompt is an evaluation prompt are
            dropped first (with a warning), so the evaluation set stays whole and held out.
        eval_path, eval_config, eval_split: the evaluation problems (``HuggingFaceH4/MATH-500``, ``test``).
        num_eval: the first ``num_eval`` evaluation problems; all when None.
        problem_key, solution_key, answer_key: row fields. A missing or empty answer is taken from the
            last ``\\boxed{}`` of the solution; evaluation rows without either are an error.
        prompt_template: the model's prompt; must contain ``{problem}`` (other braces, e.g. ``\\boxed{}``,
            are kept as they are).

    Raises:
        ValueError: for a template without ``{problem}`` or a negative count.
        DataError: for data that cannot be loaded, a row without a problem, or an evaluation row without an answer.
    """

    def __init__(self, train_path: str = "DigitalLearningGmbH/MATH-lighteval", train_config: str | None = None,
                 train_split: str = "train", num_train: int | None = None,
                 eval_path: str = "HuggingFaceH4/MATH-500", eval_config: str | None = None, eval_split: str = "test",
                 num_eval: int | None = None, problem_key: str = "problem", solution_key: str = "solution",
                 answer_key: str = "answer", prompt_template: str = BOXED_PROMPT) -> None:
        if "{problem}" not in prompt_template:
            raise ValueError(f"prompt_template must contain {{problem}}, got {prompt_template!r}")
        for name, value in (("num_train", num_train), ("num_eval", num_eval)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.prompt_template = prompt_template
        self.keys = (problem_key, solution_key, answer_key)
        train_rows = load_rows(train_path, None, train_config, train_split, "data.train_path")
        eval_rows = load_rows(eval_path, None, eval_config, eval_split, "data.eval_path")[:num_eval]
        self.eval = [self.to_example(row, f"{eval_path}:{eval_split} row {i}", need_answer=True)
                     for i, row in enumerate(eval_rows)]
        self.train = without_prompts([self.to_example(row, f"{train_path}:{train_split} row {i}", need_answer=False)
                                      for i, row in enumerate(train_rows)], self.eval, "data: math training problems")
        self.train = self.train[:num_train]
        if not self.train:
            left = "no rows" if not train_rows else "no rows that are not evaluation problems"
            raise DataError(f"data.train_path: {train_path!r} ({train_split}) has {left}")

    def to_example(self, row: dict[str, Any], where: str, need_answer: bool) -> Example:
        """A row as an example: templated problem, the solution as target, the gold answer."""
        problem_key, solution_key, answer_key = self.keys
        problem = row.get(problem_key)
        if not isinstance(problem, str) or not problem.strip():
            raise DataError(f"{where} has no {problem_key!r}: {row!r:.200}")
        solution = row.get(solution_key) if isinstance(row.get(solution_key), str) else ""
        answer = row.get(answer_key)
        answer = str(answer).strip() if answer is not None and str(answer).strip() else (boxed_answer(solution) or "")
        if need_answer and not answer:
            raise DataError(f"{where} has no {answer_key!r} and no \\boxed{{}} answer in its {solution_key!r}: {row!r:.200}")
        # the target is what off-policy methods train on and OPSD shows its teacher: the worked solution
        target = " " + solution.strip() if solution.strip() else f" \\boxed{{{answer}}}"
        return Example(self.prompt_template.replace("{problem}", problem), target, answer)

    def extract_answer(self, completion: str) -> str | None:
        """math-verify's answer in the completion as its SymPy value's string (``\\tfrac{2}{4}`` -> ``1/2``), or None."""
        parsed = parse_math(completion)
        return str(parsed[0]) if parsed else None

    def is_correct(self, completion: str, example: Example) -> bool:
        """math-verify finds the completion's answer equivalent to the gold answer (``\\frac{1}{2}`` = ``0.5``)."""
        return math_answers_equal(completion, example.answer)
