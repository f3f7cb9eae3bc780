"""Per-file test time from pytest's JUnit XML, to see where a suite's minutes go and compare two runs.

Usage::

    .venv/bin/python -m pytest -q --junitxml=/tmp/after.xml
    python scripts/test_durations.py /tmp/after.xml                 # seconds per test file, slowest first
    python scripts/test_durations.py /tmp/before.xml /tmp/after.xml # the two side by side, with the change

With ``pytest -n 2`` the per-file sums are CPU-side test time over both workers, so they add up to about twice the
wall time; the "wall" row is pytest's own elapsed time of the run.
"""

from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET
from pathlib import Path


def per_file(path: Path) -> tuple[dict[str, float], float, int]:
    """({test file: summed seconds}, the run's wall seconds, number of test cases) of one JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals: dict[str, float] = collections.defaultdict(float)
    cases = 0
    for case in root.iter("testcase"):
        module = case.get("classname", "").split(".")
        name = next((f"{'/'.join(module[: i + 1])}.py" for i, part in enumerate(module) if part.startswith("test_")),
                    case.get("classname", "?"))
        totals[name] += float(case.get("time", 0.0))
        cases += 1
    wall = sum(float(s.get("time", 0.0)) for s in suites)
    return dict(totals), wall, cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="one JUnit XML report, or two (before, after)")
    parser.add_argument("--top", type=int, default=25, help="rows to print (default 25)")
    args = parser.parse_args()
    runs = [per_file(p) for p in args.reports[:2]]
    files = sorted({f for totals, _, _ in runs for f in totals}, key=lambda f: -max(t.get(f, 0.0) for t, _, _ in runs))
    header = " | ".join(f"{p.name} (s)" for p in args.reports[:2])
    print(f"| test file | {header} |{' change |' if len(runs) == 2 else ''}")
    print("|---|" + "---:|" * len(runs) + ("---:|" if len(runs) == 2 else ""))
    for f in files[: args.top]:
        cells = [runs_total.get(f, 0.0) for runs_total, _, _ in runs]
        change = f" {cells[1] - cells[0]:+.1f} |" if len(runs) == 2 else ""
        print(f"| {f} | " + " | ".join(f"{c:.1f}" for c in cells) + f" |{change}")
    rest = [sum(t.get(f, 0.0) for f in files[args.top:]) for t, _, _ in runs]
    print("| (other files) | " + " | ".join(f"{r:.1f}" for r in rest) + " |" + (" |" if len(runs) == 2 else ""))
    print("| **sum of test times** | " + " | ".join(f"{sum(t.values()):.1f}" for t, _, _ in runs) + " |"
          + (" |" if len(runs) == 2 else ""))
    print("| **wall (pytest)** | " + " | ".join(f"{w:.1f}" for _, w, _ in runs) + " |" + (" |" if len(runs) == 2 else ""))
    print("| tests | " + " | ".join(str(n) for _, _, n in runs) + " |" + (" |" if len(runs) == 2 else ""))


if __name__ == "__main__":
    main()
