"""Where a step's rollouts come from: one :class:`RolloutSource`, written here or by a rollout worker.

The trainer holds one source and asks it, each step, for that step's micro-batches (:meth:`RolloutSource.next_batches`),
tells it after every optimizer update (:meth:`RolloutSource.after_update`), and checkpoints what it holds
(:meth:`RolloutSource.in_flight_state`). ``trainer.max_staleness`` is read here only (:func:`build_rollout_source`):

- :class:`InlineRollouts` (``max_staleness = 0``): the behaviour policy writes each micro-batch in the step, with the
  current weights. The synchronous case, like AReaL's ``max_head_offpolicyness = 0``.
- :class:`WorkerRollouts` (``max_staleness = N > 0``): a worker process samples the student's rollouts of the next N
  steps while the learner trains (:mod:`opd.engine.async_rollouts`; verl's fully-async recipe separates its
  Rollouter from the Trainer in the same way).

Both own the weight sync to the sampler (a vLLM engine's copy of the student), the rollouts restored from a checkpoint
and the staleness metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from opd import distributed as dist
from opd.config import ModelConfig, TrainerConfig
from opd.data.base import PromptIterator
from opd.engine.async_rollouts import AsyncRollouts, PendingRollout, WorkerSpec
from opd.errors import ConfigError
from opd.methods.base import Method
from opd.sampling.behaviour import RolloutContext
from opd.types import Example, RolloutBatch


def check_rollout_settings(cfg: TrainerConfig, method: Method) -> None:
    """Refuse, before any model loads, a method that cannot train on the rollouts ``trainer.max_staleness`` gives.

    Raises:
        ConfigError: one line naming the method and why.
    """
    if cfg.max_staleness:
        reason = method.staleness_blocker()
        if reason is not None:
            raise ConfigError(f"trainer.max_staleness={cfg.max_staleness}: method {method.registry_name!r} cannot "
                              f"train on stale rollouts: {reason}; or set trainer.max_staleness=0")


def worker_threads(cfg: TrainerConfig, device: torch.device) -> int:
    """torch CPU threads of the rollout worker (``trainer.rollout_num_threads``, else 1 on CPU); 0 without one."""
    if not cfg.max_staleness:
        return 0
    return cfg.rollout_num_threads or (1 if device.type == "cpu" else torch.get_num_threads())


class RolloutSource:
    """The behaviour policy's micro-batches for each step, in this process or from a worker.

    Args:
        method: its ``policy`` writes the batches.
        ctx: what the policy may use (student, teacher, tokenizer, sampler, RNG).
        prompts: the training prompt stream (its position is checkpointed by the trainer).
        grad_accum: micro-batches per step.
    """

    def __init__(self, method: Method, ctx: RolloutContext, prompts: PromptIterator, grad_accum: int) -> None:
        self.method, self.ctx, self.prompts, self.grad_accum = method, ctx, prompts, grad_accum
        #: step -> its micro-batches: submitted ahead to a worker, or restored from a checkpoint
        self.queued: dict[int, list[RolloutBatch | PendingRollout]] = {}
        #: whether batches can carry a ``policy_version`` (worker rollouts, or restored ones): then every step reports
        #: ``rollout/staleness`` (the same on every rank: the metric is gathered)
        self.reports_staleness = False

    def collect(self, examples: list[Example], step: int) -> RolloutBatch:
        """One micro-batch for ``examples``, written now by the behaviour policy with the current weights."""
        self.ctx.step = step
        return self.method.policy.collect(self.ctx, examples)

    def next_batches(self, step: int, student: torch.nn.Module) -> list[RolloutBatch]:
        """This rank's micro-batches of ``step``, each with its ``staleness`` (optimizer steps since its weights).
        Batches restored from a checkpoint come first."""
        batches = self._take(self._batches_for(step, student))
        for batch in batches:
            batch.staleness = step - batch.policy_version if batch.policy_version is not None else 0
        return batches

    def _batches_for(self, step: int, student: torch.nn.Module) -> list[RolloutBatch | PendingRollout]:
        raise NotImplementedError

    def _take(self, items: list[RolloutBatch | PendingRollout]) -> list[RolloutBatch]:
        return items  # type: ignore[return-value]  (only a worker source hands out placeholders)

    def after_update(self, student: torch.nn.Module) -> None:
        """After an optimizer step changed the weights: a sampler with its own copy of them (a vLLM engine) refreshes
        the student's (a teacher's engine is never re-synced)."""
        self.ctx.sampler.sync_weights(student)

    def metrics(self, step: int, student_batches: list[RolloutBatch]) -> dict[str, float]:
        """``rollout/policy_version`` and ``rollout/staleness`` of the oldest student batch over every rank (a
        dataset or teacher batch is never stale), when batches can be stale."""
        if not self.reports_staleness:
            return {}
        versions = [b.policy_version for b in student_batches if b.policy_version is not None]
        if dist.world_size() > 1:
            versions = [v for part in dist.gather_objects(versions) for v in part]
        if not versions:
            return {}
        return {"rollout/policy_version": float(min(versions)), "rollout/staleness": float(step - min(versions))}

    def wait(self) -> None:
        """Wait until every rollout submitted so far is written (they stay queued for their steps)."""

    def in_flight_state(self) -> dict[int, list[dict[str, Any]]]:
        """The rollouts already written for coming steps, step -> its batches' ``state_dict()`` (a checkpoint's
        ``in_flight_rank<r>.pt``: a resumed run trains on each once); a worker's are waited for first."""
        self.wait()
        return {step: [batch.state_dict() for batch in items] for step, items in self.queued.items()}

    def load_in_flight(self, state: dict[int, list[dict[str, Any]]], device: torch.device) -> None:
        """Queue the rollouts of :meth:`in_flight_state` for their steps (on resume)."""
        self.queued = {step: [RolloutBatch.from_state_dict(batch, device) for batch in batches]
                       for step, batches in state.items()}
        self.reports_staleness = True  # restored batches may have been written by a worker before the interruption

    def close(self) -> None:
        """Stop whatever the source started (idempotent)."""


class InlineRollouts(RolloutSource):
    """Synchronous rollouts (``trainer.max_staleness = 0``): each step's micro-batches are written in the step."""

    def _batches_for(self, step: int, student: torch.nn.Module) -> list[RolloutBatch | PendingRollout]:
        restored = self.queued.pop(step, None)
        if restored is not None:
            return restored
        return [self.collect(dist.shard(next(self.prompts)), step) for _ in range(self.grad_accum)]


class WorkerRollouts(RolloutSource):
    """Asynchronous rollouts (``trainer.max_staleness = N > 0``): the student's rollouts of steps up to ``step + N``
    are sampled by a worker process (:class:`~opd.engine.async_rollouts.AsyncRollouts`), from weights at most N
    optimizer steps old.

    Before each step the current weights are published to the worker's ring, then the steps not yet submitted are:
    the behaviour policy's ``collect`` runs here, with a context whose :meth:`RolloutContext.sample_student` queues a
    job for the worker and returns a placeholder; anything else the policy writes (dataset answers, teacher samples)
    is written now. Then this step's batches are taken, waiting for the worker if it is behind.

    Args:
        spec: how the worker builds its student and sampler.
        max_staleness: N >= 1.
        max_steps: no step past the run's last is submitted.
        seed, rank: the worker jobs' seeds.
    """

    def __init__(self, method: Method, ctx: RolloutContext, prompts: PromptIterator, grad_accum: int, *,
                 spec: WorkerSpec, max_staleness: int, max_steps: int, seed: int, rank: int, device: torch.device) -> None:
        super().__init__(method, ctx, prompts, grad_accum)
        self.max_staleness, self.max_steps, self.device = max_staleness, max_steps, device
        self.pipeline = AsyncRollouts(spec, max_staleness, seed, rank)  # the process starts with the first publish
        self.reports_staleness = True

    def _batches_for(self, step: int, student: torch.nn.Module) -> list[RolloutBatch | PendingRollout]:
        self.pipeline.publish(step, student)  # a collective under ZeRO-3
        for ahead in range(step, min(step + self.max_staleness, self.max_steps - 1) + 1):
            if ahead not in self.queued:  # steps are submitted in order: every later one is absent too
                self.queued[ahead] = self._submit(ahead)
        return self.queued.pop(step)

    def _submit(self, step: int) -> list[RolloutBatch | PendingRollout]:
        """The behaviour policy's micro-batches for ``step``: batches, or placeholders for the worker's rollouts."""
        items = []
        for micro in range(self.grad_accum):
            ctx = dataclasses.replace(self.ctx, step=step, student_rollouts=functools.partial(
                self.pipeline.request, step=step, micro=micro))
            items.append(self.method.policy.collect(ctx, dist.shard(next(self.prompts))))
        return items

    def _take(self, items: list[RolloutBatch | PendingRollout]) -> list[RolloutBatch]:
        return [self.pipeline.take(item, self.device) if isinstance(item, PendingRollout) else item for item in items]

    def metrics(self, step: int, student_batches: list[RolloutBatch]) -> dict[str, float]:
        """The staleness metrics, and ``time/rollout_worker_s``: this rank's worker's seconds on this step's batches."""
        return {**super().metrics(step, student_batches), "time/rollout_worker_s": self.pipeline.generate_seconds(step)}

    def wait(self) -> None:
        self.queued = {step: self._take(items) for step, items in self.queued.items()}

    def close(self) -> None:
        self.pipeline.close()


def worker_scores_teacher(teacher: Any, teacher_output: str | None, method: Method) -> bool:
    """Whether the rollout worker asks the teacher for its scores: a teacher whose scoring needs nothing of this
    process (``Teacher.scores_in_any_process``: a served one) on the sparse loss path, under the batch's own prompt
    (a local teacher stays on the learner, which holds it)."""
    return (teacher is not None and teacher.scores_in_any_process and teacher_output == "sparse"
            and type(method).teacher_prompt is Method.teacher_prompt)


def build_rollout_source(cfg: TrainerConfig, method: Method, ctx: RolloutContext, prompts: PromptIterator, *,
                         student_cfg: ModelConfig, student: torch.nn.Module, teacher: Any, teacher_output: str | None,
                         vocab_size: int, seed: int, device: torch.device) -> RolloutSource:
    """The source ``trainer.max_staleness`` asks for: :class:`InlineRollouts` at 0, else :class:`WorkerRollouts`."""
    if not cfg.max_staleness:
        return InlineRollouts(method, ctx, prompts, cfg.grad_accum)
    spec = WorkerSpec(student_cfg=student_cfg, sampler=ctx.sampler, device=str(device),
                      num_threads=worker_threads(cfg, device), vocab_size=vocab_size,
                      suppress_tokens=list(student.generation_config.suppress_tokens or []),
                      record_logprobs=method.staleness_handling() == "importance_ratio",
                      teacher=teacher if worker_scores_teacher(teacher, teacher_output, method) else None)
    return WorkerRollouts(method, ctx, prompts, cfg.grad_accum, spec=spec, max_staleness=cfg.max_staleness,
                          max_steps=cfg.max_steps, seed=seed, rank=dist.rank(), device=device)
