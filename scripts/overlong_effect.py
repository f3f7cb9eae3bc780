"""What does masking truncated rollouts (``trainer.overlong=mask``, DAPO's overlong filtering) change? Measured on the toy.

    python scripts/overlong_effect.py [--max-new-tokens 24] [--seeds 0 1 2] [--out DIR]

The toy default (GKD, lambda = 1, 400 steps) with a completion budget tight enough that many rollouts are cut before
EOS (toy solutions run to ~50 characters; the default budget is 64), once keeping the cut rollouts in the loss and
once masking them, over the same seeds. Finished runs are reused (their ``summary.json``). Writes
``overlong_toy.md`` / ``overlong_toy.json``: final accuracy (evaluated at the same budget), the share of rollouts cut,
the greedy EOS rate, and the verdict of mask vs keep (``opd.report.compare_arms``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.report import compare_arms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=24, help="a budget that cuts many toy rollouts")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="logs/overlong_effect")
    parser.add_argument("--out", default="experiments/2026-12-03_real_opd_protocol")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    for arm in ("keep", "mask"):
        for seed in args.seeds:
            run_dir = ROOT / args.runs_dir / f"budget{args.max_new_tokens}_{arm}" / f"seed{seed}"
            if not (run_dir / "summary.json").exists():
                command = [str(ROOT / ".venv" / "bin" / "opd-train"), f"sampler.max_new_tokens={args.max_new_tokens}",
                           f"trainer.overlong={arm}", f"seed={seed}", "trainer.num_threads=1", "trainer.progress=false",
                           f"output_dir={run_dir}"]
                print(" ".join(command[1:]), flush=True)
                subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            results.setdefault(arm, []).append(json.loads((run_dir / "summary.json").read_text()))
    accuracy = {arm: [s["student_accuracy_after"] for s in runs] for arm, runs in results.items()}
    comparison = compare_arms(accuracy["mask"], accuracy["keep"], eval_examples=results["keep"][0]["eval_examples"])
    lines = [f"Toy default (GKD, lambda = 1, 400 steps), sampler.max_new_tokens={args.max_new_tokens}, seeds "
             f"{args.seeds}; command: `python scripts/overlong_effect.py --max-new-tokens {args.max_new_tokens}`", "",
             "| trainer.overlong | accuracy after (%) per seed | mean | rollouts cut over the run (%) per seed | "
             "greedy EOS rate after (%) per seed | empty steps |", "|---|---|---|---|---|---|"]
    def per_seed(runs: list[dict], key: str) -> str:
        return ", ".join(f"{100 * run[key]:.1f}" for run in runs)

    for arm, runs in results.items():
        lines.append(f"| {arm} | {per_seed(runs, 'student_accuracy_after')} | {100 * sum(accuracy[arm]) / len(runs):.1f} | "
                     f"{per_seed(runs, 'rollout_truncated')} | {per_seed(runs, 'student_eos_rate_after')} | "
                     f"{', '.join(str(run.get('empty_steps', '-')) for run in runs)} |")
    lines += ["", f"mask − keep: {comparison.interval_text(100)} points: **{comparison.verdict_text(100, ' points')}**"]
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlong_toy.md").write_text("\n".join(lines) + "\n")
    (out / "overlong_toy.json").write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "seeds": args.seeds,
                                                       "accuracy": accuracy, "runs": results}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
