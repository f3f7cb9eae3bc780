"""The one method-agnostic training loop.

Each optimizer step:
  1. prompts -> completions from the method's behaviour policy (student rollouts via the sampler,
     teacher rollouts, or dataset answers), for every micro-batch of the step;
  2. the completion tokens of the whole step are counted (the loss normaliser);
  3. per micro-batch: teacher logits (no grad) and student logits on the same completion tokens ->
     ``method.loss`` -> backward;
  4. gradient clipping, AdamW step, learning-rate schedule (``opd/engine/backends.py``: a torch
     optimizer in one process, or a DeepSpeed ZeRO engine over several); non-finite steps are
     skipped, and the run stops after more than ``max_skipped_steps`` of them in a row.
Over N processes (``torchrun``/``deepspeed`` with ``deepspeed=zero2|zero3``) every rank takes its
``1/N`` slice of each global micro-batch, the loss is normalised by the global token count, and
evaluation is sharded; rank 0 writes metrics and the HF weights of checkpoints.
Greedy exact-match evaluation runs before training, every ``eval_every`` steps and at the end.
Prompts that cannot fit the models' context together with ``sampler.max_new_tokens`` are dropped at
start-up (with a warning), and a checkpoint is never written from non-finite weights.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from opd import distributed as dist
from opd.config import DeepSpeedConfig, LoggerConfig, ModelConfig, TrainerConfig
from opd.data.base import PromptIterator, Task
from opd.engine import checkpoint as ckpt
from opd.engine.backends import DeepSpeedBackend, LocalBackend
from opd.engine.evaluate import EvalResult, Evaluator
from opd.engine.loss_paths import LossPath, check_pair, path_loss, select_loss_path
from opd.engine.overlong import OverlongRollouts
from opd.engine.rollouts import build_rollout_source, check_rollout_settings, worker_threads
from opd.engine.splits import prepare_splits
from opd.engine.stopping import StopSignals
from opd.errors import ConfigError, TrainingError, TrainingInterrupted
from opd.methods.base import AuxiliaryContext, Method, cross_tokenizer_methods
from opd.models.dropout import disable_dropout
from opd.models.loading import check_model_path, load_model, load_tokenizer, resolve_device, save_base_spec
from opd.models.lora import AdaptersOff, LoraStudent, apply_lora
from opd.models.scoring import completion_logits, linear_head, prompt_sharing_blocker, trim_vocabulary
from opd.models.weights import parameter_counts
from opd.sampling.base import eos_token_ids, suppress_padding_ids
from opd.sampling.behaviour import OwnTokensTeacher, RolloutContext
from opd.teachers import Teacher
from opd.teachers.router import per_teacher_means
from opd.tracking.loggers import JsonlLogger
from opd.types import Example, RolloutBatch, SparseTeacherLogprobs


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(cfg: TrainerConfig):
    """Multiplier of the peak lr at a step: linear warmup, then cosine / linear decay to ``min_lr_ratio``, or constant."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


#: below this many student parameters one CPU thread beats two: tiny matmuls lose more to thread sync than they gain
TINY_MODEL_PARAMS = 10_000_000


def set_cpu_threads(num_threads: int | None, device: torch.device, model: torch.nn.Module,
                    worker_threads: int = 0) -> None:
    """``trainer.num_threads``, or the auto rule: 1 thread for tiny models on a CPU, else torch's default less the
    ``worker_threads`` of a rollout worker (``trainer.max_staleness > 0``).

    Measured on the 2-core CI machine (benchmarks/RESULTS.md): for the toy models two threads were
    several times slower than one, and erratic whenever anything else was running.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    elif device.type == "cpu" and sum(p.numel() for p in model.parameters()) < TINY_MODEL_PARAMS:
        torch.set_num_threads(1)
    elif device.type == "cpu" and worker_threads:  # the rollout worker's cores are not the learner's
        torch.set_num_threads(max(1, torch.get_num_threads() - worker_threads))


class StepUpdate(NamedTuple):
    """What one optimizer step did (:meth:`Trainer._update`): the loss summed over micro-batches and ranks, the
    gradient norm, the completion tokens it trained on, the rows cut before EOS out of those sampled, and the method's
    summed loss terms."""

    loss: float
    grad_norm: float
    num_tokens: int
    truncated: int
    sampled: int
    metrics: dict[str, float]


class Trainer:
    """Distils ``teacher`` into ``student`` with ``method`` on ``task``.

    Args:
        method, sampler, task: built components (see ``opd.registry``).
        teacher: the teacher, built but not loaded (``opd.teachers.build_teacher``), or None for teacher-free methods.
        student_cfg, trainer_cfg: typed config sections.
        logger: a metrics sink (``metrics.jsonl`` at least), or None to attach one later with
            :meth:`attach_logger` (``build_trainer`` does, so nothing is written before every check passed).
        run_dir: where checkpoints and ``summary.json`` go.
        seed: seeds every RNG, including the behaviour-policy coin.
        logger_cfg: the logger section (how many sample completions to log per evaluation).
        deepspeed_cfg: the ``deepspeed`` section; None or disabled = one process with a torch optimizer.

    Raises:
        ModelLoadError: a model or tokenizer cannot be loaded, or teacher and student vocabularies differ.
        DataError: a split is empty or none of its prompts fits the models' context.
        TrainingError: the method needs a teacher model but none is configured.
    """

    def __init__(self, method: Method, sampler, task: Task, teacher: Teacher | None, student_cfg: ModelConfig,
                 trainer_cfg: TrainerConfig, logger: JsonlLogger | None, run_dir: Path, seed: int = 0,
                 logger_cfg: LoggerConfig | None = None, deepspeed_cfg: DeepSpeedConfig | None = None) -> None:
        self.method, self.sampler, self.task, self.cfg = method, sampler, task, trainer_cfg
        self.logger, self.run_dir, self.seed = logger, Path(run_dir), seed
        self.num_samples = logger_cfg.num_completions if logger_cfg else 8
        seed_everything(seed)
        self.device = resolve_device(trainer_cfg.device)
        self._check_components(teacher, student_cfg)  # everything that needs no model: one-line errors in a second
        self._setup_student(student_cfg)
        self._setup_teacher(teacher)
        self._setup_loss_path()
        self._setup_backend(student_cfg, deepspeed_cfg)
        self._setup_data(student_cfg)
        self._setup_state()
        self._setup_rollouts()

    # ------------------------------------------------------------------ set-up steps, in order
    def _check_components(self, teacher: Teacher | None, student_cfg: ModelConfig) -> None:
        """The method/teacher pair (:func:`~opd.engine.loss_paths.check_pair`), the chat templates and both model
        paths, before any model loads."""
        check_pair(self.method, teacher)
        check_rollout_settings(self.cfg, self.method)
        if teacher is not None and teacher.chat_template is not None and teacher.chat_template != student_cfg.chat_template \
                and self.method.teacher_inputs != "retokenized":  # a cross-tokenizer teacher renders its own prompt
            raise ConfigError(f"teacher.chat_template={teacher.chat_template} but student.chat_template="
                              f"{student_cfg.chat_template}: both models must see the same prompt tokens")
        check_model_path(student_cfg, "student")
        if teacher is not None:
            teacher.check()
            teacher.check_sources({example.source for example in self.task.train})

    def _setup_student(self, student_cfg: ModelConfig) -> None:
        """The shared tokenizer and the student (train mode, dropout off unless configured), CPU threads."""
        self.student_cfg = student_cfg  # the rollout worker loads its own copy from it
        self.tokenizer = load_tokenizer(student_cfg, "student")
        self.student = load_model(student_cfg, "student", self.device)
        #: the PEFT wrapper of a LoRA student (adapters injected into self.student in place), or None
        self.lora: LoraStudent | None = None
        if student_cfg.lora.enabled:
            if student_cfg.lora.dropout and self.cfg.disable_dropout:
                raise ConfigError(f"student.lora.dropout={student_cfg.lora.dropout} has no effect while "
                                  "trainer.disable_dropout=true (every dropout of the student is off); set one of them")
            self.lora = apply_lora(self.student, student_cfg.lora, self.seed)
        if self.cfg.disable_dropout:  # scoring passes in train mode must equal eval-mode ones (opd/models/dropout.py)
            disable_dropout(self.student)
        self.student.train()
        set_cpu_threads(self.cfg.num_threads, self.device, self.student, worker_threads(self.cfg, self.device))

    def _setup_teacher(self, teacher: Teacher | None) -> None:
        """Load the teacher beside the student (frozen); the vocabulary the pair shares; padding rows hidden."""
        self.teacher_component = teacher
        #: logits keep the first vocab_size rows: less than a model's rows when the pair differs only by padding
        self.vocab_size = self.student.get_output_embeddings().weight.shape[0]
        if teacher is not None:  # loaded even for teacher-free losses (SFT): the summary reports its accuracy
            self.vocab_size = teacher.setup(self.student, self.tokenizer, self.device)
            teacher.vocab_size = self.vocab_size
        #: the teacher reads another tokenizer: it never samples or is evaluated on the student's ids
        self.other_tokenizer = teacher is not None and teacher.other_tokenizer
        policy = self.method.policy
        if self.other_tokenizer and policy.uses_teacher and not policy.teacher_writes_text:
            raise ConfigError(f"method {self.method.registry_name!r} decodes with the teacher token by token "
                              f"({type(policy).__name__}), which needs one vocabulary, but the teacher's tokenizer differs "
                              "from the student's; across tokenizers the teacher writes whole completions as text "
                              f"(seqkd, rs_seqkd) or scores the student's text ({', '.join(cross_tokenizer_methods())})")
        suppress_padding_ids(self.sampler, self.vocab_size,
                             {"student": self.student, "teacher": None if self.other_tokenizer else self.teacher})
        if self.cfg.eval_teacher_kl and self.teacher is None:
            raise ConfigError("trainer.eval_teacher_kl=true needs a teacher model in this process (a local teacher); "
                              "set it false for a served or missing teacher")
        try:  # checks that need the vocabulary, before any training
            self.method.check_vocabulary(self.vocab_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _setup_loss_path(self) -> None:
        """Full logits, chunked hidden states or sparse log-probs (:func:`~opd.engine.loss_paths.select_loss_path`)."""
        path = select_loss_path(self.method, self.teacher_component, self.student, self.cfg.loss_chunk_size, stacklevel=4)
        self.loss_path = dataclasses.replace(path, share_prompts=self.cfg.share_prompts)
        if self.teacher_component is not None:
            self.teacher_component.share_prompts = self.cfg.share_prompts
        if self.cfg.share_prompts and getattr(self.sampler, "n", 1) > 1:  # rows will repeat prompts: say where it is off
            for role, model in (("student", self.student), ("teacher", self.teacher)):
                reason = None if model is None else prompt_sharing_blocker(model)
                if reason is not None:
                    print(f"opd-train: trainer.share_prompts: the {role} scores every row in full ({reason})")

    def _setup_backend(self, student_cfg: ModelConfig, deepspeed_cfg: DeepSpeedConfig | None) -> None:
        """The optimizer and schedule: a torch optimizer in one process, or DeepSpeed ZeRO engines; torch.compile."""
        trainer_cfg = self.cfg
        if deepspeed_cfg is not None and deepspeed_cfg.enabled:
            teacher_dtype = (self.teacher_component.dtype if self.teacher_component else None) or student_cfg.dtype
            # a LoRA student's own base as teacher (AdaptersOff), or the live student, is the student's modules: no
            # engine of its own; an EMA copy stays whole in every process (it averages the whole student into itself)
            component = self.teacher_component
            if component is not None and component.averages_student and deepspeed_cfg.stage == 3:
                raise ConfigError(f"teacher kind {component.kind} averages the whole student into its own copy after "
                                  "every update, but under deepspeed=zero3 each process holds only a partition of the "
                                  "student; use deepspeed=zero2")
            own_engine = not (isinstance(self.teacher, AdaptersOff) or (component is not None and (
                component.shares_student or component.averages_student)))
            teacher = self.teacher if own_engine else None
            self.backend = DeepSpeedBackend(self.student, teacher, deepspeed_cfg, trainer_cfg, lr_lambda(trainer_cfg),
                                            student_cfg.dtype, teacher_dtype)
            if self.loss_path.chunk_size and deepspeed_cfg.stage == 3:
                warnings.warn("the chunked hidden-state loss is not used under ZeRO-3 (the student's output head is "
                              "partitioned); using full logits", UserWarning, stacklevel=3)
                self.loss_path = LossPath("logits", share_prompts=self.loss_path.share_prompts)
        else:
            self.backend = LocalBackend(self.student, trainer_cfg, lr_lambda(trainer_cfg), lora=self.lora)
        if trainer_cfg.compile:  # after DeepSpeed has wrapped/sharded the modules; one compile serves every shape
            for model in (self.student, self.teacher):
                if model is not None and (model is self.student or not self.teacher_component.shares_student):
                    model.forward = torch.compile(model.forward, dynamic=True)
        if dist.world_size() > 1:  # different rollout samples on every rank; the same prompts and coin flips
            torch.manual_seed(self.seed + 1_000_003 * dist.rank())

    def _setup_data(self, student_cfg: ModelConfig) -> None:
        """Chat template, the splits cut to what fits every model's context, the prompt stream and the rollout and
        auxiliary-loss contexts."""
        trainer_cfg, task, sampler = self.cfg, self.task, self.sampler
        splits = prepare_splits(task, self.tokenizer, self.student, self.teacher_component, trainer_cfg,
                                chat_template=student_cfg.chat_template, max_new_tokens=sampler.max_new_tokens,
                                needs_validation=self.method.needs_validation_loss)
        self.split_overlap = splits.overlap
        self.method.bind(task, self.tokenizer)
        self.prompts = PromptIterator(splits.train, trainer_cfg.batch_size, self.seed)
        def student_logits(batch: RolloutBatch) -> torch.Tensor:  # [B, T, V] on the pair's shared vocabulary
            return trim_vocabulary(completion_logits(self.backend.train_model, batch), self.vocab_size)

        self.aux_ctx = AuxiliaryContext(self.tokenizer, self.device, student_logits, self.teacher_logits,
                                        trainer_cfg.grad_accum,
                                        lambda count: int(dist.all_reduce_sum([count])[0]))
        # a teacher with another tokenizer writes its samples as text in its own tokens (SeqKD across tokenizers)
        own_tokens = OwnTokensTeacher(self.teacher, self.teacher_component.tokenizer, self.teacher_component.own_prompt) \
            if self.other_tokenizer else None
        self.rollout_ctx = RolloutContext(self.student, self.teacher, self.tokenizer, sampler, self.device,
                                          rng=random.Random(self.seed), max_steps=trainer_cfg.max_steps, task=task,
                                          own_tokens_teacher=own_tokens)
        self.evaluator = Evaluator(trainer_cfg, task, self.tokenizer, sampler, splits.eval, splits.validation,
                                   self.vocab_size, self.loss_chunk_size, self.num_samples, self.device)
        #: rollouts cut before any EOS (student's or teacher's ids): counted, and masked with trainer.overlong=mask
        writers = (self.student,) if self.other_tokenizer else (self.student, self.teacher)  # models writing these ids
        self.overlong = OverlongRollouts(eos_token_ids(self.tokenizer, *(m for m in writers if m)),
                                         mask=trainer_cfg.overlong == "mask")

    def _setup_state(self) -> None:
        """Counters a checkpoint saves and restores."""
        self.step = 0
        self.tokens_trained = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.initial_results: dict[str, float | None] = {}  # teacher and step-0 student accuracy, kept across resumes
        self.stop_signals = StopSignals()  # SIGTERM / SIGINT: finish the step, checkpoint, exit
        self.restored_from: Path | None = None  # the checkpoint this run continues, if any

    def _setup_rollouts(self) -> None:
        """The rollout source (:mod:`opd.engine.rollouts`): written in the step, or by a worker process."""
        self.rollouts = build_rollout_source(
            self.cfg, self.method, self.rollout_ctx, self.prompts, student_cfg=self.student_cfg, student=self.student,
            teacher=self.teacher_component, teacher_output=self.loss_path.teacher_output, vocab_size=self.vocab_size,
            seed=self.seed, device=self.device)

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The teacher's local model (sampling, evaluation, DeepSpeed), or None (no teacher, or a served one)."""
        return self.teacher_component.model if self.teacher_component is not None else None

    @property
    def eval_examples(self) -> list[Example]:
        """The held-out split the evaluator scores (read-only: pass other examples to :meth:`evaluate`)."""
        return self.evaluator.eval_examples

    @property
    def validation_examples(self) -> list[Example]:
        """The validation split (DistiLLM's adaptive schedule; a tuning run's reported split)."""
        return self.evaluator.validation_examples

    @property
    def loss_chunk_size(self) -> int:
        """Tokens per chunk of the hidden-state loss path, or 0 (full logits or sparse)."""
        return self.loss_path.chunk_size

    # ------------------------------------------------------------------ rollouts and scoring
    def collect(self, examples: list[Example]) -> RolloutBatch:
        """Completions for ``examples`` from the method's behaviour policy, written now with the current weights."""
        return self.rollouts.collect(examples, self.step)

    def close(self) -> None:
        """Stop the rollout source's worker, if one runs (``fit`` does this on its way out)."""
        self.rollouts.close()

    def teacher_logits(self, batch: RolloutBatch) -> torch.Tensor | SparseTeacherLogprobs:
        """``[B, T, V]`` teacher logits on the batch's completion tokens (its own prompt or the method's), or a
        sparse teacher's top-k and sampled-token log-probs (MiniLLM's auxiliary term, tests)."""
        output = "logits" if "logits" in self.teacher_component.provides else "sparse"
        return self.teacher_component.score(batch, output, self.method.teacher_prompt(batch, self.tokenizer))

    def micro_batch_loss(self, batch: RolloutBatch, num_tokens: int):
        """The method's loss on one micro-batch along the loss path chosen at start-up (:mod:`opd.engine.loss_paths`)."""
        # a ZeRO-3 teacher's head is partitioned: gathered while the chunks are projected (no grad, so safe)
        with _gathered_head(self.teacher if self.loss_path.teacher_output == "hidden" else None):
            return path_loss(self.loss_path, self.method, batch, self.backend.train_model, self.teacher_component,
                             self.tokenizer, self.vocab_size, num_tokens)

    def _zero_loss(self, batch: RolloutBatch) -> torch.Tensor:
        """A loss of exactly 0 through the student's graph: what a rank backpropagates in a skipped step under
        DeepSpeed, whose gradient hooks expect every rank's backward (non-finite values never reach them)."""
        return completion_logits(self.backend.train_model, batch).sum() * 0.0

    # ------------------------------------------------------------------ one optimizer step
    def accumulate_gradients(self, batches: list[RolloutBatch], num_tokens: int) -> tuple[float, bool, dict[str, float]]:
        """Forward and backward of each micro-batch of one step (no update): the student's gradients accumulate.

        Args:
            batches: this rank's micro-batches of the step.
            num_tokens: completion tokens of the whole step (all ranks, all micro-batches), the loss normaliser.
        Returns:
            ``(step loss summed over micro-batches and ranks, whether every loss was finite, summed metrics)``.
        """
        metrics: dict[str, float] = collections.defaultdict(float)
        loss_total, finite = 0.0, True
        for batch in batches:
            out = self.micro_batch_loss(batch, num_tokens)
            aux = self.method.auxiliary_loss(batch, self.aux_ctx)
            loss = out.loss if aux is None else out.loss + aux.loss
            loss_value = loss.item()
            if self.backend.is_deepspeed and not dist.all_ranks_true(math.isfinite(loss_value)):
                loss, finite = self._zero_loss(batch), False  # every rank still runs DeepSpeed's backward
            self.backend.backward(loss)
            loss_total += loss_value
            for key, value in {**out.metrics, **(aux.metrics if aux else {})}.items():
                metrics[key] += value
        if dist.world_size() > 1:  # each rank's values are its share of the global normalisation: they add up
            loss_total = dist.all_reduce_sum([loss_total])[0]
            metrics = _sum_over_ranks(metrics)
        return loss_total, finite, metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step: the step's rollouts (:attr:`rollouts`), then the update, then its metrics, then the
        failure policy.

        A step whose loss or gradient norm is not finite changes no weight and no optimizer moment;
        it is counted in ``train/skipped_steps``.

        Returns:
            The step's metrics (also for a skipped step).

        Raises:
            TrainingError: when more than ``trainer.max_skipped_steps`` steps in a row were skipped;
                that step's metrics are logged first, and no checkpoint is written.
        """
        started, step = time.perf_counter(), self.step
        batches = self.rollouts.next_batches(step, self.student)
        rollout_time = time.perf_counter() - started
        update = self._update(batches)
        metrics = self._step_metrics(step, batches, update, rollout_time, time.perf_counter() - started)
        self._apply_failure_policy(update, metrics)
        return metrics

    def _update(self, batches: list[RolloutBatch]) -> StepUpdate:
        """Forward and backward of the step's micro-batches and one optimizer update (skipped when not finite, or
        when ``trainer.overlong=mask`` left no token); advances the step and the counters."""
        truncated, sampled = self.overlong.count(batches)  # and, with trainer.overlong=mask, take cut rows out of the loss
        num_tokens = int(dist.all_reduce_sum([sum(b.num_tokens for b in batches)])[0])  # all ranks, all micro-batches
        empty = num_tokens == 0  # every row masked: nothing to learn, the weights stay (not a failure)
        loss, finite, metrics = self.accumulate_gradients(batches, max(num_tokens, 1))
        grad_norm, updated = self.backend.step(skip=empty or not (finite and math.isfinite(loss)))
        if updated:
            self.skipped_in_a_row = 0
            self.rollouts.after_update(self.student)
            if self.teacher_component is not None:  # an EMA teacher follows the student
                self.teacher_component.after_update(self.student, self.step + 1)
        elif empty:
            self.overlong.empty_steps += 1
        else:  # skipped: weights (and, in one process, the optimizer moments) stay as they were
            self.skipped_in_a_row += 1
            self.skipped_total += 1
        self.step += 1
        self.tokens_trained += num_tokens
        # several teachers: each one's loss per routed token
        return StepUpdate(loss, grad_norm, num_tokens, truncated, sampled, per_teacher_means(metrics, max(num_tokens, 1)))

    def _step_metrics(self, step: int, batches: list[RolloutBatch], update: StepUpdate, rollout_time: float,
                      elapsed: float) -> dict[str, float]:
        """The metrics row of step ``step``: the loss terms, optimizer, throughput, rollout lengths and cuts, and the
        rollout source's own (staleness; a worker's seconds)."""
        metrics = {
            **update.metrics,
            "train/loss": update.loss,
            "train/lr": self.backend.lr(),
            "train/grad_norm": update.grad_norm,
            "train/tokens": update.num_tokens,
            "train/tokens_per_s": update.num_tokens / elapsed,
            "train/skipped_steps": self.skipped_total,
            "time/rollout_s": rollout_time,
            "time/step_s": elapsed,
        }
        student_batches = [b for b in batches if b.source in ("student", "mixed")]
        rollout_tokens, rollouts = dist.all_reduce_sum([sum(b.num_tokens for b in student_batches),
                                                        sum(len(b.examples) for b in student_batches)])
        if rollouts:
            metrics["rollout/mean_length"] = rollout_tokens / rollouts
        metrics.update(self.overlong.step_metrics(update.truncated, update.sampled))
        metrics.update(self.rollouts.metrics(step, student_batches))
        return metrics

    def _apply_failure_policy(self, update: StepUpdate, metrics: dict[str, float]) -> None:
        """Stop after more than ``trainer.max_skipped_steps`` non-finite steps in a row (the failing row logged first)."""
        if self.skipped_in_a_row <= self.cfg.max_skipped_steps:
            return
        if self.logger is not None:  # the failing step's row, so metrics.jsonl shows what happened
            self.logger.log(dict(metrics), self.step)
        raise TrainingError(f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                            f"(last: loss={update.loss}, grad_norm={update.grad_norm}) at step {self.step} "
                            f"(trainer.max_skipped_steps={self.cfg.max_skipped_steps}); stopping without writing a "
                            "checkpoint, so the last good one is kept. Lower trainer.lr, check the data, or raise "
                            "trainer.max_skipped_steps.")

    # ------------------------------------------------------------------ evaluation (opd.engine.evaluate.Evaluator)
    def evaluate(self, model: torch.nn.Module, desc: str, examples: list[Example] | None = None) -> EvalResult:
        """Greedy accuracy on the held-out examples, or on ``examples`` (over N processes: each rank decodes a strided
        share). A teacher with another tokenizer decodes its own rendering of each prompt, in its own tokens."""
        own_tokens = self.rollout_ctx.own_tokens_teacher
        return self.evaluator.accuracy(model, desc, examples,
                                       own_tokens if own_tokens is not None and model is own_tokens.model else None)

    def validation_loss(self) -> float:
        """The student's token-mean cross-entropy on the validation split (DistiLLM's adaptive schedule reads it)."""
        return self.evaluator.validation_loss(self.backend.train_model)

    def _log_eval(self, result: EvalResult) -> None:
        # across tokenizers the teacher agreement is measured on text, by the teacher component itself
        metrics = self.evaluator.metrics(result, self.student, self.teacher_component if self.other_tokenizer
                                         else self.teacher)
        if self.method.needs_validation_loss:
            metrics.update(self.method.on_evaluate(self.validation_loss()))
        self.logger.log(metrics, self.step)
        self.logger.log_samples(result.samples, self.step)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs (``trainer_state.pt``)."""
        return {"step": self.step, "initial_results": self.initial_results, "skipped_in_a_row": self.skipped_in_a_row,
                **self.backend.state_dict(),  # optimizer and scheduler (in one process; DeepSpeed keeps its own)
                "rng": ckpt.rng_state(), "policy_rng": self.rollout_ctx.rng.getstate(), "data": self.prompts.state_dict(),
                "method": self.method.state_dict(),
                "teacher": self.teacher_component.state_dict() if self.teacher_component is not None else {},
                "tokens_trained": self.tokens_trained, "skipped_total": self.skipped_total,
                "rollouts": self.overlong.state()}

    def save(self) -> Path:
        """Write a checkpoint of the current step (older ones beyond ``keep_checkpoints`` are deleted).

        Raises:
            TrainingError: if a student weight is not finite; nothing is written, so the older
                checkpoints stay as they are.
        """
        if self.backend.is_deepspeed:  # every rank checks its own partition
            bad = None if dist.all_ranks_true(self.backend.local_weights_finite()) else "(a ZeRO partition)"
        else:
            bad = next((name for name, p in self.student.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrainingError(f"student weight {bad!r} is not finite at step {self.step}; refusing to write a "
                                f"checkpoint over the last good one in {self.run_dir / 'checkpoints'}")
        if self.lora is not None:  # the adapter in PEFT's format, and how to load the frozen base it adapts
            def write_model(directory: Path) -> None:  # every rank (a ZeRO-3 adapter is gathered); rank 0 writes
                self.lora.save_adapter(directory, self.student_cfg.name_or_path)
                if dist.is_main():
                    save_base_spec(self.student_cfg, directory)
        else:
            write_model = None
        return ckpt.save_checkpoint(self.run_dir, self.step, self.student, self.tokenizer, self.trainer_state(),
                                    self.cfg.keep_checkpoints,
                                    state_dict=None if self.lora else self.backend.full_state_dict(),
                                    write_shards=self.backend.save_extra, in_flight=self.rollouts.in_flight_state(),
                                    write_model=write_model)

    def restore(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint``: weights, optimizer, schedule, every RNG, data position, method state.

        Only reads; :meth:`attach_logger` then drops the metric rows the interrupted run logged after
        the checkpoint's step, since those steps are trained again.

        Raises:
            ConfigError: if the checkpoint cannot be read or does not fit this run (another model,
                method or optimizer).
        """
        try:
            self._load_state(checkpoint, ckpt.load_trainer_state(checkpoint))
        except Exception as err:  # noqa: BLE001 - unpickling, shape and key errors arrive as many types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"trainer.resume: checkpoint {str(checkpoint)!r} cannot be restored into this run "
                              f"({type(err).__name__}: {first[:300]})") from None
        self.restored_from = checkpoint
        print(f"opd-train: resumed from {checkpoint} at step {self.step}")

    def _load_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Load the weights of ``checkpoint`` and its trainer ``state`` into this trainer."""
        self.backend.load_state_dict(state, checkpoint)  # weights, optimizer (ZeRO partitions under DeepSpeed), schedule
        rank_rng = Path(checkpoint) / f"rng_rank{dist.rank()}.pt"  # this rank's RNGs in a multi-process run
        ckpt.set_rng_state(torch.load(rank_rng, weights_only=True) if rank_rng.exists() else state["rng"])
        self.rollout_ctx.rng.setstate(ckpt.as_python_rng_state(state["policy_rng"]))
        self.prompts.load_state_dict(state["data"])
        self.method.load_state_dict(state["method"])
        if self.teacher_component is not None:
            self.teacher_component.load_state_dict(state.get("teacher", {}))
        self.step, self.tokens_trained = state["step"], state["tokens_trained"]
        self.skipped_total, self.skipped_in_a_row = state["skipped_total"], state["skipped_in_a_row"]
        self.overlong.load_state(state.get("rollouts", (0, 0, 0)))
        self.initial_results = dict(state["initial_results"])
        self.rollouts.load_in_flight(ckpt.load_in_flight(checkpoint), self.device)

    def attach_logger(self, logger: JsonlLogger) -> None:
        """Use ``logger`` for metrics; after :meth:`restore`, rows past the restored step are dropped from it, and on a
        fresh start every row an earlier attempt left (one interrupted before its first checkpoint: its steps are
        trained again, so its rows would appear twice)."""
        self.logger = logger
        if self.restored_from is not None:
            logger.truncate_after(self.step)
        else:
            logger.truncate_after(-1)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Evaluate, train ``max_steps`` steps with periodic evaluation and checkpoints, evaluate; return the summary.

        Raises:
            TrainingInterrupted: after SIGTERM/SIGINT, once the current step is done and checkpointed.
        """
        started = time.perf_counter()
        if not self.initial_results:  # a fresh run (a resumed one restored these)
            teacher_result = self.evaluate(self.teacher, "eval teacher") if self.teacher is not None else None
            before = self.evaluate(self.student, "eval student")
            self.initial_results = {"teacher_accuracy": teacher_result.accuracy if teacher_result else None,
                                    "student_accuracy_before": before.accuracy}
            if before.by_source:  # mixed data: the accuracy on each source task as well
                self.initial_results.update(
                    teacher_accuracy_by_source=teacher_result.by_source if teacher_result else None,
                    student_accuracy_before_by_source=before.by_source)
            if teacher_result is not None:
                self.logger.log({"eval/teacher_accuracy": teacher_result.accuracy}, self.step)
            self._log_eval(before)

        try:
            with self.stop_signals.installed() as stop:
                after = self._train_loop()
                if stop.requested():
                    checkpoint = self.save()  # with the rollouts in flight: a resumed run trains on each once
                    raise TrainingInterrupted(f"stopped by signal {stop.signal} at step {self.step}; checkpoint saved "
                                              f"to {checkpoint}. Continue with trainer.resume={self.run_dir}", stop.signal)
        finally:
            self.close()  # the rollout worker; the final evaluation and checkpoint need only the learner
        if after is None:  # the last step was not evaluated inside the loop
            after = self.evaluate(self.student, "eval student")
            self._log_eval(after)
        checkpoint = self.save()
        return {
            "method": type(self.method).registry_name,
            "seed": self.seed,
            **self.initial_results,
            "student_accuracy_after": after.accuracy,
            **({"student_accuracy_after_by_source": after.by_source} if after.by_source else {}),
            **{f"student_{key}_after": value for key, value in self.evaluator.last_pass_at_k.items()},
            "student_eos_rate_after": after.eos_rate,  # greedy, on the evaluation split
            "student_mean_length_after": after.mean_length,
            **{f"student_{key}_after": value for key, value in self.evaluator.last_teacher_kl.items()},
            "eval_examples": after.num_examples,
            "evaluated_on": self.cfg.evaluate_on,  # "validation" in a tuning run: the accuracies are validation ones
            "steps": self.step,
            "tokens": self.tokens_trained,
            **dict(zip(("parameters", "trainable_parameters"), parameter_counts(self.student))),
            "skipped_steps": self.skipped_total,
            **self.overlong.summary(),  # the share of sampled completions cut before EOS (None: none sampled)
            "wall_time_s": round(time.perf_counter() - started, 2),
            "checkpoint": str(checkpoint),
            "split_overlap": self.split_overlap,  # distinct prompts shared between splits (opd.data.base.split_overlap)
        }

    def _train_loop(self) -> EvalResult | None:
        """Steps until ``max_steps`` or a stop signal; returns the evaluation of the final step if one ran."""
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=f"train {type(self.method).registry_name}",
                   unit="step", disable=not (self.cfg.progress and dist.is_main()), dynamic_ncols=True)
        accuracy, last = self.initial_results["student_accuracy_before"], None
        with bar:
            while self.step < self.cfg.max_steps and not self.stop_signals.requested():
                metrics = self.train_step()
                self.logger.log(metrics, self.step)
                bar.update(1)
                postfix = {"loss": f"{metrics['train/loss']:.4f}", "acc": f"{accuracy:.3f}"}
                if "rollout/mean_length" in metrics:
                    postfix["len"] = f"{metrics['rollout/mean_length']:.1f}"
                bar.set_postfix(postfix)
                last = None
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    last = self.evaluate(self.student, "eval student")
                    self._log_eval(last)
                    accuracy = last.accuracy
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.max_steps:
                    self.save()
        return last


def _sum_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Per-key sums of every rank's metrics (keys may differ between ranks)."""
    total: dict[str, float] = collections.defaultdict(float)
    for part in dist.gather_objects(dict(metrics)):
        for key, value in part.items():
            total[key] += value
    return total


@contextlib.contextmanager
def _gathered_head(model: torch.nn.Module | None):
    """Inside: a ZeRO-3 ``model``'s output head whole on every rank (read-only); a no-op otherwise."""
    head = linear_head(model) if model is not None and dist.is_zero3(model) else None
    if head is None:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
        yield
