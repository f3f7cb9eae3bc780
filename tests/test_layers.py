"""The package's layers (pyproject.toml's [tool.importlinter] contracts) and the registry's declared built-ins."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opd.registry import BUILTINS, OPTIONAL

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts over the ``opd`` package found under ``package_parent``."""
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, capture_output=True, text=True,
                          env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_the_layers_hold_and_no_module_imports_in_a_cycle():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("importer, imported, contract", [
    ("opd/types.py", "opd.engine.trainer", "layers"),  # the bottom layer importing the engine
    ("opd/losses/divergences.py", "opd.data.base", "layers"),  # one sibling of a layer importing another
    ("opd/engine/checkpoint.py", "opd.engine.trainer", "cycles"),  # trainer imports checkpoint: a cycle inside engine
])
def test_a_violating_import_breaks_a_contract(tmp_path, importer, imported, contract):
    shutil.copytree(ROOT / "opd", tmp_path / "opd", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    with open(tmp_path / importer, "a") as handle:
        handle.write(f"\nimport {imported}  # noqa: E402  (the violation under test)\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    broken = "opd's layers" if contract == "layers" else "no import cycles"
    # the report names the offending import (the cycle report relative to the package: ".checkpoint -> .trainer")
    assert broken in result.stdout and "BROKEN" in result.stdout and imported.rpartition(".")[2] in result.stdout


def test_the_declared_builtins_are_the_classes_their_modules_register():
    for registry, entries in BUILTINS.items():
        for name, target in entries.items():
            if name in OPTIONAL.get(registry, set()):
                continue
            module, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            assert registry.get(name) is cls and cls.registry_name == name, (registry.kind, name)
    # and every class a built-in package registers is declared (a new method needs its line in BUILTINS); classes
    # that tests register from their own modules (a stand-in teacher kind) are not built-ins
    import opd.data
    import opd.methods
    import opd.sampling
    import opd.teachers  # noqa: F401
    for registry, entries in BUILTINS.items():
        registered = {name for name in registry if name in entries or registry.get(name).__module__.startswith("opd.")}
        assert registered == set(entries), (registry.kind, registered ^ set(entries))
