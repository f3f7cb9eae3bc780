"""Multi-node launches (issue 15, item 5): two torchrun node ranks on localhost, and SLURM's variables.

1. ``torchrun --nnodes 2 --nproc_per_node 1`` started twice (``--node_rank 0`` and ``1``, one static rendezvous
   on 127.0.0.1, gloo, ``DS_ACCELERATOR=cpu``) trains the toy default under DeepSpeed ZeRO-2. Each node's one
   worker has ``LOCAL_RANK=0``, so this is the layout of a real multi-node job, not of one node with two GPUs.
   With dataset completions (GKD λ=0) both launches see the same tokens as one process, so the per-step loss,
   gradient norm and learning rate must equal the single-process run's to float32 rounding.
2. SLURM's per-task variables (``srun`` / submitit, one task per GPU) map to torch's rendezvous variables: every
   task of a 2-node job derives the same master address and port and a distinct rank; and two processes given
   only SLURM's variables really form one process group.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from opd import distributed as dist
from opd.engine.checkpoint import list_checkpoints
from opd.train import CONF_DIR, run

# the toy default (GKD, JSD(0.5)) on dataset completions (λ=0): identical tokens on 1 or 2 ranks;
# 2 global micro-batches of 8 prompts per step, so each rank takes 4 prompts of each
SAME_BATCHES = ["debug=tiny", "method.lmbda=0", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.grad_accum=2",
                "trainer.eval_examples=8", "trainer.num_threads=1"]
LAUNCH_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port(low: int = 0, high: int = 0) -> int:
    """A free loopback TCP port (any, or one in ``[low, high)``)."""
    for _ in range(200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", random.randrange(low, high) if high else 0))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high})")


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process (each the leader of its own session); on timeout kill their groups, then fail."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # torchrun and the worker it started
        details = "\n".join(f"--- process {i}:\n{p.communicate()[1][-3000:]}" for i, p in enumerate(procs))
        pytest.fail(f"the launch did not finish in {timeout:.0f} s\n{details}")
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """Training rows of ``metrics.jsonl`` by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "train/loss" in row}


@pytest.mark.deepspeed
def test_two_node_torchrun_zero2_matches_the_single_process_run(tmp_path):
    pytest.importorskip("deepspeed")
    single = tmp_path / "single"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*SAME_BATCHES, f"output_dir={single}"])
    run(cfg)
    expected = metric_rows(single)

    out, port = tmp_path / "two_nodes", free_port()
    procs = []
    for node_rank in (0, 1):  # the same command on each "node", as on a cluster; output_dir on a shared filesystem
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "opd.train", "deepspeed=zero2", *SAME_BATCHES, f"output_dir={out}"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **LAUNCH_ENV}, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    results = wait_all(procs, timeout=420)
    for node_rank, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"node {node_rank} failed ({code}):\n{stdout[-3000:]}\n{stderr[-6000:]}"

    rows = metric_rows(out)
    assert sorted(rows) == [1, 2]
    for step in (1, 2):
        assert rows[step]["train/tokens"] == expected[step]["train/tokens"]  # the global token count over both nodes
        assert rows[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-5)
        assert rows[step]["train/grad_norm"] == pytest.approx(expected[step]["train/grad_norm"], rel=1e-5)
        assert rows[step]["train/lr"] == pytest.approx(expected[step]["train/lr"])
    assert rows[2]["train/loss"] != rows[1]["train/loss"]  # the update changed the student (and the batch)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    # global rank 0 (node 0) alone prints and writes; node 1's worker, although LOCAL_RANK=0 there, does not
    assert results[0][1].count("student accuracy after") == 1 and "student accuracy after" not in results[1][1]
    # both nodes wrote their ZeRO-2 optimizer partition into the shared checkpoint
    (checkpoint,) = list_checkpoints(out)
    names = {p.name for p in (checkpoint / "deepspeed" / "zero").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names


def slurm_task(procid: int, nodeid: int, localid: int, **extra: str) -> dict[str, str]:
    """The variables ``srun`` sets for one task of a 2-node job with 2 tasks per node (no torch variables)."""
    return {"SLURM_PROCID": str(procid), "SLURM_NODEID": str(nodeid), "SLURM_LOCALID": str(localid),
            "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
            "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NODELIST": "node[01-02]", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_ID": "4242424", "SLURMD_NODENAME": f"node0{nodeid + 1}", **extra}


def test_every_task_of_a_two_node_slurm_job_derives_one_rendezvous():
    tasks = [slurm_task(node * 2 + local, node, local) for node in (0, 1) for local in (0, 1)]  # block distribution
    for env in tasks:
        dist.adopt_slurm_env(env)
    assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) for e in tasks] == [
        ("0", "4", "0"), ("1", "4", "1"), ("2", "4", "0"), ("3", "4", "1")]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in tasks} == {("node01", str(20000 + 4242424 % 20000))}
    assert tasks[0]["SLURMD_NODENAME"] == tasks[0]["MASTER_ADDR"]  # the master is where rank 0 runs


def test_a_step_on_part_of_the_allocation_rendezvouses_on_its_own_first_node():
    """``srun -N2 -w node[03-04]`` inside a 4-node job: rank 0 runs on node03, which the job's list does not start with."""
    env = slurm_task(0, 0, 0, SLURM_JOB_NODELIST="node[01-04]", SLURM_NODELIST="node[01-04]",
                     SLURM_STEP_NODELIST="node[03-04]", SLURMD_NODENAME="node03")
    dist.adopt_slurm_env(env)
    assert env["MASTER_ADDR"] == "node03"


def test_slurm_leaves_launcher_and_user_choices_alone():
    preset = slurm_task(2, 1, 0, MASTER_ADDR="10.0.0.7", MASTER_PORT="29500")
    dist.adopt_slurm_env(preset)  # an address or port the user exported wins
    assert (preset["RANK"], preset["MASTER_ADDR"], preset["MASTER_PORT"]) == ("2", "10.0.0.7", "29500")
    torchrun = slurm_task(3, 1, 1, WORLD_SIZE="2", RANK="1", LOCAL_RANK="0")
    dist.adopt_slurm_env(torchrun)  # torchrun per node inside the allocation: its variables win
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"], torchrun["LOCAL_RANK"]) == ("1", "2", "0")
    assert "MASTER_ADDR" not in torchrun
    one_task = slurm_task(0, 0, 0, SLURM_NTASKS="1")
    dist.adopt_slurm_env(one_task)  # a one-task job is a plain single process
    assert not set(RENDEZVOUS) & set(one_task)


@pytest.mark.parametrize("nodelist, first", [
    ("node[01-02]", "node01"), ("node[009-011,015]", "node009"), ("gpu[3,5-7]", "gpu3"), ("nid-[0042-0043]", "nid-0042"),
    ("cpu1,gpu[03-05]", "cpu1"), ("gpu[03-05,9],cpu[1-2]", "gpu03"), ("login7", "login7"), ("a1,a2", "a1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert dist.first_slurm_host(nodelist) == first


def test_env_world_size_adopts_slurm_in_the_process_environment(monkeypatch):
    for key in RENDEZVOUS:  # recorded by monkeypatch, so the test leaves the environment as it found it
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in slurm_task(3, 1, 1).items():
        monkeypatch.setenv(key, value)
    assert dist.env_world_size() == 4
    assert (os.environ["RANK"], dist.local_rank(), os.environ["MASTER_ADDR"]) == ("3", 1, "node01")


# a task of an srun job: join the group from SLURM's variables alone, sum the ranks, report, leave the group
# (DeepSpeed hidden: opd's plain torch.distributed path, which skips its import time on a loaded machine)
SLURM_WORKER = """
import json, sys
sys.modules["deepspeed"] = None
import torch.distributed
from opd import distributed as dist
dist.init_process_group(backend="gloo", timeout_minutes=3)
report = {"rank": dist.rank(), "world": dist.world_size(), "local": dist.local_rank(),
          "sum": dist.all_reduce_sum([dist.rank() + 1])[0]}
dist.barrier()
torch.distributed.destroy_process_group()
print(json.dumps(report))
"""


def test_two_slurm_tasks_on_two_nodes_form_one_process_group(tmp_path):
    """Two processes that see only what ``srun -N2 --ntasks-per-node 1`` sets (nodes named ``localhost``) join one
    gloo group: ranks 0 and 1 from ``SLURM_PROCID``, rendezvous at the derived address and port."""
    port = free_port(20000, 40000)
    job_id = 1_000_000 + port - 20000  # SLURM's job id picks the port: 20000 + job id mod 20000
    base = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS and not k.startswith(("SLURM", "TORCHELASTIC"))}
    procs = []
    for node in (0, 1):
        env = {**base, **LAUNCH_ENV, **slurm_task(node, node, 0, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                                                    SLURM_TASKS_PER_NODE="1(x2)", SLURM_JOB_NODELIST="localhost",
                                                    SLURM_NODELIST="localhost", SLURM_JOB_ID=str(job_id))}
        procs.append(subprocess.Popen([sys.executable, "-c", SLURM_WORKER], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    reports = []
    for node, (code, stdout, stderr) in enumerate(wait_all(procs, timeout=240)):
        assert code == 0, f"task {node} failed ({code}):\n{stderr[-4000:]}"
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert reports == [{"rank": r, "world": 2, "local": 0, "sum": 3.0} for r in (0, 1)]
