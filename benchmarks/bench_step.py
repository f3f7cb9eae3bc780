"""One full OPD step (rollout + teacher scoring + update), completion tokens per second: opd's Trainer vs TRL's GKDTrainer.

    python benchmarks/bench_step.py                                 # about 1 minute on 2 CPU cores
    python benchmarks/bench_step.py --compile                       # + opd with compiled forwards (2-3 minutes)
    python benchmarks/bench_step.py --trl-gradient-checkpointing    # TRL with its default gradient checkpointing
    python benchmarks/bench_step.py --quick                         # seconds (plumbing check)

Both sides run ``opd-train``'s defaults: the shipped toy teacher and student (``opd/assets/toy``), the
arithmetic task, GKD with λ = 1 (every batch sampled from the current student) and generalized JSD
β = 0.5, sampling temperature 1, 32 prompts per step, 64 new tokens at most, AdamW lr 1e-3 with 10
warmup steps then cosine decay over the run, gradient clipping at 1, float32, one torch thread.

* **opd**: ``opd.train.build_trainer`` on the composed default config (``conf/train.yaml``); each timed
  step is ``trainer.train_step()`` plus the ``metrics.jsonl`` line the training loop writes per step.
* **TRL** (only when ``trl`` is importable): ``trl.experimental.gkd.GKDTrainer`` on the same two
  checkpoints and the same training split (prompt ids tokenized as opd does, plus the reference
  solution, which λ = 1 replaces by the student's rollout), ``GKDConfig(lmbda=1, beta=0.5, temperature=1,
  max_new_tokens=64, per_device_train_batch_size=32, learning_rate=1e-3, ...)`` without evaluation,
  saving, reporting or gradient checkpointing. Its ``train()`` runs the steps; a callback times each
  optimizer step from the end of the previous one (data loading, generation, forward, backward,
  clipping, optimizer, scheduler and its per-step logging included).

The two interleave in this one process: after each TRL step (inside TRL's ``on_step_end`` callback,
outside TRL's timing) one opd step runs, so a slow spell of the shared machine hits both alike. The
first ``--warmup`` steps of each are not counted. Completion tokens are counted the same way on both
sides: generated tokens up to and including each row's first EOS (the tokens the loss is taken
over); tokens/s = those tokens / the step's wall time. The rollout's share is timed inside each step
(opd: ``time/rollout_s``; TRL: its ``generate_on_policy_outputs``).

``--compile`` adds a second opd trainer with ``trainer.compile=true``: student and teacher ``forward``
are ``torch.compile(..., dynamic=True)`` (rollouts, teacher scoring and the training forward/backward all
compiled). Its first step holds the compilation.
The opd trainers run in alternating order after each TRL step.
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
from common import markdown_table, median, print_machine, use_fresh_inductor_cache  # noqa: E402

TARGET = 1.5  # issue #6: opd's step throughput at least 1.5x TRL's on the tiny default


class StepLog:
    """Per-step measurements of one trainer: seconds, completion tokens, rollout seconds, decode steps."""

    def __init__(self) -> None:
        self.seconds, self.tokens, self.rollout_s, self.decode_steps = [], [], [], []

    def add(self, seconds: float, tokens: int, rollout_s: float, decode_steps: int) -> None:
        self.seconds.append(seconds)
        self.tokens.append(tokens)
        self.rollout_s.append(rollout_s)
        self.decode_steps.append(decode_steps)

    def summary(self, skip: int, batch_size: int) -> dict[str, float]:
        """Medians over the steps after the first ``skip``, and the total rate (all tokens / all time)."""
        sec, tok, roll, dec = (x[skip:] for x in (self.seconds, self.tokens, self.rollout_s, self.decode_steps))
        return {"steps": len(sec), "tokens_per_step": median([float(n) for n in tok]),
                "mean_length": sum(tok) / max(1, len(tok) * batch_size), "decode_steps": median([float(d) for d in dec]),
                "step_s": median(sec), "max_step_s": max(sec, default=float("nan")), "rollout_s": median(roll),
                "rest_s": median([s - r for s, r in zip(sec, roll)]),
                "tokens_per_s": median([n / s for n, s in zip(tok, sec)]), "total_tokens_per_s": sum(tok) / max(sum(sec), 1e-9)}


# ----------------------------------------------------------------------------- opd
def build_opd_trainer(run_dir: Path, args, total_steps: int, compiled: bool = False):
    """The default ``opd-train`` config, composed with Hydra, built by ``opd.train.build_trainer``."""
    from hydra import compose, initialize_config_dir

    from opd.train import CONF_DIR, build_trainer

    overrides = [f"output_dir={run_dir}",               # a throw-away run directory (metrics.jsonl is written)
                 f"trainer.num_threads={args.threads}",  # the default for the toy models is 1 already
                 f"trainer.max_steps={total_steps}",     # the lr schedule spans the steps run here, as TRL's
                 f"trainer.batch_size={args.batch_size}",
                 f"sampler.max_new_tokens={args.max_new_tokens}",
                 f"trainer.compile={compiled}",          # torch.compile of both models' forward (opd's option)
                 "trainer.progress=false"]               # no progress bar
    if args.quick:
        overrides.append("data.num_train=256")           # faster start-up
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return build_trainer(cfg, run_dir)


def opd_step(trainer, log: StepLog) -> None:
    """One ``train_step()`` and its ``metrics.jsonl`` line, timed."""
    import torch

    with torch.enable_grad():  # also when called from inside TRL's loop
        started = time.perf_counter()
        metrics = trainer.train_step()
        trainer.logger.log(metrics, trainer.step)
        seconds = time.perf_counter() - started
    log.add(seconds, int(metrics["train/tokens"]), metrics["time/rollout_s"], trainer.last_decode_steps)


def count_decode_steps(trainer) -> None:
    """Record the completion width of each rollout on ``trainer.last_decode_steps`` (wraps ``trainer.collect``)."""
    collect = trainer.collect

    def collect_and_count(examples):
        batch = collect(examples)
        trainer.last_decode_steps = batch.completion_ids.shape[1]
        return batch

    trainer.last_decode_steps = 0
    trainer.collect = collect_and_count


# ----------------------------------------------------------------------------- TRL
def trl_dataset(tokenizer, examples):
    """Pre-tokenized rows for TRL's ``DataCollatorForChatML``: prompt ids as opd encodes them + reference solution + EOS."""
    from datasets import Dataset

    prompts = tokenizer([ex.prompt for ex in examples])["input_ids"]  # special tokens (BOS) as in opd's encode_prompts
    targets = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    rows = {"prompt": [], "input_ids": [], "completion_mask": []}
    for ex, p, t in zip(examples, prompts, targets):
        completion = t + [tokenizer.eos_token_id]
        rows["prompt"].append(ex.prompt)
        rows["input_ids"].append(p + completion)
        rows["completion_mask"].append([0] * len(p) + [1] * len(completion))
    return Dataset.from_dict(rows)


def build_trl_trainer(opd_trainer, args, total_steps: int, output_dir: Path, on_step):
    """TRL's GKDTrainer on the same checkpoints, data and settings; ``on_step(trl_trainer)`` runs after each optimizer step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opd.config import ASSETS

    class TimedGKDTrainer(GKDTrainer):
        """GKDTrainer that records the time and completion tokens of its on-policy rollouts."""

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            started = time.perf_counter()
            ids, mask, labels = super().generate_on_policy_outputs(model, inputs, generation_config)
            self.last_rollout = (time.perf_counter() - started, int((labels != -100).sum()),
                                 ids.shape[1] - inputs["prompts"].shape[1])
            return ids, mask, labels

    class StepTimer(TrainerCallback):
        """Times each optimizer step from the end of the previous one (the first from ``on_step_begin``)."""

        def __init__(self) -> None:
            self.mark = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.mark is None:
                self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            on_step(time.perf_counter() - self.mark)
            self.mark = time.perf_counter()  # opd's step in on_step is not TRL's time

    toy = ASSETS / "toy"
    tokenizer = AutoTokenizer.from_pretrained(toy / "student")
    student = AutoModelForCausalLM.from_pretrained(toy / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(toy / "teacher", dtype=torch.float32)
    cfg = opd_trainer.cfg
    config = GKDConfig(
        output_dir=str(output_dir),                  # nothing is saved there (save_strategy="no")
        lmbda=1.0,                                   # every batch from the student (opd: method.lmbda=1)
        beta=0.5,                                    # generalized JSD β (opd: method.beta=0.5)
        temperature=1.0,                             # sampling temperature (TRL's default is 0.9; its loss is at T=1)
        max_new_tokens=args.max_new_tokens,          # completion cap (opd: sampler.max_new_tokens)
        per_device_train_batch_size=args.batch_size,  # prompts per step (opd: trainer.batch_size)
        gradient_accumulation_steps=1,               # opd: trainer.grad_accum
        max_steps=total_steps,                       # the run (and the lr schedule) is as long as opd's
        learning_rate=cfg.lr,                        # 1e-3
        warmup_steps=cfg.warmup_steps,               # 10 linear warmup steps
        lr_scheduler_type="cosine_with_min_lr",      # cosine decay ...
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},  # ... to 0.1 x lr, as opd's schedule
        weight_decay=cfg.weight_decay,               # 0
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,  # AdamW betas
        max_grad_norm=cfg.max_grad_norm,             # clipping at 1
        gradient_checkpointing=args.trl_gradient_checkpointing,  # TRL's default is on; opd does not recompute activations
        bf16=False, fp16=False,                      # float32, as opd on CPU
        use_cpu=True,                                # no accelerator
        dataloader_num_workers=0,                    # collate in the training process, as opd
        eval_strategy="no", save_strategy="no",      # no evaluation, no checkpoints
        report_to="none",                            # no W&B / TensorBoard
        logging_steps=1,                             # loss, grad norm and lr every step, as opd's metrics.jsonl
        disable_tqdm=True,                           # no progress bar
        seed=0,                                      # Trainer seeds python, numpy and torch
    )
    trainer = TimedGKDTrainer(model=student, teacher_model=teacher, args=config,
                              train_dataset=trl_dataset(tokenizer, opd_trainer.task.train), processing_class=tokenizer,
                              callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # the logs are still computed every step, just not printed
    return trainer


# ----------------------------------------------------------------------------- the driver
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps per trainer")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps per trainer")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per step (opd-train's default)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion cap (opd-train's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (opd-train's auto setting for the toy models)")
    p.add_argument("--no-trl", action="store_true", help="only opd's side, even when trl is installed")
    p.add_argument("--compile", action="store_true",
                   help="also a second opd trainer with trainer.compile=true (student and teacher forwards torch.compile'd; "
                        "compiling takes 1-2 minutes)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL with its default gradient_checkpointing=True (activations recomputed in backward, and its "
                        "rollouts then generate without a KV cache)")
    p.add_argument("--quick", action="store_true", help="2 + 1 steps, 4 prompts, 8 tokens (plumbing check, seconds)")
    p.add_argument("--json", type=Path, help="also write the summaries and per-step measurements here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.max_new_tokens = 2, 1, 4, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames (gradient_checkpointing, ...)
    print("# bench_step: one full OPD step (rollout + teacher scoring + update), completion tokens/s, opd vs TRL\n")
    print_machine(args.threads)
    with_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    total = args.warmup + args.steps
    logs = {"opd": StepLog()}  # trainer name -> its measurements
    trainers = {}
    if args.compile:
        use_fresh_inductor_cache()  # cold compile times
    with tempfile.TemporaryDirectory(prefix="opd-bench-step-") as tmp:
        for name in ["opd"] + (["opd + compiled forwards"] if args.compile else []):
            started = time.perf_counter()
            trainers[name] = build_opd_trainer(Path(tmp) / f"opd{len(trainers)}", args, total, compiled=name != "opd")
            count_decode_steps(trainers[name])
            logs[name] = StepLog()
            print(f"{name}: trainer built in {time.perf_counter() - started:.1f} s "
                  f"({sum(p.numel() for p in trainers[name].student.parameters())} student parameters, torch threads "
                  f"{torch.get_num_threads()})", flush=True)

        def opd_steps(count: int) -> None:
            """One step of each opd trainer, in alternating order."""
            names = list(trainers) if count % 2 == 0 else list(reversed(list(trainers)))
            for name in names:
                opd_step(trainers[name], logs[name])

        if with_trl:
            import trl

            state = {"count": 0}
            logs["TRL GKDTrainer"] = StepLog()

            def after_trl_step(seconds: float) -> None:
                rollout_s, tokens, decode_steps = state["trl"].last_rollout
                logs["TRL GKDTrainer"].add(seconds, tokens, rollout_s, decode_steps)
                opd_steps(state["count"])
                state["count"] += 1

            started = time.perf_counter()
            state["trl"] = build_trl_trainer(trainers["opd"], args, total, Path(tmp) / "trl", after_trl_step)
            print(f"TRL {trl.__version__} GKDTrainer built in {time.perf_counter() - started:.1f} s", flush=True)
            state["trl"].train()
        else:
            print("trl not installed (or --no-trl): TRL column skipped; install it in a separate venv, see benchmarks/README.md")
            for count in range(total):
                opd_steps(count)
        versions = f"transformers {transformers.__version__}" + (f", trl {trl.__version__}" if with_trl else "")

    results = {name: log.summary(args.warmup, args.batch_size) for name, log in logs.items()}
    rows = []
    for name, r in results.items():
        row = [name, r["steps"], f"{logs[name].seconds[0]:.2f}", f"{r['max_step_s'] * 1e3:.0f}", f"{r['tokens_per_step']:.0f}",
               f"{r['mean_length']:.1f}", f"{r['decode_steps']:.0f}", f"{r['step_s'] * 1e3:.0f}", f"{r['rollout_s'] * 1e3:.0f}",
               f"{r['rest_s'] * 1e3:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['total_tokens_per_s']:.0f}"]
        if with_trl:
            base = results["TRL GKDTrainer"]
            row += [f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}",
                    f"{r['total_tokens_per_s'] / base['total_tokens_per_s']:.2f}"]
        rows.append(row)
    header = ["trainer", "steps timed", "first step s", "slowest timed step ms", "tokens / step", "mean completion length",
              "decode steps", "step ms", "rollout ms", "scoring + update ms", "tokens/s (median step)", "tokens/s (total)"]
    if with_trl:
        header += ["vs TRL (median step)", "vs TRL (total)"]
    print(f"\n## Results ({versions}; medians over the timed steps, ratios measured in this run)\n")
    print(markdown_table(header, rows))
    if with_trl:
        ratio = results["opd"]["tokens_per_s"] / results["TRL GKDTrainer"]["tokens_per_s"]
        verdict = "met" if ratio >= TARGET else "missed"
        caveat = " (against TRL with gradient checkpointing: not like for like)" if args.trl_gradient_checkpointing else ""
        print(f"\nopd / TRL completion tokens per second: {ratio:.2f}x (target >= {TARGET}x: {verdict}){caveat}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": results,
                                         "steps": {name: vars(log) for name, log in logs.items()}}, indent=1))
    return results


if __name__ == "__main__":
    main()
