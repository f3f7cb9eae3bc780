"""The ``opd-train`` command: help, clear one-line errors, and Hydra sweeps into separate directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def opd_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "opd.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def tiny_args(tiny_model_dirs):
    return [f"teacher.name_or_path={tiny_model_dirs['teacher']}", f"student.name_or_path={tiny_model_dirs['student']}",
            "debug=tiny", "trainer.num_threads=1", "data.num_train=64", "data.num_eval=16"]


def test_help_lists_methods_and_groups(tmp_path):
    out = opd_train("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "gkd" in out.stdout and "sft" in out.stdout and "method:" in out.stdout
    assert "Configuration groups" in out.stdout or "Compose your configuration" in out.stdout  # Hydra's part


@pytest.mark.parametrize(("override", "needle"), [
    ("trainer.lr=abc", "trainer.lr"),           # wrong type, caught by the typed schema
    ("trainer.lrr=1", "trainer.lrr"),           # misspelled key
    ("method=nope", "method/nope"),             # unknown method: Hydra lists the available ones
    ("teacher.name_or_path=/missing/teacher", "teacher.name_or_path: no model directory"),
])
def test_config_errors_are_short_and_name_the_key(tmp_path, tiny_args, override, needle):
    out = opd_train(*tiny_args, override, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_offline_hub_dataset_fails_with_a_clear_message(tmp_path, tiny_args):
    out = opd_train(*tiny_args[:-2], "data=gsm8k", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "could not load dataset 'openai/gsm8k'" in out.stderr and "Traceback" not in out.stderr


def test_sweep_runs_each_combination_into_its_own_directory(tmp_path, tiny_args):
    out = opd_train("-m", "method=gkd,sft", "seed=1,2", *tiny_args, "name=sweeptest", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summaries = sorted((tmp_path / "logs" / "sweeptest" / "multiruns").glob("*/*/summary.json"))
    assert len(summaries) == 4
    combos = {(json.loads(p.read_text())["method"], json.loads(p.read_text())["seed"]) for p in summaries}
    assert combos == {("gkd", 1), ("gkd", 2), ("sft", 1), ("sft", 2)}
    names = {p.parent.name for p in summaries}
    assert any("method=gkd" in n and "seed=1" in n for n in names) and all("/" not in n for n in names)
