"""Training FLOP/s of one full OPD step as a share of this machine's float32 matrix-product peak, measured in the same run.

    python benchmarks/bench_flops.py            # SmolLM2-135M teacher, 10-layer student (about 2 minutes on 2 CPU cores)
    python benchmarks/bench_flops.py --quick    # 2 prompts, 8 tokens, 2 + 1 steps (plumbing check)

The step: ``opd-train experiment=real_smollm2 method=gkd`` (the settings of ``bench_step.py --real``: 8 chat
prompts of reasoning_gym one-digit products, at most 32 new tokens, GKD with λ = 1, β = 0.5, float32, 2 torch
threads), built by ``opd.train.build_trainer``; each timed step is ``trainer.train_step()``.

The peak: ``torch.matmul`` of two float32 ``[2048, 2048]`` matrices in a loop for ``--peak-seconds`` at the
trainer's thread count (``common.matmul_peak_flops``), once before and once after the steps; the fastest call
of both is the peak (the median call is printed too, as the machine's load shows in it).

FLOPs are counted analytically, per step, from the rows the step actually had (prompt lengths p_i without
padding, completion lengths t_i up to and including the first EOS), with the convention of Kaplan et al. 2020
("Scaling Laws for Neural Language Models", arXiv:2001.08361, §2.1): a forward pass costs 2 FLOPs per
matrix parameter per token (C_forward ≈ 2N), the backward pass twice the forward (training ≈ 6N per token).
N counts the weights of the ``nn.Linear`` layers: the decoder body at every position, the output head
``[V, H]`` only where logits are formed (opd forms them on completion positions only; a rollout forms one
per generated token). The input embedding is a lookup and is not counted. Per step:

* rollout (student forward, KV cache: each position once): 2·N_S,body·Σ(p_i + t_i) + 2·N_S,head·Σt_i
* teacher scoring (forward, no grad):                      2·N_T,body·Σ(p_i' + t_i) + 2·N_T,head·Σt_i
* student forward + backward:                            3 × (2·N_S,body·Σ(p_i' + t_i) + 2·N_S,head·Σt_i)

With ``--n`` samples per prompt (``sampler.n``), the work actually done is counted: the rollout's prefill runs each
row's prompt (``generate`` expands the prompt to its n rows first), while with ``trainer.share_prompts`` (on) the
scoring and the update read a group's prompt once: p_i' = p_i for the first row of a group and 0 for the others.

Not counted (so the share is a lower bound of the arithmetic done): the attention-score products
(Kaplan's 2·n_layer·n_ctx·d_attn per token; printed as a share of the counted FLOPs), the decode steps that
rows already past their EOS still run inside ``generate``, left padding, softmax/norm/elementwise work and the
optimizer. This is "model FLOPs utilisation" (Chowdhery et al. 2022, PaLM, App. B) against a measured CPU peak
rather than a datasheet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import build_opd_trainer, count_decode_steps  # noqa: E402
from common import markdown_table, matmul_parameters, matmul_peak_flops, median, print_machine  # noqa: E402


def step_flops(student, teacher, prompt_lengths: list[int], completion_lengths: list[int],
               shared_group: int = 1) -> dict[str, float]:
    """Analytic FLOPs of one GKD step's parts (see the module docstring), from per-row lengths ``[B]``; with
    ``shared_group`` n > 1 the scoring and update read each group of n consecutive rows' prompt once."""
    s_body, s_head = matmul_parameters(student)
    t_body, t_head = matmul_parameters(teacher)
    seq = sum(p + t for p, t in zip(prompt_lengths, completion_lengths))
    gen = sum(completion_lengths)
    scored = gen + sum(p for row, p in enumerate(prompt_lengths) if row % shared_group == 0)
    rollout = 2 * s_body * seq + 2 * s_head * gen
    student_forward = 2 * s_body * scored + 2 * s_head * gen
    teacher_forward = 2 * t_body * scored + 2 * t_head * gen

    def attention(model) -> float:  # causal QK^T and AV: ~L²/2 · d_attn multiply-adds each, per layer (not counted)
        c = model.config
        d_attn = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        return sum(2 * (p + t) ** 2 * d_attn * c.num_hidden_layers for p, t in zip(prompt_lengths, completion_lengths))

    counted = rollout + teacher_forward + 3 * student_forward
    return {"rollout": rollout, "teacher": teacher_forward, "update": 3 * student_forward,
            "total": counted, "attention_not_counted": 4 * attention(student) + attention(teacher),
            "tokens_seq": seq, "tokens_gen": gen}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (the real experiment's)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion cap (the real experiment's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the trainer and of the peak measurement")
    p.add_argument("--matmul-size", type=int, default=2048, help="square matrix size of the peak measurement")
    p.add_argument("--peak-seconds", type=float, default=5.0, help="seconds of matmul loop, before and after the steps")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (sampler.n; trainer.share_prompts on)")
    p.add_argument("--quick", action="store_true", help="2 + 1 steps, 2 prompts, 8 tokens, 1 s of peak (plumbing check)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.max_new_tokens, args.peak_seconds = 2, 1, 2, 8, 1.0
    args.real, args.compile, args.trl_gradient_checkpointing, args.gpu = True, False, False, False  # what
    #   build_opd_trainer reads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    print("# bench_flops: training FLOP/s of one OPD step vs this machine's float32 matmul peak\n")
    print_machine(args.threads)
    before = matmul_peak_flops(args.threads, args.matmul_size, args.peak_seconds)
    print(f"float32 matmul [{args.matmul_size}]^2, {args.threads} threads, before the steps: fastest call "
          f"{before['peak_flops'] / 1e9:.1f} GFLOP/s, median {before['median_flops'] / 1e9:.1f} ({before['calls']} calls)",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="opd-bench-flops-") as tmp:
        started = time.perf_counter()
        trainer = build_opd_trainer(Path(tmp) / "opd", args, args.warmup + args.steps)
        count_decode_steps(trainer)
        torch.set_num_threads(args.threads)
        print(f"opd trainer built in {time.perf_counter() - started:.1f} s; student {trainer.student.config.num_hidden_layers} "
              f"layers, teacher {trainer.teacher.config.num_hidden_layers}; loss chunk size {trainer.loss_chunk_size}",
              flush=True)
        for step in range(args.warmup + args.steps):
            with torch.enable_grad():
                t0 = time.perf_counter()
                metrics = trainer.train_step()
                seconds = time.perf_counter() - t0
            if step >= args.warmup:
                flops = step_flops(trainer.student, trainer.teacher, *trainer.last_lengths,
                                   shared_group=args.n if trainer.loss_path.share_prompts else 1)
                rows.append({"seconds": seconds, "rollout_s": metrics["time/rollout_s"], **flops})
        after = matmul_peak_flops(args.threads, args.matmul_size, args.peak_seconds)
    print(f"float32 matmul, after the steps: fastest call {after['peak_flops'] / 1e9:.1f} GFLOP/s, "
          f"median {after['median_flops'] / 1e9:.1f} ({after['calls']} calls)\n")
    peak = max(before["peak_flops"], after["peak_flops"])
    s_body, s_head = matmul_parameters(trainer.student)
    t_body, t_head = matmul_parameters(trainer.teacher)
    print(f"matrix parameters counted: student body {s_body / 1e6:.1f} M + head {s_head / 1e6:.1f} M, "
          f"teacher body {t_body / 1e6:.1f} M + head {t_head / 1e6:.1f} M\n")

    def rate(key: str, seconds: str) -> float:
        """Median over steps of (that part's FLOPs / that part's seconds)."""
        return median([r[key] / r[seconds] if r[seconds] > 0 else float("nan") for r in rows])

    for r in rows:
        r["rest_s"] = r["seconds"] - r["rollout_s"]
        r["scoring_update"] = r["teacher"] + r["update"]
    parts = [("whole step", "total", "seconds"), ("rollout (student decode)", "rollout", "rollout_s"),
             ("teacher scoring + student forward/backward + optimizer", "scoring_update", "rest_s")]
    table = []
    for label, key, seconds in parts:
        achieved = rate(key, seconds)
        table.append([label, f"{median([r[key] for r in rows]) / 1e9:.2f}", f"{median([r[seconds] for r in rows]):.2f}",
                      f"{achieved / 1e9:.2f}", f"{100 * achieved / peak:.1f}%"])
    print(f"## Results (medians over {len(rows)} timed steps; peak = fastest matmul call, {peak / 1e9:.1f} GFLOP/s)\n")
    print(markdown_table(["part", "GFLOP / step (counted)", "seconds / step", "GFLOP/s", "share of matmul peak"], table))
    attention_share = median([r["attention_not_counted"] / r["total"] for r in rows])
    print(f"\ntokens per step: {median([r['tokens_seq'] for r in rows]):.0f} prompt + completion, "
          f"{median([r['tokens_gen'] for r in rows]):.0f} completion; attention-score FLOPs (not counted): "
          f"{100 * attention_share:.1f}% of the counted FLOPs")
    if hasattr(trainer.sampler, "close"):
        trainer.sampler.close()
    return {"peak_flops": peak, "step_flops_per_s": rate("total", "seconds"), "rows": rows}


if __name__ == "__main__":
    main()
