"""Seeds to verdicts: spread, confidence intervals and the holds / reversed / not shown comparison of two arms."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------- statistics

#: the power at which :func:`compare_arms` states the smallest difference a design can detect
POWER = 0.8
#: a method trained on the gold labels, not on a teacher: an upper reference, not a competitor
ORACLE_METHOD, ORACLE_NOTE = "sft", "oracle: gold labels"
#: the distillation baseline that comparisons default to when a report has it
BASELINE_METHOD = "seqkd"


def binomial_sd(accuracy: float, eval_examples: int) -> float:
    """sqrt(p(1−p)/N): the sampling SD of an accuracy p measured on N problems, the evaluation's own noise.

    p is kept inside [1/N, 1 − 1/N] (as if one problem had gone the other way), so that an accuracy of 0 or
    100 % still gets a non-zero SD.
    """
    if eval_examples < 2:
        raise ValueError(f"eval_examples must be >= 2, got {eval_examples}")
    p = min(max(accuracy, 1 / eval_examples), 1 - 1 / eval_examples)
    return math.sqrt(p * (1 - p) / eval_examples)


def _spread_floor(values: Sequence[float], eval_examples: int | None, resolution: float | None) -> float | None:
    """The SD that stands in for a zero spread of ``values`` (see :func:`compare_arms`); None without a floor."""
    if eval_examples is not None:
        return binomial_sd(statistics.fmean(values), eval_examples)
    if resolution is not None:
        return resolution / math.sqrt(12)
    return None


@dataclass(frozen=True)
class Comparison:
    """mean(a) − mean(b) over seeds, as :func:`compare_arms` judges the claim a > b.

    Attributes:
        difference: mean(a) − mean(b) (paired: the mean of the per-seed differences), in the values' units.
        ci_low, ci_high: its two-sided (1 − alpha) Student-t interval.
        n_a, n_b: values (seeds) per arm.
        verdict: "holds" (interval above 0), "reversed" (below 0) or "not shown" (it covers 0).
        min_detectable_difference: the smallest true difference this design detects with 80 % power at alpha.
        note: why a spread was floored ("all 3 seeds of both arms equal: ..."), else "".
        paired, alpha: how it was computed.
    """

    difference: float
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int
    verdict: str
    min_detectable_difference: float
    note: str = ""
    paired: bool = False
    alpha: float = 0.05

    def interval_text(self, scale: float = 1.0, digits: int = 1) -> str:
        """``-4.0 [-8.6, +0.5]``, the values times ``scale`` (100 for accuracies in points)."""
        def signed(value: float) -> str:
            return f"{scale * value:+.{digits}f}"

        return f"{signed(self.difference)} [{signed(self.ci_low)}, {signed(self.ci_high)}]"

    def verdict_text(self, scale: float = 1.0, unit: str = "", digits: int = 1) -> str:
        """``holds``, ``reversed`` or ``not shown (smallest detectable difference 5.9 pp at 80 % power, α = 0.05)``,
        then the note, if any, after a semicolon."""
        text = self.verdict
        if self.verdict == "not shown":
            text += (f" (smallest detectable difference {scale * self.min_detectable_difference:.{digits}f}{unit} "
                     f"at {100 * POWER:.0f} % power, α = {self.alpha:g})")
        return f"{text}; {self.note}" if self.note else text


def compare_arms(a: Sequence[float], b: Sequence[float], *, paired: bool = False, alpha: float = 0.05,
                 eval_examples: int | None = None, resolution: float | None = None) -> Comparison:
    """Judge the claim mean(a) > mean(b) from one value per seed: the difference, its interval, a verdict.

    Verdicts: **holds** (the (1 − alpha) interval lies above 0), **reversed** (it lies below 0: b > a is
    shown) or **not shown** (it covers 0). Whatever the verdict, ``min_detectable_difference`` says how
    large a true difference this design detects with 80 % power at ``alpha``: (t_{1−α/2,df} + t_{0.8,df})·SE.

    Two arms (``paired=False``): Welch's interval, SE = sqrt(s_a²/n_a + s_b²/n_b) with Welch–Satterthwaite
    df; for equal n and equal spreads s this is the textbook (t_{1−α/2} + t_{0.8})·s·sqrt(2/n) with
    df = 2n − 2. Paired (the same seeds, e.g. after vs before training): SE = s_d/sqrt(n) over the per-seed
    differences d, df = n − 1. t quantiles come from ``scipy.stats.t``.

    A zero spread is floored. Accuracies on N problems move in steps of 1/N, so seeds that all score the
    same are an ordinary event: it says the seeds agreed, not that the noise is zero. Taken at face value it
    gives a zero-width interval (a "tie" that cannot discriminate) and an infinitely sensitive design.
    So a spread that is exactly 0 is replaced, and the note says so ("all 3 seeds of both arms equal"):

    * ``eval_examples=N`` (accuracies): the binomial sampling SD of the arm's mean accuracy p,
      sqrt(p(1−p)/N), the evaluation's own noise (what a fresh draw of N problems would move it by);
      for a paired difference sqrt(sd_a² + sd_b²).
    * ``resolution=r`` (values on a grid, e.g. steps to a score evaluated every r steps): r/sqrt(12),
      the SD of a value known only to within one grid step; sqrt(2)·r/sqrt(12) for a paired difference.

    Observed non-zero spreads are used as they are.

    Args:
        a, b: one value per seed; when ``paired``, the same seeds in the same order.
        paired: compare the per-seed differences a_i − b_i.
        alpha: two-sided level; the interval is the (1 − alpha) one.
        eval_examples: the problems behind each accuracy (the floor for accuracies).
        resolution: the grid step of the values (the floor for steps).

    Returns:
        The :class:`Comparison`, in the units of ``a`` and ``b``.

    Raises:
        ValueError: fewer than 2 values in an arm, unequal lengths when paired, alpha outside (0, 1), or a
            zero spread with neither ``eval_examples`` nor ``resolution`` to floor it.
    """
    from scipy import stats

    a, b = [float(v) for v in a], [float(v) for v in b]
    if min(len(a), len(b)) < 2:
        raise ValueError(f"compare_arms needs at least 2 values per arm, got {len(a)} and {len(b)}")
    if paired and len(a) != len(b):
        raise ValueError(f"paired arms need the same seeds, got {len(a)} and {len(b)} values")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if eval_examples is not None:
        floor_text = f"spread floored at the binomial SD of an accuracy on {eval_examples} problems, sqrt(p(1−p)/N)"
    else:
        floor_text = f"spread floored at resolution/√12 (values on a grid of {resolution:g})" if resolution else ""

    def floor(values: list[float], what: str) -> float:
        sd = _spread_floor(values, eval_examples, resolution)
        if sd is None:
            raise ValueError(f"all {what} equal: pass eval_examples (accuracies) or resolution (a grid, such as steps) "
                             "to floor the spread")
        return sd

    notes = []
    if paired:
        diffs = [x - y for x, y in zip(a, b)]
        difference, n, sd = statistics.fmean(diffs), len(diffs), statistics.stdev(diffs)
        if sd == 0:
            what = f"{n} per-seed differences"
            sd = math.hypot(floor(a, what), floor(b, what))
            notes.append(f"all {what} equal")
        se, df = sd / math.sqrt(n), n - 1
    else:
        difference = statistics.fmean(a) - statistics.fmean(b)
        spreads = [statistics.stdev(a), statistics.stdev(b)]
        zero = [i for i, sd in enumerate(spreads) if sd == 0]
        for i in zero:
            spreads[i] = floor((a, b)[i], f"{len((a, b)[i])} seeds of an arm")
        if zero:
            arms = "both arms" if len(zero) == 2 else ("the first arm", "the second arm")[zero[0]]
            counts = sorted({len((a, b)[i]) for i in zero})
            notes.append(f"all {'/'.join(map(str, counts))} seeds of {arms} equal")
        var_a, var_b = spreads[0] ** 2 / len(a), spreads[1] ** 2 / len(b)
        se = math.sqrt(var_a + var_b)
        df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    t_crit, t_power = float(stats.t.ppf(1 - alpha / 2, df)), float(stats.t.ppf(POWER, df))
    low, high = difference - t_crit * se, difference + t_crit * se
    verdict = "holds" if low > 0 else "reversed" if high < 0 else "not shown"
    note = f"{notes[0]}: {floor_text}" if notes else ""
    return Comparison(difference, low, high, len(a), len(b), verdict, (t_crit + t_power) * se, note, paired, alpha)


def describe(values: Sequence[Any], eval_examples: int | None = None) -> dict[str, Any]:
    """Mean, sample std and 95 % interval of the numeric, finite ``values`` (std None below two; mean None for none).

    ``all_equal`` marks two or more values that are all the same; their interval is floored
    (:func:`mean_confidence_interval`), never zero-width. ``eval_examples``: the problems behind each value, when
    the values are accuracies.
    """
    numbers = [float(v) for v in values
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return {"mean": statistics.fmean(numbers) if numbers else None,
            "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
            "ci95": mean_confidence_interval(numbers, eval_examples=eval_examples), "n": len(numbers),
            "values": list(values), "all_equal": len(numbers) > 1 and len(set(numbers)) == 1,
            "eval_examples": eval_examples}


def mean_confidence_interval(numbers: Sequence[float], level: float = 0.95,
                             eval_examples: int | None = None) -> list[float] | None:
    """``[low, high]`` Student-t confidence interval of the mean over seeds (None below two values).

    With n seeds it is mean ± t_{(1+level)/2, n−1} · s/√n, from ``scipy.stats.t.interval`` (at n = 3, t = 4.30:
    three seeds bound the mean only loosely, which is the honest width). When every value is the same, s is
    floored as in :func:`compare_arms`: at the binomial SD of an accuracy on ``eval_examples`` problems; without
    ``eval_examples`` there is no interval (None), never a zero-width one. Given ``eval_examples`` (the values are
    accuracies), the interval is clipped to [0, 1].
    """
    if len(numbers) < 2:
        return None
    from scipy import stats

    mean, sd = statistics.fmean(numbers), statistics.stdev(numbers)
    if sd == 0:
        sd = _spread_floor(numbers, eval_examples, None)
        if sd is None:
            return None
    low, high = stats.t.interval(level, len(numbers) - 1, loc=mean, scale=sd / math.sqrt(len(numbers)))
    if eval_examples is not None:
        low, high = max(low, 0.0), min(high, 1.0)
    return [float(low), float(high)]


