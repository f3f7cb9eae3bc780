"""Every evaluation of every run of this record (finished ones in runs/, the interrupted one in unfinished/):
step, held-out accuracy (%), teacher RKL (nats/token). Run from this folder: python evaluations.py > evaluations.txt"""

import json
from pathlib import Path

for metrics in sorted(Path(".").glob("*/*/seed*/metrics.jsonl")):
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [(r["step"], round(100 * r["eval/accuracy"], 1), round(r.get("eval/teacher_rkl", float("nan")), 3))
             for r in rows if "eval/accuracy" in r]
    print(metrics.parent, evals)
