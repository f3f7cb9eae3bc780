"""Cluster and search plugins: the SLURM launcher config composes, an Optuna study really runs trials."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def opd_train(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "opd.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_slurm_launcher_config_composes(tmp_path):
    out = opd_train("hydra/launcher=opd_slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "SlurmLauncher" in out.stdout and "partition: gpu" in out.stdout and "gpus_per_node: 1" in out.stdout


def test_optuna_sweeper_runs_a_study_maximising_accuracy(tmp_path, tiny_model_dirs):
    out = opd_train("-m", "hydra/sweeper=opd_optuna", "hydra.sweeper.n_trials=2", "method.beta=interval(0,1)",
                    f"teacher.name_or_path={tiny_model_dirs['teacher']}", f"student.name_or_path={tiny_model_dirs['student']}",
                    "debug=tiny", "data.num_train=64", "data.num_eval=8", "name=optuna", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Best parameters: {'method.beta':" in out.stdout + out.stderr
    assert len(list((tmp_path / "logs" / "optuna" / "multiruns").glob("*/*/summary.json"))) == 2
