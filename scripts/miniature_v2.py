"""The miniature table v2 and the papers' claims, checked one by one (issue 13). ``make table`` runs this.

1. Runs every *arm* × seed with ``opd-train experiment=miniature_v2``: the 14 methods at their tuned settings
   (``conf/tuned/toy/<method>.yaml``, from ``make tune``) and the extra arms the claims compare against (GKD at
   λ = 0 and at β = 0, 0.5, 1; DistiLLM with the skew α = 0, i.e. plain KL). Two runs at a time, one CPU thread each;
   a finished run (its ``summary.json`` exists) is never run again, so an interrupted call continues where it was.
2. Optionally (``--real``) the OPSD claim on the real model: SmolLM2-135M-Instruct distils itself, its teacher the
   initial model shown the worked answer in context (``conf/experiment/real_smollm2.yaml``'s task).
3. Writes the table (``opd-report`` over the 14 methods: ``report.md``, curves, small multiples), one curve figure per
   claim, and ``claims.md`` / ``claims.json``: each claim's arms, numbers per seed, the difference with its 95 %
   confidence interval, and a verdict (holds / does not hold / cannot be tested at this scale).

Usage::

    python scripts/miniature_v2.py                       # toy arms (~35 min on 2 cores), report, claims
    python scripts/miniature_v2.py --real                # also the real-model OPSD arm (~40 min more)
    python scripts/miniature_v2.py --runs-dir logs/miniature_v2/<time>   # continue, or only re-analyse
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.report import ReportError, Run, find_run_dirs, load_runs, make_report  # noqa: E402

TABLE_METHODS = ["sft", "kd", "seqkd", "gkd", "minillm", "distillm", "distillm2", "opsd", "eopd", "tm_opd", "tip",
                 "reopold", "aopd", "topk_rkl_sg"]
SEEDS = (0, 1, 2)
METRIC = "eval/accuracy"

#: arm -> opd-train overrides. The table's arms are the tuned methods; the claim arms change one setting of a tuned
#: method, everything else (lr included) as tuned.
ARMS: dict[str, list[str]] = {
    **{method: ["experiment=miniature_v2", f"tuned/toy={method}"] for method in TABLE_METHODS},
    "gkd_lambda0": ["experiment=miniature_v2", "tuned/toy=gkd", "method.lmbda=0"],
    "gkd_beta0": ["experiment=miniature_v2", "tuned/toy=gkd", "method.beta=0"],
    "gkd_beta0.5": ["experiment=miniature_v2", "tuned/toy=gkd", "method.beta=0.5"],
    "gkd_beta1": ["experiment=miniature_v2", "tuned/toy=gkd", "method.beta=1"],
    "distillm_kl": ["experiment=miniature_v2", "tuned/toy=distillm", "method.alpha=0"],
}
#: The real-model OPSD arm (conf/experiment/real_opsd.yaml): the full SmolLM2-135M-Instruct is the student, and the
#: teacher is its frozen step-0 copy shown a solved chat turn of the same problem.
REAL_ARMS: dict[str, list[str]] = {"real_opsd": ["experiment=real_opsd"]}


@dataclasses.dataclass
class Claim:
    """One paper claim as a comparison of arms.

    kind: ``final`` (accuracy after training, ``better`` − ``worse``), ``best_of`` (the best of ``better`` arms −
    ``worse``), ``steps`` (steps to reach a score: ``worse`` − ``better``, positive = ``better`` is faster) or
    ``gain`` (accuracy after − before of ``better``, paired per seed).
    """

    key: str
    text: str
    source: str
    kind: str
    better: list[str]
    worse: str | None = None
    #: OPSD: the model whose privileged view must know more than its plain view ("toy" or "real"), else the claim
    #: cannot be tested at this scale
    privileged_model: str | None = None


CLAIMS = [
    Claim("gkd_on_policy", "GKD: student-generated data (λ = 1) beats supervised data (λ = 0) at equal steps",
          "Agarwal et al., ICLR 2024 (arXiv:2306.13649), Sec. 4, Fig. 4", "final", ["gkd"], "gkd_lambda0"),
    Claim("gkd_beta", "GKD: the best β of the generalized JSD is not the forward-KL end (β = 0)",
          "Agarwal et al., ICLR 2024, Sec. 4 (divergence ablations)", "best_of", ["gkd_beta0.5", "gkd_beta1", "gkd"],
          "gkd_beta0"),
    Claim("minillm_vs_kd", "MiniLLM: reverse-KL distillation beats word-level KD",
          "Gu et al., ICLR 2024 (arXiv:2306.08543), Table 1", "final", ["minillm"], "kd"),
    Claim("minillm_vs_sft", "MiniLLM: reverse-KL distillation beats SFT",
          "Gu et al., ICLR 2024, Table 1", "final", ["minillm"], "sft"),
    Claim("distillm_speed", "DistiLLM: skew KL reaches a given score in fewer steps than KL",
          "Ko et al., ICML 2024 (arXiv:2402.03898), Sec. 3.1 and Fig. 5", "steps", ["distillm"], "distillm_kl"),
    Claim("opd_speed_tm", "On-policy distillation (sampled-token reverse KL) reaches a given score in fewer steps "
          "than SFT on teacher samples (SeqKD)", "Thinking Machines, 'On-Policy Distillation' (2025); surveyed in "
          "../shared/papers/", "steps", ["tm_opd"], "seqkd"),
    Claim("opd_speed_gkd", "On-policy distillation (full-vocabulary JSD, GKD λ = 1) reaches a given score in fewer "
          "steps than SeqKD", "Agarwal et al. 2024; the on-policy distillation reports surveyed in ../shared/papers/",
          "steps", ["gkd"], "seqkd"),
    Claim("opsd_toy", "OPSD: a teacher that knows the answer in context improves the student (toy model)",
          "Zhao et al., arXiv:2601.18734, Eq. 6", "gain", ["opsd"], privileged_model="toy"),
    Claim("opsd_real", "OPSD: a teacher that knows the answer in context improves the student (SmolLM2-135M)",
          "Zhao et al., arXiv:2601.18734, Eq. 6", "gain", ["real_opsd"], privileged_model="real"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where the runs go (default: a new logs/miniature_v2/<time>); an existing one is continued")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "2026-11-30_miniature_v2",
                   help="the record: report.md, plots, claims.md, claims.json")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one CPU thread)")
    p.add_argument("--real", action="store_true", help="also the real-model OPSD arm (3 seeds, ~40 min on 2 cores)")
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help="run only these arms (default: all; the analysis always reads every arm the runs dir holds)")
    p.add_argument("--analyse-only", action="store_true", help="run nothing; report on what --runs-dir holds")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- running


def run_one(arm: str, overrides: list[str], seed: int, runs_dir: Path) -> tuple[str, int, int, float]:
    """One ``opd-train`` run into ``runs_dir/<arm>/seed<seed>``; returns (arm, seed, exit code, seconds)."""
    run_dir = runs_dir / arm / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "opd-train"), *overrides, f"seed={seed}", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    with open(run_dir / "opd-train.log", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return arm, seed, code, time.perf_counter() - started


def run_arms(arms: dict[str, list[str]], runs_dir: Path, jobs: int) -> list[str]:
    """Every unfinished (arm, seed); returns the failed ones as ``arm/seed``."""
    todo = [(arm, overrides, seed) for arm, overrides in arms.items() for seed in SEEDS
            if not (runs_dir / arm / f"seed{seed}" / "summary.json").exists()]
    failed = []
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(todo), desc="runs", unit="run") as bar:
        futures = [pool.submit(run_one, arm, overrides, seed, runs_dir) for arm, overrides, seed in todo]
        for future in as_completed(futures):
            arm, seed, code, seconds = future.result()
            bar.update(1)
            if code != 0:
                failed.append(f"{arm}/seed{seed}")
                bar.write(f"  {arm} seed {seed}: FAILED (exit {code}); see {runs_dir / arm / f'seed{seed}'}/opd-train.log")
    return failed


# ---------------------------------------------------------------------------------------------- statistics


def finished_runs(arm_dir: Path) -> list[Run]:
    """The arm's finished runs (those with a summary.json); none when it was not run or was stopped early."""
    try:
        return load_runs(find_run_dirs([arm_dir])) if arm_dir.exists() else []
    except ReportError:
        return []


def final_accuracies(runs: list[Run]) -> list[float]:
    return [run.summary["student_accuracy_after"] for run in runs]


def steps_to_reach(run: Run, threshold: float, max_steps: int) -> tuple[int, bool]:
    """The first evaluated step whose accuracy is >= ``threshold``; (max_steps + 1, False) when it never is."""
    for step, value in sorted(run.metrics.get(METRIC, {}).items()):
        if value >= threshold:
            return step, True
    return max_steps + 1, False


def difference_interval(a: list[float], b: list[float], paired: bool = False) -> dict[str, Any]:
    """mean(a) − mean(b) with its 95 % Student-t confidence interval (Welch's for two arms; paired: the mean of
    a − b per seed), from ``scipy.stats``. A difference with zero spread gets a zero-width interval."""
    from scipy import stats

    # one arm without spread (e.g. every seed censored at the same step) makes scipy warn about precision; the
    # interval is still Welch's (its degrees of freedom come from the other arm alone)
    warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
    if paired:
        diffs = [x - y for x, y in zip(a, b)]
        mean = statistics.fmean(diffs)
        if len(set(diffs)) == 1:
            return {"diff": mean, "ci95": [mean, mean]}
        ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    else:
        mean = statistics.fmean(a) - statistics.fmean(b)
        if len(set(a)) == 1 and len(set(b)) == 1:
            return {"diff": mean, "ci95": [mean, mean]}
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return {"diff": mean, "ci95": [float(ci.low), float(ci.high)]}


def verdict(ci95: list[float]) -> str:
    """holds: the interval excludes 0 in the claimed direction; does not hold otherwise (reversed, or within noise)."""
    low, high = ci95
    if low == high == 0:
        return "does not hold (a tie: every seed of both arms reached it at the same evaluation)"
    if low > 0:
        return "holds"
    if high < 0:
        return "does not hold (reversed)"
    return "does not hold at this scale (difference within seed noise)"


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def evaluate_claim(claim: Claim, arms: dict[str, list[Run]]) -> dict[str, Any] | None:
    """The claim's numbers and verdict, or None when an arm has no runs."""
    names = claim.better + ([claim.worse] if claim.worse else [])
    if any(not arms.get(name) for name in names):
        return None
    result: dict[str, Any] = {"claim": claim.text, "source": claim.source, "kind": claim.kind,
                              "arms": {name: {"seeds": [run.summary["seed"] for run in arms[name]],
                                              "accuracy_after": final_accuracies(arms[name]),
                                              "accuracy_before": [r.summary["student_accuracy_before"] for r in arms[name]]}
                                       for name in names}}
    if claim.kind == "final":
        (better,) = claim.better
        stat = difference_interval(final_accuracies(arms[better]), final_accuracies(arms[claim.worse]))
        result["compared"] = f"{better} − {claim.worse}, accuracy after training (pp)"
    elif claim.kind == "best_of":
        means = {name: statistics.fmean(final_accuracies(arms[name])) for name in claim.better}
        best = max(means, key=means.get)
        stat = difference_interval(final_accuracies(arms[best]), final_accuracies(arms[claim.worse]))
        result["compared"] = (f"best β arm ({best}) − {claim.worse}, accuracy after (pp); the best arm is picked "
                              "from the same runs, which biases the difference upward")
        result["best_arm"] = best
    elif claim.kind == "steps":
        (better,) = claim.better
        finals = [statistics.fmean(final_accuracies(arms[name])) for name in (better, claim.worse)]
        threshold = 0.9 * min(finals)  # a score both arms reach on average: 90 % of the weaker arm's final accuracy
        max_steps = max(run.summary["steps"] for name in names for run in arms[name])
        reached = {name: [steps_to_reach(run, threshold, max_steps) for run in arms[name]] for name in names}
        for name in names:
            result["arms"][name]["steps_to_threshold"] = [step for step, _ in reached[name]]
            result["arms"][name]["reached"] = [ok for _, ok in reached[name]]
        stat = difference_interval([float(s) for s, _ in reached[claim.worse]], [float(s) for s, _ in reached[better]])
        result["threshold"] = threshold
        result["compared"] = (f"steps to reach {pct(threshold)} % (90 % of the weaker arm's final accuracy): "
                              f"{claim.worse} − {better} (positive = {better} is faster); a seed that never reaches it "
                              f"counts as {max_steps + 1}")
    else:  # gain
        (arm,) = claim.better
        after = final_accuracies(arms[arm])
        before = [run.summary["student_accuracy_before"] for run in arms[arm]]
        stat = difference_interval(after, before, paired=True)
        result["compared"] = f"{arm}: accuracy after − before (pp), paired per seed"
    scale = 1.0 if claim.kind == "steps" else 100.0
    result["difference"] = stat["diff"] * scale
    result["ci95"] = [value * scale for value in stat["ci95"]]
    result["verdict"] = verdict(stat["ci95"])
    return result


# ---------------------------------------------------------------------------------------------- OPSD precondition


def privileged_accuracy(overrides: list[str], limit: int | None = None) -> dict[str, float]:
    """The initial student's greedy accuracy on the eval prompts as the student sees them and as OPSD's teacher sees
    them (its template: the worked solution in context). OPSD can only teach what the second view knows."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from opd.config import register_configs
    from opd.train import build_trainer

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train", overrides=[*overrides, "trainer.progress=false", f"output_dir={tmp}"])
        trainer = build_trainer(cfg, tmp)
        examples = trainer.eval_examples[:limit] if limit else trainer.eval_examples
        trainer.eval_examples = examples
        plain = trainer.evaluate(trainer.student, "plain").accuracy
        trainer.eval_examples = [dataclasses.replace(ex, prompt=trainer.method.render(ex)) for ex in examples]
        privileged = trainer.evaluate(trainer.student, "privileged").accuracy
    return {"plain": plain, "privileged": privileged, "examples": len(examples)}


# ---------------------------------------------------------------------------------------------- writing


#: the privileged view must beat the plain one by this much (accuracy) for OPSD's claim to be testable
PRIVILEGED_MARGIN = 0.05


def apply_precondition(claim: Claim, result: dict[str, Any], precondition: dict[str, dict[str, float]]) -> None:
    """OPSD can only teach what its teacher's view knows: without a privileged view that beats the plain one by
    PRIVILEGED_MARGIN, the claim cannot be tested on this model (whatever the runs did)."""
    accuracy = precondition.get(claim.privileged_model) if claim.privileged_model else None
    if accuracy is None:
        return
    result["precondition"] = accuracy
    if accuracy["privileged"] - accuracy["plain"] < PRIVILEGED_MARGIN:
        result["verdict"] = (f"cannot be tested at this scale: the model does not use the answer in context "
                             f"(privileged {pct(accuracy['privileged'])} % vs plain {pct(accuracy['plain'])} %)")


def claims_markdown(results: dict[str, dict[str, Any]], precondition: dict[str, dict[str, float]]) -> str:
    lines = ["# The papers' claims at miniature scale", "",
             "Each claim is a comparison of arms of `scripts/miniature_v2.py` (3 seeds each; every arm at the tuned "
             "settings of its method, `conf/tuned/toy/`). Differences are in accuracy points (steps for speed claims) "
             "with Student-t 95 % confidence intervals over seeds (Welch's for two arms, paired for before/after). "
             "**holds** = the interval excludes 0 in the claimed direction.", "",
             "| claim | source | compared | difference [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for result in results.values():
        lines.append(f"| {result['claim']} | {result['source']} | {result['compared']} | "
                     f"{result['difference']:+.1f} [{result['ci95'][0]:+.1f}, {result['ci95'][1]:+.1f}] | "
                     f"**{result['verdict']}** |")
    lines += ["", "## Per seed", ""]
    for key, result in results.items():
        lines.append(f"**{key}**: " + "; ".join(
            f"{name}: after {', '.join(pct(v) for v in arm['accuracy_after'])} %"
            + (f", steps {arm['steps_to_threshold']}" if "steps_to_threshold" in arm else "")
            + (f", before {', '.join(pct(v) for v in arm['accuracy_before'])} %" if result["kind"] == "gain" else "")
            for name, arm in result["arms"].items()))
        lines.append("")
    if precondition:
        lines += ["## OPSD's precondition: does the teacher's view know more?", "",
                  "Greedy accuracy of the initial student on the eval prompts, as the student sees them and with "
                  "OPSD's privileged template (the worked solution in context):", "",
                  "| model | examples | plain prompt (%) | privileged prompt (%) |", "|---|---|---|---|"]
        models = {"toy": "toy student (`tuned/toy=opsd`)", "real": "SmolLM2-135M-Instruct (`experiment=real_opsd`)"}
        for name, acc in precondition.items():
            lines.append(f"| {models.get(name, name)} | {acc['examples']} | {pct(acc['plain'])} | "
                         f"{pct(acc['privileged'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs_dir = (args.runs_dir or ROOT / "logs" / "miniature_v2" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    arms = dict(ARMS, **(REAL_ARMS if args.real else {}))
    if args.arms:
        unknown = sorted(set(args.arms) - set(ARMS) - set(REAL_ARMS))
        if unknown:
            sys.exit(f"miniature_v2: unknown arms {unknown}; known: {', '.join([*ARMS, *REAL_ARMS])}")
        arms = {arm: overrides for arm, overrides in {**ARMS, **REAL_ARMS}.items() if arm in args.arms}
    missing = [m for m in TABLE_METHODS if not (ROOT / "conf" / "tuned" / "toy" / f"{m}.yaml").exists()]
    needed = sorted({o.split("=", 1)[1] for overrides in arms.values() for o in overrides if o.startswith("tuned/toy=")})
    if set(needed) & set(missing):
        sys.exit(f"miniature_v2: no tuned settings for {', '.join(sorted(set(needed) & set(missing)))}; "
                 "run `make tune` first")
    started = time.perf_counter()
    if not args.analyse_only:
        print(f"miniature_v2: {len(arms)} arms x {len(SEEDS)} seeds into {runs_dir}, {args.jobs} at a time")
        failed = run_arms(arms, runs_dir, args.jobs)
        if failed:
            print(f"miniature_v2: failed runs: {', '.join(failed)}", file=sys.stderr)
    wall_minutes = (time.perf_counter() - started) / 60
    if missing:  # the analysis needs the table
        print(f"miniature_v2: runs done in {wall_minutes:.1f} min; no analysis before every method is tuned")
        return

    args.out.mkdir(parents=True, exist_ok=True)
    table_dirs = [runs_dir / m for m in TABLE_METHODS if (runs_dir / m).exists()]
    _, table = make_report(table_dirs, args.out, group_by=["method.name"], metrics=[METRIC, "train/loss"])
    print(table)
    loaded = {arm: finished_runs(runs_dir / arm) for arm in {**ARMS, **REAL_ARMS}}
    for claim in CLAIMS:  # one curve figure per claim, its arms only
        names = [n for n in claim.better + ([claim.worse] if claim.worse else []) if loaded.get(n)]
        if names and claim.kind != "gain":
            make_report([runs_dir / n for n in names], args.out / "claims" / claim.key, metrics=[METRIC], smooth=1)
    precondition = {"toy": privileged_accuracy(ARMS["opsd"])}
    if args.real or (runs_dir / "real_opsd").exists():
        precondition["real"] = privileged_accuracy(REAL_ARMS["real_opsd"])
    results = {}
    for claim in CLAIMS:
        result = evaluate_claim(claim, loaded)
        if result is not None:
            apply_precondition(claim, result, precondition)
            results[claim.key] = result
    (args.out / "claims.json").write_text(json.dumps({"runs_dir": str(runs_dir), "claims": results,
                                                      "opsd_precondition": precondition,
                                                      "wall_minutes_this_call": round(wall_minutes, 1)}, indent=2) + "\n")
    (args.out / "claims.md").write_text(claims_markdown(results, precondition))
    print(f"miniature_v2: {len(results)} claims -> {args.out / 'claims.md'}; runs took {wall_minutes:.1f} min")


if __name__ == "__main__":
    main()
