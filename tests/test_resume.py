"""Runs survive kills: SIGKILL mid-run then resume gives the uninterrupted result; SIGTERM checkpoints first. Both also
with asynchronous rollouts (``trainer.max_staleness``), whose rollouts in flight are checkpointed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opd.engine.checkpoint import latest_valid_checkpoint, list_checkpoints
from opd.train import run


def launch(tiny_model_dirs, out: Path, *extra: str) -> subprocess.Popen:
    args = [f"teacher.name_or_path={tiny_model_dirs['teacher']}", f"student.name_or_path={tiny_model_dirs['student']}",
            "debug=tiny", "trainer.num_threads=1", "data.num_train=64", "data.num_eval=16", "trainer.max_steps=10",
            "trainer.save_every=2", "trainer.keep_checkpoints=10", "trainer.eval_every=5", "trainer.batch_size=4",
            f"output_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "opd.train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (out / "checkpoints" / f"step_{step:06d}" / "COMPLETE").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def in_flight_steps(checkpoint: Path) -> list[int]:
    """The steps whose rollouts a checkpoint holds ahead of time (``trainer.max_staleness``), or []."""
    path = checkpoint / "in_flight_rank0.pt"
    return sorted(torch.load(path, weights_only=True)) if path.exists() else []




# async is slow-marked (~40 s, three launches with rollout workers): make test keeps exact resume (sync) and the
# in-flight rollouts in the checkpoint (test_sigterm_saves_a_checkpoint_before_exiting[async]). lora: a LoRA student
# (issue 24) resumes its adapter and the adapter's optimizer state exactly; slow-marked too (~35 s, three launches):
# make test keeps that check in process (test_a_lora_student_resumes_its_adapter_and_optimizer_state_exactly)
@pytest.mark.parametrize("staleness, student", [(0, ()), pytest.param(0, ("student.lora.r=4",), marks=pytest.mark.slow),
                                                pytest.param(2, (), marks=pytest.mark.slow)], ids=["sync", "lora", "async"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dirs, tmp_path, staleness, student):
    settings = (f"trainer.max_staleness={staleness}", *student)
    full = launch(tiny_model_dirs, tmp_path / "full", *settings)
    assert full.wait(timeout=300) == 0, full.stderr.read()

    killed = launch(tiny_model_dirs, tmp_path / "killed", *settings)
    wait_for_checkpoint(tmp_path / "killed", 4, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    checkpoint = list_checkpoints(tmp_path / "killed")[-1]
    step = int(checkpoint.name.split("_")[1])
    assert in_flight_steps(checkpoint) == list(range(step, min(step + staleness, 10)))

    resumed = launch(tiny_model_dirs, tmp_path / "killed", *settings, "trainer.resume=auto")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out

    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "steps", "tokens"):
        assert a[key] == b[key], key
    # bitwise-equal final weights on CPU
    wa = torch.load(Path(a["checkpoint"]) / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    wb = torch.load(Path(b["checkpoint"]) / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    for key in wa:
        assert torch.equal(wa[key]["exp_avg"], wb[key]["exp_avg"])
    # metrics.jsonl holds each step once, in order, with the uninterrupted run's batches (the same losses, tokens and,
    # asynchronously, the same policy versions)
    rows = {kind: [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line] for kind in ("full", "killed")}
    assert [row["step"] for row in rows["killed"]] == list(range(1, 11))
    keys = ("train/loss", "train/tokens") + (("rollout/policy_version",) if staleness else ())
    for x, y in zip(rows["full"], rows["killed"]):
        assert [x[k] for k in keys] == [y[k] for k in keys], x["step"]


# lora is slow-marked (~13 s, a launch): the signal path is the sync one; what a LoRA checkpoint holds and that it resumes
# exactly are checked in process (test_a_lora_student_resumes_its_adapter_and_optimizer_state_exactly, tests/test_lora.py)
@pytest.mark.parametrize("staleness, student", [(0, ()), pytest.param(0, ("student.lora.r=4",), marks=pytest.mark.slow),
                                                (2, ())], ids=["sync", "lora", "async"])
def test_sigterm_saves_a_checkpoint_before_exiting(tiny_model_dirs, tmp_path, staleness, student):
    proc = launch(tiny_model_dirs, tmp_path / "run", "trainer.max_steps=1000", "trainer.save_every=0",
                  f"trainer.max_staleness={staleness}", *student)
    deadline = time.time() + 120
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err and "trainer.resume=" in err
    checkpoint = latest_valid_checkpoint(tmp_path / "run")
    step = int(checkpoint.name.split("_")[1])
    assert in_flight_steps(checkpoint) == list(range(step, step + staleness))  # the worker's rollouts, kept


def test_a_lora_student_resumes_its_adapter_and_optimizer_state_exactly(compose_cfg, tmp_path):
    """A LoRA student (issue 24), in this process: four steps in one go, or two, a checkpoint, and two more in a new
    trainer restored from it give the same losses and token counts, bit-for-bit the same adapter and the same AdamW
    moments (one machine, one seed); the checkpoint holds the adapter, not the model."""
    from opd.models.lora import adapter_tensors
    from opd.train import build_trainer

    common = ("student.lora.r=4", "data.num_train=64", "data.num_eval=16", "trainer.batch_size=4",
              "trainer.max_steps=4", "trainer.keep_checkpoints=5")

    def steps(trainer, n: int) -> list[tuple[float, float]]:
        return [(m["train/loss"], m["train/tokens"]) for m in (trainer.train_step() for _ in range(n))]

    straight = build_trainer(compose_cfg(*common, f"output_dir={tmp_path / 'straight'}"))
    want = steps(straight, 4)
    first = build_trainer(compose_cfg(*common, f"output_dir={tmp_path / 'first'}"))
    got = steps(first, 2)
    checkpoint = first.save()
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    second = build_trainer(compose_cfg(*common, f"output_dir={tmp_path / 'second'}"))
    second.restore(checkpoint)
    assert second.step == 2
    got += steps(second, 2)
    assert got == want and straight.step == second.step == 4
    adapters = dict(adapter_tensors(straight.student))
    resumed = dict(adapter_tensors(second.student))
    assert adapters and adapters.keys() == resumed.keys()
    assert all(torch.equal(adapters[name], resumed[name]) for name in adapters), "the adapter differs after the resume"
    assert any(float(t.abs().max()) > 0 for name, t in adapters.items() if "lora_B" in name)  # the adapter trained
    for a, b in zip(straight.student.parameters(), second.student.parameters()):
        assert torch.equal(a, b)  # the frozen base too
    moments = [t.backend.optimizer.state_dict()["state"] for t in (straight, second)]
    assert moments[0].keys() == moments[1].keys() and len(moments[0]) == len(adapters)  # state for the adapter only
    for key in moments[0]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[0][key][name], moments[1][key][name]), (key, name)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(compose_cfg, tmp_path):
    run(compose_cfg("trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=5"))
    run_dir = tmp_path / "run"
    newest = list_checkpoints(run_dir)[-1]
    (newest / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        chosen = latest_valid_checkpoint(run_dir)
    assert chosen == list_checkpoints(run_dir)[-2]
    # a half-written checkpoint directory (no COMPLETE marker) is never listed
    (run_dir / "checkpoints" / "step_000099.tmp").mkdir()
    assert all(not p.name.endswith(".tmp") for p in list_checkpoints(run_dir))


def test_distillm_replay_buffer_and_threshold_survive_a_restore(compose_cfg, tmp_path):
    """Method state (DistiLLM's replay buffer and adaptive threshold) is part of the checkpoint."""
    from opd.train import build_trainer

    common = ("method=distillm", "method.init_threshold=1.0", "trainer.batch_size=2", "trainer.keep_checkpoints=5")
    first = build_trainer(compose_cfg(*common, f"output_dir={tmp_path / 'a'}"))
    for _ in range(3):
        first.train_step()
    first.method.policy.on_evaluate(1.0)
    checkpoint = first.save()
    second = build_trainer(compose_cfg(*common, f"output_dir={tmp_path / 'b'}"))
    second.restore(checkpoint)
    assert len(second.method.policy.buffer) == len(first.method.policy.buffer) > 0
    assert list(second.method.policy.buffer) == list(first.method.policy.buffer)
    assert second.method.policy.threshold == first.method.policy.threshold
    assert second.step == 3 and second.prompts.state_dict() == first.prompts.state_dict()


def test_a_run_interrupted_before_its_first_checkpoint_restarts_with_one_row_per_step(compose_cfg, tmp_path):
    """trainer.resume=auto with no checkpoint starts afresh: the rows the interrupted attempt logged (its steps are
    trained again) are dropped, not left beside the new ones (a study's curves would count those steps twice)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 9.0}) + "\n" for s in range(1, 4)))
    run(compose_cfg("trainer.max_steps=3", "trainer.resume=auto"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "train/loss" in row]
    assert steps == [1, 2, 3] and all(row["train/loss"] != 9.0 for row in rows if "train/loss" in row)
