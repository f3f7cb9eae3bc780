"""What the OPSD student writes: the completions each OPSD run logged at every evaluation (the first 8 held-out
problems, greedy), with the share that open with the teacher view's "===" delimiter. Writes opsd_samples.json.

    python experiments/2026-12-03_real_opd_finetuned_teacher/opsd_samples.py [--runs logs/real_opd_finetuned_teacher/study/opsd]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "logs/real_opd_finetuned_teacher/study/opsd")
    args = parser.parse_args()
    out: dict[str, dict[int, dict]] = {}
    for seed_dir in sorted(args.runs.glob("seed*")):
        by_step: dict[int, list[dict]] = defaultdict(list)
        for line in (seed_dir / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_step[row["step"]].append(row)
        out[seed_dir.name] = {step: {"completions": [r["completion"] for r in rows],
                                     "correct": sum(r["correct"] for r in rows), "logged": len(rows),
                                     "open_with_delimiter": sum(r["completion"].lstrip().startswith("==") for r in rows)}
                              for step, rows in sorted(by_step.items())}
    (HERE / "opsd_samples.json").write_text(json.dumps(out, indent=2) + "\n")
    for seed, steps in out.items():
        for step, row in steps.items():
            print(f"{seed} step {step}: {row['correct']}/{row['logged']} correct, {row['open_with_delimiter']} open with "
                  f"'==': {row['completions'][:3]}")
