"""Finding, reading and grouping finished runs (``summary.json``, ``metrics.jsonl``, the resolved config)."""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from opd.config import flatten_config
from opd.errors import OPDError

PROG = "opd-report"
SUMMARY = "summary.json"
_UNSET = "(unset)"  # shown for a key a run's config does not have (e.g. method.beta for sft)
_IGNORED_KEYS = {"name", "output_dir", "run_dir", "trainer.resume"}
_IGNORED_LEAVES = {"output_dir", "run_dir", "dir", "log_dir", "logging_dir", "save_dir", "checkpoint", "checkpoints",
                   "checkpoint_dir", "resume"}
_COLUMNS = (  # (summary key, column header, kind)
    ("teacher_accuracy", "teacher acc. (%)", "pct"),
    ("student_accuracy_before", "student acc. before (%)", "pct"),
    ("student_accuracy_after", "student acc. after (%)", "pct"),
    ("tokens", "tokens", "int"),
    ("wall_time_s", "wall time (s)", "float"),
)


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def display_value(value: Any) -> str:
    """A value as a label shows it; an absolute path keeps its last two parts (``…/toy/teacher``), so that
    legends stay legible when runs differ by a model directory."""
    if isinstance(value, str):
        return "…/" + "/".join(Path(value).parts[-2:]) if value.startswith("/") and value.count("/") > 2 else value
    return json.dumps(value, default=str)


class ReportError(OPDError):
    """Nothing to report on, or an option that does not fit the runs; the CLI prints one line and exits 2."""


@dataclass
class Run:
    """One finished run, as read from its directory.

    Attributes:
        path: the run directory.
        summary: ``summary.json``.
        config: the resolved config flattened to dotted keys.
        metrics: metric name -> {step: value} from ``metrics.jsonl`` (the last value logged at a step wins).
        overrides: the dotted keys named in ``.hydra/overrides.yaml`` (empty outside Hydra).
    """

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


@dataclass
class Group:
    """Runs that share the values of the group keys (usually: the same configuration, different seeds)."""

    values: dict[str, Any]
    runs: list[Run]

    @property
    def label(self) -> str:
        """``key=value`` pairs joined by spaces, e.g. ``method.name=gkd method.beta=0.5``; unset keys left out."""
        pairs = [f"{key}={display_value(value)}" for key, value in self.values.items() if value != _UNSET]
        return " ".join(pairs or [f"{key}={_UNSET}" for key in self.values]) or "all runs"


# ---------------------------------------------------------------------------------------------- finding and reading


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a ``summary.json``, sorted and without duplicates.

    Raises:
        ReportError: a path does not exist, or none holds a run.
    """
    found: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise ReportError(f"no such file or directory: {str(path)!r}")
        found.update(p.parent.resolve() for p in path.rglob(SUMMARY) if p.is_file())  # rglob includes path itself
    if not found:
        raise ReportError(f"no run directories (with {SUMMARY}) under {', '.join(repr(str(p)) for p in paths)}")
    return sorted(found)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``.

    Raises:
        ReportError: it cannot be read or is not a JSON object.
    """
    try:
        summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"unreadable {SUMMARY} in {run_dir} ({err})") from err
    if not isinstance(summary, dict):
        raise ReportError(f"unreadable {SUMMARY} in {run_dir} (not a JSON object)")
    return summary


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``metrics.jsonl`` as metric -> {step: value}; malformed lines (e.g. cut by a kill) are skipped."""
    path = run_dir / "metrics.jsonl"
    metrics: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return metrics
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(key, {})[step] = float(value)
    return metrics


def read_config(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The flattened ``resolved_config.yaml``; without one, the method name and seed from the summary."""
    path = run_dir / "resolved_config.yaml"
    try:
        return flatten_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except Exception as err:  # noqa: BLE001 - missing or malformed YAML: fall back, with a warning
        warn(f"{run_dir}: no readable resolved_config.yaml ({type(err).__name__}); using method and seed from {SUMMARY}")
        return {"method.name": summary.get("method"), "seed": summary.get("seed")}


def read_overrides(run_dir: Path, config: dict[str, Any]) -> list[str]:
    """Dotted config keys set on the command line (``method=gkd`` -> ``method.name``, ``+a.b=1`` -> ``a.b``)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    except Exception:  # noqa: BLE001 - the overrides only order the label keys; ignore a bad file
        return []
    keys = []
    for override in overrides if isinstance(overrides, list) else []:
        key = str(override).split("=", 1)[0].lstrip("+~")
        keys += [k for k in (key, f"{key}.name") if k in config][:1]
    return keys


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """Read every run; a run whose summary cannot be read is skipped with a warning.

    Raises:
        ReportError: no run could be read.
    """
    runs = []
    for run_dir in run_dirs:
        try:
            summary = read_summary(run_dir)
        except ReportError as err:
            warn(f"skipping run: {err}")
            continue
        config = read_config(run_dir, summary)
        runs.append(Run(run_dir, summary, config, read_metrics(run_dir), read_overrides(run_dir, config)))
    if not runs:
        raise ReportError(f"none of the {len(run_dirs)} run directories has a readable {SUMMARY}")
    return runs


# ---------------------------------------------------------------------------------------------- grouping


def _canonical(value: Any) -> str:
    """A hashable, comparable form of a config value (lists and dicts included)."""
    return json.dumps(value, sort_keys=True, default=str)


def _value(run: Run, key: str) -> Any:
    return run.config.get(key, _UNSET)


def is_bookkeeping_key(key: str, seed_key: str) -> bool:
    """True for keys that differ between runs without describing what was run (seed, run dirs, names)."""
    leaf = key.rsplit(".", 1)[-1]
    return (key == seed_key or key in _IGNORED_KEYS or key.startswith("hydra.") or leaf in _IGNORED_LEAVES
            or leaf.endswith("_dir"))


def _is_run_specific(key: str, runs: Sequence[Run]) -> bool:
    """True when every run's value is a string that contains that run's own directory (a per-run path)."""
    def inside(run: Run) -> bool:
        value = run.config.get(key)
        homes = [str(run.path), *[d for d in [str(run.summary.get("run_dir", ""))] if Path(d).is_absolute()]]
        return isinstance(value, str) and any(home in value for home in homes)

    return all(inside(run) for run in runs)


def differing_keys(runs: Sequence[Run], seed_key: str) -> list[str]:
    """Config keys whose values are not the same in every run, bookkeeping keys excluded."""
    keys = sorted({key for run in runs for key in run.config})
    return [key for key in keys
            if len({_canonical(_value(run, key)) for run in runs}) > 1
            and not is_bookkeeping_key(key, seed_key) and not _is_run_specific(key, runs)]


def _blocks(runs: Sequence[Run], keys: Sequence[str]) -> int:
    """How many groups ``keys`` split ``runs`` into."""
    return len({tuple(_canonical(_value(run, key)) for key in keys) for run in runs})


def label_keys(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """The fewest of ``keys`` (greedily, preferred first) that split ``runs`` as finely as all of ``keys``.

    Preferred, and returned in this order: keys every run has (not e.g. ``method.beta``, which only
    some methods have), keys named in the overrides (in command-line order), ``*.name`` keys,
    shallow keys, then alphabetical.
    """
    overridden = list(dict.fromkeys(key for run in runs for key in run.overrides))
    ranked = sorted(keys, key=lambda k: (any(k not in run.config for run in runs),
                                         overridden.index(k) if k in overridden else len(overridden),
                                         k.rsplit(".", 1)[-1] != "name", k.count("."), k))
    target, chosen = _blocks(runs, keys), []
    for key in ranked:
        if _blocks(runs, chosen) == target:
            break
        if _blocks(runs, [*chosen, key]) > _blocks(runs, chosen):
            chosen.append(key)
    return chosen


def default_group_keys(runs: Sequence[Run], seed_key: str) -> list[str]:
    """The label keys of the swept configuration; ``method.name`` when only seeds (or nothing) differ."""
    keys = label_keys(runs, differing_keys(runs, seed_key))
    if not keys and all("method.name" in run.config for run in runs):
        return ["method.name"]
    return keys


def check_group_keys(runs: Sequence[Run], keys: Sequence[str]) -> None:
    """Raises ReportError for a ``--group-by`` key that no run's config has, with the closest known keys."""
    known = sorted({key for run in runs for key in run.config})
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ReportError(f"unknown --group-by key {key!r}: no run's config has it{hint}")


def _sort_key(value: Any) -> tuple:
    """Numbers numerically, then strings, then unset values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (2, 0.0, "") if value == _UNSET else (1, 0.0, _canonical(value))


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    """Runs grouped by their values of ``keys``, groups in natural order of those values, runs by seed."""
    groups: dict[str, Group] = {}
    for run in runs:
        values = {key: _value(run, key) for key in keys}
        groups.setdefault(_canonical(list(values.values())), Group(values, [])).runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (_sort_key(r.summary.get("seed")), str(r.path)))
    return sorted(groups.values(), key=lambda g: [_sort_key(v) for v in g.values.values()])


def warn_mixed_groups(groups: Sequence[Group], seed_key: str) -> None:
    """Warn about a group whose runs differ in more than the seed (possible with ``--group-by``)."""
    for group in groups:
        mixed = differing_keys(group.runs, seed_key)
        if mixed:
            warn(f"group {group.label!r} mixes runs that also differ in: {', '.join(mixed)}")


