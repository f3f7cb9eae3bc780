"""``opd-report``: find runs, group them, write ``report.md``, ``report.json`` and the plots."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opd.report.plots import write_plots
from opd.report.runs import (
    PROG,
    ReportError,
    check_group_keys,
    default_group_keys,
    find_run_dirs,
    group_runs,
    load_runs,
    warn_mixed_groups,
)
from opd.report.tables import build_report, format_markdown, format_table

# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or directories above them (sweeps, logs/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md, report.json and the plots go (default: the path given, or . for several)")
    parser.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                        help="config keys to group by (default: the keys that differ between runs, seed excluded)")
    parser.add_argument("--seed-key", default="seed", help="config key of the seed, never a group key (default: seed)")
    parser.add_argument("--metric", nargs="+", default=["eval/accuracy"], metavar="NAME",
                        help="metrics to plot vs step, one PNG each (default: eval/accuracy); train/loss is always plotted")
    parser.add_argument("--smooth", type=int, default=5, metavar="N",
                        help="moving-average window of the train/loss curve in steps; 1 = raw (default: 5)")
    parser.add_argument("--baseline", default=None, metavar="GROUP",
                        help="the group to compare every other with: its label or method (default: seqkd when one group "
                             "is SeqKD; 'none' for no comparisons)")
    return parser.parse_args(argv)


def make_report(paths: Sequence[Path], out_dir: Path, group_by: Sequence[str] | None = None, seed_key: str = "seed",
                metrics: Sequence[str] = ("eval/accuracy",), smooth: int = 5,
                baseline: str | None = None) -> tuple[dict[str, Any], str]:
    """Find, read and group the runs below ``paths``; write report.md, report.json and the plots into ``out_dir``.

    Returns:
        (the report.json content, the markdown table).

    Raises:
        ReportError: no runs, no readable run, a ``group_by`` key no run has, or a ``baseline`` that names no group.
    """
    runs = load_runs(find_run_dirs(paths))
    if group_by:
        check_group_keys(runs, group_by)
    keys = list(group_by) if group_by else default_group_keys(runs, seed_key)
    groups = group_runs(runs, keys)
    warn_mixed_groups(groups, seed_key)
    data = build_report(runs, groups, keys, seed_key, baseline)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(groups, metrics, smooth, out_dir)
    data["plots"] = [path.name for path in plots]
    return data, write_report(data, out_dir)


def write_report(data: dict[str, Any], out_dir: Path) -> str:
    """Write ``report.json`` and ``report.md`` (its plots: ``data["plots"]``, already in ``out_dir``); returns the table."""
    table = format_table(data)
    plots = [out_dir / name for name in data.get("plots", [])]
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(format_markdown(data, table, plots, out_dir), encoding="utf-8")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``opd-report``: prints the table; returns 0, or 2 after a one-line error."""
    args = parse_args(argv)
    out_dir = args.out or (args.paths[0] if len(args.paths) == 1 else Path.cwd())
    try:
        data, table = make_report(args.paths, out_dir, args.group_by, args.seed_key, args.metric, args.smooth,
                                  args.baseline)
    except ReportError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"{PROG}: {data['num_runs']} runs in {len(data['groups'])} groups; wrote report.md, report.json"
          f"{''.join(', ' + name for name in data['plots'])} to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
