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
    ("method.betaa=1", "unknown config key 'method.betaa'"),  # a key of the chosen method (Hydra: 5 lines)
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


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one line a failed start prints on stderr (no traceback, no Hydra hint)."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("opd-train: error: "), out.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(("args", "needles"), [
    # a group declared `optional` skipped a missing choice silently: the default run started
    (["experiment=nope"], ["unknown experiment 'nope'", "available: distillm_gpt2-xl", "toy_table"]),
    (["debug=nope"], ["unknown debug 'nope'", "available: tiny"]),
    (["-m", "seed=1,2", "experiment=toy_table,nope"], ["unknown experiment 'nope'", "toy_table"]),  # before any job
    # `+` adds keys past the typed schema: a TypeError traceback, or (top level) silently ignored
    (["+trainer.lrr=1"], ["unknown config key 'trainer.lrr' (did you mean 'trainer.lr'?)",
                          "valid keys of trainer: adam_beta1, adam_beta2, batch_size,"]),
    (["trainer.lrr=1"], ["unknown config key 'trainer.lrr'", "valid keys of trainer: "]),  # Hydra: 7 lines
    (["+foo=1"], ["unknown config key 'foo'", "valid top-level keys: data, debug, deepspeed, experiment,"]),
    # a key of the chosen method, sampler or data class: Hydra printed 5 lines for the one without `+`
    (["method.betaa=1"], ["unknown config key 'method.betaa' (did you mean 'method.beta'?)",
                          "valid keys of method 'gkd': beta, lmbda, name,"]),
    (["method=sft", "method.beta=0.5"], ["unknown config key 'method.beta'; valid keys of method 'sft': "]),
    (["experiment=real_smollm2", "method.lmbdaa=1"], ["'method.lmbdaa' (did you mean 'method.lmbda'?)"]),
    (["sampler.temprature=1"], ["unknown config key 'sampler.temprature'", "valid keys of sampler 'auto': "]),
    (["-m", "method=gkd,sft", "method.beta=0.5"], ["unknown config key 'method.beta'; valid keys of method 'sft'"]),
])
def test_typos_in_overrides_stop_with_one_line_and_no_run_directory(tmp_path, tiny_args, args, needles, monkeypatch,
                                                                    capsys):
    """``opd-train``'s entry point in this process (a process launch per case cost ~3 s; the launched command line is
    checked by test_config_errors_are_short_and_name_the_key): the check stops the run before Hydra starts."""
    import opd.train

    def hydra_started():
        raise AssertionError("the command line's check let the typo through to Hydra")

    flags = [a for a in args if a.startswith("-")]
    monkeypatch.setattr(opd.train, "_hydra_main", hydra_started)
    monkeypatch.setattr(sys, "argv", ["opd-train", *flags, *tiny_args, *[a for a in args if not a.startswith("-")]])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_code:
        opd.train.main()
    err = capsys.readouterr().err
    line = error_line(subprocess.CompletedProcess(args, exit_code.value.code, "", err))
    assert all(needle in line for needle in needles), line
    assert not (tmp_path / "logs").exists()  # stopped before Hydra made a run directory


@pytest.mark.parametrize(("override", "needle"), [
    ("+foo=1", "unknown config key 'foo'; valid top-level keys: "),
    ("+trainer.lrr=1", "unknown config key 'trainer.lrr' (did you mean 'trainer.lr'?); valid keys of trainer: "),
    ("+deepspeed.foo=1", "unknown config key 'deepspeed.foo'; valid keys of deepspeed: "),
    ("+logger.foo=1", "unknown config key 'logger.foo'; valid keys of logger: "),
    ("+teacher.foo=1", "unknown config key 'teacher.foo'; valid keys of teacher: "),
    ("+student.foo=1", "unknown config key 'student.foo'; valid keys of student: "),
    ("+sampler.foo=1", "unknown config key 'sampler.foo'; valid keys of sampler 'auto': "),
    ("+data.foo=1", "unknown config key 'data.foo'; valid keys of data 'arithmetic': "),
    ("+method.betaa=1", "unknown config key 'method.betaa' (did you mean 'method.beta'?); valid keys of method 'gkd': "),
])
def test_added_keys_fail_the_start_up_checks_with_one_line(compose_cfg, override, needle):
    """The same keys in a config composed without the command line's check (compose API, other config dirs)."""
    from opd.errors import ConfigError
    from opd.train import build_trainer

    with pytest.raises(ConfigError) as err:
        build_trainer(compose_cfg(override))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_failed_start_leaves_no_run_directory(tmp_path, tiny_args):
    """Hydra makes the run directory before the start-up checks run; a failed start removes it again."""
    out = opd_train(*tiny_args, "trainer.resume=/nonexistent/run", cwd=tmp_path)
    assert "trainer.resume: no run directory or checkpoint at '/nonexistent/run'" in error_line(out)
    assert not (tmp_path / "logs").exists()
    # in a sweep the failed job's directory goes; the sweep's multirun.yaml stays (other jobs may be starting)
    out = opd_train("-m", *tiny_args, "name=failsweep", "seed=1,2", "trainer.resume=/nonexistent/run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "logs").rglob("*") if not p.is_dir())
    assert len(files) == 1 and files[0].startswith("logs/failsweep/multiruns/") and files[0].endswith("/multirun.yaml")
    assert [p.name for p in (tmp_path / "logs").rglob("*") if p.is_dir()] == ["failsweep", "multiruns",
                                                                              Path(files[0]).parent.name]


def test_only_hydra_only_directories_are_removed(tmp_path, monkeypatch):
    """``_remove_hydra_only_dir`` drops ``.hydra/`` + job log (and parents left empty, up to the working
    directory), and keeps a directory with anything else in it, the working directory and its parents."""
    from opd.train import _remove_hydra_only_dir

    monkeypatch.chdir(tmp_path)
    failed, finished = tmp_path / "logs/x/runs/t1", tmp_path / "logs/x/runs/t2"
    for run in (failed, finished):
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra/config.yaml").write_text("seed: 0\n")
        (run / "train.log").write_text("")
    (finished / "resolved_config.yaml").write_text("seed: 0\n")
    _remove_hydra_only_dir(finished)
    assert (finished / "resolved_config.yaml").exists()
    _remove_hydra_only_dir(failed)
    assert not failed.exists() and (tmp_path / "logs/x/runs").is_dir()  # a parent that is not empty stays
    (finished / "resolved_config.yaml").unlink()
    _remove_hydra_only_dir(finished)
    assert not (tmp_path / "logs").exists() and tmp_path.is_dir()  # empty parents go, up to the working directory
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "train.log").write_text("")
    _remove_hydra_only_dir(tmp_path)  # the working directory itself (hydra.run.dir=.) is never removed
    _remove_hydra_only_dir(tmp_path.parent)
    assert (tmp_path / ".hydra").is_dir() and (tmp_path / "train.log").exists()
