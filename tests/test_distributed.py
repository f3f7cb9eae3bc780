"""Single-process behaviour of the data-parallel helpers, the launch checks and the SLURM rendezvous mapping."""

from __future__ import annotations

import pytest

from opd import distributed as dist
from opd.config import DeepSpeedConfig, TrainerConfig
from opd.engine.backends import deepspeed_train_config
from opd.errors import ConfigError
from opd.train import check_launch


def test_collectives_are_identities_in_one_process():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert dist.all_ranks_true(True) and not dist.all_ranks_true(False)
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.gather_objects(3) == [3]
    assert dist.shard(list(range(8))) == list(range(8)) and dist.strided_shard([1, 2, 3]) == ([1, 2, 3], 3)


def test_shards_split_a_global_batch_and_pad_evaluation_evenly(monkeypatch):
    assert dist.shard(list(range(8)), rank_=1, world=2) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not split over 3"):
        dist.shard(list(range(8)), rank_=0, world=3)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        shares.append(dist.strided_shard(list("abcde")))
    assert shares == [(list("ace"), 3), (list("bd") + ["b"], 2)]  # same length on every rank; padding comes last


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,9],cpu1", "gpu03"), ("node7", "node7"), ("a1,a2", "a1"),
                                             ("n[1-2]", "n1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert dist.first_slurm_host(nodelist) == first


def test_slurm_tasks_become_torch_ranks():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]",
           "SLURM_JOB_ID": "12345"}
    dist.adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("9", "16", "1", "gpu03")
    assert env["MASTER_PORT"] == str(20000 + 12345)
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    dist.adopt_slurm_env(torchrun)  # torchrun inside an allocation: its variables win
    assert torchrun["RANK"] == "0"


def test_launch_checks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="deepspeed=none"):
        check_launch(DeepSpeedConfig(enabled=False), 8)
    with pytest.raises(ConfigError, match="batch_size=6 .* multiple of the number of processes \\(4\\)"):
        check_launch(DeepSpeedConfig(enabled=True), 6)
    check_launch(DeepSpeedConfig(enabled=True), 8)


def test_deepspeed_config_follows_the_trainer_section():
    cfg = TrainerConfig(batch_size=8, grad_accum=4, lr=3e-4, max_grad_norm=0.5, weight_decay=0.1)
    ds = deepspeed_train_config(DeepSpeedConfig(enabled=True, stage=3, extra={"zero_optimization": {"sub_group_size": 7}}),
                                cfg, "bfloat16", world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 4, 32)
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 3e-4 and ds["bf16"]["enabled"]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["sub_group_size"] == 7  # deepspeed.extra merged in last
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


@pytest.mark.parametrize("kwargs, message", [({"stage": 4}, "deepspeed.stage"), ({"teacher_stage": 2}, "teacher_stage"),
                                             ({"offload_param": True, "stage": 2}, "offload_param needs"),
                                             ({"backend": "mpi"}, "deepspeed.backend")])
def test_bad_deepspeed_values_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DeepSpeedConfig(**kwargs)
