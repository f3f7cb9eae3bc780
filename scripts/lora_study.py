"""LoRA against full fine-tuning on the real SmolLM2 pair, under the warm-started protocol (issue 24).

Every arm is GKD on-policy (lambda = 1, JSD 0.5: the fine-tuned-teacher study's declared on-policy arm) for the same
40 steps from the same warm-started student and fine-tuned teacher (``experiment=real_opd_finetuned_teacher``; its
stages are shared, computed once): full fine-tuning, and LoRA adapters of rank 8 and 32 on every linear layer.

1. ``--tune``: each family's learning rate is chosen on a grid (:data:`GRID`, seed 0) by the final accuracy on the
   task's own **validation** split: 256 sums after the 256 evaluation ones, in neither train nor eval, seen by no
   stage (``data.num_validation=256``, ``trainer.evaluate_on=validation``). These runs use the protocol's finished
   stages (passed by directory: the extra data key would otherwise name new ones). Rank 32 takes rank 8's rate: with
   alpha fixed, LoRA's scaling alpha/r makes the best rate nearly rank-independent (LoRA Without Regret, 2025).
2. Every arm at its family's tuned rate, three seeds each, evaluated on the 256 held-out evaluation sums; verdicts
   LoRA vs full at equal steps. Run directories: ``<runs-dir>/<arm>/seed<k>`` at the first rates run (5e-5 full,
   5e-4 LoRA), ``<runs-dir>/<arm>-lr<rate>/seed<k>`` at any other; tuning runs under ``<runs-dir>/tuning/``.

Usage::

    python scripts/lora_study.py --tune --out experiments/2026-12-04_lora          # the grid, then the report
    python scripts/lora_study.py --seeds 0 1 2 --out experiments/2026-12-04_lora   # arms at the tuned rates, report
    python scripts/lora_study.py --only-report --runs-dir experiments/2026-12-04_lora/runs --out experiments/2026-12-04_lora
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from real_opd_protocol import archive_run, claims_table, comparison_fields, describe, pct, run_cell  # noqa: E402

from opd.report import compare_arms  # noqa: E402

EXPERIMENT = "real_opd_finetuned_teacher"
GKD_ON_POLICY = ["method=gkd", "method.lmbda=1", "method.beta=0.5"]
#: arm -> (family, opd-train overrides over the experiment, without the rate)
ARMS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", GKD_ON_POLICY),
    "lora8": ("lora", [*GKD_ON_POLICY, "student.lora.r=8"]),
    "lora32": ("lora", [*GKD_ON_POLICY, "student.lora.r=32"]),
}
#: the first rates run (the record's seed-0 runs): the experiment's 5e-5 for full fine-tuning, 10x that for LoRA
#: (LoRA Without Regret's rule of thumb); their run directories carry no rate in their name
FIRST_RATE = {"full": 5.0e-5, "lora": 5.0e-4}
#: the learning-rate grid of each family (tuning: seed 0, validation split); ×4 steps around the first rates
GRID = {"full": [5.0e-5, 2.0e-4], "lora": [5.0e-4, 2.0e-3]}
#: the arm whose tuning run stands for its family
TUNED_ON = {"full": "full", "lora": "lora8"}
#: what makes a run a tuning run: the task's own validation split (after eval; no stage saw it), scored at the end only
VALIDATION_EXAMPLES = 256
TUNING = [f"data.num_validation={VALIDATION_EXAMPLES}", "trainer.evaluate_on=validation",
          f"trainer.validation_examples={VALIDATION_EXAMPLES}", "trainer.eval_every=0", "trainer.eval_teacher_kl=false"]


def arm_dir(arm: str, rate: float) -> str:
    """``full`` at the first rate, ``full-lr0.0002`` at another."""
    return arm if rate == FIRST_RATE[ARMS[arm][0]] else f"{arm}-lr{rate:g}"


def parse_arm_dir(name: str) -> tuple[str, float] | None:
    """(arm, rate) of a run directory name (:func:`arm_dir`), or None for a name that is no arm's."""
    arm, _, rate = name.partition("-lr")
    if arm not in ARMS:
        return None
    return arm, float(rate) if rate else FIRST_RATE[ARMS[arm][0]]


def protocol_stages() -> list[str]:
    """``teacher_finetune.dir=`` and ``warm_start.dir=`` of the protocol's finished stages (tuning runs name them: their
    extra data key would otherwise hash to new stage directories, though train and eval are the same problems)."""
    from hydra import compose, initialize_config_dir

    from opd import stages
    from opd.train import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={EXPERIMENT}", *GKD_ON_POLICY])
    teacher = stages.stage_zero_dir(cfg, stages.stage_zero_config(cfg))
    if not (teacher / "summary.json").is_file():
        raise SystemExit(f"tuning needs the protocol's fine-tuned teacher; {teacher} has not finished: run the arms first")
    staged = stages.with_finetuned_teacher(cfg, json.loads((teacher / "summary.json").read_text()))
    warm = stages.stage_one_dir(staged, stages.stage_one_config(staged))
    if not (warm / "summary.json").is_file():
        raise SystemExit(f"tuning needs the protocol's warm start; {warm} has not finished: run the arms first")
    return [f"++teacher_finetune.dir={teacher.resolve()}", f"++warm_start.dir={warm.resolve()}"]


def read(root: Path) -> dict[tuple[str, float], dict[int, dict[str, Any]]]:
    """(arm, rate) -> seed -> {summary, step seconds (median)} of every finished run directly under ``root``."""
    runs: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for summary_file in sorted(root.glob("*/seed*/summary.json")):
        key = parse_arm_dir(summary_file.parent.parent.name)
        if key is None:
            continue
        rows = [json.loads(line) for line in (summary_file.parent / "metrics.jsonl").read_text().splitlines()]
        steps = [row["time/step_s"] for row in rows if "time/step_s" in row]
        runs.setdefault(key, {})[int(summary_file.parent.name[4:])] = {
            "summary": json.loads(summary_file.read_text()),
            "step_s": statistics.median(steps) if steps else None}
    return runs


def tuned_rates(tuning: dict[tuple[str, float], dict[int, dict[str, Any]]]) -> tuple[dict[str, float], list[str]]:
    """family -> its tuned rate (the best final validation accuracy of its grid; a tie goes to the smaller rate), and
    the tuning table as markdown rows. A family whose grid has not finished has no tuned rate."""
    rates, lines = {}, ["| family (tuned on) | rate | validation accuracy before | after (seed 0) |", "|---|---|---|---|"]
    for family, grid in GRID.items():
        results = {rate: tuning[(TUNED_ON[family], rate)][0]["summary"] for rate in grid
                   if 0 in tuning.get((TUNED_ON[family], rate), {})}
        for rate, summary in results.items():
            assert summary["evaluated_on"] == "validation", f"{family} at {rate}: not a tuning run"
            lines.append(f"| {family} ({TUNED_ON[family]}) | {rate:g} | {pct(summary['student_accuracy_before'])} | "
                         f"{pct(summary['student_accuracy_after'])} |")
        if len(results) == len(grid):
            rates[family] = max(grid, key=lambda rate: (results[rate]["student_accuracy_after"], -rate))
    return rates, lines


def report(runs: dict[tuple[str, float], dict[int, dict[str, Any]]], rates: dict[str, float]) -> tuple[dict[str, Any], str]:
    """The table of every (arm, rate) run (accuracy before/after, teacher agreement, step seconds) and the verdicts
    LoRA vs full fine-tuning at equal steps, each family at its tuned rate (``rates``; the first rates, marked
    untuned, for a family not tuned yet)."""
    table = {}
    for (arm, rate), seeds in sorted(runs.items(), key=lambda item: (list(ARMS).index(item[0][0]), item[0][1])):
        summaries = [r["summary"] for r in seeds.values()]
        table[arm_dir(arm, rate)] = {
            "arm": arm, "rate": rate, "tuned": rates.get(ARMS[arm][0]) == rate, "seeds": sorted(seeds),
            "accuracy_after": describe([s["student_accuracy_after"] for s in summaries]),
            "accuracy_before": describe([s["student_accuracy_before"] for s in summaries]),
            "step_s": describe([r["step_s"] for r in seeds.values()]),
            "teacher_rkl_after": describe([s.get("student_teacher_rkl_after") for s in summaries]),
            "eval_examples": summaries[0]["eval_examples"]}
    claims = []
    at = {family: rates.get(family, FIRST_RATE[family]) for family in GRID}
    full = table.get(arm_dir("full", at["full"]))
    for arm in ("lora8", "lora32"):
        row = table.get(arm_dir(arm, at["lora"]))
        untuned = "" if all(family in rates for family in GRID) else " (untuned rates)"
        name = f"{arm} (lr {at['lora']:g}) beats full fine-tuning (lr {at['full']:g}) at equal steps{untuned}"
        if row is None or full is None or len(row["seeds"]) < 2 or len(full["seeds"]) < 2:
            claims.append({"claim": name, "verdict": "not run (fewer than 2 seeds)"})
            continue
        a, b = row["accuracy_after"]["per_seed"], full["accuracy_after"]["per_seed"]
        claims.append({"claim": name, "arms": [arm, "full"], "a": a, "b": b,
                       **comparison_fields(compare_arms(a, b, eval_examples=row["eval_examples"]))})
    lines = ["| arm | lr | tuned | seeds | accuracy before | accuracy after (mean ± std) | per seed | teacher RKL after "
             "(nats/token) | step s (median; load-dependent) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table.values():
        after, before, rkl = row["accuracy_after"], row["accuracy_before"], row["teacher_rkl_after"]["mean"]
        lines.append(f"| {row['arm']} | {row['rate']:g} | {'yes' if row['tuned'] else 'no'} | {len(row['seeds'])} | "
                     f"{pct(before['mean'])} | {pct(after['mean'])} ± "
                     f"{pct(after['std']) if after['std'] is not None else '–'} | "
                     f"{', '.join(pct(v) for v in after['per_seed'])} | "
                     f"{'n/a' if rkl is None else f'{rkl:.3f}'} | {row['step_s']['mean']:.2f} |")
    lines += ["", *claims_table(claims)]
    return {"rates": rates, "table": table, "claims": claims}, "\n".join(lines) + "\n"


def run_and_archive(runs_dir: Path, out: Path, name: str, seed: int, overrides: list[str]) -> None:
    """One run (skipped when finished), then its summary and metrics copied into the record."""
    run_cell(runs_dir, name, seed, [f"experiment={EXPERIMENT}", *overrides], "", sys.stdout)
    archive_run(runs_dir / name / f"seed{seed}", out / "runs" / name / f"seed{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune", action="store_true", help="run each family's rate grid (seed 0, validation split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--untuned", action="store_true", help="run the arms at the first rates, without tuning")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "logs" / "lora_study")
    parser.add_argument("--out", type=Path, required=True, help="the record directory (results.md, results.json, runs/)")
    parser.add_argument("--only-report", action="store_true")
    parser.add_argument("--threads", type=int, help="trainer.num_threads of every run (default: the experiment's 2); "
                                                     "1 lets two jobs share a 2-core machine without oversubscribing it")
    args = parser.parse_args()
    os.chdir(ROOT)  # stage directories are relative to the repository (logs/<experiment>/...)
    threads = [f"trainer.num_threads={args.threads}"] if args.threads else []
    runs_dir = args.runs_dir if args.runs_dir.exists() else args.out / "runs"
    if args.tune and not args.only_report:
        stage_dirs = protocol_stages()
        for family, grid in GRID.items():
            for rate in grid:
                arm = TUNED_ON[family]
                run_and_archive(args.runs_dir, args.out, f"tuning/{arm_dir(arm, rate)}", 0,
                                [*ARMS[arm][1], f"trainer.lr={rate}", *TUNING, *stage_dirs, *threads])
    rates, tuning_lines = tuned_rates(read(runs_dir / "tuning"))
    if not args.only_report and not args.tune:
        missing = [family for family in GRID if family not in rates]
        if missing and not args.untuned:
            raise SystemExit(f"no tuned rate for {', '.join(missing)}: run --tune first (or --untuned for the first "
                             f"rates {FIRST_RATE})")
        for seed in args.seeds:  # seed-major: an early stop leaves every arm with the same seeds
            for arm in args.arms:
                family, overrides = ARMS[arm]
                rate = FIRST_RATE[family] if args.untuned else rates[family]
                run_and_archive(args.runs_dir, args.out, arm_dir(arm, rate), seed,
                                [*overrides, f"trainer.lr={rate}", *threads])
    analysis, text = report(read(runs_dir), rates)
    text = "Tuning (seed 0; the task's validation split, 256 sums no stage or evaluation saw):\n\n" + \
        "\n".join(tuning_lines) + "\n\n" + text
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(analysis, indent=2, default=str))
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
