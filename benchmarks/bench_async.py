"""Steps per second with asynchronous rollouts (``trainer.max_staleness`` 0, 1, 2), against TRL's GKDTrainer.

    python benchmarks/bench_async.py                          # toy default, about 3 minutes on 2 CPU cores
    python benchmarks/bench_async.py --trl-venv .venv-trl     # + TRL's GKDTrainer in the same run (make bench-async)
    python benchmarks/bench_async.py --real                   # the SmolLM2 pair (experiment=real_smollm2), ~10 minutes
    python benchmarks/bench_async.py --quick                  # seconds (plumbing check)

Every opd trainer is ``opd-train``'s default (GKD, λ = 1, JSD β = 0.5, 32 prompts, 64 new tokens; ``--real``:
``experiment=real_smollm2`` with GKD) built by ``opd.train.build_trainer``; they differ only in
``trainer.max_staleness``. On this 2-core machine the synchronous trainer gets the learner's thread count
(toy 1, ``--real`` 2, each trainer's best) and an asynchronous one 1 thread for its learner
(``--async-learner-threads``) and 1 for its rollout worker (``trainer.rollout_num_threads``), so each side uses
the machine's two cores as well as it can.

Timing: the trainers take turns in blocks of ``--block`` optimizer steps (the order rotates each round). A block is
timed from its first ``train_step()`` until the worker has also written every rollout it has been asked for
(``trainer.rollouts.wait()``), so no trainer's worker works during another trainer's block, and the rollouts a
block leaves ready for the next one were paid for inside it. The first round is warm-up (the worker's start,
allocator growth) and is not counted. Steps/s = timed steps / timed seconds; the spread is the lowest and highest
block. TRL's ``GKDTrainer`` (``--trl-venv``, built as in ``bench_step.py``: same checkpoints, data and
settings) runs its own blocks: every ``--block`` TRL steps, inside its step callback and outside its timing, one
block of each opd trainer runs. Ratios are against the synchronous trainer and TRL of the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import build_trl_trainer  # noqa: E402
from common import (  # noqa: E402
    REAL_EXPERIMENT,
    add_site_packages,
    compose_train_config,
    fill_defaults,
    markdown_table,
    median,
    print_machine,
)

#: issue 15's targets: async steps/s over the synchronous trainer's, and over TRL GKDTrainer's
TARGET_SYNC, TARGET_TRL = 1.6, 1.5


class BlockLog:
    """One trainer's timed blocks: (steps, seconds, completion tokens) and its per-step metrics."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, float, int]] = []
        self.metrics: list[dict] = []

    def summary(self) -> dict[str, float]:
        steps, seconds, tokens = (sum(b[i] for b in self.blocks) for i in range(3))
        rates = [b[0] / b[1] for b in self.blocks]

        def med(key: str) -> float:
            values = [m[key] for m in self.metrics if key in m]
            return median(values) if values else float("nan")

        return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds,
                "block_min": min(rates), "block_max": max(rates), "staleness": med("rollout/staleness"),
                "wait_ms": med("time/rollout_s") * 1e3, "worker_ms": med("time/rollout_worker_s") * 1e3,
                "mean_length": med("rollout/mean_length")}


def build_opd_trainer(run_dir: Path, args, max_staleness: int, total_steps: int):
    """The default config (``--real``: the real experiment with GKD) at ``trainer.max_staleness=max_staleness``."""
    from opd.train import build_trainer

    learner_threads = args.threads if max_staleness == 0 else args.async_learner_threads
    overrides = [f"experiment={REAL_EXPERIMENT}", "method=gkd"] if args.real else []
    overrides += [f"output_dir={run_dir}",                        # a throw-away run directory
                  f"trainer.max_staleness={max_staleness}",       # 0 = synchronous; N = N steps sampled ahead
                  f"trainer.num_threads={learner_threads}",       # the learner's torch threads
                  "trainer.rollout_num_threads=1",                # the worker's (unused when synchronous)
                  f"trainer.max_steps={total_steps}",             # the lr schedule spans the steps run here
                  f"trainer.batch_size={args.batch_size}",
                  f"sampler.max_new_tokens={args.max_new_tokens}",
                  "trainer.progress=false"]
    if args.quick:
        overrides.append("data.num_train=256")
    return build_trainer(compose_train_config(overrides), run_dir)


def opd_block(trainer, steps: int, log: BlockLog, timed: bool) -> None:
    """``steps`` train steps and the worker's outstanding rollouts, timed as one block, at the trainer's own torch
    threads (a process-wide setting: each trainer set it when built, the last one built wins)."""
    import torch

    torch.set_num_threads(trainer.cfg.num_threads)
    with torch.enable_grad():  # also when called from inside TRL's loop
        started = time.perf_counter()
        metrics = [trainer.train_step() for _ in range(steps)]
        trainer.rollouts.wait()
        seconds = time.perf_counter() - started
    if timed:
        log.blocks.append((steps, seconds, sum(int(m["train/tokens"]) for m in metrics)))
        log.metrics.extend(metrics)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="the SmolLM2 pair of experiment=real_smollm2 instead of the toys")
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2], help="max_staleness values (0 = the baseline)")
    p.add_argument("--block", type=int, help="optimizer steps per block (toy 20, --real 3)")
    p.add_argument("--rounds", type=int, help="rounds of blocks, the first one untimed (toy 6, --real 4)")
    p.add_argument("--batch-size", type=int, help="prompts per step (toy 32, --real 8)")
    p.add_argument("--max-new-tokens", type=int, help="completion cap (toy 64, --real 32)")
    p.add_argument("--threads", type=int, help="torch threads of the synchronous trainer (toy 1, --real 2)")
    p.add_argument("--async-learner-threads", type=int, default=1,
                   help="torch threads of an asynchronous trainer's learner (its worker always has 1)")
    p.add_argument("--trl-venv", type=Path, help="import trl from this virtual environment (e.g. .venv-trl)")
    p.add_argument("--no-trl", action="store_true", help="no TRL trainer even when trl is importable")
    p.add_argument("--quick", action="store_true", help="2 rounds of 2-step blocks, 4 prompts, 8 tokens")
    p.add_argument("--json", type=Path, help="also write the summaries here")
    args = p.parse_args(argv)
    fill_defaults(args, dict(block=3, rounds=4, batch_size=8, max_new_tokens=32, threads=2) if args.real else
                  dict(block=20, rounds=6, batch_size=32, max_new_tokens=64, threads=1),
                  quick=dict(block=2, rounds=2, batch_size=4, max_new_tokens=8))
    args.trl_gradient_checkpointing = False  # TRL at its best CPU settings (bench_step.py)
    if 0 not in args.staleness:
        p.error("--staleness must include 0, the synchronous baseline")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.trl_venv is not None and add_site_packages(args.trl_venv) is None:
        raise SystemExit(f"--trl-venv {args.trl_venv}: no lib/python*/site-packages there (make bench-trl creates .venv-trl)")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    what = "SmolLM2-135M-Instruct teacher, 10-layer pruned student (--real)" if args.real else "toy default"
    print(f"# bench_async: steps/s with trainer.max_staleness {args.staleness}, {what}\n")
    print_machine(f"sync {args.threads}; async {args.async_learner_threads} learner + 1 worker")
    with_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    total = args.block * args.rounds
    names = {n: ("opd sync" if n == 0 else f"opd max_staleness={n}") for n in args.staleness}
    logs = {names[n]: BlockLog() for n in args.staleness}
    with tempfile.TemporaryDirectory(prefix="opd-bench-async-") as tmp:
        trainers = {}
        for n in args.staleness:
            started = time.perf_counter()
            trainers[names[n]] = build_opd_trainer(Path(tmp) / f"opd{n}", args, n, total)
            print(f"{names[n]}: built in {time.perf_counter() - started:.1f} s", flush=True)
        order = list(trainers)

        def opd_round(index: int) -> None:
            rotated = order[index % len(order):] + order[: index % len(order)]
            for name in rotated:
                opd_block(trainers[name], args.block, logs[name], timed=index > 0)
            torch.set_num_threads(args.threads)  # TRL's steps (between opd rounds) run at the synchronous setting
            print(f"round {index}{' (warm-up)' if index == 0 else ''}: " + ", ".join(
                f"{name} {logs[name].blocks[-1][0] / logs[name].blocks[-1][1]:.2f} steps/s"
                for name in order if index > 0), flush=True)

        try:
            if with_trl:
                import trl

                logs["TRL GKDTrainer"] = trl_log = BlockLog()
                state = {"steps": 0, "seconds": 0.0, "tokens": 0, "round": 0}
                holder = {}

                def after_trl_step(seconds: float) -> None:
                    _, tokens, _ = holder["trl"].last_rollout
                    state["steps"] += 1
                    state["seconds"] += seconds
                    state["tokens"] += tokens
                    if state["steps"] == args.block:
                        if state["round"] > 0:
                            trl_log.blocks.append((state["steps"], state["seconds"], state["tokens"]))
                        opd_round(state["round"])
                        state.update(steps=0, seconds=0.0, tokens=0, round=state["round"] + 1)

                torch.set_num_threads(args.threads)
                holder["trl"] = build_trl_trainer(trainers[names[0]], args, total, Path(tmp) / "trl", after_trl_step)
                print(f"TRL {trl.__version__} GKDTrainer built", flush=True)
                holder["trl"].train()
            else:
                print("trl not importable (or --no-trl): no TRL column; `make bench-async` uses .venv-trl")
                for index in range(args.rounds):
                    opd_round(index)
        finally:
            for trainer in trainers.values():
                trainer.close()

    results = {name: log.summary() for name, log in logs.items() if log.blocks}
    base = results[names[0]]
    trl_base = results.get("TRL GKDTrainer")
    header = ["trainer", "timed steps", "steps/s", "block range", "tokens/s", "× sync", "median staleness",
              "learner wait ms", "worker ms / step", "mean completion length"]
    if trl_base:
        header.insert(6, "× TRL GKDTrainer")
    rows = []
    for name, r in results.items():
        row = [name, r["steps"], f"{r['steps_per_s']:.2f}", f"{r['block_min']:.2f}–{r['block_max']:.2f}",
               f"{r['tokens_per_s']:.0f}", f"{r['steps_per_s'] / base['steps_per_s']:.2f}", f"{r['staleness']:.0f}",
               f"{r['wait_ms']:.1f}", f"{r['worker_ms']:.1f}", f"{r['mean_length']:.1f}"]
        if trl_base:
            row.insert(6, f"{r['steps_per_s'] / trl_base['steps_per_s']:.2f}")
        rows.append(row)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if with_trl:
        versions += f", trl {trl.__version__}"
    print(f"\n## Results ({versions}; {args.rounds - 1} timed rounds of {args.block}-step blocks)\n")
    print(markdown_table(header, rows))
    for n in args.staleness[1:]:
        r = results[names[n]]
        line = f"max_staleness={n}: {r['steps_per_s'] / base['steps_per_s']:.2f}x sync (target >= {TARGET_SYNC}x)"
        if trl_base:
            line += f", {r['steps_per_s'] / trl_base['steps_per_s']:.2f}x TRL GKDTrainer (target >= {TARGET_TRL}x)"
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
