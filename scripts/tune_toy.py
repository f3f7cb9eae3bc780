"""Give every method its best settings for the miniature table: one Optuna study per method (issue 13).

Each study is a Hydra multirun of ``opd-train -m experiment=toy_tune`` with the project's Optuna sweeper
(``conf/hydra/sweeper/opd_optuna.yaml``). A trial trains the toy student for the table's 200 steps and is
scored by its greedy accuracy on a validation split of fresh problems (``trainer.evaluate_on=validation``),
so the evaluation split that the table reports is never read while tuning. The search spans the learning
rate and, where a method has one, its most sensitive knob (``SEARCH_SPACES``).

Outputs:
    conf/tuned/toy/<method>.yaml   the chosen values, with the study that chose them (``experiment=miniature_v2``
                                   applies them)
    <record>/tuning.md, tuning.json  every trial of every study

Usage::

    python scripts/tune_toy.py                      # every method, two studies at a time (~40 min on 2 cores)
    python scripts/tune_toy.py --methods gkd kd     # some methods
    python scripts/tune_toy.py --collect logs/toy_tune/studies/<time>   # rewrite the outputs from finished studies
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
LR_RANGE = "tag(log, interval(1e-4, 1e-2))"  # two decades around the toy default 1e-3
LR_GRID = "choice(1e-4, 3e-4, 1e-3, 3e-3, 1e-2)"  # the same two decades in half-decade steps

#: method -> {override key: Optuna search expression}. The learning rate for all; the one knob the issue names where a
#: method has it: β for GKD, the skew α for DistiLLM, the PPO clip ε for the clipped policy-gradient methods, and the
#: retention ratio ρ for TIP. tm_opd's and AOPD's policy-gradient terms have no clip in their papers, and scaling
#: their advantage only rescales a gradient that AdamW normalises, so they search the learning rate alone.
SEARCH_SPACES: dict[str, dict[str, str]] = {
    "sft": {"trainer.lr": LR_RANGE},
    "kd": {"trainer.lr": LR_RANGE},
    "seqkd": {"trainer.lr": LR_RANGE},
    "rs_seqkd": {"trainer.lr": LR_RANGE},
    "gkd": {"trainer.lr": LR_RANGE, "method.beta": "interval(0, 1)"},
    "minillm": {"trainer.lr": LR_RANGE, "method.clip_eps": "interval(0.05, 0.5)"},
    "distillm": {"trainer.lr": LR_RANGE, "method.alpha": "interval(0, 0.5)"},
    "distillm2": {"trainer.lr": LR_RANGE},
    "opsd": {"trainer.lr": LR_RANGE},
    "eopd": {"trainer.lr": LR_RANGE, "method.clip_eps": "interval(0.05, 0.5)"},
    "tm_opd": {"trainer.lr": LR_RANGE},
    "tip": {"trainer.lr": LR_RANGE, "method.rho": "interval(0.1, 1)"},
    "reopold": {"trainer.lr": LR_RANGE, "method.clip_eps": "interval(0.05, 0.5)"},
    "aopd": {"trainer.lr": LR_RANGE},
    "topk_rkl_sg": {"trainer.lr": LR_RANGE},
    "uld": {"trainer.lr": LR_RANGE},
    "alm": {"trainer.lr": LR_RANGE},
    "sdft": {"trainer.lr": LR_RANGE},
    "sdpo": {"trainer.lr": LR_RANGE},
}
#: How a study searches, by the number of searched parameters. The learning rate alone: Optuna's grid sampler over
#: LR_GRID (5 trials; 5 random draws could leave a half-decade empty). With a knob: TPE (seed 0) from 4 random
#: start-up trials, 8 trials in all.
STUDY_SETTINGS = {
    1: ["hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=5"],
    2: ["hydra.sweeper.sampler.seed=0", "hydra.sweeper.sampler.n_startup_trials=4", "hydra.sweeper.n_trials=8"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(SEARCH_SPACES), choices=list(SEARCH_SPACES),
                   help="methods to tune (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="studies run at once (each trial uses one CPU thread)")
    p.add_argument("--trials", type=int, default=None, help="trials per study (default: 5 for lr only (a grid), 8 with a knob)")
    p.add_argument("--collect", type=Path, default=None, help="only rewrite the outputs from this finished studies dir")
    p.add_argument("--studies-dir", type=Path, default=None,
                   help="continue in this studies dir: a method whose study finished there is not searched again")
    p.add_argument("--record", type=Path, default=ROOT / "experiments" / "2026-11-30_miniature_v2",
                   help="where tuning.md and tuning.json go")
    p.add_argument("--tuned-dir", type=Path, default=ROOT / "conf" / "tuned" / "toy", help="where <method>.yaml goes")
    p.add_argument("overrides", nargs="*", help="extra opd-train overrides for every trial (e.g. trainer.max_steps=50)")
    return p.parse_args(argv)


def run_study(method: str, studies_dir: Path, trials: int | None, overrides: list[str]) -> tuple[str, int, float]:
    """One Optuna study as an ``opd-train -m`` multirun; returns (method, exit code, seconds)."""
    space = dict(SEARCH_SPACES[method])
    settings = STUDY_SETTINGS[len(space)]
    if len(space) == 1:
        space["trainer.lr"] = LR_GRID
    command = [str(Path(sys.executable).parent / "opd-train"), "-m", "experiment=toy_tune", f"method={method}",
               *settings, *([f"hydra.sweeper.n_trials={trials}"] if trials else []),
               f"hydra.sweep.dir={studies_dir / method}", *(f"{key}={value}" for key, value in space.items()), *overrides]
    (studies_dir / method).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(studies_dir / f"{method}.log", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return method, code, time.perf_counter() - started


def read_trials(study_dir: Path, space: dict[str, str]) -> list[dict]:
    """Every finished trial of a study: its searched values, validation accuracy and wall time."""
    trials = []
    for summary_path in sorted(study_dir.glob("*/summary.json"), key=lambda p: int(p.parent.name.split("_")[0])):
        summary = json.loads(summary_path.read_text())
        overrides = yaml.safe_load((summary_path.parent / ".hydra" / "overrides.yaml").read_text())
        params = {}
        for item in overrides:
            key, _, value = item.partition("=")
            if key in space:
                params[key] = float(value)
        trials.append({"trial": int(summary_path.parent.name.split("_")[0]), "params": params,
                       "validation_accuracy": summary["student_accuracy_after"],
                       "evaluated_on": summary.get("evaluated_on"), "wall_time_s": summary["wall_time_s"]})
    return trials


def round_value(key: str, value: float) -> float:
    """3 significant digits for the learning rate, 3 decimals for a knob in [0, 1]."""
    if key == "trainer.lr":
        return float(f"{value:.3g}")
    return round(value, 3)


def write_tuned_config(method: str, best: dict, trials: list[dict], study_dir: Path, tuned_dir: Path) -> Path:
    """``conf/tuned/toy/<method>.yaml``: the method and its chosen values, each with the search that chose it."""
    tuned_dir.mkdir(parents=True, exist_ok=True)
    space = SEARCH_SPACES[method]
    lines = ["# @package _global_",
             f"# {method} at its best settings for the miniature table (conf/experiment/miniature_v2.yaml).",
             f"# Chosen by scripts/tune_toy.py: an Optuna study of {len(trials)} trials "
             f"({'a grid' if len(space) == 1 else 'TPE, seed 0'}), 200 steps, training seed 0,",
             f"# scored on the fresh validation split (489 problems; never the eval split); best validation accuracy "
             f"{100 * best['validation_accuracy']:.1f} % (trial {best['trial']}).",
             f"# Study: {study_dir.relative_to(ROOT) if study_dir.is_relative_to(ROOT) else study_dir}",
             "defaults:", f"  - override /method: {method}"]
    sections: dict[str, list[str]] = {}
    for key, expression in space.items():
        expression = LR_GRID if len(space) == 1 else expression  # a learning-rate-only study searches the grid
        section, _, name = key.partition(".")
        value = round_value(key, best["params"][key])
        sections.setdefault(section, []).append(f"  {name}: {value}  # searched over {expression}")
    for section in ("trainer", "method"):
        if section in sections:
            lines += [f"{section}:", *sections[section]]
    path = tuned_dir / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def format_params(params: dict[str, float]) -> str:
    return ", ".join(f"{key.split('.')[-1]}={round_value(key, value):g}" for key, value in params.items())


def collect(studies_dir: Path, methods: list[str], record: Path, tuned_dir: Path) -> None:
    """Write the tuned configs and the tuning record from finished studies."""
    record.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []
    for method in methods:
        trials = read_trials(studies_dir / method, SEARCH_SPACES[method])
        if not trials:
            print(f"tune_toy: no finished trial for {method} in {studies_dir / method}; skipped", file=sys.stderr)
            continue
        best = max(trials, key=lambda t: t["validation_accuracy"])  # the first of equal bests, as Optuna's best_trial
        write_tuned_config(method, best, trials, studies_dir / method, tuned_dir)
        accuracies = [t["validation_accuracy"] for t in trials]
        results[method] = {"space": SEARCH_SPACES[method], "best": best, "trials": trials}
        rows.append(f"| {method} | {format_params(best['params'])} | {100 * best['validation_accuracy']:.1f} | "
                    f"{100 * min(accuracies):.1f}–{100 * max(accuracies):.1f} | {len(trials)} | "
                    f"{sum(t['wall_time_s'] for t in trials) / 60:.1f} |")
    (record / "tuning.json").write_text(json.dumps({"studies_dir": str(studies_dir), "results": results}, indent=2) + "\n")
    lines = ["# Per-method tuning (scripts/tune_toy.py)", "",
             f"Studies: `{studies_dir.relative_to(ROOT) if studies_dir.is_relative_to(ROOT) else studies_dir}`. "
             "Validation accuracy (%) of the toy student after 200 steps, seed 0, on the fresh validation split "
             "(`data.num_validation=600`: 489 problems once those seen in train or eval are dropped).", "",
             "| method | chosen | best val. acc. | range over trials | trials | train minutes |", "|---|---|---|---|---|---|",
             *rows, "", "## Every trial", ""]
    for method, result in results.items():
        space = {"trainer.lr": LR_GRID} if len(result["space"]) == 1 else result["space"]
        sampler = "grid" if len(result["space"]) == 1 else "TPE, seed 0, 4 random start-up trials"
        lines.append(f"**{method}** ({sampler}: {', '.join(f'`{k}={v}`' for k, v in space.items())})")
        lines.append("")
        for trial in sorted(result["trials"], key=lambda t: -t["validation_accuracy"]):
            lines.append(f"- trial {trial['trial']}: {format_params(trial['params'])} → "
                         f"{100 * trial['validation_accuracy']:.1f} %")
        lines.append("")
    (record / "tuning.md").write_text("\n".join(lines))
    print(f"tune_toy: wrote {tuned_dir}/<method>.yaml for {len(results)} methods and {record / 'tuning.md'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.collect is not None:
        collect(args.collect.resolve(), args.methods, args.record, args.tuned_dir)
        return
    studies_dir = (args.studies_dir or ROOT / "logs" / "toy_tune" / "studies" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    studies_dir = studies_dir.resolve()
    todo = [m for m in args.methods if not (studies_dir / m / "optimization_results.yaml").exists()]
    print(f"tune_toy: {len(todo)} studies ({len(args.methods) - len(todo)} already finished), {args.jobs} at a time, "
          f"in {studies_dir} (logs: <method>.log)")
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc="studies", unit="study") as bar:
        futures = [pool.submit(run_study, m, studies_dir, args.trials, args.overrides) for m in todo]
        for future in futures:
            method, code, seconds = future.result()
            bar.update(1)
            bar.write(f"  {method}: {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds / 60:.1f} min")
            if code != 0:
                failed.append(method)
    collect(studies_dir, args.methods, args.record, args.tuned_dir)
    if failed:
        sys.exit(f"tune_toy: studies failed: {', '.join(failed)}; see {studies_dir}/<method>.log")


if __name__ == "__main__":
    main()
