"""Accuracy at equal steps with asynchronous rollouts (issue 15): ``trainer.max_staleness`` 0, 1, 2, three seeds each.

The record: experiments/2026-11-30_async_opd/. Arms differ only in ``trainer.max_staleness``; every run is the
``opd-train`` default (toy: GKD λ = 1, JSD β = 0.5, 400 steps) or, with ``--real``, ``experiment=real_smollm2``
with GKD (SmolLM2-135M-Instruct teaching its 10-layer pruned copy, 60 steps). On the 2-core machine a synchronous
run has the run's own thread count (toy 1, real 2) and an asynchronous one 1 learner thread and 1 worker thread.
Runs go one at a time (an asynchronous run uses both cores). Writes ``results.md``/``results.json`` (final greedy
accuracy per seed, mean ± std [95 % interval], and the difference from the synchronous arm with Welch's 95 %
interval) and the learning curves (``opd-report``). Finished runs are not repeated.

Usage::

    python scripts/async_accuracy.py             # toy default, ~10 min on 2 cores
    python scripts/async_accuracy.py --real      # SmolLM2 pair, ~50 min
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from miniature_v2 import difference_interval, final_accuracies, finished_runs, run_arms  # noqa: E402

from opd.report import describe, format_interval, format_stat, make_report  # noqa: E402

STALENESS = (0, 1, 2)


def arms(real: bool) -> dict[str, list[str]]:
    """arm -> ``opd-train`` overrides."""
    base = ["experiment=real_smollm2", "method=gkd"] if real else ["trainer.progress=false"]
    sync_threads = 2 if real else 1
    return {f"max_staleness_{n}": [*base, f"trainer.max_staleness={n}",
                                   f"trainer.num_threads={sync_threads if n == 0 else 1}", "trainer.rollout_num_threads=1"]
            for n in STALENESS}


def stat(values: list[float]) -> str:
    summary = describe(values)
    return f"{format_stat(summary, 'pct')} {format_interval(summary['ci95'])}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="the SmolLM2 pair instead of the toy default")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: a new logs/async_accuracy/<time>")
    p.add_argument("--out", type=Path, default=None, help="default: experiments/2026-11-30_async_opd/{toy,real}")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args(argv)
    kind = "real" if args.real else "toy"
    runs_dir = (args.runs_dir or ROOT / "logs" / "async_accuracy" / f"{kind}_{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    out = args.out or ROOT / "experiments" / "2026-11-30_async_opd" / kind
    todo = arms(args.real)
    if not args.analyse_only:
        failed = run_arms(todo, runs_dir, jobs=1)
        if failed:
            print(f"async_accuracy: failed runs: {', '.join(failed)}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []
    sync = final_accuracies(finished_runs(runs_dir / "max_staleness_0"))
    for arm in todo:
        runs = sorted(finished_runs(runs_dir / arm), key=lambda r: r.summary["seed"])
        if not runs:
            continue
        accuracy = final_accuracies(runs)
        wall = [r.summary["wall_time_s"] for r in runs]
        diff = (difference_interval(accuracy, sync, eval_examples=runs[0].summary.get("eval_examples"))
                if arm != "max_staleness_0" and len(sync) > 1 else None)
        results[arm] = {"seeds": [r.summary["seed"] for r in runs], "accuracy_after": accuracy,
                        "accuracy_before": [r.summary["student_accuracy_before"] for r in runs],
                        "teacher_accuracy": runs[0].summary["teacher_accuracy"], "wall_time_s": wall,
                        "steps": [r.summary["steps"] for r in runs], "difference_from_sync": diff}
        per_seed = ", ".join(f"{100 * a:.1f}" for a in accuracy)
        diff_text = (f"{100 * diff['diff']:+.1f} [{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}]"
                     if diff else "–")
        rows.append(f"| {arm.replace('_', ' ')} | {per_seed} | {stat(accuracy)} | {diff_text} | "
                    f"{sum(wall) / len(wall):.0f} |")
    (out / "results.json").write_text(json.dumps({"runs_dir": str(runs_dir), "arms": results}, indent=2) + "\n")
    first = next(iter(results.values()), None)
    lines = [f"# Accuracy at equal steps, trainer.max_staleness 0 / 1 / 2 ({kind})", "",
             "Greedy accuracy (%) after the run's last step; mean ± sample std [Student-t 95 % interval]; difference "
             "from max_staleness 0 with Welch's 95 % interval, in points.", "",
             "| arm | per seed (0, 1, 2) | mean ± std [95 % CI] | − sync [95 % CI] | wall s / run |",
             "|---|---|---|---|---|", *rows, ""]
    if first:
        lines.append(f"Teacher {100 * first['teacher_accuracy']:.1f} %, student before training "
                     f"{100 * first['accuracy_before'][0]:.1f} %, {first['steps'][0]} steps per run.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    make_report([runs_dir / arm for arm in todo if (runs_dir / arm).exists()], out, metrics=["eval/accuracy"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
