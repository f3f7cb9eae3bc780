"""A second toy task: integer multiplication with a worked, column-style solution.

Problems come from ``reasoning_gym``'s ``products`` generator (seeded, offline). We write them compactly
for the toy character tokenizer (``opd.models.toy.TOY_ALPHABET``) and add a worked solution that
multiplies the running product by each place value of the next factor, then adds the partial products.
Every step is a one-digit-place multiplication or an addition, so a skill the chained +/- task does not
teach (the multiplication table, shifted by powers of ten) is needed::

    prompt:  "15*43="
    target:  "15*40=600;15*3=45;600+45=645;#645"
    answer:  "645"
"""

from __future__ import annotations

import re

from opd.data.base import Task
from opd.data.generated import generated_splits
from opd.registry import DATASETS

_FACTOR = re.compile(r"\d+")


def worked_solution(expression: str) -> tuple[str, str, str]:
    """(prompt, target, answer) for a product of non-negative integers such as ``'15 * 43'``.

    For each next factor ``b`` with more than one digit, the running product ``p`` is multiplied by every
    place value of ``b`` (``40`` and ``3`` for ``43``; zero digits included, so every problem of a size has
    the same shape) and the partial products are summed left to right. A one-digit ``b`` is one step.

    Raises:
        ValueError: if the expression is not a product of at least two non-negative integers.
    """
    compact = expression.replace(" ", "")
    factors = compact.split("*")
    if len(factors) < 2 or not all(_FACTOR.fullmatch(f) for f in factors):
        raise ValueError(f"not a product of non-negative integers: {expression!r}")
    total, steps = int(factors[0]), []
    for factor in factors[1:]:
        digits = factor.lstrip("0") or "0"
        if len(digits) == 1:
            steps.append(f"{total}*{digits}={total * int(digits)}")
            total *= int(digits)
            continue
        places = [int(d) * 10 ** (len(digits) - 1 - k) for k, d in enumerate(digits)]  # 43 -> [40, 3]
        partials = [total * place for place in places]
        steps += [f"{total}*{place}={partial}" for place, partial in zip(places, partials)]
        running = partials[0]
        for partial in partials[1:]:
            steps.append(f"{running}+{partial}={running + partial}")
            running += partial
        total = running
    return f"{compact}=", ";".join(steps) + f";#{total}", str(total)


@DATASETS.register("multiplication")
class Multiplication(Task):
    """Products of integers with column-style worked solutions (reasoning_gym ``products``), exact-match accuracy.

    Splits as in :class:`opd.data.arithmetic.ChainArithmetic`: ``train`` = the first ``num_train`` problems, ``eval``
    and ``validation`` = the next ``num_eval`` and ``num_validation`` distinct problems unseen in train (or eval),
    by :func:`opd.data.generated.held_out_splits`. Entry ``i`` depends on ``(seed, i)`` only.
    """

    def __init__(self, num_train: int = 6000, num_eval: int = 400, min_terms: int = 2, max_terms: int = 2,
                 min_digits: int = 2, max_digits: int = 2, seed: int = 0, num_validation: int = 0) -> None:
        self.train, self.eval, self.validation = generated_splits(
            "multiplication", "products", worked_solution, num_train, num_eval, num_validation, seed, min_terms, max_terms,
            min_digits, max_digits)
