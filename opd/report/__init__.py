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

from opd.report.cli import main, make_report, parse_args, write_report
from opd.report.plots import (
    LINESTYLES,
    MARKERS,
    PALETTE,
    REFERENCE_COLOR,
    group_curve,
    moving_average,
    plot_metric,
    plot_small_multiples,
    reference_group,
    series_styles,
    small_multiples_figure,
    write_plots,
)
from opd.report.runs import (
    PROG,
    SUMMARY,
    Group,
    ReportError,
    Run,
    check_group_keys,
    default_group_keys,
    differing_keys,
    display_value,
    find_run_dirs,
    group_runs,
    is_bookkeeping_key,
    label_keys,
    load_runs,
    read_config,
    read_metrics,
    read_overrides,
    read_summary,
    warn,
    warn_mixed_groups,
)
from opd.report.statistics import (
    BASELINE_METHOD,
    ORACLE_METHOD,
    ORACLE_NOTE,
    POWER,
    Comparison,
    binomial_sd,
    compare_arms,
    describe,
    mean_confidence_interval,
)
from opd.report.tables import (
    add_comparisons,
    build_report,
    choose_baseline,
    format_ci,
    format_comparison,
    format_interval,
    format_markdown,
    format_stat,
    format_table,
    group_row,
    rebuild_report,
    reference_rows,
    row_label,
)

__all__ = [
    "BASELINE_METHOD", "Comparison", "Group", "LINESTYLES", "MARKERS", "ORACLE_METHOD", "ORACLE_NOTE", "PALETTE",
    "POWER", "PROG", "REFERENCE_COLOR", "ReportError", "Run", "SUMMARY", "add_comparisons", "binomial_sd",
    "build_report", "check_group_keys", "choose_baseline", "compare_arms", "default_group_keys", "describe",
    "differing_keys", "find_run_dirs", "format_ci", "format_comparison", "format_interval", "format_markdown",
    "format_stat", "format_table", "group_curve", "group_row", "group_runs", "is_bookkeeping_key", "label_keys",
    "load_runs", "main", "make_report", "mean_confidence_interval", "moving_average", "parse_args", "plot_metric",
    "plot_small_multiples", "read_config", "read_metrics", "read_overrides", "read_summary", "rebuild_report",
    "reference_group", "reference_rows", "row_label", "series_styles", "small_multiples_figure", "display_value", "warn",
    "warn_mixed_groups", "write_plots", "write_report",
]
