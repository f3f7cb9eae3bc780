"""Report rows (mean, spread and comparison with the baseline per group) and their markdown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from opd.report.runs import _COLUMNS, Group, ReportError, Run, differing_keys
from opd.report.statistics import BASELINE_METHOD, ORACLE_METHOD, ORACLE_NOTE, Comparison, compare_arms, describe


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


