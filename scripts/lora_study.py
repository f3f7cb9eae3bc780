"""LoRA against full fine-tuning on the real SmolLM2 pair, under the warm-started protocol (issue 24).

Every arm is GKD on-policy (lambda = 1, JSD 0.5: the fine-tuned-teacher study's declared on-policy arm) for the same
40 steps from the same warm-started student and fine-tuned teacher (``experiment=real_opd_finetuned_teacher``; its
stages are shared, computed once): full fine-tuning at the study's learning rate, and LoRA adapters of rank 8 and 32
on every linear layer at 10x that rate (LoRA Without Regret's rule; not tuned here). Three seeds each, evaluated on the
256 held-out sums.

Usage::

    python scripts/lora_study.py --seeds 0 1 2 --out experiments/2026-12-04_lora     # runs, then the report
    python scripts/lora_study.py --only-report --runs-dir experiments/2026-12-04_lora/runs --out experiments/2026-12-04_lora
"""

from __future__ import annotations

import argparse
import json
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
FULL_LR = 5.0e-5  # the experiment's (conf/experiment/real_opd_finetuned_teacher.yaml), untuned
LORA_LR = 10 * FULL_LR  # LoRA Without Regret: the best LoRA rate is about 10x full fine-tuning's
#: arm -> opd-train overrides over the experiment
ARMS: dict[str, list[str]] = {
    "full": [*GKD_ON_POLICY, f"trainer.lr={FULL_LR}"],
    "lora8": [*GKD_ON_POLICY, "student.lora.r=8", f"trainer.lr={LORA_LR}"],
    "lora32": [*GKD_ON_POLICY, "student.lora.r=32", f"trainer.lr={LORA_LR}"],
}


def read(root: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """arm -> seed -> {summary, step seconds (median), final rows} of every finished run under ``root``."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for summary_file in sorted(root.glob("*/seed*/summary.json")):
        arm, seed = summary_file.parent.parent.name, int(summary_file.parent.name[4:])
        rows = [json.loads(line) for line in (summary_file.parent / "metrics.jsonl").read_text().splitlines()]
        steps = [row["time/step_s"] for row in rows if "time/step_s" in row]
        runs.setdefault(arm, {})[seed] = {"summary": json.loads(summary_file.read_text()),
                                          "step_s": statistics.median(steps) if steps else None}
    return runs


def report(runs: dict[str, dict[int, dict[str, Any]]]) -> tuple[dict[str, Any], str]:
    """The table (accuracy before/after, step seconds) and the verdicts LoRA vs full at equal steps."""
    table = {}
    for arm in ARMS:
        seeds = runs.get(arm, {})
        if not seeds:
            continue
        table[arm] = {"seeds": sorted(seeds),
                      "accuracy_after": describe([r["summary"]["student_accuracy_after"] for r in seeds.values()]),
                      "accuracy_before": describe([r["summary"]["student_accuracy_before"] for r in seeds.values()]),
                      "step_s": describe([r["step_s"] for r in seeds.values()]),
                      "teacher_rkl_after": describe([r["summary"].get("student_teacher_rkl_after") for r in seeds.values()]),
                      "eval_examples": next(iter(seeds.values()))["summary"]["eval_examples"]}
    claims = []
    for arm in ("lora8", "lora32"):
        if arm not in table or "full" not in table:
            continue
        a, b = table[arm]["accuracy_after"]["per_seed"], table["full"]["accuracy_after"]["per_seed"]
        if len(a) < 2 or len(b) < 2:
            claims.append({"claim": f"{arm} beats full fine-tuning", "verdict": "not run (fewer than 2 seeds)"})
            continue
        claims.append({"claim": f"{arm} beats full fine-tuning at equal steps", "arms": [arm, "full"], "a": a,
                       "b": b, **comparison_fields(compare_arms(a, b, eval_examples=table[arm]["eval_examples"]))})
    lines = ["| arm | lr | seeds | accuracy before | accuracy after (mean ± std) | per seed | teacher RKL after "
             "(nats/token) | step s (median; load-dependent) |", "|---|---|---|---|---|---|---|---|"]
    for arm, row in table.items():
        after, before = row["accuracy_after"], row["accuracy_before"]
        lr = next(o.split("=")[1] for o in ARMS[arm] if o.startswith("trainer.lr="))
        lines.append(f"| {arm} | {lr} | {len(row['seeds'])} | {pct(before['mean'])} | {pct(after['mean'])} ± "
                     f"{pct(after['std']) if after['std'] is not None else '–'} | "
                     f"{', '.join(pct(v) for v in after['per_seed'])} | "
                     f"{row['teacher_rkl_after']['mean']:.3f} | {row['step_s']['mean']:.2f} |")
    lines += ["", *claims_table(claims)]
    return {"table": table, "claims": claims}, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "logs" / "lora_study")
    parser.add_argument("--out", type=Path, required=True, help="the record directory (results.md, results.json, runs/)")
    parser.add_argument("--only-report", action="store_true")
    parser.add_argument("--threads", type=int, help="trainer.num_threads of every run (default: the experiment's 2); "
                                                     "1 lets two jobs share a 2-core machine without oversubscribing it")
    args = parser.parse_args()
    if not args.only_report:
        for seed in args.seeds:  # seed-major: an early stop leaves every arm with the same seeds
            for arm in args.arms:
                threads = [f"trainer.num_threads={args.threads}"] if args.threads else []
                run_cell(args.runs_dir, arm, seed, [f"experiment={EXPERIMENT}", *ARMS[arm], *threads], "", sys.stdout)
                archive_run(args.runs_dir / arm / f"seed{seed}", args.out / "runs" / arm / f"seed{seed}")
    runs = read(args.runs_dir if args.runs_dir.exists() else args.out / "runs")
    analysis, text = report(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(analysis, indent=2, default=str))
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
