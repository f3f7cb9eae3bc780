"""Train the two tiny checkpoints that the default (CPU, offline) run ships in ``opd/assets/toy/``.

* ``teacher/``: a 4-layer Llama trained by supervised fine-tuning (SFT) on the default chained
  arithmetic task until its greedy exact-match accuracy on the held-out split is high (>= 0.9).
* ``student/``: a much smaller 2-layer Llama trained by the same SFT but stopped early, as soon as it
  writes well-formed worked solutions and gets a modest fraction of answers right. It is the
  starting point that on-policy distillation from the teacher is expected to improve.

After saving, both directories are reloaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
re-evaluated, and the student is (optionally) trained further with SFT to measure its headroom; the
numbers are written to ``opd/assets/toy/README.md``.

Run from the repository root; the shipped checkpoints come from exactly this command (14 minutes on
2 CPU cores that other jobs were also using; with the default threads on idle cores, about 10)::

    python scripts/make_toy_models.py --threads 1

A specialist teacher for another toy task (multi-teacher distillation) is trained alone with ``--task``
and ``--teacher-only``; it goes to ``opd/assets/toy_<task>/teacher`` and its README also records its
accuracy on the other toy tasks and that of the shipped ``opd/assets/toy`` teacher and student on its task::

    python scripts/make_toy_models.py --task multiplication --teacher-only --threads 1 --teacher-steps 2500

Everything is seeded and runs in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # allow `python scripts/make_toy_models.py` without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from opd.data.arithmetic import ChainArithmetic  # noqa: E402
from opd.data.base import Example, PromptIterator, Task  # noqa: E402
from opd.data.multiplication import Multiplication  # noqa: E402
from opd.engine.evaluate import evaluate_accuracy  # noqa: E402
from opd.models.scoring import completion_logits  # noqa: E402
from opd.models.toy import build_char_tokenizer, tiny_llama_config  # noqa: E402
from opd.sampling.hf import HFSampler  # noqa: E402
from opd.sampling.tokenize import encode_targets  # noqa: E402

#: the toy tasks (all share the character tokenizer), by --task name
TASKS = {"arithmetic": ChainArithmetic, "multiplication": Multiplication}
#: a well-formed completion per task: one or more "a+b=c;" steps, then "#answer" (EOS is checked separately).
WELL_FORMED = {"arithmetic": re.compile(r"(-?\d+[+-]\d+=-?\d+;)+#-?\d+"),
               "multiplication": re.compile(r"(\d+[*+]\d+=\d+;)+#\d+")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults reproduce the shipped checkpoints."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="arithmetic",
                   help="the toy task to train on (every task uses the same character tokenizer)")
    p.add_argument("--teacher-only", action="store_true",
                   help="train and save only the teacher (a specialist for --task), then measure it on every toy "
                        "task and the shipped opd/assets/toy teacher and student on --task")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where teacher/, student/ and README.md are written (default opd/assets/toy for "
                        "arithmetic, opd/assets/toy_<task> otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed for model init, data order and torch")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4),
                   help="torch CPU threads; tiny models stop scaling beyond a few, and on a machine busy with "
                        "other jobs use 1 (oversubscribed threads make every step many times slower)")
    p.add_argument("--batch-size", type=int, default=64, help="training examples per optimizer step")
    p.add_argument("--val-size", type=int, default=256,
                   help="training examples held out (not trained on) to decide when to stop; the eval split "
                        "is only used for the final, reported accuracies")
    p.add_argument("--eval-batch-size", type=int, default=128, help="prompts per greedy-decoding batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length cap when decoding")
    # task (None = the task class's defaults, i.e. those of a run with data=<task>)
    p.add_argument("--num-train", type=int, default=None, help="training problems (default: the task's)")
    p.add_argument("--num-eval", type=int, default=None, help="held-out problems before de-duplication (default: the task's)")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the problem generator")
    # teacher
    p.add_argument("--teacher-hidden", type=int, default=96, help="teacher hidden size")
    p.add_argument("--teacher-layers", type=int, default=4, help="teacher decoder layers")
    p.add_argument("--teacher-heads", type=int, default=4, help="teacher attention heads")
    p.add_argument("--teacher-steps", type=int, default=3000,
                   help="teacher optimizer steps (length of its warmup + cosine schedule)")
    p.add_argument("--teacher-lr", type=float, default=3e-3, help="teacher peak learning rate")
    p.add_argument("--teacher-stop-acc", type=float, default=0.99,
                   help="stop the teacher early once its validation accuracy reaches this")
    p.add_argument("--teacher-min-acc", type=float, default=0.9,
                   help="fail if the saved teacher's eval accuracy is below this")
    # student
    p.add_argument("--student-hidden", type=int, default=64, help="student hidden size")
    p.add_argument("--student-layers", type=int, default=2, help="student decoder layers")
    p.add_argument("--student-heads", type=int, default=4, help="student attention heads")
    p.add_argument("--student-steps", type=int, default=3000,
                   help="length of the student's warmup + cosine schedule; it is stopped long before the end")
    p.add_argument("--student-lr", type=float, default=3e-3, help="student peak learning rate")
    p.add_argument("--student-stop-acc", type=float, default=0.2,
                   help="stop the student at the first validation check with at least this accuracy")
    p.add_argument("--student-max-acc", type=float, default=0.35,
                   help="warn if the saved student's eval accuracy is above this (too little headroom)")
    p.add_argument("--headroom-steps", type=int, default=1000,
                   help="after saving, keep training the student this many more SFT steps and report its "
                        "accuracy (0 skips this check)")
    # shared optimisation settings
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--eval-every", type=int, default=250, help="teacher validation interval in steps")
    p.add_argument("--student-eval-every", type=int, default=25, help="student validation interval in steps")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = REPO_ROOT / "opd" / "assets" / ("toy" if args.task == "arithmetic" else f"toy_{args.task}")
    return args


def build_task(name: str, args: argparse.Namespace) -> Task:
    """The toy task ``name`` with its default settings, except --num-train/--num-eval/--task-seed when given."""
    sizes = {key: value for key, value in (("num_train", args.num_train), ("num_eval", args.num_eval))
             if value is not None}
    return TASKS[name](seed=args.task_seed, **sizes)


def seed_everything(seed: int) -> None:
    """Seed Python and torch (the data order is seeded separately by ``PromptIterator``)."""
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(tokenizer, hidden: int, layers: int, heads: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised float32 ``LlamaForCausalLM`` from :func:`tiny_llama_config`."""
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads)
    config.dtype = torch.float32
    return LlamaForCausalLM(config).float()


def num_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def sft_loss(model: torch.nn.Module, tokenizer, examples: list[Example]) -> torch.Tensor:
    """Mean token cross-entropy of the reference completions (worked solution + EOS) given the prompts.

    Prompt tokens are context only; the loss covers completion tokens, and padding is masked out.
    """
    batch = encode_targets(tokenizer, examples)
    logits = completion_logits(model, batch)  # [B, T, V], position t predicts completion_ids[:, t]
    token_nll = F.cross_entropy(logits.transpose(1, 2), batch.completion_ids, reduction="none")  # [B, T]
    mask = batch.completion_mask.float()  # [B, T]
    return (token_nll * mask).sum() / mask.sum()


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak learning rate over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class SFTRun:
    """One model's supervised fine-tuning state: optimizer, schedule, data stream and step counter.

    Keeping it in an object lets the student be stopped early, saved, and then trained further on
    exactly the same schedule and data stream for the headroom check.
    """

    model: LlamaForCausalLM
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: PromptIterator
    grad_clip: float
    step: int = 0
    seconds: float = 0.0

    @classmethod
    def create(cls, model: LlamaForCausalLM, tokenizer, train: list[Example], args: argparse.Namespace,
               lr: float, total_steps: int) -> SFTRun:
        """AdamW (no decay on norms) with warmup + cosine over ``total_steps``, batches of ``args.batch_size``."""
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
        scheduler = warmup_cosine(optimizer, args.warmup_steps, total_steps)
        return cls(model, tokenizer, optimizer, scheduler, PromptIterator(train, args.batch_size, args.seed),
                   args.grad_clip)

    def train(self, steps: int, desc: str, val: list[Example] | None = None, task: Task | None = None,
              eval_every: int = 0, stop_acc: float | None = None, eval_batch_size: int = 128,
              max_new_tokens: int = 64) -> float | None:
        """Run up to ``steps`` optimizer steps, validating every ``eval_every`` steps.

        Args:
            steps: the most optimizer steps to take in this call (the schedule continues across calls).
            desc: progress-bar label.
            val: problems for greedy validation; None disables validation.
            task: the task whose answer checker scores validation completions.
            eval_every: validation interval in steps (0 disables validation).
            stop_acc: stop at the first validation whose accuracy is at least this.
            eval_batch_size, max_new_tokens: greedy-decoding settings for validation.

        Returns:
            The last validation accuracy (None if never validated). Training stops early at the
            first validation with accuracy ``>= stop_acc``.
        """
        self.model.train()
        last_acc = None
        bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True)
        for _ in bar:
            start = time.perf_counter()
            loss = sft_loss(self.model, self.tokenizer, next(self.data))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.seconds += time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.1e}",
                            val_acc="-" if last_acc is None else f"{last_acc:.3f}")
            if val and eval_every and self.step % eval_every == 0:
                last_acc = evaluate_accuracy(self.model, self.tokenizer, task, val, batch_size=eval_batch_size,
                                             max_new_tokens=max_new_tokens, progress=False).accuracy
                self.model.train()
                tqdm.write(f"{desc}: step {self.step}, {self.seconds:.0f} s training, validation accuracy {last_acc:.3f}")
                if stop_acc is not None and last_acc >= stop_acc:
                    break
        bar.close()
        self.model.eval()
        return last_acc


@torch.no_grad()
def well_formed_rate(model: torch.nn.Module, tokenizer, examples: list[Example], batch_size: int,
                     max_new_tokens: int, pattern: re.Pattern = WELL_FORMED["arithmetic"]) -> float:
    """Fraction of greedy completions that are ``step;...;#answer`` and end with EOS (right or wrong)."""
    sampler = HFSampler(max_new_tokens=max_new_tokens)
    good = 0
    for start in range(0, len(examples), batch_size):
        rollout = sampler.generate(model, tokenizer, examples[start: start + batch_size], greedy=True)
        # completion_mask covers tokens up to and including the first EOS: [B, T]
        lengths = rollout.completion_mask.sum(dim=1)
        for ids, length in zip(rollout.completion_ids, lengths.tolist()):
            ended = length > 0 and ids[length - 1].item() == tokenizer.eos_token_id
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
            good += ended and pattern.fullmatch(text) is not None
    return good / max(len(examples), 1)


def save_checkpoint(model: LlamaForCausalLM, tokenizer, path: Path) -> int:
    """Save float32 safetensors weights, config and tokenizer to ``path``; returns the directory size in bytes."""
    path.mkdir(parents=True, exist_ok=True)
    model.float().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def reload_and_evaluate(path: Path, task: Task, args: argparse.Namespace,
                        task_name: str = "arithmetic") -> tuple[float, float]:
    """Load ``path`` exactly as a user would and measure (eval accuracy, well-formed rate) on the eval split."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    acc = evaluate_accuracy(model, tokenizer, task, task.eval, batch_size=args.eval_batch_size,
                            max_new_tokens=args.max_new_tokens, desc=f"eval {path.name}").accuracy
    fmt = well_formed_rate(model, tokenizer, task.eval, args.eval_batch_size, args.max_new_tokens,
                           WELL_FORMED[task_name])
    return acc, fmt


def describe(model: LlamaForCausalLM) -> str:
    """A one-line architecture summary, e.g. ``LlamaForCausalLM: 4 layers, hidden 96, 4 heads, MLP 384, ...``."""
    c = model.config
    return (f"LlamaForCausalLM: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
            f"MLP {c.intermediate_size}, vocab {c.vocab_size}, tied embeddings")


def write_readme(out_dir: Path, metrics: dict, command: str) -> None:
    """Document both checkpoints (architecture, size, training, accuracies) next to them."""
    t, s = metrics["teacher"], metrics["student"]
    headroom = (f"- Trained {s['headroom_steps']} more SFT steps ({s['headroom_seconds']:.0f} s; not saved), the "
                f"student reaches **{s['headroom_accuracy']:.3f}** eval accuracy, so it has clear room to improve.\n"
                if s.get("headroom_accuracy") is not None else "")
    text = f"""# Toy checkpoints for the default CPU run

Two tiny character-level Llama models for the default task (chained +/- arithmetic with worked
solutions, `ChainArithmetic()` with its default settings: 3-4 terms of 1-2 digits, `seed=0`,
{metrics.get('num_train', 20000)} train / {metrics['num_eval']} held-out eval problems). Both use the character tokenizer of
`opd.models.toy.build_char_tokenizer()` and configs from `tiny_llama_config()`; weights are float32
safetensors. Load them like any Hugging Face model:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("opd/assets/toy/teacher")  # or .../student
tokenizer = AutoTokenizer.from_pretrained("opd/assets/toy/teacher")
tokenizer.padding_side = "left"  # prompts are left-padded for batched generation
```

| | teacher | student |
|---|---|---|
| architecture | {t['architecture']} | {s['architecture']} |
| parameters | {t['params']:,} | {s['params']:,} |
| size on disk | {t['bytes'] / 1e6:.2f} MB | {s['bytes'] / 1e6:.2f} MB |
| SFT steps (batch {metrics['batch_size']}) | {t['steps']} | {s['steps']} (early-stopped) |
| training time | {t['seconds']:.0f} s | {s['seconds']:.0f} s |
| eval accuracy (greedy exact match) | **{t['accuracy']:.3f}** | **{s['accuracy']:.3f}** |
| well-formed completions (`steps;#answer` + EOS) | {t['well_formed']:.3f} | {s['well_formed']:.3f} |

- `teacher/`: supervised fine-tuning (cross-entropy on the reference worked solution + EOS only)
  with AdamW, linear warmup and cosine decay, until its accuracy is high.
- `student/`: the same SFT on a much smaller model, stopped at the first validation check with
  accuracy >= {metrics['student_stop_acc']} (validation = {metrics['val_size']} training problems held out of
  training). It already writes well-formed solutions but gets most answers wrong: the starting point
  that on-policy distillation from the teacher should improve.
{headroom}
Accuracies were measured after reloading the saved directories with `AutoModelForCausalLM` /
`AutoTokenizer` and running `opd.engine.evaluate.evaluate_accuracy` on the eval split
(greedy, `max_new_tokens={metrics['max_new_tokens']}`).

## How they were made

```bash
{command}
```

Seeded (`--seed {metrics['seed']}`), float32, `--threads {metrics['threads']}`; the whole script (both trainings,
the reload-and-evaluate check and the headroom check) took {metrics['total_seconds'] / 60:.1f} minutes of wall time on
{metrics['machine']}. On the same machine and thread count a rerun reproduces both `model.safetensors`
files byte for byte; other thread counts or CPUs change the float rounding, hence the exact weights
and possibly the early-stopping step. Run `python scripts/make_toy_models.py --help` for the training flags.
"""
    (out_dir / "README.md").write_text(text)


def write_teacher_readme(out_dir: Path, metrics: dict, command: str) -> None:
    """Document a specialist teacher: architecture, training, and accuracy on every toy task (its own and the others)."""
    t, name = metrics["teacher"], metrics["task"]
    rows = "\n".join(f"| `{task}` ({row['num_eval']} eval problems) | **{row['teacher']:.3f}** | {row['toy_teacher']:.3f} | "
                     f"{row['toy_student']:.3f} |" for task, row in metrics["cross"].items())
    text = f"""# Toy specialist teacher for the `{name}` task

A tiny character-level Llama trained by supervised fine-tuning on `data={name}` only
(`{metrics['task_class']}()` with its default settings, `seed=0`, {metrics['num_train']} train /
{metrics['num_eval']} held-out eval problems), for multi-teacher distillation next to the arithmetic
teacher in `opd/assets/toy/teacher`. Same character tokenizer (`opd.models.toy.build_char_tokenizer()`),
so the two teachers and the toy student share one vocabulary. Config: `teacher=toy_{name}`.

| | teacher |
|---|---|
| architecture | {t['architecture']} |
| parameters | {t['params']:,} |
| size on disk | {t['bytes'] / 1e6:.2f} MB |
| SFT steps (batch {metrics['batch_size']}) | {t['steps']} |
| training time | {t['seconds']:.0f} s |
| well-formed completions on `{name}` | {t['well_formed']:.3f} |

Greedy exact-match accuracy on each toy task's eval split (each model reloaded from disk, then
`opd.engine.evaluate.evaluate_accuracy`, `max_new_tokens={metrics['max_new_tokens']}`):

| task | this teacher (`toy_{name}/teacher`) | arithmetic teacher (`toy/teacher`) | toy student (`toy/student`) |
|---|---|---|---|
{rows}

Each teacher is a specialist: this one on `{name}`, the shipped `toy/teacher` on `arithmetic`.

## How it was made

```bash
{command}
```

Seeded (`--seed {metrics['seed']}`), float32, `--threads {metrics['threads']}`; {metrics['total_seconds'] / 60:.1f} minutes
of wall time (training, reload and all evaluations) on {metrics['machine']}. Stopping decisions used
{metrics['val_size']} held-out training problems; the eval splits were read only for the table above.
"""
    (out_dir / "README.md").write_text(text)


def teacher_only(args: argparse.Namespace, task: Task, train: list[Example], common: dict, tokenizer,
                 wall_start: float) -> None:
    """Train and save a specialist teacher for ``args.task``, then measure it and the shipped toy models on every task."""
    teacher = build_model(tokenizer, args.teacher_hidden, args.teacher_layers, args.teacher_heads, args.seed)
    print(f"teacher: {describe(teacher)}; {num_params(teacher):,} parameters")
    run = SFTRun.create(teacher, tokenizer, train, args, args.teacher_lr, args.teacher_steps)
    run.train(args.teacher_steps, f"{args.task} teacher SFT", eval_every=args.eval_every,
              stop_acc=args.teacher_stop_acc, **common)
    teacher_bytes = save_checkpoint(teacher, tokenizer, args.out_dir / "teacher")
    shipped = REPO_ROOT / "opd" / "assets" / "toy"
    cross, own_fmt = {}, 0.0
    for name in TASKS:  # every toy task with its default settings (the split a data=<name> run evaluates on)
        other = task if name == args.task else TASKS[name]()
        acc, fmt = reload_and_evaluate(args.out_dir / "teacher", other, args, name)
        own_fmt = fmt if name == args.task else own_fmt
        cross[name] = {"num_eval": len(other.eval), "teacher": acc,
                       "toy_teacher": reload_and_evaluate(shipped / "teacher", other, args, name)[0],
                       "toy_student": reload_and_evaluate(shipped / "student", other, args, name)[0]}
        print(f"{name}: {cross[name]}")
    metrics = {
        "task": args.task, "task_class": TASKS[args.task].__name__, "seed": args.seed, "threads": args.threads,
        "batch_size": args.batch_size, "val_size": len(common["val"]), "num_train": len(task.train),
        "num_eval": len(task.eval), "max_new_tokens": args.max_new_tokens, "machine": f"{os.cpu_count()} CPU cores",
        "total_seconds": time.perf_counter() - wall_start, "cross": cross,
        "teacher": {"architecture": describe(teacher), "params": num_params(teacher), "bytes": teacher_bytes,
                    "steps": run.step, "seconds": run.seconds, "well_formed": own_fmt},
    }
    print(json.dumps(metrics, indent=2))
    write_teacher_readme(args.out_dir, metrics, " ".join(["python scripts/make_toy_models.py", *sys.argv[1:]]))
    if cross[args.task]["teacher"] < args.teacher_min_acc:
        raise SystemExit(f"teacher eval accuracy {cross[args.task]['teacher']:.3f} < {args.teacher_min_acc}: train it "
                         f"longer (--teacher-steps) or make it bigger")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    task = build_task(args.task, args)
    # Stopping decisions use held-out *training* problems, so the eval split stays untouched until the end.
    train, val = task.train[: -args.val_size], task.train[-args.val_size:]
    # a generated training split may repeat a problem: a validation problem that is also trained on would make the
    # stopping decision in-sample, so those are dropped (and counted) from validation
    trained = {example.prompt for example in train}
    repeated = sum(example.prompt in trained for example in val)
    val = [example for example in val if example.prompt not in trained]
    if repeated:
        print(f"validation: dropped {repeated} problem(s) that the training split repeats")
    if not val:
        raise SystemExit(f"make_toy_models: all {args.val_size} validation problems repeat training ones; "
                         "raise --num-train or --val-size")
    tokenizer = build_char_tokenizer()
    print(f"task: {len(train)} train / {len(val)} validation / {len(task.eval)} eval problems; "
          f"vocab {len(tokenizer)}; {args.threads} threads")
    common = dict(val=val, task=task, eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    if args.teacher_only:
        teacher_only(args, task, train, common, tokenizer, wall_start)
        return

    # --- teacher: train to high accuracy -------------------------------------------------------------
    teacher = build_model(tokenizer, args.teacher_hidden, args.teacher_layers, args.teacher_heads, args.seed)
    print(f"teacher: {describe(teacher)}; {num_params(teacher):,} parameters")
    teacher_run = SFTRun.create(teacher, tokenizer, train, args, args.teacher_lr, args.teacher_steps)
    teacher_run.train(args.teacher_steps, "teacher SFT", eval_every=args.eval_every, stop_acc=args.teacher_stop_acc,
                      **common)
    teacher_bytes = save_checkpoint(teacher, tokenizer, args.out_dir / "teacher")

    # --- student: same SFT on a smaller model, stopped early --------------------------------------------
    student = build_model(tokenizer, args.student_hidden, args.student_layers, args.student_heads, args.seed)
    print(f"student: {describe(student)}; {num_params(student):,} parameters")
    student_run = SFTRun.create(student, tokenizer, train, args, args.student_lr, args.student_steps)
    student_run.train(args.student_steps, "student SFT (early-stopped)", eval_every=args.student_eval_every,
                      stop_acc=args.student_stop_acc, **common)
    student_bytes = save_checkpoint(student, tokenizer, args.out_dir / "student")
    student_steps, student_seconds = student_run.step, student_run.seconds

    # --- verify: reload the saved directories as a user would ----------------------------------------------
    teacher_acc, teacher_fmt = reload_and_evaluate(args.out_dir / "teacher", task, args)
    student_acc, student_fmt = reload_and_evaluate(args.out_dir / "student", task, args)
    print(f"teacher eval accuracy {teacher_acc:.3f} (well-formed {teacher_fmt:.3f}); "
          f"student eval accuracy {student_acc:.3f} (well-formed {student_fmt:.3f})")

    # --- headroom: would more SFT make the student much better? (the saved checkpoint is unaffected) -------
    headroom_acc = None
    if args.headroom_steps > 0:
        student_run.train(args.headroom_steps, "student SFT (headroom check)")
        headroom_acc = evaluate_accuracy(student, tokenizer, task, task.eval, batch_size=args.eval_batch_size,
                                         max_new_tokens=args.max_new_tokens, desc="eval student+").accuracy
        print(f"student after {args.headroom_steps} more SFT steps: eval accuracy {headroom_acc:.3f}")

    metrics = {
        "seed": args.seed, "threads": args.threads, "batch_size": args.batch_size, "val_size": len(val),
        "num_train": len(task.train), "num_eval": len(task.eval), "max_new_tokens": args.max_new_tokens,
        "student_stop_acc": args.student_stop_acc,
        "machine": f"{os.cpu_count()} CPU cores", "total_seconds": time.perf_counter() - wall_start,
        "teacher": {"architecture": describe(teacher), "params": num_params(teacher), "bytes": teacher_bytes,
                    "steps": teacher_run.step, "seconds": teacher_run.seconds, "accuracy": teacher_acc,
                    "well_formed": teacher_fmt},
        "student": {"architecture": describe(student), "params": num_params(student), "bytes": student_bytes,
                    "steps": student_steps, "seconds": student_seconds, "accuracy": student_acc,
                    "well_formed": student_fmt, "headroom_steps": args.headroom_steps,
                    "headroom_seconds": student_run.seconds - student_seconds, "headroom_accuracy": headroom_acc},
    }
    command = " ".join(["python scripts/make_toy_models.py", *(sys.argv[1:] if argv is None else argv)])
    print(json.dumps(metrics, indent=2))
    write_readme(args.out_dir, metrics, command)
    print(f"wrote {args.out_dir} in {metrics['total_seconds'] / 60:.1f} min")

    if teacher_acc < args.teacher_min_acc:
        raise SystemExit(f"teacher eval accuracy {teacher_acc:.3f} < {args.teacher_min_acc}: train it longer "
                         f"(--teacher-steps) or make it bigger")
    if student_acc > args.student_max_acc:
        print(f"warning: student eval accuracy {student_acc:.3f} > {args.student_max_acc}; lower --student-stop-acc")


if __name__ == "__main__":
    main()
