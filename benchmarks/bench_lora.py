"""LoRA students against full fine-tuning at real size: memory, optimizer state, checkpoint, step time, weight sync.

Each variant runs in a fresh process (its peak RSS is its own): the fine-tuned-teacher study's settings
(``experiment=real_opd_finetuned_teacher``: SmolLM2-135M-Instruct student and teacher, 16 prompts, 16 new tokens,
GKD on-policy), without its stages (the costs measured here do not depend on the weights). Per variant:

* ``trainable``: parameters the optimizer updates; ``optimizer MiB``: AdamW's state after the first step;
* ``checkpoint MiB``: the files ``Trainer.save`` writes (weights or adapter, trainer state, tokenizer);
* ``peak RSS GiB``: the process's high-water mark after the steps;
* ``step s``: median of the steps after the first (rollouts + update);
* with ``--vllm``: ``sampler=vllm``, the bytes and seconds ``sync_weights`` moves per step (a full student's
  weights; a LoRA student's adapter files, ``sampler.lora_sync=adapter``, or its merged weights, ``merged``).

``--opsd`` adds OPSD's self-distillation (``teacher=initial_student``): the LoRA student scoring as its own teacher
with the adapters off, against the same run with the teacher as a deep copy of the student (what a full student
needs; forced here by patching the teacher's adapter check), to show the memory the shared base saves.

Figures go to ``benchmarks/RESULTS.md`` by hand, with the command and the machine's load.

Usage::

    .venv/bin/python benchmarks/bench_lora.py --steps 4 --vllm --opsd
    .venv/bin/python benchmarks/bench_lora.py --quick     # the toy pair, seconds (tests/test_benchmarks_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compose_train_config, markdown_table, peak_rss_bytes, print_machine, run_worker  # noqa: E402

MIB = 1 << 20
REAL = ["experiment=real_opd_finetuned_teacher", "teacher_finetune=null", "warm_start=null",
        "trainer.eval_teacher_kl=false"]
QUICK = ["debug=tiny", "teacher=toy", "student=toy", "trainer.batch_size=8"]
GKD = ["method=gkd", "method.lmbda=1", "method.beta=0.5"]  # the study's on-policy arm
#: variant -> overrides (and flags for the worker)
VARIANTS = {
    "full": [*GKD],
    "lora r=8": [*GKD, "student.lora.r=8"],
    "lora r=32": [*GKD, "student.lora.r=32"],
}
VLLM_VARIANTS = {
    "full, vllm": [*GKD, "sampler=vllm"],
    "lora r=8, vllm adapter": [*GKD, "sampler=vllm", "student.lora.r=8", "sampler.lora_sync=adapter"],
    "lora r=8, vllm merged": [*GKD, "sampler=vllm", "student.lora.r=8", "sampler.lora_sync=merged"],
    "lora r=32, vllm adapter": [*GKD, "sampler=vllm", "student.lora.r=32", "sampler.lora_sync=adapter"],
}
OPSD_VARIANTS = {
    "opsd lora r=8, teacher = adapters off": ["method=opsd", "student.lora.r=8"],
    "opsd lora r=8, teacher = deep copy": ["method=opsd", "student.lora.r=8", "+copy_teacher"],
    "opsd full, teacher = deep copy": ["method=opsd"],
}


def worker(payload: dict) -> None:
    """Build the trainer, run ``steps`` steps, save once; print the measurements as one JSON line."""
    import time

    import torch

    from opd.train import build_trainer

    overrides = [o for o in payload["overrides"] if o != "+copy_teacher"]
    if "+copy_teacher" in payload["overrides"]:  # the teacher as a deep copy even for a LoRA student
        import opd.teachers.initial_student as initial_student

        initial_student.has_adapters = lambda model: False
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_train_config([*overrides, f"output_dir={out}", f"trainer.num_threads={payload['threads']}",
                                    "trainer.progress=false"])
        trainer = build_trainer(cfg)
        seconds = []
        for _ in range(payload["steps"]):
            started = time.perf_counter()
            trainer.train_step()
            seconds.append(time.perf_counter() - started)
        optimizer = getattr(trainer.backend.optimizer, "state", {})
        optimizer_bytes = sum(t.numel() * t.element_size() for state in optimizer.values() for t in state.values()
                              if isinstance(t, torch.Tensor))
        checkpoint = trainer.save()
        checkpoint_bytes = sum(f.stat().st_size for f in Path(checkpoint).rglob("*") if f.is_file())
        sampler = trainer.sampler
        syncs = getattr(sampler, "syncs", 0)
        trainer.close()
        print(json.dumps({
            "trainable": sum(p.numel() for p in trainer.student.parameters() if p.requires_grad),
            "optimizer_mib": optimizer_bytes / MIB, "checkpoint_mib": checkpoint_bytes / MIB,
            "peak_rss_gib": peak_rss_bytes() / (1 << 30),
            "step_s": statistics.median(seconds[1:] or seconds),
            "sync_mib_per_step": getattr(sampler, "sync_bytes", 0) / MIB / syncs if syncs else None,
            "sync_s_per_step": getattr(sampler, "sync_seconds", 0.0) / syncs if syncs else None}))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run every variant; returns variant -> its measurements (or an ``error``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per variant (the first is not timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm", action="store_true", help="also sampler=vllm: weight-sync bytes and seconds")
    parser.add_argument("--opsd", action="store_true", help="also OPSD: the base as teacher, shared vs copied")
    parser.add_argument("--quick", action="store_true", help="the toy pair, 2 steps (a smoke test)")
    parser.add_argument("--only", nargs="+", help="run only the variants with these names (default: every one selected)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    print_machine(args.threads)
    base, steps = (QUICK, 2) if args.quick else (REAL, args.steps)
    variants = dict(VARIANTS)
    if args.vllm:
        variants.update(VLLM_VARIANTS)
    if args.opsd:
        variants.update(OPSD_VARIANTS)
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            parser.error(f"--only: unknown variants {unknown}; known: {sorted(variants)}")
        variants = {name: overrides for name, overrides in variants.items() if name in args.only}
    rows, results = [], {}
    for name, overrides in variants.items():
        result = run_worker(Path(__file__), {"overrides": [*base, *overrides], "steps": steps, "threads": args.threads},
                            args.threads, timeout=1800)
        results[name] = result
        if "error" in result:
            rows.append([name, result["error"][:120], "", "", "", "", "", ""])
            continue

        def fmt(value, spec):
            return "–" if value is None else format(value, spec)

        rows.append([name, f"{result['trainable']:,}", fmt(result["optimizer_mib"], ".1f"),
                     fmt(result["checkpoint_mib"], ".1f"), fmt(result["peak_rss_gib"], ".2f"), fmt(result["step_s"], ".2f"),
                     fmt(result["sync_mib_per_step"], ".2f"), fmt(result["sync_s_per_step"], ".3f")])
        print(f"  {name}: {result}", flush=True)
    print(markdown_table(["variant", "trainable", "optimizer MiB", "checkpoint MiB", "peak RSS GiB", "step s",
                          "sync MiB/step", "sync s/step"], rows))
    return results


if __name__ == "__main__":
    main()
