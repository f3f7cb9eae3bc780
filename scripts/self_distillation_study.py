"""The self-distillation family on the real LM (issue 25): OPSD, SDFT with the initial, live and EMA teachers, SDPO and
SDPO's own baseline (the group-relative policy gradient without the distillation term), from the protocol study's
warm student on two-number sums (``conf/experiment/real_opd_finetuned_teacher.yaml``; 256 held-out problems).

Every arm x seed is one ``opd-train`` run of ``experiment=real_sdft`` / ``real_sdpo`` / ``real_opsd`` (the study's
task, stages and stage-2 budget: 40 steps of 16 rollouts at lr 5e-5; SDPO at 4 prompts x 4 samples). The stages (the
fine-tuned teacher, the SeqKD warm start) are the study's directories, trained by the first run when missing. Runs are
resumable and never repeated (``scripts/real_opd_protocol.py``'s runner); each finished run's summary, metrics and
logged completions are archived into ``<out>/runs/``, so ``--only-report --runs-dir <out>/runs`` rebuilds the record.

The report (``results.md`` / ``results.json``): accuracy, EOS rate and mean length per arm (mean, std, 95 % CI, per
seed), and the verdicts (``opd.report.compare_arms``): each arm's own claim that it improves the student it starts from
(after − before, paired per seed), SDPO against its baseline, the live and EMA teachers against the initial one, and
SDFT against OPSD. Context leakage: the share of the final evaluation's logged completions that are not a bare answer
(they carry text of a teacher prompt, e.g. OPSD's "=" delimiter rows, "Correct solution", "feedback").

Usage::

    python scripts/self_distillation_study.py                         # all runs (resumable), then the report
    python scripts/self_distillation_study.py --arms sdpo grpo --seeds 0 1 2
    python scripts/self_distillation_study.py --only-report --runs-dir experiments/<record>/runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import real_opd_protocol as study  # noqa: E402

from opd.report import compare_arms  # noqa: E402

RECORD = "experiments/2026-12-05_self_distillation"
SEEDS = (0, 1, 2)
#: arm -> opd-train overrides (each names its experiment, built on the protocol study's)
ARMS: dict[str, list[str]] = {
    "sdpo": ["experiment=real_sdpo"],  # SDPO, EMA teacher, sampled-token reverse KL, w = 1 (TRL defaults)
    "grpo": ["experiment=real_sdpo", "method.distillation_weight=0"],  # SDPO's own baseline: no distillation term
    "sdft": ["experiment=real_sdft"],  # SDFT, the initial student as teacher (TRL "base")
    "sdft_live": ["experiment=real_sdft", "method.teacher_model=live"],
    "sdft_ema": ["experiment=real_sdft", "method.teacher_model=ema"],
    "opsd": ["experiment=real_opsd"],  # OPSD as its official code does it (the protocol study's arm)
}
#: every arm evaluates at its end only (step 0 is the warm start's final evaluation): the study's mid-run evaluation at
#: step 20 costs ~3 minutes a run on 2 cores and decides nothing here
EVAL = ["trainer.eval_every=40"]
#: run order: the arms of the pre-declared comparisons (SDPO vs its baseline, SDFT's own claim) seed by seed first
FIRST = ("sdpo", "grpo", "sdft")
#: archived with each run: the logged evaluation completions, for the leakage count
ARCHIVED = ("summary.json", "metrics.jsonl", "samples.jsonl")
#: a completion that is a bare answer: optional spaces, a number, optional punctuation (the task's answer format)
BARE_ANSWER = re.compile(r"^\s*-?\d+\s*[.!]?\s*$")


def plan(arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    first = [(arm, seed) for seed in seeds for arm in arms if arm in FIRST]
    return first + [(arm, seed) for seed in seeds for arm in arms if arm not in FIRST]


def archive(run: Path, target: Path) -> None:
    if run.resolve() == target.resolve() or not (run / "summary.json").exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED:
        if (run / name).exists():
            shutil.copyfile(run / name, target / name)


def leakage(run: Path) -> dict[str, Any] | None:
    """Of the completions logged at the run's last evaluation: how many are not a bare answer."""
    path = run / "samples.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    last = max(row["step"] for row in rows)
    final = [row["completion"] for row in rows if row["step"] == last]
    first = [row["completion"] for row in rows if row["step"] == min(row["step"] for row in rows)]
    return {"step": last, "logged": len(final), "not_bare": sum(not BARE_ANSWER.match(c) for c in final),
            "not_bare_at_start": sum(not BARE_ANSWER.match(c) for c in first), "examples": final[:3]}


def verdicts(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    runs, table = analysis["runs"], analysis["table"]
    out: list[dict[str, Any]] = []

    def final(arm: str) -> list[float]:
        return [runs[arm][s]["summary"]["student_accuracy_after"] for s in sorted(runs.get(arm, {}))]

    def add(claim: str, a: str, b: str, note: str = "", paired: bool = False) -> None:
        values_a = final(a)
        values_b = final(b) if not paired else [runs[a][s]["summary"]["student_accuracy_before"] for s in sorted(runs[a])]
        if len(values_a) < 2 or len(values_b) < 2:
            out.append({"claim": claim, "arms": [a, b], "verdict": "not run (fewer than 2 seeds per arm)", "role": note})
            return
        comparison = compare_arms(values_a, values_b, paired=paired, eval_examples=table[a]["eval_examples"])
        out.append({"claim": claim, "arms": [a, b], "a": values_a, "b": values_b, "role": note,
                    **study.comparison_fields(comparison)})

    for arm in ARMS:
        if arm in runs:
            add(f"{arm} improves the student it starts from (after - before, paired)", arm, f"{arm}@0",
                "the method's own claim" if arm != "grpo" else "the RL baseline", paired=True)
    if "sdpo" in runs or "grpo" in runs:
        add("SDPO beats its group-relative policy-gradient baseline", "sdpo", "grpo", "SDPO's claim (Hübotter et al.)")
    for teacher in ("sdft_live", "sdft_ema"):
        if teacher in runs:
            add(f"{teacher} beats sdft (the initial student as teacher)", teacher, "sdft", "secondary")
    if "opsd" in runs:
        add("SDFT beats OPSD", "sdft", "opsd", "secondary: two templates and losses")
    return out


def format_results(analysis: dict[str, Any], claims: list[dict[str, Any]], leaks: dict[str, list]) -> str:
    pct = study.pct
    lines = ["| arm | seeds | accuracy before | accuracy after (mean ± std) | per seed | EOS rate | mean length | "
             "not a bare answer (logged, final eval) | train s (mean) |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in [a for a in ARMS if a in analysis["table"]]:
        row = analysis["table"][arm]
        acc = row["accuracy"]
        std = "–" if acc["std"] is None else pct(acc["std"])
        leak = leaks.get(arm, [])
        leak_text = ", ".join(f"{x['not_bare']}/{x['logged']}" for x in leak if x) or "n/a"
        lines.append(f"| {arm} | {acc['n']} | {pct(row['start_accuracy'])} | {pct(acc['mean'])} ± {std} | "
                     f"{' '.join(pct(v) for v in acc['per_seed'])} | {pct(row['eos_rate']['mean'])} | "
                     f"{row['mean_length']['mean']:.1f} | {leak_text} | {row['train_seconds']['mean']:.0f} |")
    lines += ["", "| claim | difference (points) | 95 % CI | verdict | smallest detectable difference | role | note |",
              "|---|---|---|---|---|---|---|"]
    for c in claims:
        if "difference" not in c:
            lines.append(f"| {c['claim']} | | | {c['verdict']} | | {c.get('role', '')} | |")
            continue
        lines.append(f"| {c['claim']} | {100 * c['difference']:+.1f} | [{100 * c['ci_low']:+.1f}, "
                     f"{100 * c['ci_high']:+.1f}] | **{c['verdict']}** | {100 * c['min_detectable_difference']:.1f} | "
                     f"{c.get('role', '')} | {c.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="logs/self_distillation/study", help="run directories (resumable)")
    parser.add_argument("--out", default=RECORD, help="where the record's results go")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--only-report", action="store_true", help="no runs: the report from what exists")
    args = parser.parse_args()
    root, out = ROOT / args.runs_dir, ROOT / args.out
    if not args.only_report:
        started = time.time()
        cells = plan(args.arms, args.seeds)
        for index, (arm, seed) in enumerate(cells):
            seconds = study.run_cell(root, arm, seed, ARMS[arm] + EVAL, "", sys.stdout)
            if seconds is not None:
                archive(study.run_dir(root, arm, seed), out / "runs" / arm / f"seed{seed}")
            status = "done before" if seconds is None else f"{seconds:.0f} s"
            print(f"  [{index + 1}/{len(cells)}] {arm} seed {seed}: {status} (study {time.time() - started:.0f} s so "
                  f"far; load {os.getloadavg()[0]:.1f})", flush=True)
    for summary in sorted(root.glob("*/seed*/summary.json")) if root.exists() else []:
        archive(summary.parent, out / "runs" / summary.parent.parent.name / summary.parent.name)
    analysis = study.analyse(root, args.seeds)
    claims = verdicts(analysis)
    leaks = {arm: [leakage(root / arm / f"seed{seed}") for seed in sorted(by_seed)]
             for arm, by_seed in analysis["runs"].items()}
    out.mkdir(parents=True, exist_ok=True)
    text = format_results(analysis, claims, leaks)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"table": analysis["table"], "claims": claims, "leakage": leaks},
                                                 indent=2, default=str) + "\n")
    print(text)
    print(f"wrote {out / 'results.md'} and results.json; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
