"""Two specialist teachers vs one vs SFT on mixed toy data (issue 14): the record experiments/2026-11-30_two_teachers/.

Arms (``conf/experiment/two_teachers.yaml``, 3 seeds each, two runs at a time): the student distilled with GKD on the
arithmetic + multiplication mixture from (a) both specialists, each prompt routed to its own, (b) the arithmetic
teacher alone, (c) the multiplication teacher alone, and (d) SFT on the mixture's reference solutions. Writes
``results.md``/``results.json`` (per-task accuracy, mean ± std and a 95 % interval over seeds) and the per-task
learning curves (``opd-report``).

Usage::

    python scripts/two_teachers.py                           # ~15 min on 2 cores
    python scripts/two_teachers.py --runs-dir logs/two_teachers/<time>   # continue, or only re-analyse
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from miniature_v2 import run_arms  # noqa: E402

from opd.report import describe, find_run_dirs, format_interval, format_stat, load_runs, make_report  # noqa: E402

ARMS: dict[str, list[str]] = {
    "two_teachers": ["experiment=two_teachers", "~teacher", "+teacher@teachers.arithmetic=toy",
                     "+teacher@teachers.multiplication=toy_multiplication"],
    "arithmetic_teacher_only": ["experiment=two_teachers", "teacher=toy"],
    "multiplication_teacher_only": ["experiment=two_teachers", "teacher=toy_multiplication"],
    "sft": ["experiment=two_teachers", "method=sft"],
}
SOURCES = ("arithmetic", "multiplication")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", type=Path, default=None, help="default: a new logs/two_teachers/<time>")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "2026-11-30_two_teachers")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each)")
    p.add_argument("--analyse-only", action="store_true")
    return p.parse_args(argv)


def stat(values: list[float]) -> str:
    """``19.4 ± 1.3 [16.1, 22.7]``: opd-report's mean ± std and 95 % interval, in percent."""
    summary = describe(values)
    return f"{format_stat(summary, 'pct')} {format_interval(summary['ci95'])}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs_dir = (args.runs_dir or ROOT / "logs" / "two_teachers" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if not args.analyse_only:
        failed = run_arms(ARMS, runs_dir, args.jobs)
        if failed:
            print(f"two_teachers: failed runs: {', '.join(failed)}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for arm in ARMS:
        runs = load_runs(find_run_dirs([runs_dir / arm])) if (runs_dir / arm).exists() else []
        if not runs:
            continue
        after = {s: [r.summary["student_accuracy_after_by_source"][s] for r in runs] for s in SOURCES}
        before = {s: [r.summary["student_accuracy_before_by_source"][s] for r in runs] for s in SOURCES}
        overall = [r.summary["student_accuracy_after"] for r in runs]
        tokens = {}
        for name in SOURCES:  # tokens routed to each teacher over the run (two-teacher arm only)
            key = f"teacher/{name}/tokens"
            per_run = [sum(r.metrics.get(key, {}).values()) for r in runs]
            if any(per_run):
                tokens[name] = statistics.fmean(per_run)
        results[arm] = {"seeds": [r.summary["seed"] for r in runs], "after": after, "before": before,
                        "overall_after": overall, "tokens_routed": tokens}
        rows.append(f"| {arm} | {len(runs)} | {stat(after['arithmetic'])} | {stat(after['multiplication'])} | "
                    f"{stat(overall)} |")
    (args.out / "results.json").write_text(json.dumps({"runs_dir": str(runs_dir), "arms": results}, indent=2) + "\n")
    first = next(iter(results.values()), None)
    lines = ["# Two teachers vs one vs SFT (toy arithmetic + multiplication mixture)", "",
             "Greedy exact match (%) after 400 steps, mean ± sample std over seeds [Student-t 95 % interval].", "",
             "| arm | seeds | arithmetic | multiplication | both (pooled) |", "|---|---|---|---|---|", *rows, ""]
    if first:
        lines.append("Initial student: " + ", ".join(f"{s} {100 * statistics.fmean(first['before'][s]):.1f} %"
                                                      for s in SOURCES) + ".")
    if "two_teachers" in results and results["two_teachers"]["tokens_routed"]:
        lines.append("Completion tokens routed per teacher (two-teacher arm, mean over seeds): " + ", ".join(
            f"{name} {value:,.0f}" for name, value in results["two_teachers"]["tokens_routed"].items()) + ".")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    make_report([runs_dir / arm for arm in ARMS if (runs_dir / arm).exists()], args.out,
                metrics=["eval/accuracy/arithmetic", "eval/accuracy/multiplication"], smooth=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
