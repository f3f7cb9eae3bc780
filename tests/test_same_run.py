"""scripts/same_run.py: two runs are identical unless a trained value differs; time and path keys never count."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_run(run_dir: Path, losses: list[float], step_seconds: float, accuracy: float) -> Path:
    run_dir.mkdir(parents=True)
    rows = [{"step": i + 1, "train/loss": loss, "time/step_s": step_seconds, "train/tokens_per_s": 1 / step_seconds}
            for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "summary.json").write_text(json.dumps({"student_accuracy_after": accuracy, "wall_time_s": step_seconds,
                                                      "run_dir": str(run_dir), "checkpoint": str(run_dir / "c")}))
    return run_dir


def same_run(before: Path, after: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "same_run.py"), str(before), str(after)],
                          capture_output=True, text=True)


def test_runs_that_differ_only_in_time_and_paths_are_identical(tmp_path):
    result = same_run(write_run(tmp_path / "a", [0.5, 0.25], 0.1, 0.3), write_run(tmp_path / "b", [0.5, 0.25], 9.0, 0.3))
    assert result.returncode == 0 and "identical: 2 metric rows" in result.stdout


def test_a_loss_one_ulp_apart_and_a_changed_accuracy_are_each_reported(tmp_path):
    nudged = 0.25 + 2 ** -54  # the next float64 above 0.25: the promise on one machine is bit for bit
    result = same_run(write_run(tmp_path / "a", [0.5, 0.25], 0.1, 0.3), write_run(tmp_path / "b", [0.5, nudged], 0.1, 0.31))
    assert result.returncode == 1
    assert "row 1 (step 2) train/loss" in result.stdout and "summary student_accuracy_after" in result.stdout
    assert "2 differences" in result.stdout


def test_an_unfinished_run_is_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = same_run(tmp_path / "empty", write_run(tmp_path / "b", [0.5], 0.1, 0.3))
    assert result.returncode == 1 and "is not a finished run" in result.stderr and "Traceback" not in result.stderr
