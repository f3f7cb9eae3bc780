"""Which float settings move the pinned first steps on this machine, and by how much (issue 20).

Recomputes every pinned value of the test suite (the pitfall suite's ``PINNED`` and the teacher registry's
``PATH_PINS``: first-step loss and grad norm per method and loss path) in a fresh process under each setting that
changes the CPU kernels or their reduction order, and compares them with the pins and with the run under no setting.
A setting that moves a value at all shows that a bit-for-bit pin would fail there; the tests' ``PIN_RTOL`` must stay
far above the largest gap printed.

Usage::

    .venv/bin/python scripts/pin_drift.py                     # the four settings of issue 20 and the default
    .venv/bin/python scripts/pin_drift.py --setting OMP_NUM_THREADS=4 --setting ATEN_CPU_CAPABILITY=avx512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("ATEN_CPU_CAPABILITY=default", "ATEN_CPU_CAPABILITY=avx2", "OMP_NUM_THREADS=1", "OMP_NUM_THREADS=2")


def test_modules():
    """The two test modules that hold the pins (``tests/`` on the path, offline, as the suite runs them)."""
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import test_pitfalls
    import test_teacher_registry

    return test_pitfalls, test_teacher_registry


def pinned_values() -> dict[str, list[float]]:
    """{pin name: [loss, grad_norm]} recomputed in this process (``method`` or ``method/path``)."""
    import torch

    pitfalls, registry = test_modules()
    torch.set_num_threads(1)  # as the test suite does (tests/conftest.py)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in pitfalls.PINNED:
            out[name] = list(pitfalls.pinned_run(name, Path(tmp) / name))
        for key in registry.PATH_PINS:
            out[key] = list(registry.path_first_step(key, Path(tmp) / key.replace("/", "_")))
    return out


def pins() -> dict[str, tuple[float, float]]:
    """Every pinned first step, as the tests hold them."""
    pitfalls, registry = test_modules()
    return {**pitfalls.PINNED, **registry.PATH_PINS}


def run_under(setting: str | None) -> dict[str, list[float]]:
    env = dict(os.environ)
    if setting:
        key, _, value = setting.partition("=")
        env[key] = value
    proc = subprocess.run([sys.executable, __file__, "--child"], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pin_drift: the run under {setting or 'no setting'} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_gap(a: dict[str, list[float]], b: dict[str, tuple[float, float]] | dict[str, list[float]]) -> tuple[float, int]:
    """(largest relative gap over every value, number of values not bitwise equal)."""
    gaps = [abs(x - y) / max(abs(y), 1e-12) for k in a for x, y in zip(a[k], b[k])]
    return max(gaps), sum(g > 0 for g in gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", help="VAR=value to run under (repeatable); default: issue 20's four")
    parser.add_argument("--child", action="store_true", help="(internal) print this process's values as JSON")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(pinned_values()))
        return
    pinned = pins()
    base = run_under(None)
    values = len(base) * 2
    print(f"{len(base)} pinned first steps ({values} values); relative gaps; 'moved' = values not bitwise equal")
    print("| setting | vs pins: max gap | vs pins: moved | vs no setting: max gap | vs no setting: moved |")
    print("|---|---:|---:|---:|---:|")
    gap, moved = max_gap(base, pinned)
    print(f"| (none) | {gap:.1e} | {moved}/{values} | 0 | 0/{values} |")
    for setting in args.setting or SETTINGS:
        got = run_under(setting)
        gap, moved = max_gap(got, pinned)
        gap0, moved0 = max_gap(got, base)
        print(f"| {setting} | {gap:.1e} | {moved}/{values} | {gap0:.1e} | {moved0}/{values} |")


if __name__ == "__main__":
    main()
