"""The on-policy protocol study on the real LM (issue 21): does on-policy distillation beat SeqKD once the student is
warm and its rollouts finish? ``make study`` runs this.

1. Every *arm* x seed runs ``opd-train experiment=<study>``. The default study,
   ``conf/experiment/real_opd_finetuned_teacher.yaml``, first fine-tunes SmolLM2-135M-Instruct on the task (stage 0,
   as GKD's teachers are) and distils it into its pruned copy; ``--experiment real_opd_protocol`` is the first record's
   study (the teacher as shipped, on letter counting), ``--toy`` the shipped toy pair. Each run first needs the
   experiment's fine-tuned teacher and warm start (stage 1, greedy SeqKD); each is trained once, by the first run, and
   shared by every arm and seed of that student size (``opd/stages.py``). The arms the headline verdicts need
   (SeqKD, GKD lambda = 1 and lambda = 0) run first, seed by seed, then the other arms seed by seed, so an early
   stop still leaves the deciding comparisons complete. A run with a ``summary.json`` is never run again; an
   interrupted one resumes from its newest checkpoint (``trainer.resume=auto``), so the whole target resumes after
   an interruption.
2. The two deciding arms (SeqKD and the pre-declared on-policy arm) again at a second student size
   (``student.keep_layers=20``, with its own warm start).
3. ``--only-report`` (or after the runs) writes ``results.md`` / ``results.json`` and the curves into ``--out``:
   accuracy, EOS rate, mean length and teacher agreement per arm (mean, sample std, 95 % CI, per seed), and the
   verdicts (``opd.report.compare_arms``): on-policy vs SeqKD at equal steps and at equal training seconds, GKD
   lambda = 1 vs 0, and at the second size. Each finished run's ``summary.json`` and ``metrics.jsonl`` are copied into
   ``<out>/runs/`` as it finishes, so ``--only-report --runs-dir <out>/runs`` rebuilds the record without ``logs/``.

Usage::

    python scripts/real_opd_protocol.py                      # all runs (resumable), then the report
    python scripts/real_opd_protocol.py --experiment real_opd_protocol   # the letter-counting study of the first record
    python scripts/real_opd_protocol.py --only-report        # the report from the runs that exist
    python scripts/real_opd_protocol.py --arms seqkd gkd --seeds 0   # a subset
    python scripts/real_opd_protocol.py --only-report --runs-dir experiments/<record>/runs   # from the record alone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.report import compare_arms  # noqa: E402

EXPERIMENT = "real_opd_protocol"
SEEDS = (0, 1, 2)
#: arm -> opd-train overrides over the experiment (which sets lr, steps, budget, warm start for all of them)
ARMS: dict[str, list[str]] = {
    "seqkd": ["method=seqkd", "method.greedy=true"],  # the distillation baseline: the teacher's greedy answers, as stage 1
    "gkd_l0": ["method=gkd", "method.lmbda=0", "method.beta=0.5"],  # GKD off-policy: the teacher's samples, JSD(0.5)
    "gkd_l1": ["method=gkd", "method.lmbda=1", "method.beta=0.5"],  # GKD on-policy, JSD(0.5) (the paper's main setting)
    "gkd_l1_b1": ["method=gkd", "method.lmbda=1", "method.beta=1"],  # GKD on-policy, reverse KL (full distribution)
    "tm_opd": ["method=tm_opd"],  # sampled-token reverse KL (Thinking Machines)
    "distillm": ["method=distillm"],  # skew KL with adaptive off-policy
    # the overlong treatment (trainer.overlong=mask, DAPO's filtering): gkd_l1 with no loss on rollouts cut before EOS
    "gkd_l1_mask": ["method=gkd", "method.lmbda=1", "method.beta=0.5", "trainer.overlong=mask"],
    # rejection-sampled SeqKD: CE on the teacher's correct samples (the task verifier judges them), the next baseline a
    # practitioner tries after SeqKD
    "rs_seqkd": ["method=rs_seqkd"],
    # OPSD (Zhao et al., arXiv:2601.18734) as its official code does it, from the same warm student: its own experiment
    # (conf/experiment/real_opsd.yaml: the study's task, stages and stage-2 budget; OPSD's sampler, clip and prompt)
    "opsd": ["experiment=real_opsd"],
}
#: the studies this script runs: experiment -> (record directory, default arms, the second student size's
#: keep_layers or None). The fine-tuned-teacher study drops gkd_l1_mask (its teacher answers in 3-4 tokens: no rollout
#: is cut, so masking cut ones changes nothing) and adds rs_seqkd; its second size is the 10-layer copy. The
#: letter-counting one is the first record's (its teacher is below a constant answer)
STUDIES: dict[str, tuple[str, tuple[str, ...], int | None]] = {
    "real_opd_finetuned_teacher": ("experiments/2026-12-03_real_opd_finetuned_teacher",
                                   ("seqkd", "gkd_l1", "gkd_l0", "gkd_l1_b1", "tm_opd", "distillm", "opsd", "rs_seqkd"),
                                   10),
    # the same study with a stage 2 that can move the student (80 steps at the warm start's lr 1e-4): the deciding arms
    "real_opd_longer_stage2": ("experiments/2026-12-05_real_opd_longer_stage2", ("seqkd", "gkd_l1", "gkd_l0"), None),
    "real_opd_protocol": ("experiments/2026-12-03_real_opd_protocol",
                          ("seqkd", "gkd_l1", "gkd_l0", "gkd_l1_b1", "tm_opd", "distillm", "gkd_l1_mask"), 20),
    "toy_opd_protocol": ("experiments/2026-12-03_real_opd_protocol/toy",
                         ("seqkd", "gkd_l1", "gkd_l0", "gkd_l1_b1", "tm_opd", "distillm", "gkd_l1_mask"), None),
}
ON_POLICY = ("gkd_l1", "gkd_l1_b1", "tm_opd", "distillm", "gkd_l1_mask", "opsd")
#: baselines compared with SeqKD too: gkd_l0 trains on the dataset's gold outputs (oracle labels), rs_seqkd on the
#: teacher's verified-correct samples
OTHER_BASELINES = ("rs_seqkd",)
#: fixed before the runs: the on-policy arm the headline verdicts use (GKD's own on-policy setting, Agarwal et al. 2024)
DECLARED_ON_POLICY = "gkd_l1"
SECOND_SIZE = {"keep_layers": 20, "arms": ("seqkd", DECLARED_ON_POLICY)}
METRIC = "eval/accuracy"


def run_dir(root: Path, arm: str, seed: int, size: str = "") -> Path:
    return root / f"{arm}{size}" / f"seed{seed}"


#: run order: the arms the headline verdicts need first (all seeds), then the other arms, then the second size; an
#: interrupted or time-boxed study so always holds complete seeds of the deciding comparisons
DECIDING = ("seqkd", DECLARED_ON_POLICY, "gkd_l0")
#: run after every seed of the other arms: the extra baseline, which the issue's arm list does not name
LAST = ("rs_seqkd",)


def plan(arms: list[str], seeds: list[int], second_size: bool) -> list[tuple[str, int, list[str], str]]:
    """(arm, seed, overrides, size tag) in run order: the deciding arms seed-major, then the two deciding arms at the
    second student size, then the other arms seed-major, and the ``LAST`` ones (what the headline verdicts need comes
    first)."""
    deciding = [(arm, seed, ARMS[arm], "") for seed in seeds for arm in arms if arm in DECIDING]
    others = [(arm, seed, ARMS[arm], "") for group in ([a for a in arms if a not in DECIDING + LAST],
                                                       [a for a in arms if a in LAST])
              for seed in seeds for arm in group]
    second = []
    if second_size:
        tag = f"_keep{SECOND_SIZE['keep_layers']}"
        second = [(arm, seed, ARMS[arm] + [f"student.keep_layers={SECOND_SIZE['keep_layers']}"], tag)
                  for seed in seeds for arm in SECOND_SIZE["arms"] if arm in arms]
    return deciding + second + others


def cell_command(overrides: list[str], seed: int, out: Path) -> list[str]:
    """The ``opd-train`` command of one cell. An arm may name its own experiment (opsd: ``real_opsd``, built on the
    study's), which replaces the study's."""
    experiment = next((o for o in overrides if o.startswith("experiment=")), f"experiment={EXPERIMENT}")
    return [str(ROOT / ".venv" / "bin" / "opd-train"), experiment, *(o for o in overrides if o != experiment),
            f"seed={seed}", f"output_dir={out}", "trainer.resume=auto", "trainer.progress=false"]


def run_cell(root: Path, arm: str, seed: int, overrides: list[str], tag: str, log) -> float | None:
    """One run (skipped when finished); returns its wall seconds, or None when it was already done."""
    out = run_dir(root, arm, seed, tag)
    if (out / "summary.json").exists():
        return None
    out.mkdir(parents=True, exist_ok=True)
    command = cell_command(overrides, seed, out)
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {arm}{tag} seed {seed}: {' '.join(command[1:])}", file=log, flush=True)
    with open(out / "stdout.log", "a") as handle:
        code = subprocess.call(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{arm}{tag} seed {seed} failed (exit {code}); see {out / 'stdout.log'}")
    return time.time() - started


#: what a record keeps of each finished run (``<out>/runs/<arm>/seed<k>/``): enough for ``--only-report --runs-dir
#: <out>/runs`` to rebuild every table, verdict and curve of the record. Run directories live under ``logs/``, which a
#: machine may not keep (a session's machine is reclaimed; 1.6 GB checkpoints are pruned), and a record whose numbers
#: can no longer be regenerated is a claim, not a record
ARCHIVED_FILES = ("summary.json", "metrics.jsonl")


def archive_run(run: Path, archive: Path) -> None:
    """Copy a finished run's summary and metric rows (a few hundred KB) into the record's ``runs/`` folder."""
    if run.resolve() == archive.resolve() or not (run / "summary.json").exists():
        return
    archive.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED_FILES:
        if (run / name).exists():
            shutil.copyfile(run / name, archive / name)


def archive_runs(root: Path, out: Path) -> None:
    """Archive every finished run under ``root`` (see :data:`ARCHIVED_FILES`)."""
    for summary in sorted(root.glob("*/seed*/summary.json")) if root.exists() else []:
        archive_run(summary.parent, out / "runs" / summary.parent.parent.name / summary.parent.name)


# ------------------------------------------------------------------ analysis
def read_run(path: Path) -> dict[str, Any] | None:
    """A finished run: its summary, evaluation rows by step, and cumulative training seconds by step."""
    if not (path / "summary.json").exists():
        return None
    summary = json.loads((path / "summary.json").read_text())
    evals: dict[int, dict[str, float]] = {}
    seconds, train_seconds = {0: 0.0}, 0.0
    for line in (path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "time/step_s" in row:
            train_seconds += row["time/step_s"]
            seconds[row["step"]] = train_seconds
        if METRIC in row:
            evals.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k.startswith("eval/")})
    return {"summary": summary, "evals": evals, "train_seconds": seconds}


def accuracy_within(run: dict[str, Any], budget_s: float) -> float:
    """Accuracy at the last evaluation whose cumulative training seconds are within ``budget_s``."""
    steps = [step for step in sorted(run["evals"]) if run["train_seconds"].get(step, math.inf) <= budget_s + 1e-9]
    return run["evals"][steps[-1]][METRIC]


def describe(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample std, 95 % CI and the values of the seeds that have one (None: not measured in that run, e.g. the
    teacher agreement of an arm whose teacher is the student itself)."""
    from opd.report import mean_confidence_interval

    values = [v for v in values if v is not None]
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "ci95": mean_confidence_interval(values) if len(values) > 1 else None, "per_seed": values}


#: what the report keeps of the warm start's summary (its teacher's accuracy is the fine-tuned teacher's, which an arm
#: whose teacher is the student itself, OPSD, does not report)
WARM_START_KEYS = ("method", "steps", "teacher_accuracy", "student_accuracy_after", "student_eos_rate_after",
                   "student_mean_length_after", "student_teacher_rkl_after", "wall_time_s", "run_dir")


def analyse(root: Path, seeds: list[int]) -> dict[str, Any]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for arm_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []:
        for seed in seeds:
            run = read_run(arm_dir / f"seed{seed}")
            if run is not None:
                runs.setdefault(arm_dir.name, {})[seed] = run
    table = {}
    for arm, by_seed in runs.items():
        finals = [r["summary"] for r in by_seed.values()]
        table[arm] = {
            "seeds": sorted(by_seed),
            "accuracy": describe([s["student_accuracy_after"] for s in finals]),
            "eos_rate": describe([s.get("student_eos_rate_after") for s in finals]),
            "mean_length": describe([s.get("student_mean_length_after") for s in finals]),
            "teacher_rkl": describe([s.get("student_teacher_rkl_after") for s in finals]),
            "rollout_truncated": describe([s["rollout_truncated"] for s in finals if s.get("rollout_truncated") is not None]),
            "train_seconds": describe([max(r["train_seconds"].values()) for r in by_seed.values()]),
            "wall_seconds": [s.get("wall_time_s") for s in finals],  # fit(): evaluations + training, no model loading
            "start_accuracy": finals[0].get("student_accuracy_before"),
            "teacher_accuracy": finals[0].get("teacher_accuracy"),
            "eval_examples": finals[0].get("eval_examples"),
            "warm_start": {k: finals[0]["warm_start"].get(k) for k in WARM_START_KEYS}
            if finals[0].get("warm_start") else None,
            "teacher_finetune": {k: finals[0]["teacher_finetune"].get(k) for k in ("method", "steps",
                                 "student_accuracy_before", "student_accuracy_after", "wall_time_s", "run_dir")}
            if finals[0].get("teacher_finetune") else None,
        }
    return {"runs": runs, "table": table}


def verdicts(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    runs, table = analysis["runs"], analysis["table"]
    out = []

    def final(arm: str) -> list[float]:
        return [runs[arm][s]["summary"]["student_accuracy_after"] for s in sorted(runs.get(arm, {}))]

    def add(claim: str, a: str, b: str, values_a: list[float], values_b: list[float], note: str = "") -> None:
        if len(values_a) < 2 or len(values_b) < 2:
            out.append({"claim": claim, "arms": [a, b], "verdict": "not run (fewer than 2 seeds per arm)"})
            return
        n_eval = table[a]["eval_examples"]
        comparison = compare_arms(values_a, values_b, eval_examples=n_eval)
        out.append({"claim": claim, "arms": [a, b], "a": values_a, "b": values_b, "note": note,
                    **comparison_fields(comparison)})

    for arm in ON_POLICY + OTHER_BASELINES:
        if arm not in runs and arm != DECLARED_ON_POLICY:
            continue  # an arm this study does not run
        add(f"{arm} beats SeqKD at equal steps", arm, "seqkd", final(arm), final("seqkd"),
            "pre-declared headline" if arm == DECLARED_ON_POLICY else "secondary (several comparisons)")
    if "seqkd" in runs and DECLARED_ON_POLICY in runs:  # equal training seconds: the smaller arm's median total
        budget = min(statistics.median(max(r["train_seconds"].values()) for r in runs[arm].values())
                     for arm in ("seqkd", DECLARED_ON_POLICY))
        add(f"{DECLARED_ON_POLICY} beats SeqKD at equal training seconds ({budget:.0f} s)", DECLARED_ON_POLICY, "seqkd",
            [accuracy_within(r, budget) for _, r in sorted(runs[DECLARED_ON_POLICY].items())],
            [accuracy_within(r, budget) for _, r in sorted(runs["seqkd"].items())],
            "accuracy at the last evaluation within the budget (evaluation time excluded, the same for both)")
    add("GKD lambda=1 beats lambda=0 (beta 0.5)", "gkd_l1", "gkd_l0", final("gkd_l1"), final("gkd_l0"))
    if "opsd" in runs:  # OPSD's own claim: self-distillation improves the student it starts from (paired per seed)
        seeds_run = sorted(runs["opsd"])
        before = [runs["opsd"][s]["summary"]["student_accuracy_before"] for s in seeds_run]
        if len(seeds_run) < 2:
            out.append({"claim": "OPSD improves its starting student", "arms": ["opsd", "opsd@0"],
                        "verdict": "not run (fewer than 2 seeds)"})
        else:
            comparison = compare_arms(final("opsd"), before, paired=True, eval_examples=table["opsd"]["eval_examples"])
            out.append({"claim": "OPSD improves its starting student (after - before, paired)", "arms": ["opsd", "opsd@0"],
                        "a": final("opsd"), "b": before, "note": "the paper's claim (Zhao et al. 2026)",
                        **comparison_fields(comparison)})
    if "gkd_l1_mask" in runs:
        add("masking cut rollouts (trainer.overlong=mask) helps gkd_l1", "gkd_l1_mask", "gkd_l1",
            final("gkd_l1_mask"), final("gkd_l1"))
    if SECOND_SIZE["keep_layers"] is not None:  # a study with a second student size
        tag = f"_keep{SECOND_SIZE['keep_layers']}"
        add(f"{DECLARED_ON_POLICY} beats SeqKD at keep_layers={SECOND_SIZE['keep_layers']}", DECLARED_ON_POLICY + tag,
            "seqkd" + tag, final(DECLARED_ON_POLICY + tag), final("seqkd" + tag))
    return out


def comparison_fields(comparison: Any) -> dict[str, Any]:
    """The JSON fields of an ``opd.report.compare_arms`` result."""
    import dataclasses

    return dataclasses.asdict(comparison) if dataclasses.is_dataclass(comparison) else dict(comparison)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_results(analysis: dict[str, Any], claims: list[dict[str, Any]]) -> str:
    table = analysis["table"]
    lines = []
    for row in table.values():  # the fine-tuned teacher, once
        tf = row["teacher_finetune"]
        if tf and not any(line.startswith(f"- teacher fine-tuned in {tf['run_dir']}") for line in lines):
            lines.append(f"- teacher fine-tuned in {tf['run_dir']}: {tf['method']} for {tf['steps']} steps; held-out accuracy "
                         f"{pct(tf['student_accuracy_before'])} % as shipped, {pct(tf['student_accuracy_after'])} % after, "
                         f"{tf['wall_time_s']:.0f} s")
    for row in table.values():  # the shared starting points, once per student size
        ws = row["warm_start"]
        if ws and not any(line.startswith(f"- warm start {ws['run_dir']}") for line in lines):
            sharing = [name for name, other in table.items() if (other["warm_start"] or {}).get("run_dir") == ws["run_dir"]]
            lines.append(f"- warm start {ws['run_dir']} (arms {', '.join(sharing)}): "
                         f"{ws['method']} for {ws['steps']} steps; its teacher {pct(ws.get('teacher_accuracy'))} %, "
                         f"student after the warm start {pct(ws['student_accuracy_after'])} % on {row['eval_examples']} "
                         "held-out problems, "
                         "greedy EOS "
                         f"rate {pct(ws['student_eos_rate_after'])} %, mean length {ws['student_mean_length_after']:.1f} tokens, "
                         f"teacher RKL {ws['student_teacher_rkl_after']:.3f} nats/token, {ws['wall_time_s']:.0f} s")
    stages = {}  # each stage run once, however many arms share it
    for row in table.values():
        for key in ("teacher_finetune", "warm_start"):
            if row[key]:
                stages[row[key]["run_dir"]] = row[key]["wall_time_s"] or 0.0
    cells = [seconds for row in table.values() for seconds in row["wall_seconds"] if seconds is not None]
    lines.append(f"- cost: {len(stages)} stage runs ({sum(stages.values()) / 3600:.2f} h) and {len(cells)} arm x seed runs "
                 f"({sum(cells) / 3600:.2f} h) of training and evaluation wall time (model loading excluded), "
                 f"{(sum(stages.values()) + sum(cells)) / 3600:.2f} h in all")
    lines += ["", "| arm | seeds | accuracy (%) mean ± std [95 % CI] | per seed | greedy EOS rate | mean length (tokens) | "
             "teacher RKL (nats/token) | rollouts cut (%) | training s |", "|" + "---|" * 9]
    for arm, row in table.items():
        acc = row["accuracy"]
        ci = acc["ci95"]
        spread = "all seeds equal" if acc["std"] == 0 else (
            f"± {100 * acc['std']:.1f} [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")
        lines.append("| " + " | ".join([
            arm, str(len(row["seeds"])), f"{pct(acc['mean'])} {spread}", ", ".join(pct(v) for v in acc["per_seed"]),
            pct(row["eos_rate"]["mean"]), f"{row['mean_length']['mean']:.1f}",
            f"{row['teacher_rkl']['mean']:.3f}" if row["teacher_rkl"]["mean"] is not None else "n/a",
            pct(row["rollout_truncated"]["mean"]), f"{row['train_seconds']['mean']:.0f}"]) + " |")
    lines += ["", "Per evaluation, mean over the arm's seeds (greedy accuracy / greedy EOS rate / teacher RKL in nats per "
              "token / training seconds so far):", "", "| arm | " + " | ".join(f"step {step}" for step in
              sorted({step for by_seed in analysis["runs"].values() for r in by_seed.values() for step in r["evals"]}))
              + " |"]
    steps = sorted({step for by_seed in analysis["runs"].values() for r in by_seed.values() for step in r["evals"]})
    lines.append("|---|" + "---|" * len(steps))
    for arm, by_seed in analysis["runs"].items():
        cells = []
        for step in steps:
            rows = [r["evals"][step] for r in by_seed.values() if step in r["evals"]]
            secs = [r["train_seconds"].get(step, 0.0) for r in by_seed.values() if step in r["evals"]]
            if not rows:
                cells.append("")
                continue
            accuracy, eos, rkl = (statistics.fmean(row.get(key, math.nan) for row in rows)
                                  for key in (METRIC, "eval/eos_rate", "eval/teacher_rkl"))
            agreement = "n/a" if math.isnan(rkl) else f"{rkl:.2f}"  # an arm that measures none (OPSD)
            cells.append(f"{100 * accuracy:.1f} / {100 * eos:.0f} % / {agreement} / {statistics.fmean(secs):.0f} s")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", *claims_table(claims)]
    return "\n".join(lines) + "\n"


def claims_table(claims: list[dict[str, Any]]) -> list[str]:
    """The verdicts as markdown rows: difference, 95 % CI and smallest detectable difference in points."""
    lines = ["| claim | difference (points) | 95 % CI | verdict | smallest detectable difference | note |",
             "|---|---|---|---|---|---|"]
    for claim in claims:
        if "difference" not in claim:
            lines.append(f"| {claim['claim']} | | | {claim['verdict']} | | |")
            continue
        lines.append(f"| {claim['claim']} | {100 * claim['difference']:+.1f} | [{100 * claim['ci_low']:+.1f}, "
                     f"{100 * claim['ci_high']:+.1f}] | **{claim['verdict']}** | "
                     f"{100 * claim['min_detectable_difference']:.1f} | {claim.get('note') or ''} "
                     f"{claim.get('comparison_note') or ''} |")
    return lines


def plot_curves(analysis: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, xlabel, name in (("step", "optimizer step", "accuracy_vs_steps.png"),
                                ("seconds", "training seconds (evaluation excluded)", "accuracy_vs_seconds.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for arm, by_seed in analysis["runs"].items():
            steps = sorted(set.intersection(*(set(r["evals"]) for r in by_seed.values())))
            ys = [statistics.fmean(r["evals"][s][METRIC] for r in by_seed.values()) for s in steps]
            xs = steps if x_key == "step" else [statistics.fmean(r["train_seconds"].get(s, 0.0) for r in by_seed.values())
                                                for s in steps]
            ax.plot(xs, [100 * y for y in ys], marker="o", label=f"{arm} (n={len(by_seed)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="real_opd_finetuned_teacher", choices=list(STUDIES),
                        help="which study: the fine-tuned SmolLM2 teacher on two-number sums (default), the same with "
                             "a longer stage 2 at the warm start's rate (real_opd_longer_stage2), the shipped "
                             "SmolLM2 on letter counting (the first record), or the toy pair")
    parser.add_argument("--toy", action="store_true",
                        help="the same study on the shipped toy pair (= --experiment toy_opd_protocol; no second size)")
    parser.add_argument("--runs-dir", default=None,
                        help="run directories (fixed: resumable); <out>/runs, the record's archive of each finished "
                             "run's summary and metrics, rebuilds the report where the run directories are gone")
    parser.add_argument("--out", default=None, help="where the results go")
    parser.add_argument("--arms", nargs="*", default=None, choices=list(ARMS), help="default: the study's arms")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--no-second-size", action="store_true",
                        help="skip the second student size (keep_layers 10; 20 for letter counting)")
    parser.add_argument("--only-report", action="store_true", help="no runs: the report from what exists")
    args = parser.parse_args()
    global EXPERIMENT
    EXPERIMENT = "toy_opd_protocol" if args.toy else args.experiment
    if EXPERIMENT == "toy_opd_protocol":
        args.no_second_size = True
    record, default_arms, second_size = STUDIES[EXPERIMENT]
    args.arms = list(default_arms) if args.arms is None else args.arms
    SECOND_SIZE["keep_layers"] = second_size  # None: the study has no second size (no verdict row for one)
    if second_size is None:
        args.no_second_size = True
    root = ROOT / (args.runs_dir or f"logs/{EXPERIMENT}/study")
    out = ROOT / (args.out or record)
    if not args.only_report:
        cells = plan(args.arms, args.seeds, not args.no_second_size)
        log = sys.stdout
        started = time.time()
        for index, (arm, seed, overrides, tag) in enumerate(cells):
            seconds = run_cell(root, arm, seed, overrides, tag, log)
            status = "done before" if seconds is None else f"{seconds:.0f} s"
            if seconds is not None:  # kept in the record at once: a lost machine loses at most the running cell
                archive_run(run_dir(root, arm, seed, tag), out / "runs" / f"{arm}{tag}" / f"seed{seed}")
            print(f"  [{index + 1}/{len(cells)}] {arm}{tag} seed {seed}: {status} "
                  f"(study {time.time() - started:.0f} s so far)", file=log, flush=True)
    archive_runs(root, out)
    analysis = analyse(root, args.seeds)
    claims = verdicts(analysis)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(format_results(analysis, claims))
    (out / "results.json").write_text(json.dumps({"table": analysis["table"], "claims": claims}, indent=2,
                                                 default=str) + "\n")
    plot_curves(analysis, out)
    print(format_results(analysis, claims))
    print(f"wrote {out / 'results.md'}, results.json and the curves; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
