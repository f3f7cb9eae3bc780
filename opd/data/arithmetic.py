"""The default task: chained integer addition/subtraction with a worked, step-by-step solution.

Problems come from ``reasoning_gym``'s ``chain_sum`` generator (seeded, offline). We write them
compactly for a character-level tokenizer and add a worked solution in which every step reuses the
previous result, so one wrong intermediate sum spoils the final answer: the student's own
mistakes compound, which is the regime on-policy distillation is meant for::

    prompt:  "12+7-30="
    target:  "12+7=19;19-30=-11;#-11"
    answer:  "-11"
"""

from __future__ import annotations

import re

from opd.data.base import Task
from opd.data.generated import generated_splits
from opd.registry import DATASETS

_TERM = re.compile(r"([+-]?)\s*(\d+)")


def worked_solution(expression: str) -> tuple[str, str, str]:
    """(prompt, target, answer) for a chain expression such as ``'12 + 7 - 30'``.

    Raises:
        ValueError: if the expression is not a chain of integers joined by + and -.
    """
    compact = expression.replace(" ", "")
    terms = [(sign or "+", int(digits)) for sign, digits in _TERM.findall(compact)]
    if len(terms) < 2 or "".join(f"{s}{d}" for s, d in terms).lstrip("+") != compact:
        raise ValueError(f"not a chain of + and - over integers: {expression!r}")
    total = terms[0][1] if terms[0][0] == "+" else -terms[0][1]
    steps = []
    for sign, value in terms[1:]:
        new_total = total + value if sign == "+" else total - value
        steps.append(f"{total}{sign}{value}={new_total}")
        total = new_total
    return f"{compact}=", ";".join(steps) + f";#{total}", str(total)


@DATASETS.register("arithmetic")
class ChainArithmetic(Task):
    """Chained +/- arithmetic with worked solutions (reasoning_gym ``chain_sum``), exact-match accuracy.

    Splits by :func:`opd.data.generated.held_out_splits`: ``train`` = the first ``num_train`` problems, ``eval`` and
    ``validation`` = the next ``num_eval`` and ``num_validation`` distinct problems unseen in train (or eval).
    """

    def __init__(self, num_train: int = 20000, num_eval: int = 200, min_terms: int = 3, max_terms: int = 4,
                 min_digits: int = 1, max_digits: int = 2, seed: int = 0, num_validation: int = 0) -> None:
        self.train, self.eval, self.validation = generated_splits(
            "arithmetic", "chain_sum", worked_solution, num_train, num_eval, num_validation, seed, min_terms, max_terms,
            min_digits, max_digits)
