"""Do two runs of one config train identically? The check after a refactor that should move nothing.

Compares ``metrics.jsonl`` and ``summary.json`` of two run directories, row by row and key by key, leaving out what
measures time (``time/*``, ``*_per_s``, ``wall_time_s``) and where the run was written. Run the same config and seed
on one machine before and after the change: the promise is bit for bit there (one machine, one seed), so any
difference is printed.

Usage::

    python scripts/same_run.py logs/before logs/after     # exit 0: identical; 1: the differing values are listed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: keys that measure time or name a path: they differ between two identical runs
VOLATILE = ("time/", "_per_s", "wall_time_s", "checkpoint", "run_dir")


def volatile(key: str) -> bool:
    return any(part in key for part in VOLATILE)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def differences(before: Path, after: Path) -> list[str]:
    """Every differing (row, key) of the metrics and every differing summary key, as one line each."""
    found: list[str] = []
    old_rows, new_rows = rows(before), rows(after)
    if len(old_rows) != len(new_rows):
        found.append(f"metrics.jsonl: {len(old_rows)} rows vs {len(new_rows)}")
    for index, (old, new) in enumerate(zip(old_rows, new_rows)):
        for key in sorted(set(old) | set(new)):
            if not volatile(key) and old.get(key) != new.get(key):
                found.append(f"row {index} (step {old.get('step')}) {key}: {old.get(key)!r} vs {new.get(key)!r}")
    old_summary, new_summary = (json.loads((d / "summary.json").read_text()) for d in (before, after))
    for key in sorted(set(old_summary) | set(new_summary)):
        if not volatile(key) and old_summary.get(key) != new_summary.get(key):
            found.append(f"summary {key}: {old_summary.get(key)!r} vs {new_summary.get(key)!r}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    for run_dir in (args.before, args.after):
        if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "summary.json").is_file():
            sys.exit(f"same_run: {run_dir} is not a finished run (no metrics.jsonl / summary.json)")
    found = differences(args.before, args.after)
    compared = len(rows(args.before))
    if found:
        print(f"{len(found)} differences:\n" + "\n".join(found[:50]))
        sys.exit(1)
    print(f"identical: {compared} metric rows and the summary (time and path keys left out)")


if __name__ == "__main__":
    main()
