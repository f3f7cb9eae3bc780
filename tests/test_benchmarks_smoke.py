"""The benchmark scripts still run: a tiny version of each (seconds), and the shared timing helper."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"opd_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_time_variants_interleaves_alternates_and_seeds():
    common = load("common")
    calls = []

    def variant(name):
        def run(tokens):
            import torch

            calls.append((name, torch.get_num_threads(), torch.rand(1).item()))
            return tokens, 4
        return run

    results = common.time_variants({"a": variant("a"), "b": variant("b")}, (10,), reps=2, threads=(1,))
    assert [c[0] for c in calls] == ["a", "b", "b", "a"]  # the order is reversed on the second repetition
    assert calls[0][2] == calls[1][2] and calls[2][2] == calls[3][2]  # same seed within a repetition
    timing = results[("a", 1)]
    assert timing.tokens == [10, 10] and timing.steps == [4, 4] and len(timing.seconds) == 2
    assert timing.tokens_per_s() > 0 and timing.positions_per_s(batch_size=2) > 0


def test_bench_rollout_quick(capsys):
    load("bench_rollout").main(["--quick"])
    out = capsys.readouterr().out
    assert "| student | HFSampler (sample, T=1) |" in out and "| teacher | static cache (greedy) |" in out


def test_bench_step_quick(capsys):
    results = load("bench_step").main(["--quick"])
    out = capsys.readouterr().out
    assert results["opd"]["steps"] == 2 and results["opd"]["tokens_per_s"] > 0
    assert results["opd"]["decode_steps"] > 0  # the step's rollouts were seen (the trainer's rollout source, wrapped)
    if importlib.util.find_spec("trl") is None:
        assert "TRL column skipped" in out
    else:
        assert "TRL GKDTrainer" in results and "opd / TRL completion tokens per second" in out


def test_bench_step_cross_tokenizer_selects_gold_only(capsys):
    """--cross-tokenizer (issue 23): the Gemma teacher with ULD on opd's side, TRL's GOLDTrainer alone on TRL's; the
    other modes keep their trainers."""
    bench = load("bench_step")
    args = bench.parse_args(["--real", "--cross-tokenizer", "--quick"])
    assert args.cross_tokenizer and args.trl_trainers == ["gold"]
    assert bench.trl_trainer_names(args) == ["TRL GOLDTrainer"]
    assert bench.TRL_TRAINERS["TRL GOLDTrainer"] is bench.build_trl_gold_trainer
    assert bench.target_for("TRL GOLDTrainer", real=True, n=1) is None  # measured, no target asked
    assert bench.trl_trainer_names(bench.parse_args(["--real"])) == ["TRL GKDTrainer", "TRL DistillationTrainer"]
    assert bench.trl_trainer_names(bench.parse_args([])) == ["TRL GKDTrainer"]
    for argv in (["--cross-tokenizer"], ["--real", "--cross-tokenizer", "--trl-trainers", "gkd"],
                 ["--real", "--trl-trainers", "gold"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert "--cross-tokenizer needs --real" in capsys.readouterr().err


def test_bench_async_quick(capsys):
    results = load("bench_async").main(["--quick", "--no-trl"])
    out = capsys.readouterr().out
    assert set(results) == {"opd sync", "opd max_staleness=1", "opd max_staleness=2"}
    assert all(r["steps"] == 2 and r["steps_per_s"] > 0 for r in results.values())
    assert results["opd max_staleness=2"]["staleness"] == 2 and "max_staleness=1:" in out


LORA_QUICK = ["--quick", "--opsd", "--only", "full", "lora r=8", "opsd lora r=8, teacher = adapters off"]


def check_bench_lora_quick(results: dict, out: str) -> None:
    assert not any("error" in r for r in results.values()), results
    full, lora = results["full"], results["lora r=8"]
    assert lora["trainable"] < full["trainable"] / 4 and lora["optimizer_mib"] < full["optimizer_mib"] / 4
    assert lora["checkpoint_mib"] < full["checkpoint_mib"] / 2
    assert "| opsd lora r=8, teacher = adapters off |" in out


@pytest.mark.slow  # ~40 s (three fresh processes); make test runs the same variants and checks in process, below
def test_bench_lora_quick(capsys):
    """Full vs LoRA on the toy pair: a LoRA student's optimizer state and checkpoint are far smaller, and OPSD's
    teacher with the adapters off trains like the deep-copied one."""
    # three fresh processes (~10 s each to import torch, transformers and peft): the full student, rank 8, and OPSD's
    # teacher with the adapters off
    results = load("bench_lora").main(LORA_QUICK)
    check_bench_lora_quick(results, capsys.readouterr().out)


def test_bench_lora_quick_with_its_workers_in_this_process(capsys, monkeypatch):
    """test_bench_lora_quick's variants and checks, each worker run by ``bench_lora.worker`` in this process instead
    of a fresh interpreter (its peak RSS is then the test process's, which no check reads): the script's variants,
    measurements and table, without three process starts."""
    import contextlib
    import io
    import json

    bench = load("bench_lora")

    def worker_here(script, payload, threads, timeout=900):
        assert Path(script).name == "bench_lora.py" and threads == 1
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            bench.worker(payload)
        return json.loads([line for line in printed.getvalue().splitlines() if line.startswith("{")][-1])

    monkeypatch.setattr(bench, "run_worker", worker_here)
    results = bench.main([*LORA_QUICK, "--threads", "1"])  # this process's one torch thread (conftest)
    check_bench_lora_quick(results, capsys.readouterr().out)


def test_bench_flops_counts_a_shared_prompt_once_in_scoring_and_per_row_in_the_rollout(tiny_model_dirs):
    """bench_flops with --n: the rollout's prefill runs every row's prompt, while shared-prompt scoring and the
    update read a group's prompt once (Kaplan et al. 2020's 2N per token and position)."""
    from transformers import AutoModelForCausalLM

    flops = load("bench_flops")
    common = load("common")
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"])
    (s_body, s_head), (t_body, t_head) = common.matmul_parameters(student), common.matmul_parameters(teacher)
    prompts, completions = [5, 5, 7, 7], [3, 4, 2, 6]  # two prompts, two samples each
    shared = flops.step_flops(student, teacher, prompts, completions, shared_group=2)
    every_row = flops.step_flops(student, teacher, prompts, completions)
    assert shared["rollout"] == every_row["rollout"] == 2 * s_body * (24 + 15) + 2 * s_head * 15
    assert shared["teacher"] == 2 * t_body * (12 + 15) + 2 * t_head * 15  # prompts 5 and 7 once, completions 15
    assert every_row["teacher"] == 2 * t_body * (24 + 15) + 2 * t_head * 15
    assert shared["update"] == 3 * (2 * s_body * 27 + 2 * s_head * 15)


@pytest.mark.parametrize("name", ["bench_loss", "bench_rollout", "bench_step", "bench_async", "bench_lora",
                                  "bench_flops"])
def test_benchmark_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load(name).main(["--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
