"""Re-score a finished study's final students on more held-out problems (issue 21: is the seed spread the students'
or the evaluation's?).

A study made by ``scripts/real_opd_protocol.py`` evaluates each arm x seed on the task's ``num_eval`` held-out
problems (256 in the SmolLM2 studies). An accuracy on N problems carries a binomial sampling SD of sqrt(p(1-p)/N),
3.1 points at p = 0.55 and N = 256, about the spread seen between seeds, so the verdicts' smallest detectable
differences may be set by the evaluation rather than by training. This script loads each run's newest complete
checkpoint, with the run's own resolved config (task, chat template, decoding budget, teacher), and decodes greedily
on the first ``--num-eval`` held-out problems instead. The held-out split grows at its end: its first ``num_eval``
problems are the run's own (``opd.data.generated.held_out_splits``), still disjoint from training (the overlap is
checked and written), and the accuracy on them is checked against the run's recorded one. The warm start and the
teacher are scored on the same problems. Each (run, problem) verdict is kept, so the output also supports paired
per-problem comparisons.

Writes ``--out`` (JSON; resumable: runs already in it are not scored again) and, with ``--report``, a Markdown table
and the verdicts (``opd.report.compare_arms``, Welch over seeds) at both evaluation sizes.

Usage::

    python scripts/reevaluate_study.py --study logs/real_opd_longer_stage2/study --num-eval 2048 \
        --out experiments/<record>/reevaluation.json --report experiments/<record>/reevaluation.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.report import compare_arms, mean_confidence_interval  # noqa: E402

#: the claims judged at both evaluation sizes: (claim, arm a, arm b); arms a study lacks are skipped
CLAIMS = (("gkd_l1 beats SeqKD at equal steps", "gkd_l1", "seqkd"),
          ("GKD lambda=1 beats lambda=0 (beta 0.5)", "gkd_l1", "gkd_l0"),
          ("gkd_l0 (oracle labels) beats SeqKD at equal steps", "gkd_l0", "seqkd"))


def newest_checkpoint(run: Path) -> Path:
    """The run's newest complete checkpoint (``opd.engine.checkpoint.list_checkpoints``)."""
    from opd.engine.checkpoint import list_checkpoints

    done = list_checkpoints(run)
    if not done:
        raise SystemExit(f"{run}: no complete checkpoint under {run / 'checkpoints'}")
    return done[-1]


def find_runs(study: Path, arms: list[str] | None, seeds: list[int] | None) -> list[tuple[str, int, Path]]:
    """(arm, seed, run directory) of every finished run (one with ``summary.json``) under ``study/<arm>/seed<k>``."""
    runs = []
    for arm_dir in sorted(p for p in study.iterdir() if p.is_dir()):
        if arms and arm_dir.name not in arms:
            continue
        for run in sorted(arm_dir.glob("seed*")):
            seed = int(run.name.removeprefix("seed"))
            if (run / "summary.json").exists() and (seeds is None or seed in seeds):
                runs.append((arm_dir.name, seed, run))
    if not runs:
        raise SystemExit(f"{study}: no finished runs (<arm>/seed<k>/summary.json)")
    return runs


def build_scorer(run: Path, student: Path, num_eval: int, scratch: Path):
    """A trainer built from ``run``'s resolved config with ``student`` as the student and ``num_eval`` held-out
    problems (it trains nothing: only its evaluator, task, tokenizer and teacher are used)."""
    from omegaconf import OmegaConf

    from opd.train import build_trainer

    cfg = OmegaConf.load(run / "resolved_config.yaml")
    cfg.student.name_or_path = str(student)
    cfg.data.num_eval = num_eval
    cfg.trainer.eval_examples = None  # every one of them (a run's cap applied to its own, recorded, evaluation)
    cfg.trainer.resume = None
    cfg.trainer.eval_teacher_kl = False  # accuracy only: the agreement would double the cost
    cfg.output_dir = str(scratch / f"{run.parent.name}_{run.name}_{time.time_ns()}")
    return build_trainer(cfg)


def score(trainer, model, desc: str, recorded: int) -> dict[str, Any]:
    """Greedy verdicts of ``model`` on every held-out problem; the accuracies on all and on the first ``recorded``."""
    start = time.perf_counter()
    result = trainer.evaluate(model, desc)
    flags = result.correct
    return {"accuracy": result.accuracy, "num_eval": result.num_examples,
            f"accuracy_first_{recorded}": sum(flags[:recorded]) / recorded, "eos_rate": result.eos_rate,
            "mean_length": result.mean_length, "correct": "".join("1" if f else "0" for f in flags),
            "seconds": round(time.perf_counter() - start, 1)}


def rescore(study: Path, out: Path, num_eval: int, arms: list[str] | None, seeds: list[int] | None) -> dict[str, Any]:
    results = json.loads(out.read_text()) if out.exists() else {}
    if results and results.get("num_eval") != num_eval:
        raise SystemExit(f"{out} holds a re-scoring on {results.get('num_eval')} problems, not {num_eval}: "
                         "pass another --out")
    results.update({"study": str(study), "num_eval": num_eval})
    results.setdefault("runs", {})
    runs = find_runs(study, arms, seeds)
    with tempfile.TemporaryDirectory(prefix="opd-reeval-") as scratch:
        for index, (arm, seed, run) in enumerate(runs):
            key = f"{arm}/seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            recorded = int(summary["eval_examples"])
            if "warm_start" not in results:  # the student every arm started from (the run config's student)
                warm = Path(run_config(run)["student"]["name_or_path"])
                print(f"warm start and teacher: {warm}", flush=True)
                trainer = build_scorer(run, warm, num_eval, Path(scratch))
                check_split(trainer, results, recorded)
                if trainer.teacher is not None:
                    results["teacher"] = score(trainer, trainer.teacher, "teacher", recorded)
                    results["teacher"]["recorded_accuracy"] = summary.get("teacher_accuracy")
                results["warm_start"] = score(trainer, trainer.student, "warm start", recorded)
                results["warm_start"].update(checkpoint=str(warm), recorded_accuracy=summary.get("student_accuracy_before"))
                save(results, out)
                del trainer
            if key in results["runs"]:
                continue
            checkpoint = newest_checkpoint(run)
            print(f"[{index + 1}/{len(runs)}] {key}: {checkpoint}", flush=True)
            trainer = build_scorer(run, checkpoint, num_eval, Path(scratch))
            check_split(trainer, results, recorded)
            row = score(trainer, trainer.student, key, recorded)
            row.update(arm=arm, seed=seed, checkpoint=str(checkpoint), recorded_accuracy=summary["student_accuracy_after"])
            results["runs"][key] = row
            print(f"    {num_eval} problems: {100 * row['accuracy']:.1f} %; first {recorded}: "
                  f"{100 * row[f'accuracy_first_{recorded}']:.1f} % (recorded {100 * row['recorded_accuracy']:.1f} %)"
                  f"; {row['seconds']} s", flush=True)
            save(results, out)
            del trainer
    return results


def save(results: dict[str, Any], out: Path) -> None:
    """Write ``results`` to ``out`` after each model, so an interrupted re-scoring resumes where it stopped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def check_split(trainer, results: dict[str, Any], recorded: int) -> None:
    """Stop when a held-out problem is a training problem; write the split's sizes into ``results``."""
    from opd.data.base import split_overlap

    overlap = split_overlap(trainer.task)["train_eval"]
    if overlap:
        raise SystemExit(f"{overlap} of the {len(trainer.eval_examples)} held-out problems are training problems")
    results["split"] = {"num_train": len(trainer.task.train), "num_eval": len(trainer.eval_examples),
                        "train_eval_overlap": overlap, "recorded_num_eval": recorded}


def run_config(run: Path) -> dict[str, Any]:
    """The run's resolved config as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / "resolved_config.yaml"), resolve=True)


def arm_table(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """arm -> per-seed accuracies on all problems and on the recorded first ones."""
    recorded = results["split"]["recorded_num_eval"]
    arms: dict[str, dict[str, Any]] = {}
    for row in sorted(results["runs"].values(), key=lambda r: (r["arm"], r["seed"])):
        entry = arms.setdefault(row["arm"], {"seeds": [], "all": [], "first": [], "recorded": []})
        entry["seeds"].append(row["seed"])
        entry["all"].append(row["accuracy"])
        entry["first"].append(row[f"accuracy_first_{recorded}"])
        entry["recorded"].append(row["recorded_accuracy"])
    return arms


def report(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown report and the verdicts at both evaluation sizes."""
    n_all, recorded = results["num_eval"], results["split"]["recorded_num_eval"]
    arms = arm_table(results)
    lines = [f"Held-out problems: {n_all} (the runs' own first {recorded} and {n_all - recorded} more); "
             f"train/eval overlap {results['split']['train_eval_overlap']}.", ""]
    for name in ("teacher", "warm_start"):
        if name in results:
            row = results[name]
            lines.append(f"- {name.replace('_', ' ')}: {100 * row['accuracy']:.1f} % on {n_all}, "
                         f"{100 * row[f'accuracy_first_{recorded}']:.1f} % on the first {recorded} "
                         f"(recorded {100 * row['recorded_accuracy']:.1f} %)")
    lines += ["", f"| arm | seeds | on {recorded} (recorded) | on {n_all}: mean ± std [95 % CI] | per seed on {n_all} | "
              f"binomial SD of one seed on {recorded} / {n_all} |", "|---|---|---|---|---|---|"]
    for arm, entry in arms.items():
        values = entry["all"]
        mean = statistics.fmean(values)
        ci = mean_confidence_interval(values, eval_examples=n_all)
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        sd = [100 * (mean * (1 - mean) / n) ** 0.5 for n in (recorded, n_all)]
        lines.append(f"| {arm} | {len(values)} | {100 * statistics.fmean(entry['recorded']):.1f} ± "
                     f"{100 * statistics.stdev(entry['recorded']) if len(values) > 1 else float('nan'):.1f} | "
                     f"{100 * mean:.1f} ± {100 * std:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] | "
                     f"{', '.join(f'{100 * v:.1f}' for v in values)} | {sd[0]:.1f} / {sd[1]:.1f} |"
                     if ci else f"| {arm} | {len(values)} | | {100 * mean:.1f} | | |")
    claims = []
    lines += ["", "| claim | evaluation | difference (points) | 95 % CI | verdict | smallest detectable difference |",
              "|---|---|---|---|---|---|"]
    for claim, a, b in CLAIMS:
        if a not in arms or b not in arms or min(len(arms[a]["all"]), len(arms[b]["all"])) < 2:
            continue
        for label, field, n in ((f"recorded ({recorded})", "recorded", recorded), (f"first {recorded} here", "first",
                                                                                   recorded), (str(n_all), "all", n_all)):
            comparison = compare_arms(arms[a][field], arms[b][field], eval_examples=n)
            claims.append({"claim": claim, "evaluation": label, "a": arms[a][field], "b": arms[b][field],
                           "difference": comparison.difference, "ci": [comparison.ci_low, comparison.ci_high],
                           "verdict": comparison.verdict, "min_detectable": comparison.min_detectable_difference,
                           "note": comparison.note})
            lines.append(f"| {claim} | {label} | {100 * comparison.difference:+.1f} | "
                         f"[{100 * comparison.ci_low:+.1f}, {100 * comparison.ci_high:+.1f}] | **{comparison.verdict}** | "
                         f"{100 * comparison.min_detectable_difference:.1f} |")
    return "\n".join(lines) + "\n", claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="the study's run root: <arm>/seed<k>/ run directories")
    parser.add_argument("--num-eval", type=int, default=2048, help="held-out problems to score (the runs' own first)")
    parser.add_argument("--out", required=True, help="JSON results (resumable)")
    parser.add_argument("--report", default=None, help="also write the Markdown table and verdicts here")
    parser.add_argument("--arms", nargs="*", default=None, help="default: every arm under --study")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="default: every seed")
    parser.add_argument("--only-report", action="store_true", help="no scoring: the report from --out")
    args = parser.parse_args()
    study, out = Path(args.study), Path(args.out)
    if args.only_report:
        if not out.exists():
            raise SystemExit(f"{out}: no results to report (run without --only-report first)")
        results = json.loads(out.read_text())
    else:
        if not study.is_dir():
            raise SystemExit(f"{study}: not a directory (a study's run root, e.g. logs/real_opd_longer_stage2/study)")
        results = rescore(study, out, args.num_eval, args.arms, args.seeds)
    text, claims = report(results)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
        results["claims"] = claims
        save(results, out)


if __name__ == "__main__":
    main()
