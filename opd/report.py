"""Compare finished runs: one table row per swept configuration (mean ± std over seeds) and learning curves.

Usage:
    opd-report logs/default/multiruns/2026-11-25_15-30-00      # a sweep: every run directory below it
    opd-report runs/gkd-1 runs/gkd-2 runs/sft-1 --out reports   # any run directories
    opd-report logs/ --group-by method.name method.beta         # choose the grouping keys yourself
    opd-report logs/ --metric eval/accuracy loss/jsd --smooth 10
    opd-report logs/ --baseline kd                               # compare every group with kd (default: seqkd)

A run directory is any directory holding ``summary.json`` (written by ``opd-train``); its
``metrics.jsonl``, ``resolved_config.yaml`` and ``.hydra/overrides.yaml`` are read when present.
Config keys are the dotted keys of the W&B run config (``method.beta``, ``trainer.lr``, ...).

Grouping: by default runs are grouped by every config key whose value differs between them, except
the seed key and bookkeeping keys (``name``, ``output_dir``, ``hydra.*``, directory and resume
keys, and values that contain the run's own directory). Runs that differ only in the seed form one
group. A group is labelled by the fewest of those keys that still tell the groups apart, preferring
keys named in the sweep's overrides and ``*.name`` keys, so ``-m method=gkd,sft`` gives the rows
``method.name=gkd`` and ``method.name=sft`` rather than every method knob. When nothing differs,
the single group is labelled by ``method.name``. ``--group-by`` replaces all of this.

Outputs (in ``--out``; default: the path given, or the working directory when several are given):
    report.md           the table (also printed to stdout), the run list and the plots
    report.json         the same numbers, machine-readable
    <metric>.png        per ``--metric`` (default ``eval_accuracy.png``): mean over seeds per group
    <metric>_small_multiples.png   the same, one panel per group with SFT as a grey reference (2+ groups)
    train_loss.png      train/loss, moving average over ``--smooth`` steps

Statistics: accuracies are percentages with one decimal; "mean ± std" uses the sample standard
deviation over the group's runs; a group of one run shows the mean alone (its std is undefined and
``null`` in report.json). A group whose seeds all scored the same shows "all N seeds equal", and its
interval uses the binomial SD of an accuracy on the run's ``eval_examples`` problems instead of a
spread of 0 (never a zero-width interval). Tokens and wall time are means. The "teacher" and "initial
student" rows pool every run's ``teacher_accuracy`` and ``student_accuracy_before``; when runs use
different teachers or students, read the per-group columns instead.

Comparisons: every group is compared with a baseline (``--baseline``; by default the SeqKD group, the
distillation baseline, when there is one) by ``compare_arms``: the difference of the mean accuracy after
training with Welch's 95 % interval, and a verdict on "beats the baseline": holds, reversed or not shown
(with the smallest difference the seeds could detect). SFT trains on the gold labels, so its group is
labelled "(oracle: gold labels)": a reference, not a competitor.

Plots: curves are interpolated onto the union of the group's logged steps (each run only inside its
own step range); the band spans min..max over the runs. Each group has its own colour, line style and
marker (distinct colours for up to 20 groups), assigned in sorted order of the group labels, so a group
keeps its style between reports of the same groups.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import statistics
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from opd.config import flatten_config
from opd.errors import OPDError

PROG = "opd-report"
SUMMARY = "summary.json"
_UNSET = "(unset)"  # shown for a key a run's config does not have (e.g. method.beta for sft)
_IGNORED_KEYS = {"name", "output_dir", "run_dir", "trainer.resume"}
_IGNORED_LEAVES = {"output_dir", "run_dir", "dir", "log_dir", "logging_dir", "save_dir", "checkpoint", "checkpoints",
                   "checkpoint_dir", "resume"}
_COLUMNS = (  # (summary key, column header, kind)
    ("teacher_accuracy", "teacher acc. (%)", "pct"),
    ("student_accuracy_before", "student acc. before (%)", "pct"),
    ("student_accuracy_after", "student acc. after (%)", "pct"),
    ("tokens", "tokens", "int"),
    ("wall_time_s", "wall time (s)", "float"),
)


class ReportError(OPDError):
    """Nothing to report on, or an option that does not fit the runs; the CLI prints one line and exits 2."""


@dataclass
class Run:
    """One finished run, as read from its directory.

    Attributes:
        path: the run directory.
        summary: ``summary.json``.
        config: the resolved config flattened to dotted keys.
        metrics: metric name -> {step: value} from ``metrics.jsonl`` (the last value logged at a step wins).
        overrides: the dotted keys named in ``.hydra/overrides.yaml`` (empty outside Hydra).
    """

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


@dataclass
class Group:
    """Runs that share the values of the group keys (usually: the same configuration, different seeds)."""

    values: dict[str, Any]
    runs: list[Run]

    @property
    def label(self) -> str:
        """``key=value`` pairs joined by spaces, e.g. ``method.name=gkd method.beta=0.5``; unset keys left out."""
        pairs = [f"{key}={_display(value)}" for key, value in self.values.items() if value != _UNSET]
        return " ".join(pairs or [f"{key}={_UNSET}" for key in self.values]) or "all runs"


# ---------------------------------------------------------------------------------------------- finding and reading


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a ``summary.json``, sorted and without duplicates.

    Raises:
        ReportError: a path does not exist, or none holds a run.
    """
    found: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise ReportError(f"no such file or directory: {str(path)!r}")
        found.update(p.parent.resolve() for p in path.rglob(SUMMARY) if p.is_file())  # rglob includes path itself
    if not found:
        raise ReportError(f"no run directories (with {SUMMARY}) under {', '.join(repr(str(p)) for p in paths)}")
    return sorted(found)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``.

    Raises:
        ReportError: it cannot be read or is not a JSON object.
    """
    try:
        summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"unreadable {SUMMARY} in {run_dir} ({err})") from err
    if not isinstance(summary, dict):
        raise ReportError(f"unreadable {SUMMARY} in {run_dir} (not a JSON object)")
    return summary


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``metrics.jsonl`` as metric -> {step: value}; malformed lines (e.g. cut by a kill) are skipped."""
    path = run_dir / "metrics.jsonl"
    metrics: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return metrics
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(key, {})[step] = float(value)
    return metrics


def read_config(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The flattened ``resolved_config.yaml``; without one, the method name and seed from the summary."""
    path = run_dir / "resolved_config.yaml"
    try:
        return flatten_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except Exception as err:  # noqa: BLE001 - missing or malformed YAML: fall back, with a warning
        warn(f"{run_dir}: no readable resolved_config.yaml ({type(err).__name__}); using method and seed from {SUMMARY}")
        return {"method.name": summary.get("method"), "seed": summary.get("seed")}


def read_overrides(run_dir: Path, config: dict[str, Any]) -> list[str]:
    """Dotted config keys set on the command line (``method=gkd`` -> ``method.name``, ``+a.b=1`` -> ``a.b``)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    except Exception:  # noqa: BLE001 - the overrides only order the label keys; ignore a bad file
        return []
    keys = []
    for override in overrides if isinstance(overrides, list) else []:
        key = str(override).split("=", 1)[0].lstrip("+~")
        keys += [k for k in (key, f"{key}.name") if k in config][:1]
    return keys


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """Read every run; a run whose summary cannot be read is skipped with a warning.

    Raises:
        ReportError: no run could be read.
    """
    runs = []
    for run_dir in run_dirs:
        try:
            summary = read_summary(run_dir)
        except ReportError as err:
            warn(f"skipping run: {err}")
            continue
        config = read_config(run_dir, summary)
        runs.append(Run(run_dir, summary, config, read_metrics(run_dir), read_overrides(run_dir, config)))
    if not runs:
        raise ReportError(f"none of the {len(run_dirs)} run directories has a readable {SUMMARY}")
    return runs


# ---------------------------------------------------------------------------------------------- grouping


def _canonical(value: Any) -> str:
    """A hashable, comparable form of a config value (lists and dicts included)."""
    return json.dumps(value, sort_keys=True, default=str)


def _value(run: Run, key: str) -> Any:
    return run.config.get(key, _UNSET)


def is_bookkeeping_key(key: str, seed_key: str) -> bool:
    """True for keys that differ between runs without describing what was run (seed, run dirs, names)."""
    leaf = key.rsplit(".", 1)[-1]
    return (key == seed_key or key in _IGNORED_KEYS or key.startswith("hydra.") or leaf in _IGNORED_LEAVES
            or leaf.endswith("_dir"))


def _is_run_specific(key: str, runs: Sequence[Run]) -> bool:
    """True when every run's value is a string that contains that run's own directory (a per-run path)."""
    def inside(run: Run) -> bool:
        value = run.config.get(key)
        homes = [str(run.path), *[d for d in [str(run.summary.get("run_dir", ""))] if Path(d).is_absolute()]]
        return isinstance(value, str) and any(home in value for home in homes)

    return all(inside(run) for run in runs)


def differing_keys(runs: Sequence[Run], seed_key: str) -> list[str]:
    """Config keys whose values are not the same in every run, bookkeeping keys excluded."""
    keys = sorted({key for run in runs for key in run.config})
    return [key for key in keys
            if len({_canonical(_value(run, key)) for run in runs}) > 1
            and not is_bookkeeping_key(key, seed_key) and not _is_run_specific(key, runs)]


def _blocks(runs: Sequence[Run], keys: Sequence[str]) -> int:
    """How many groups ``keys`` split ``runs`` into."""
    return len({tuple(_canonical(_value(run, key)) for key in keys) for run in runs})


def label_keys(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """The fewest of ``keys`` (greedily, preferred first) that split ``runs`` as finely as all of ``keys``.

    Preferred, and returned in this order: keys every run has (not e.g. ``method.beta``, which only
    some methods have), keys named in the overrides (in command-line order), ``*.name`` keys,
    shallow keys, then alphabetical.
    """
    overridden = list(dict.fromkeys(key for run in runs for key in run.overrides))
    ranked = sorted(keys, key=lambda k: (any(k not in run.config for run in runs),
                                         overridden.index(k) if k in overridden else len(overridden),
                                         k.rsplit(".", 1)[-1] != "name", k.count("."), k))
    target, chosen = _blocks(runs, keys), []
    for key in ranked:
        if _blocks(runs, chosen) == target:
            break
        if _blocks(runs, [*chosen, key]) > _blocks(runs, chosen):
            chosen.append(key)
    return chosen


def default_group_keys(runs: Sequence[Run], seed_key: str) -> list[str]:
    """The label keys of the swept configuration; ``method.name`` when only seeds (or nothing) differ."""
    keys = label_keys(runs, differing_keys(runs, seed_key))
    if not keys and all("method.name" in run.config for run in runs):
        return ["method.name"]
    return keys


def check_group_keys(runs: Sequence[Run], keys: Sequence[str]) -> None:
    """Raises ReportError for a ``--group-by`` key that no run's config has, with the closest known keys."""
    known = sorted({key for run in runs for key in run.config})
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ReportError(f"unknown --group-by key {key!r}: no run's config has it{hint}")


def _sort_key(value: Any) -> tuple:
    """Numbers numerically, then strings, then unset values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (2, 0.0, "") if value == _UNSET else (1, 0.0, _canonical(value))


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    """Runs grouped by their values of ``keys``, groups in natural order of those values, runs by seed."""
    groups: dict[str, Group] = {}
    for run in runs:
        values = {key: _value(run, key) for key in keys}
        groups.setdefault(_canonical(list(values.values())), Group(values, [])).runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (_sort_key(r.summary.get("seed")), str(r.path)))
    return sorted(groups.values(), key=lambda g: [_sort_key(v) for v in g.values.values()])


def warn_mixed_groups(groups: Sequence[Group], seed_key: str) -> None:
    """Warn about a group whose runs differ in more than the seed (possible with ``--group-by``)."""
    for group in groups:
        mixed = differing_keys(group.runs, seed_key)
        if mixed:
            warn(f"group {group.label!r} mixes runs that also differ in: {', '.join(mixed)}")


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


def _common_eval_examples(runs: Sequence[Run]) -> int | None:
    """The fewest evaluation problems over the runs' summaries (the widest floor); None when one does not say."""
    counts = [run.summary.get("eval_examples") for run in runs]
    return min(counts) if counts and all(isinstance(c, int) for c in counts) else None


def _common_method(runs: Sequence[Run]) -> str | None:
    """The ``method.name`` every run shares; None when they differ or do not say."""
    names = {run.config.get("method.name") for run in runs}
    return names.pop() if len(names) == 1 else None


def _stats(row: dict[str, Any], values: dict[str, Sequence[Any]]) -> dict[str, Any]:
    """``describe`` of each summary column (accuracies with the row's ``eval_examples`` floor)."""
    return {key: describe(values[key], row.get("eval_examples") if kind == "pct" else None)
            for key, _, kind in _COLUMNS if key in values}


def group_row(group: Group, seed_key: str) -> dict[str, Any]:
    """One table row: the group's values, its runs and seeds, and the statistics of each summary column."""
    row = {"label": group.label, "values": group.values, "n": len(group.runs),
           "method": _common_method(group.runs), "eval_examples": _common_eval_examples(group.runs),
           "seeds": [run.config.get(seed_key, run.summary.get("seed")) for run in group.runs],
           "run_dirs": [str(run.path) for run in group.runs]}
    row["oracle"] = row["method"] == ORACLE_METHOD
    return {**row, **_stats(row, {key: [run.summary.get(key) for run in group.runs] for key, _, _ in _COLUMNS})}


def reference_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The "teacher" and "initial student" rows, pooled over every run's summary."""
    rows = []
    for label, key in (("teacher", "teacher_accuracy"), ("initial student", "student_accuracy_before")):
        stat = describe([run.summary.get(key) for run in runs], _common_eval_examples(runs))
        rows.append({"label": label, "column": key, "n": stat["n"], "eval_examples": stat["eval_examples"], key: stat})
    return rows


def _row_method(row: dict[str, Any]) -> str | None:
    """The row's method: its runs' common ``method.name`` (rows of older reports: their ``method.name`` value)."""
    return row["method"] if "method" in row else row.get("values", {}).get("method.name")


def choose_baseline(rows: Sequence[dict[str, Any]], requested: str | None = None) -> dict[str, Any] | None:
    """The row that comparisons are made against.

    ``requested``: a row's label or its method (``seqkd``), or ``"none"`` for no comparisons. By default the one
    row whose method is SeqKD (the distillation baseline), else none.

    Raises:
        ReportError: ``requested`` names no row, or a method that several rows share.
    """
    if requested is not None and requested.lower() == "none":
        return None
    wanted = requested or BASELINE_METHOD
    matches = [row for row in rows if row["label"] == wanted] or [row for row in rows if _row_method(row) == wanted]
    if len(matches) == 1:
        return matches[0]
    if requested is None:
        return None
    labels = ", ".join(repr(row["label"]) for row in (matches or rows))
    raise ReportError(f"--baseline {requested!r} {'matches several groups' if matches else 'names no group'}; "
                      f"give one of {labels}")


def add_comparisons(report: dict[str, Any], baseline: str | None = None) -> None:
    """Set ``report["baseline"]`` and each group's ``vs_baseline``: :func:`compare_arms` of its accuracy after
    training against the baseline's (None for the baseline itself and for groups of one run)."""
    base = choose_baseline(report["groups"], baseline)
    report["baseline"] = base["label"] if base else None
    for row in report["groups"]:
        row["vs_baseline"] = None
        if base is None or row is base:
            continue
        ours, theirs = row["student_accuracy_after"], base["student_accuracy_after"]
        counts = [c for c in (row.get("eval_examples"), base.get("eval_examples")) if c]
        numbers = [[v for v in stat["values"] if isinstance(v, (int, float))] for stat in (ours, theirs)]
        try:
            row["vs_baseline"] = asdict(compare_arms(*numbers, eval_examples=min(counts) if counts else None))
        except ValueError:  # one run in a group, or all seeds equal and no eval_examples to floor them
            continue


def build_report(runs: Sequence[Run], groups: Sequence[Group], keys: Sequence[str], seed_key: str,
                 baseline: str | None = None) -> dict[str, Any]:
    """The content of ``report.json``: grouping, reference rows, one row per group and the comparisons."""
    report = {"group_keys": list(keys), "differing_keys": differing_keys(runs, seed_key), "seed_key": seed_key,
              "num_runs": len(runs), "columns": {key: header for key, header, _ in _COLUMNS},
              "reference": reference_rows(runs), "groups": [group_row(group, seed_key) for group in groups]}
    add_comparisons(report, baseline)
    return report


def rebuild_report(report: dict[str, Any], eval_examples: int | None = None, baseline: str | None = None) -> dict[str, Any]:
    """A stored ``report.json`` with its statistics, oracle labels and comparisons recomputed from its per-seed values.

    For records written before these fields existed: ``eval_examples`` stands in where a row does not say.
    """
    rebuilt = json.loads(json.dumps(report))
    for row in [*rebuilt["reference"], *rebuilt["groups"]]:
        row["eval_examples"] = row.get("eval_examples") or eval_examples
        row.update(_stats(row, {key: row[key]["values"] for key, _, _ in _COLUMNS if key in row}))
    for row in rebuilt["groups"]:
        row["method"] = _row_method(row)
        row["oracle"] = row["method"] == ORACLE_METHOD
    add_comparisons(rebuilt, baseline)
    return rebuilt


# ---------------------------------------------------------------------------------------------- markdown


def _display(value: Any) -> str:
    """A value as a label shows it; an absolute path keeps its last two parts (``…/toy/teacher``), so that
    legends stay legible when runs differ by a model directory."""
    if isinstance(value, str):
        return "…/" + "/".join(Path(value).parts[-2:]) if value.startswith("/") and value.count("/") > 2 else value
    return json.dumps(value, default=str)


def format_stat(stat: dict[str, Any], kind: str) -> str:
    """``12.5 ± 3.1`` (percent for accuracies); the mean alone with fewer than two values; ``n/a`` with none.

    Accuracies that are the same on every seed show ``10.1 (all 3 seeds equal)``, not a spread of 0.
    """
    if stat["mean"] is None:
        return "n/a"
    scale, spec = {"pct": (100.0, ".1f"), "int": (1.0, ",.0f"), "float": (1.0, ".1f")}[kind]
    text = format(scale * stat["mean"], spec)
    if stat["std"] is None or kind != "pct":
        return text
    if stat.get("all_equal"):
        return f"{text} (all {stat['n']} seeds equal)"
    return f"{text} ± {format(scale * stat['std'], spec)}"


def format_interval(interval: Sequence[float] | None) -> str:
    """``[21.3, 30.1]`` in percent; ``n/a`` below two seeds."""
    return "n/a" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def format_ci(stat: dict[str, Any]) -> str:
    """The interval of an accuracy's ``describe``; when every seed is equal it says so and how it was floored."""
    if not stat.get("all_equal"):
        return format_interval(stat["ci95"])
    if stat["ci95"] is None:
        return f"n/a (all {stat['n']} seeds equal)"
    return f"{format_interval(stat['ci95'])} (all {stat['n']} seeds equal; binomial SD on {stat['eval_examples']} problems)"


def row_label(row: dict[str, Any]) -> str:
    """The group's label, marked ``(oracle: gold labels)`` for SFT, which learns from the gold answers."""
    return f"{row['label']} ({ORACLE_NOTE})" if row.get("oracle") else row["label"]


def format_comparison(row: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """The two comparison cells of a group: ``-4.0 [-8.6, +0.5]`` (points) and the verdict on "beats the baseline"."""
    if row["label"] == report.get("baseline"):
        return ["(baseline)", "–"]
    if not row.get("vs_baseline"):
        return ["n/a", "–"]
    comparison = Comparison(**row["vs_baseline"])
    return [comparison.interval_text(100), comparison.verdict_text(100, " pp")]


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def format_table(report: dict[str, Any]) -> str:
    """The markdown table: the teacher and initial-student rows, then one row per group; with a baseline, each
    group's difference from it and the verdict (:func:`compare_arms`)."""
    base = report.get("baseline")
    name = base.split("=", 1)[1] if base and base.count("=") == 1 and " " not in base else base  # gkd, not method.name=gkd
    compared = [f"acc. after − {name} (pp) [95 % CI]", f"beats {name}?"] if base else []
    headers = ["run", "n seeds", *(header for _, header, _ in _COLUMNS), "95 % CI of acc. after", *compared]
    lines = [_md_row(headers), _md_row(["---"] * len(headers))]
    for ref in report["reference"]:
        cells = [format_stat(ref[key], kind) if key == ref["column"] else "–" for key, _, kind in _COLUMNS]
        lines.append(_md_row([ref["label"], ref["n"], *cells, "–", *["–" for _ in compared]]))
    for row in report["groups"]:
        lines.append(_md_row([row_label(row), row["n"], *(format_stat(row[key], kind) for key, _, kind in _COLUMNS),
                              format_ci(row["student_accuracy_after"]),
                              *(format_comparison(row, report) if base else [])]))
    return "\n".join(lines)


def format_markdown(report: dict[str, Any], table: str, plots: Sequence[Path], out_dir: Path) -> str:
    """The whole ``report.md``: table, how to read it, the runs of each group and the plots."""
    keys = ", ".join(f"`{k}`" for k in report["group_keys"]) or "(none)"
    reading = (f"{report['num_runs']} runs, grouped by {keys}; seeds from `{report['seed_key']}`. Accuracies in %, "
               "mean ± sample std over seeds (mean alone for one seed), and the Student-t 95 % confidence interval of "
               "the mean accuracy after training; when every seed scored the same, the interval's spread is the binomial "
               "SD of an accuracy on the evaluation's problems, never 0. Tokens and wall time are means.")
    if any(row.get("oracle") for row in report["groups"]):
        reading += (f" `{ORACLE_METHOD}` trains on the gold labels, not on a teacher ({ORACLE_NOTE}): a reference, "
                    "not a competitor.")
    if report.get("baseline"):
        reading += (f" Each group is compared with `{report['baseline']}`: the difference of the mean accuracy after "
                    "training with Welch's 95 % interval, and the claim that it beats the baseline **holds** (interval "
                    "above 0), is **reversed** (below 0) or is **not shown** (it covers 0; then the smallest difference "
                    "these seeds could detect with 80 % power is given).")
    lines = ["# Run report", "", table, "", reading,
             "", "## Runs", "", _md_row(["group", "seed", "student acc. after (%)", "run directory"]),
             _md_row(["---"] * 4)]
    for row in report["groups"]:
        for seed, run_dir, after in zip(row["seeds"], row["run_dirs"], row["student_accuracy_after"]["values"]):
            lines.append(_md_row([row_label(row), seed, format_stat(describe([after]), "pct"), f"`{run_dir}`"]))
    lines += ["", "## Curves", ""] + [f"![{p.stem}]({_relative(p, out_dir)})" for p in plots]
    return "\n".join(lines) + "\n"


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- curves and plots


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start); ``window`` <= 1 leaves ``values`` as they are."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def group_curve(runs: Sequence[Run], metric: str, smooth: int = 1) -> tuple[np.ndarray, ...] | None:
    """(steps, mean, low, high) of ``metric`` over ``runs`` on the union of their steps; None when no run logged it.

    Each run is (optionally smoothed and) linearly interpolated onto the union of steps inside its own
    step range only; mean, min and max are taken over the runs present at each step.
    """
    series = [sorted(run.metrics[metric].items()) for run in runs if run.metrics.get(metric)]
    if not series:
        return None
    steps = np.array(sorted({step for s in series for step, _ in s}), dtype=float)
    grid = np.full((len(series), len(steps)), np.nan)
    for row, points in zip(grid, series):
        x, y = np.array(points, dtype=float).T
        inside = (steps >= x[0]) & (steps <= x[-1])
        row[inside] = np.interp(steps[inside], x, moving_average(y, smooth))
    return steps, np.nanmean(grid, axis=0), np.nanmin(grid, axis=0), np.nanmax(grid, axis=0)


# 20 colours told apart on screen and in colour print: tab10 (grey swapped for black, grey marks the SFT
# reference) then 10 more chosen greedily for the largest CIELAB distance to those before (min. distance 27.7).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#000000", "#bcbd22", "#17becf",
           "#f032e6", "#00008b", "#556b2f", "#ffa07a", "#800000", "#1b9e77", "#a6761d", "#2f4f4f", "#8b008b", "#ffb000")
# 4 dash patterns x 7 markers: the (line style, marker) pair repeats only after 28 series, so lines differ in greyscale.
LINESTYLES = ("solid", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
REFERENCE_COLOR = "0.55"  # the SFT reference line in the small multiples


def series_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``name -> {color, linestyle, marker}``, assigned in sorted order of the distinct ``names``.

    Colours are distinct for up to 20 series, (colour, line style, marker) for up to 140; the same set
    of names always gets the same styles, whatever order the groups come in.
    """
    ordered = sorted(set(names))
    return {name: {"color": PALETTE[i % len(PALETTE)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                   "marker": MARKERS[i % len(MARKERS)]} for i, name in enumerate(ordered)}


def _draw(ax: Any, curve: tuple[np.ndarray, ...], scale: float, style: dict[str, Any], label: str | None,
          band_alpha: float = 0.2) -> None:
    """One mean line with markers (at most ~12 per line) and its min..max band."""
    steps, mean, low, high = (curve[0], *(scale * c for c in curve[1:]))
    ax.plot(steps, mean, markersize=4, markevery=max(1, len(steps) // 12), linewidth=1.6, label=label, **style)
    ax.fill_between(steps, low, high, color=style["color"], alpha=band_alpha, linewidth=0)


def _metric_axes_labels(ax: Any, metric: str, scale: float, xlabel: bool = True, ylabel: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    if xlabel:
        ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(f"{metric} (%)" if scale != 1.0 else metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _metric_curves(groups: Sequence[Group], metric: str, smooth: int) -> tuple[float, list[tuple[Group, tuple]]]:
    """(display scale: 100 for accuracies, else 1; ``(group, curve)`` for every group that logged ``metric``)."""
    scale = 100.0 if "accuracy" in metric else 1.0
    return scale, [(group, curve) for group in groups if (curve := group_curve(group.runs, metric, smooth)) is not None]


def plot_metric(groups: Sequence[Group], metric: str, path: Path, smooth: int = 1) -> bool:
    """Write a PNG of ``metric`` vs step, one line (mean) and band (min..max) per group; False if nothing logged it.

    Every group has its own colour, line style and marker (``series_styles``); the legend sits outside the axes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, curves = _metric_curves(groups, metric, smooth)
    if not curves:
        return False
    styles = series_styles([group.label for group in groups])
    fig = Figure(figsize=(7.5 + (2.5 if len(curves) > 1 else 0), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for group, curve in curves:
        _draw(ax, curve, scale, styles[group.label], f"{group.label} (n={len(group.runs)})",
              band_alpha=0.2 if len(curves) <= 4 else 0.08)
    smoothing = f", moving average over {smooth} steps" if smooth > 1 else ""
    ax.set_title(f"{metric}: mean over seeds (band: min–max{smoothing})")
    _metric_axes_labels(ax, metric, scale)
    ax.legend(fontsize="small", handlelength=3.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=120)
    return True


def reference_group(groups: Sequence[Group]) -> Group | None:
    """The SFT baseline: the first group whose label contains ``sft`` (any case); None when there is none."""
    return next((group for group in groups if "sft" in group.label.lower()), None)


def _panel_title(group: Group) -> str:
    """The group's value when it is grouped by one key (``gkd``), else its full label wrapped to the panel's width."""
    if len(group.values) == 1:
        return _display(next(iter(group.values.values())))
    return "\n".join(textwrap.wrap(group.label, width=32))


def small_multiples_figure(groups: Sequence[Group], metric: str, smooth: int = 1) -> Any:
    """A matplotlib Figure with one panel per group that logged ``metric`` (shared axes), None when none did.

    Each panel draws its group in its ``series_styles`` style; every other panel also draws the SFT group
    (``reference_group``) as a grey dashed reference line labelled ``reference``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, curves = _metric_curves(groups, metric, smooth)
    if not curves:
        return None
    styles = series_styles([group.label for group in groups])
    reference = reference_group([group for group, _ in curves])
    ref_curve = next((curve for group, curve in curves if group is reference), None)
    ncols = min(4, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig = Figure(figsize=(2.9 * ncols + 0.6, 2.3 * nrows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for i, (ax, (group, curve)) in enumerate(zip(axes, curves)):
        if ref_curve is not None and group is not reference:
            ax.plot(ref_curve[0], scale * ref_curve[1], color=REFERENCE_COLOR, linestyle=(0, (4, 2)), linewidth=1.4,
                    label="reference", zorder=1)
        _draw(ax, curve, scale, styles[group.label], group.label)
        ax.set_title(f"{_panel_title(group)} (n={len(group.runs)})", fontsize="medium")
        bottom = i >= len(curves) - ncols  # nothing below it: show its step ticks and label
        _metric_axes_labels(ax, metric, scale, xlabel=bottom, ylabel=i % ncols == 0)
        ax.xaxis.set_tick_params(labelbottom=bottom)
    for ax in axes[len(curves):]:
        ax.remove()
    smoothing = f", moving average over {smooth} steps" if smooth > 1 else ""
    ref_text = f"; grey dashed: {reference.label}" if ref_curve is not None else ""
    fig.suptitle(f"{metric}: mean over seeds (band: min–max{smoothing}){ref_text}")
    return fig


def plot_small_multiples(groups: Sequence[Group], metric: str, path: Path, smooth: int = 1) -> bool:
    """Write ``small_multiples_figure`` as a PNG; False when no group logged ``metric``."""
    fig = small_multiples_figure(groups, metric, smooth)
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    return True


def write_plots(groups: Sequence[Group], metrics: Sequence[str], smooth: int, out_dir: Path) -> list[Path]:
    """The PNGs that could be drawn: each of ``metrics`` as logged, then ``train/loss`` smoothed; warnings for the rest."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn("matplotlib is not installed (pip install 'opd[report]'); no plots")
        return []
    wanted = [(metric, 1) for metric in dict.fromkeys(metrics) if metric != "train/loss"] + [("train/loss", smooth)]
    written = []
    for metric, window in wanted:
        path = out_dir / f"{metric.replace('/', '_')}.png"
        if plot_metric(groups, metric, path, window):
            written.append(path)
        else:
            warn(f"no run logged {metric!r}; no {path.name}")
            continue
        panels = path.with_name(f"{path.stem}_small_multiples.png")
        if metric != "train/loss" and len(groups) > 1 and plot_small_multiples(groups, metric, panels, window):
            written.append(panels)
    return written


# ---------------------------------------------------------------------------------------------- command line


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or directories above them (sweeps, logs/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md, report.json and the plots go (default: the path given, or . for several)")
    parser.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                        help="config keys to group by (default: the keys that differ between runs, seed excluded)")
    parser.add_argument("--seed-key", default="seed", help="config key of the seed, never a group key (default: seed)")
    parser.add_argument("--metric", nargs="+", default=["eval/accuracy"], metavar="NAME",
                        help="metrics to plot vs step, one PNG each (default: eval/accuracy); train/loss is always plotted")
    parser.add_argument("--smooth", type=int, default=5, metavar="N",
                        help="moving-average window of the train/loss curve in steps; 1 = raw (default: 5)")
    parser.add_argument("--baseline", default=None, metavar="GROUP",
                        help="the group to compare every other with: its label or method (default: seqkd when one group "
                             "is SeqKD; 'none' for no comparisons)")
    return parser.parse_args(argv)


def make_report(paths: Sequence[Path], out_dir: Path, group_by: Sequence[str] | None = None, seed_key: str = "seed",
                metrics: Sequence[str] = ("eval/accuracy",), smooth: int = 5,
                baseline: str | None = None) -> tuple[dict[str, Any], str]:
    """Find, read and group the runs below ``paths``; write report.md, report.json and the plots into ``out_dir``.

    Returns:
        (the report.json content, the markdown table).

    Raises:
        ReportError: no runs, no readable run, a ``group_by`` key no run has, or a ``baseline`` that names no group.
    """
    runs = load_runs(find_run_dirs(paths))
    if group_by:
        check_group_keys(runs, group_by)
    keys = list(group_by) if group_by else default_group_keys(runs, seed_key)
    groups = group_runs(runs, keys)
    warn_mixed_groups(groups, seed_key)
    data = build_report(runs, groups, keys, seed_key, baseline)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(groups, metrics, smooth, out_dir)
    data["plots"] = [path.name for path in plots]
    return data, write_report(data, out_dir)


def write_report(data: dict[str, Any], out_dir: Path) -> str:
    """Write ``report.json`` and ``report.md`` (its plots: ``data["plots"]``, already in ``out_dir``); returns the table."""
    table = format_table(data)
    plots = [out_dir / name for name in data.get("plots", [])]
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(format_markdown(data, table, plots, out_dir), encoding="utf-8")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``opd-report``: prints the table; returns 0, or 2 after a one-line error."""
    args = parse_args(argv)
    out_dir = args.out or (args.paths[0] if len(args.paths) == 1 else Path.cwd())
    try:
        data, table = make_report(args.paths, out_dir, args.group_by, args.seed_key, args.metric, args.smooth,
                                  args.baseline)
    except ReportError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"{PROG}: {data['num_runs']} runs in {len(data['groups'])} groups; wrote report.md, report.json"
          f"{''.join(', ' + name for name in data['plots'])} to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
