"""Data parallelism across processes: rank and world size, and collectives that are no-ops in one process.

A run launched by ``torchrun`` or ``deepspeed`` over N processes (``WORLD_SIZE`` > 1 in the
environment) joins one process group; every rank draws the same global micro-batch of prompts and
keeps its own ``1/N`` slice (:func:`shard`), so the optimisation does not depend on N. Everything
here works unchanged in a plain single process (world size 1, no process group).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def env_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when launched as a plain process), or SLURM's task count."""
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def adopt_slurm_env(env: dict[str, str] | None = None) -> None:
    """Under ``srun`` / the submitit launcher with one task per GPU, set torch's rendezvous variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) from SLURM's.

    Nothing changes when ``WORLD_SIZE`` is already set (torchrun, deepspeed) or the job has one task.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    # rank 0 runs on the first node of the step (srun -N2 in a larger allocation), not necessarily of the job
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
    env.setdefault("MASTER_ADDR", first_slurm_host(nodelist))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))  # the same on every task


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes metrics, summaries and the HF weights of checkpoints."""
    return rank() == 0


def default_backend() -> str:
    """nccl with CUDA, gloo on CPU (DeepSpeed's CPU accelerator also speaks gloo)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


#: the environment variables this process set to form its own group of one (None: it formed none)
_own_group_env: dict[str, str] | None = None


def init_process_group(backend: str | None = None, timeout_minutes: float = 30.0, single: bool = False) -> None:
    """Join the launcher's process group once (no-op when already joined).

    A plain single process joins nothing, unless ``single`` (DeepSpeed needs a group even for one
    process): then it forms a group of one on a free loopback port. DeepSpeed's ``init_distributed``
    is used when DeepSpeed is installed, so its communication layer and torch's share one group;
    plain ``torch.distributed`` otherwise. A launcher's group is left when the process exits; a group
    of one by :func:`leave_own_process_group` at the end of each run.
    """
    global _own_group_env
    if is_initialized() or (env_world_size() <= 1 and not single):
        return
    if env_world_size() <= 1:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        _own_group_env = {key: value for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                                                          ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)))
                          if key not in os.environ}  # a user's own settings stay
        os.environ.update(_own_group_env)
    else:
        atexit.register(_destroy)
    backend = backend or default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    try:
        import deepspeed
    except ImportError:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)


def leave_own_process_group() -> None:
    """Leave the group of one this process formed (DeepSpeed without a launcher), if it did; no-op otherwise.

    Called at the end of a run and when a run fails (:func:`opd.train.run`, the ``opd-train`` entry point), so the
    process exits without a group left behind, and the next job of a Hydra sweep in the same process forms a fresh
    one on a fresh port. A launcher's group (``torchrun``) stays for the whole process, whose sweep jobs share it
    (joining the launcher's rendezvous a second time hangs), and is left when the process exits.
    """
    global _own_group_env
    if _own_group_env is None:
        return
    _destroy()
    for key, value in _own_group_env.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    _own_group_env = None


def _destroy() -> None:
    """Destroy the default process group (no-op without one); DeepSpeed's call also drops the groups it cached."""
    if not is_initialized():
        return
    if "deepspeed" in sys.modules:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a list of numbers (float64 on CPU; the input itself in one process)."""
    if not is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_ranks_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (a picklable object)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous slice of a global batch whose length is a multiple of the world size."""
    rank_, world = rank() if rank_ is None else rank_, world_size() if world is None else world
    if len(items) % world:
        raise ValueError(f"a global batch of {len(items)} does not split over {world} ranks")
    size = len(items) // world
    return list(items[rank_ * size:(rank_ + 1) * size])


def strided_shard(items: Sequence[T]) -> tuple[list[T], int]:
    """This rank's strided share of ``items``, padded to the same length on every rank.

    Ranks that hold fewer items repeat their first one (or the first item overall), so every rank
    runs the same number of batches, which sharded models (ZeRO-3) need: each forward is a
    collective. Returns ``(items, number of real items)``; the padding comes last.
    """
    world, rank_ = world_size(), rank()
    mine = list(items[rank_::world])
    per_rank = -(-len(items) // world)
    filler = mine[0] if mine else (items[0] if items else None)
    return mine + [filler] * (per_rank - len(mine)), len(mine)


def is_zero3(model: torch.nn.Module | None) -> bool:
    """Whether ``model``'s parameters are partitioned by DeepSpeed ZeRO-3 (they carry ``ds_id``)."""
    if model is None:
        return False
    return any(hasattr(p, "ds_id") for p in model.parameters())


def needs_synced_decoding(model: torch.nn.Module | None) -> bool:
    """A ZeRO-3 model in a multi-process run: every forward is a collective, so decoding loops must keep
    stepping until all ranks are done (``generate(synced_gpus=True)``)."""
    return world_size() > 1 and is_zero3(model)


def _comm_device() -> torch.device:
    backend = dist.get_backend() if is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
