"""DeepSpeed ZeRO over two processes on the CPU (gloo, ``DS_ACCELERATOR=cpu``), launched with ``torchrun``.

Each multi-process run is compared with the single-process run of the same global batches: with
dataset completions (GKD λ=0) both see exactly the same tokens, so the step loss (normalised by the
global token count over ranks and accumulation steps) and the gradient norm must agree to float32
rounding, at steps 1 and 2 (the second also checks that DeepSpeed's AdamW update and our schedule
equal the single-process ones). The ZeRO-3 run shards teacher and student parameters completely
(``param_persistence_threshold=0``), so every forward, ``generate`` included, gathers layers across ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from hydra import compose, initialize_config_dir  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from opd.engine.checkpoint import list_checkpoints  # noqa: E402
from opd.export import export_checkpoint  # noqa: E402
from opd.train import CONF_DIR, run  # noqa: E402

pytestmark = pytest.mark.deepspeed

# dataset completions (λ=0): identical tokens in one and two processes; 2 micro-batches of 8 prompts per step
SAME_BATCHES = ["debug=tiny", "method.lmbda=0", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.grad_accum=2",
                "trainer.eval_examples=8", "trainer.num_threads=1"]
SHARD_ALL = "deepspeed.param_persistence_threshold=0"  # ZeRO-3: partition even the toy models' small tensors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*overrides: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m opd.train <overrides>`` on the CPU; fails the test with its output on error."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "opd.train", *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """Training rows of ``metrics.jsonl`` by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "train/loss" in row}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("single") / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*SAME_BATCHES, f"output_dir={out}"])
    run(cfg)
    return metric_rows(out)


# ZeRO-2 is slow-marked: make test covers two ZeRO-2 ranks against one process by tests/test_multinode.py (steps 1
# and 2 over two torchrun "nodes") and tests/test_pitfalls.py (every method's first step, loss and every gradient)
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_two_process_zero_matches_the_single_process_run(stage, single_process, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(f"deepspeed=zero{stage}", SHARD_ALL, *SAME_BATCHES, f"output_dir={out}", cwd=tmp_path)
    rows = metric_rows(out)
    for step in (1, 2):
        assert rows[step]["train/tokens"] == single_process[step]["train/tokens"]  # the global token count
        assert rows[step]["train/loss"] == pytest.approx(single_process[step]["train/loss"], rel=1e-5)
        assert rows[step]["train/grad_norm"] == pytest.approx(single_process[step]["train/grad_norm"], rel=1e-5)
        assert rows[step]["train/lr"] == pytest.approx(single_process[step]["train/lr"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert proc.stdout.count("student accuracy after") == 1  # rank 0 alone prints and writes
    # the checkpoint: every rank's ZeRO partitions, and the whole student as HF weights
    (checkpoint,) = list_checkpoints(out)
    names = {p.name for p in (checkpoint / "deepspeed" / "zero").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    # the HF weights rebuilt from the partitions alone equal the consolidated ones
    exported = export_checkpoint(checkpoint, tmp_path / "exported", from_zero=True)
    ours, theirs = load_file(checkpoint / "model.safetensors"), load_file(exported / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not (tmp_path / "logs").exists() or len(list((tmp_path / "logs").rglob("runs/*"))) <= 1  # no stray run dirs


#: one process without a launcher: a ZeRO-3 run to a checkpoint, then a run that fails after forming its group; the
#: process must have left its group of one after each (and the variables it set to form it are gone)
WITHOUT_LAUNCHER = """
import json, os, sys
import torch.distributed
from hydra import compose, initialize_config_dir
from opd.errors import ConfigError
from opd.train import CONF_DIR, run

def state():
    return {"joined": torch.distributed.is_initialized(), "master_port": "MASTER_PORT" in os.environ}

def cfg(*extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*sys.argv[2:], *extra])

states = {"before": state()}
run(cfg("trainer.max_steps=1"))
states["after_run"] = state()
try:
    run(cfg("trainer.resume=/nonexistent/run"))
except ConfigError:
    states["after_failure"] = state()
open(sys.argv[1], "w").write(json.dumps(states))
"""


def test_zero3_run_without_a_launcher_leaves_its_group_and_resumes_across_a_relaunch(tmp_path):
    """One process, no launcher (DeepSpeed's group of one): student rollouts (sampled ``generate`` on a ZeRO-3 student)
    and a checkpoint; the process leaves its group at the end of the run and after a failed start; a relaunch through
    ``opd-train`` resumes the checkpoint. (Two ranks: the slow test below.)"""
    out = tmp_path / "run"
    common = ["deepspeed=zero3", SHARD_ALL, "debug=tiny", "trainer.batch_size=4", "trainer.num_threads=1",
              "trainer.save_every=1", "trainer.eval_examples=4", f"output_dir={out}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script, states = tmp_path / "without_launcher.py", tmp_path / "states.json"
    script.write_text(WITHOUT_LAUNCHER)
    proc = subprocess.run([sys.executable, str(script), str(states), *common], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    left = {"joined": False, "master_port": False}
    assert json.loads(states.read_text()) == {"before": left, "after_run": left, "after_failure": left}
    first = metric_rows(out)
    assert sorted(first) == [1] and first[1]["train/tokens"] > 0 and first[1]["rollout/mean_length"] > 0
    proc = subprocess.run([sys.executable, "-m", "opd.train", *common, "trainer.max_steps=2", "trainer.resume=auto"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2] and rows[1] == first[1] and rows[2]["train/tokens"] > 0
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1


@pytest.mark.slow  # ~50 s; make test keeps the one-process relaunch above and the two-rank ZeRO-3 checkpoint test
def test_zero3_on_policy_run_resumes_across_a_relaunch(tmp_path):
    """Student rollouts (sampled ``generate`` on a ZeRO-3 student), a checkpoint, then a relaunch that resumes it."""
    out = tmp_path / "run"
    common = ["deepspeed=zero3", SHARD_ALL, "debug=tiny", "trainer.batch_size=4", "trainer.num_threads=1",
              "trainer.save_every=1", "trainer.eval_examples=4", f"output_dir={out}"]
    torchrun(*common, "trainer.max_steps=1", cwd=tmp_path)
    first = metric_rows(out)
    assert sorted(first) == [1] and first[1]["train/tokens"] > 0 and first[1]["rollout/mean_length"] > 0
    torchrun(*common, "trainer.max_steps=2", "trainer.resume=auto", cwd=tmp_path)
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2] and rows[1] == first[1] and rows[2]["train/tokens"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2


# MiniLLM's L_PT alone: 2 global micro-batches of 8 prompts, teacher-forced on their reference completions
LM_TERM = ["debug=tiny", "method=minillm", "method.lm_coef=1.0", "method.lm_kd_ratio=0.5", "trainer.batch_size=8",
           "trainer.grad_accum=2", "trainer.num_threads=1"]


def lm_term_step(overrides: list[str], out_json: Path) -> None:
    """One optimizer step of MiniLLM's L_PT term alone on the run's first global micro-batches (fixed by the seed),
    through the trainer's backend; writes the rank-summed ``minillm/lm_loss`` and the gradient norm (rank 0)."""
    from opd import distributed as dist
    from opd.sampling.tokenize import encode_targets
    from opd.train import build_trainer

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    trainer = build_trainer(cfg)
    lm_loss = 0.0
    for _ in range(trainer.cfg.grad_accum):
        batch = encode_targets(trainer.tokenizer, dist.shard(next(trainer.prompts)), trainer.device)
        aux = trainer.method.auxiliary_loss(batch, trainer.aux_ctx)  # reads only the batch's prompts and references
        trainer.backend.backward(aux.loss)
        lm_loss += aux.metrics["minillm/lm_loss"]
    grad_norm, _ = trainer.backend.step(skip=False)
    lm_loss = dist.all_reduce_sum([lm_loss])[0]
    if dist.is_main():
        out_json.write_text(json.dumps({"lm_loss": lm_loss, "grad_norm": grad_norm}))


@pytest.mark.slow  # make test: the pitfall suite's two-rank test runs "minillm lm_coef=1" (the same rank-dependent term)
def test_minillm_lm_term_over_two_processes_equals_the_single_process_one(tmp_path):
    """L_PT is a token mean per global micro-batch: 2 processes (ZeRO-2) give the single-process value and gradient."""
    lm_term_step([*LM_TERM, f"output_dir={tmp_path / 'single'}"], tmp_path / "single.json")
    single = json.loads((tmp_path / "single.json").read_text())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(tmp_path / "two.json"), "deepspeed=zero2", *LM_TERM,
           f"output_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    two = json.loads((tmp_path / "two.json").read_text())
    assert single["lm_loss"] > 0 and single["grad_norm"] > 0
    assert two["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)


def test_several_processes_without_deepspeed_fail_with_one_line(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "opd.train", "debug=tiny", f"output_dir={tmp_path / 'run'}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "deepspeed=none" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_hydra_sweep_under_torchrun_runs_every_job_over_both_ranks(tmp_path):
    """``torchrun ... -m opd.train -m method=gkd,sft``: each job is a 2-process ZeRO-2 run in its own directory."""
    proc = torchrun("-m", "deepspeed=zero2", "method=gkd,sft", "debug=tiny", "trainer.max_steps=2", cwd=tmp_path)
    runs = sorted(p for p in (tmp_path / "logs" / "default" / "multiruns").glob("*/*") if p.is_dir())
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in runs if (run_dir / "summary.json").exists()]
    assert sorted(s["method"] for s in summaries) == ["gkd", "sft"]
    assert all(s["world_size"] == 2 and s["steps"] == 2 for s in summaries)
    assert proc.stdout.count("student accuracy after") == 2  # rank 0 only, once per job


@pytest.mark.slow  # ~40 s; make test keeps the pitfall suite's two-rank first step of sdpo (EMA teacher) and sdft (live)
def test_an_ema_teacher_follows_the_zero2_student_and_resumes_over_two_processes(tmp_path):
    """SDPO's EMA teacher over two ZeRO-2 processes: at update rate 1 the teacher is the student after every step, so
    the checkpoint's averaged tensors equal the consolidated student weights; the run then resumes to step 3."""
    out = tmp_path / "run"
    common = ["debug=tiny", "method=sdpo", "teacher=ema", "teacher.update_rate=1.0", "sampler.n=2", "trainer.batch_size=4",
              "trainer.eval_examples=8", "trainer.num_threads=1", "deepspeed=zero2", f"output_dir={out}"]
    torchrun(*common, "trainer.max_steps=2", cwd=tmp_path)
    (checkpoint,) = list_checkpoints(out)
    averaged = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["teacher"]["averaged"]
    student = load_file(checkpoint / "model.safetensors")
    shared = averaged.keys() & student.keys()
    assert len(shared) >= len(student) - 1  # every tensor (a tied head may be saved once)
    assert all(torch.equal(averaged[k], student[k]) for k in shared)
    torchrun(*common, "trainer.max_steps=3", "trainer.resume=auto", cwd=tmp_path)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


if __name__ == "__main__":  # the worker of the two-process L_PT test: <output json> <overrides...>
    lm_term_step(sys.argv[2:], Path(sys.argv[1]))
