"""trainer.share_prompts (issue 26): scoring and update of one micro-batch of grouped rollouts, with the prompt run once
per group against every row in full, at real size.

    python benchmarks/bench_shared_prompts.py                 # SmolLM2 pair, 8 prompts x n = 1 and 4 (a few minutes)
    python benchmarks/bench_shared_prompts.py --quick         # toy models (seconds, plumbing check)

The rollouts are sampled once per n by the real experiment's trainer (``experiment=real_smollm2``: SmolLM2-135M-Instruct
teacher, its 10-layer copy as student, chat-template prompts, 32 new tokens) and kept fixed; then, alternating the two
modes ``--repeats`` times, each mode runs what a step does after the rollout: the teacher scores the batch (no
gradient) and the student's loss is back-propagated (``Trainer.accumulate_gradients`` on the trainer's own loss path,
the chunked hidden-state loss at vocabulary 49k), gradients cleared after. Reported: the median seconds of each mode,
their ratio, and the prompt's share of the tokens. The two modes' losses are printed too (they agree to float
rounding: tests/test_pitfalls.py checks every method).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import REAL_EXPERIMENT, compose_train_config, print_machine  # noqa: E402


def build(run_dir: Path, n: int, quick: bool, threads: int, prompts: int):
    from opd.train import build_trainer

    overrides = [] if quick else [f"experiment={REAL_EXPERIMENT}", "method=gkd"]
    overrides += [f"output_dir={run_dir}", f"sampler.n={n}", f"trainer.batch_size={prompts}", "trainer.progress=false",
                  f"trainer.num_threads={threads}", "sampler.max_new_tokens=" + ("8" if quick else "32")]
    if quick:
        overrides.append("data.num_train=64")
    return build_trainer(compose_train_config(overrides), run_dir)


def time_mode(trainer, batch, shared: bool) -> tuple[float, float]:
    """Seconds of teacher scoring + student forward and backward on ``batch``, and the loss."""
    trainer.loss_path = dataclasses.replace(trainer.loss_path, share_prompts=shared)
    trainer.teacher_component.share_prompts = shared
    trainer.student.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss, _, _ = trainer.accumulate_gradients([batch], batch.num_tokens)
    seconds = time.perf_counter() - started
    trainer.student.zero_grad(set_to_none=True)
    return seconds, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4], help="completions per prompt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timings of each mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="toy models, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    import torch

    torch.set_num_threads(args.threads)
    print("# bench_shared_prompts: scoring + update of grouped rollouts, prompts shared vs every row in full\n")
    print_machine(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            trainer = build(Path(tmp) / f"n{n}", n, args.quick, args.threads, args.prompts)
            torch.manual_seed(0)
            batch = trainer.collect(next(trainer.prompts))
            prompt_tokens = int(batch.prompt_mask.sum())
            share = prompt_tokens / (prompt_tokens + batch.num_tokens)
            times = {True: [], False: []}
            losses = {}
            time_mode(trainer, batch, True)  # warm-up of both paths (allocator, kernels)
            time_mode(trainer, batch, False)
            for repeat in range(args.repeats):
                for shared in ((True, False) if repeat % 2 == 0 else (False, True)):
                    seconds, losses[shared] = time_mode(trainer, batch, shared)
                    times[shared].append(seconds)
            on, off = statistics.median(times[True]), statistics.median(times[False])
            rows.append((n, len(batch.examples), prompt_tokens, batch.num_tokens, share, off, on, off / on,
                         losses[False], losses[True]))
            del trainer
    print("| n | rows | prompt tokens | completion tokens | prompt share | every row s | shared s | speed-up | "
          "loss (every row) | loss (shared) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, rows_, p, c, share, off, on, ratio, loss_off, loss_on in rows:
        print(f"| {n} | {rows_} | {p} | {c} | {share:.2f} | {off:.2f} | {on:.2f} | {ratio:.2f}x | {loss_off:.6f} | "
              f"{loss_on:.6f} |")


if __name__ == "__main__":
    main()
