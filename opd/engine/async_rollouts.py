"""Asynchronous rollouts (``trainer.max_staleness = N > 0``): a worker process samples the student's rollouts of the
next steps while the learner trains on the current one.

Schedule, the same on every run with the same seed:

- Before step k the learner copies its weights v_k (the weights after k optimizer steps) into slot ``k mod (N+1)``
  of a ring of shared-memory buffers (:class:`WeightRing`), then submits the rollouts of every step up to k+N not yet
  submitted, each tagged with version k. The behaviour policy's ``collect`` runs then, on the learner, with a context
  whose ``sample_student`` turns the student sampling call into a job for the worker
  (:class:`opd.engine.rollouts.WorkerRollouts`); dataset or teacher batches of a mixed policy (GKD's λ coin) are
  written there and then.
- The worker (:func:`worker_main`, one process per rank with its own copy of the student and of the sampler, so a
  vLLM sampler has its own engine) takes jobs in order; when a job's version differs from the weights it holds it
  copies that slot into its model (and its engine), seeds torch with the job's seed and samples. When the method
  reads the behaviour policy's log-probabilities it also records log q_old(y_t) at the sampling temperature. With a
  served teacher (``teacher.kind: vllm_server``) it also asks the server for the batch's log-probs, so teacher
  scoring overlaps the learner's step as well; a local teacher scores on the learner, which holds it.
- At step k the learner takes the batches of step k. The batch of step j was sampled by v_{max(j−N, 0)}: its
  staleness is min(j, N) steps, never more (``rollout/staleness``).

A slot is rewritten only after every job that reads it has been taken (version v serves jobs up to v+N, all taken by
step v+N; its slot is next written at step v+N+1), so no lock is needed. Each job's seed depends on the run's seed,
the rank, the step and the micro-batch only, so rollouts do not depend on how the two processes' timings interleave.
A checkpoint stores the rollouts already submitted for the next steps (``Trainer.save``), so a resumed run
trains on each of them exactly once: none is generated twice, none skipped.

The setting has the meaning of TRL's ``AsyncDistillationTrainer`` ``max_staleness`` and of verl's one-step-off
schedule (N = 1). What each loss does with a stale batch follows the AsyncOPD study (arXiv 2606.24143): forward KL as
is, reverse KL with the student's side recomputed at learner time, sampled-token losses through a clipped importance
ratio (``Method.staleness_handling``, docs/methods.md "Stale rollouts").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import time
import traceback
import warnings
import weakref
from typing import Any

import numpy as np
import torch

from opd.config import ModelConfig
from opd.errors import TrainingError
from opd.models.weights import named_sync_tensors
from opd.types import Example, RolloutBatch

#: seconds between checks that the other process is still alive while waiting on a queue
POLL_S = 1.0


def job_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The torch seed of one job: a function of the run's seed, the rank, the step and the micro-batch only."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])


@dataclasses.dataclass
class PendingRollout:
    """A student rollout the worker is writing: it stands in a step's micro-batch list until the learner takes it.

    Attributes:
        step, micro: the optimizer step and micro-batch the rollout is for.
        version: the student weights (optimizer steps done) that sample it.
    """

    step: int
    micro: int
    version: int


@dataclasses.dataclass
class RolloutJob:
    """What the worker receives for one micro-batch."""

    step: int
    micro: int
    version: int
    seed: int
    examples: list[Example]


@dataclasses.dataclass
class WorkerSpec:
    """Everything the worker needs to build its copy of the student and of the sampler (pickled into the process).

    Attributes:
        student_cfg: the student's config (the worker loads the same architecture; the weights come from the ring).
        sampler: the configured sampler, before it has built any engine.
        device: where the worker's student runs (the learner's device).
        num_threads: torch CPU threads of the worker.
        vocab_size: the vocabulary the pair shares (log-probs are over its rows only).
        suppress_tokens: ids the student must never sample (padding rows past the shared vocabulary).
        record_logprobs: record log q_old(y_t) of each sampled token when the sampler does not.
        teacher: a teacher that can score in any process (``Teacher.scores_in_any_process``: a served one) that the
            worker asks for the batch's sparse log-probs right after sampling, so the request overlaps the learner's
            step too; None = the learner scores.
    """

    student_cfg: ModelConfig
    sampler: Any
    device: str
    num_threads: int
    vocab_size: int
    suppress_tokens: list[int]
    record_logprobs: bool
    teacher: Any = None


class WeightRing:
    """``slots`` shared-memory copies of a model's weights: one flat buffer per dtype and slot.

    Args:
        layout: ``(name, dtype, shape)`` of every tensor, in a fixed order.
        slots: N+1 for ``max_staleness`` N.
    """

    def __init__(self, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], slots: int) -> None:
        self.layout, self.offsets = layout, []
        sizes: dict[torch.dtype, int] = {}
        for _, dtype, shape in layout:
            numel = int(np.prod(shape)) if shape else 1
            self.offsets.append(sizes.get(dtype, 0))
            sizes[dtype] = sizes.get(dtype, 0) + numel
        self.buffers = [{dtype: torch.empty(size, dtype=dtype).share_memory_() for dtype, size in sizes.items()}
                        for _ in range(slots)]

    @classmethod
    def for_model(cls, model: torch.nn.Module, slots: int) -> WeightRing:
        """A ring laid out like what the worker needs of ``model`` (:func:`~opd.models.weights.named_sync_tensors`:
        the whole weights, or a LoRA student's adapter only)."""
        layout = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in named_sync_tensors(model)]
        return cls(layout, slots)

    def views(self, slot: int) -> list[torch.Tensor]:
        """The slot's tensors, shaped as the layout says (views of its flat buffers)."""
        out = []
        for (_, dtype, shape), offset in zip(self.layout, self.offsets):
            numel = int(np.prod(shape)) if shape else 1
            out.append(self.buffers[slot][dtype][offset : offset + numel].view(shape))
        return out

    @torch.no_grad()
    def write(self, slot: int, model: torch.nn.Module) -> None:
        """Copy ``model``'s current weights into ``slot`` (under ZeRO-3 a collective: every rank calls it)."""
        names = [name for name, _, _ in self.layout]
        for (name, tensor), view, expected in zip(named_sync_tensors(model), self.views(slot), names):
            if name != expected:
                raise RuntimeError(f"the student's tensors changed order ({name!r} where {expected!r} was)")
            view.copy_(tensor)

    @torch.no_grad()
    def read_into(self, slot: int, model: torch.nn.Module) -> None:
        """Copy ``slot`` into ``model``'s tensors in place."""
        state = model.state_dict(keep_vars=True)
        for (name, _, _), view in zip(self.layout, self.views(slot)):
            state[name].data.copy_(view)


class AsyncRollouts:
    """The learner's side of the rollout worker: the weight ring, the job and result queues, the process.

    Args:
        spec: how the worker builds its student and sampler.
        max_staleness: N >= 1; the ring has N+1 slots.
        seed, rank: for the jobs' seeds (:func:`job_seed`).
    """

    def __init__(self, spec: WorkerSpec, max_staleness: int, seed: int, rank: int) -> None:
        self.spec, self.max_staleness, self.seed, self.rank = spec, max_staleness, seed, rank
        self.ring: WeightRing | None = None
        self.process = None
        self.published: int | None = None  # the newest version in the ring
        self.results: dict[tuple[int, int], tuple[RolloutBatch, float]] = {}  # arrived, not yet taken
        self.generate_s: dict[int, float] = {}  # step -> the worker's seconds on it

    # ------------------------------------------------------------------ process
    def start(self, model: torch.nn.Module) -> None:
        """Lay out the ring from ``model`` and start the worker (spawned: a fresh interpreter, no forked state)."""
        import torch.multiprocessing as mp

        self.ring = WeightRing.for_model(model, self.max_staleness + 1)
        context = mp.get_context("spawn")
        self.jobs, self.done = context.Queue(), context.Queue()
        # not a daemon: a vLLM engine in the worker starts processes of its own, which daemons may not
        self.process = context.Process(target=worker_main, args=(self.spec, self.ring, self.jobs, self.done),
                                       name=f"opd-rollout-worker-{self.rank}", daemon=False)
        self.process.start()
        weakref.finalize(self, _stop_process, self.process, self.jobs)  # also at interpreter exit

    def close(self) -> None:
        """Stop the worker (a sentinel, then SIGKILL if it does not exit within 30 s). Idempotent."""
        if self.process is not None:
            _stop_process(self.process, self.jobs)
            self.process = None

    # ------------------------------------------------------------------ learner calls
    def publish(self, version: int, model: torch.nn.Module) -> None:
        """Make ``model``'s weights, version ``version``, available to the worker (once per version)."""
        if self.process is None:
            self.start(model)
        if self.published != version:
            self.ring.write(version % (self.max_staleness + 1), model)
            self.published = version

    def request(self, examples: list[Example], *, step: int, micro: int) -> PendingRollout:
        """Queue the student rollouts of ``examples`` for micro-batch ``micro`` of ``step``, at the published version."""
        if self.published is None:
            raise RuntimeError("AsyncRollouts.request before any weights were published")
        self.jobs.put(RolloutJob(step, micro, self.published, job_seed(self.seed, self.rank, step, micro),
                                 list(examples)))
        return PendingRollout(step, micro, self.published)

    def take(self, pending: PendingRollout, device: torch.device) -> RolloutBatch:
        """The worker's batch for ``pending`` (waiting for it), on ``device``, its ``policy_version`` set.

        Raises:
            TrainingError: the worker failed (its error is quoted) or died.
        """
        key = (pending.step, pending.micro)
        while key not in self.results:
            try:
                message = self.done.get(timeout=POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise TrainingError(f"the rollout worker died (exit code {self.process.exitcode}) before writing "
                                        f"the rollouts of step {pending.step}; if its traceback above ends in "
                                        "multiprocessing's spawn, the script that builds the trainer needs "
                                        "`if __name__ == \"__main__\":` (the worker re-imports it)") from None
                continue
            if message[0] == "error":
                last = message[1].strip().splitlines()[-1]
                raise TrainingError(f"the rollout worker failed: {last} (traceback below)\n{message[1]}")
            _, got_key, state, seconds = message
            self.results[got_key] = (RolloutBatch.from_state_dict(from_wire(state)), seconds)
        batch, seconds = self.results.pop(key)
        self.generate_s[pending.step] = self.generate_s.get(pending.step, 0.0) + seconds
        batch.policy_version = pending.version
        return batch.to(device)

    def generate_seconds(self, step: int) -> float:
        """The worker's seconds of sampling for ``step`` (its batches taken so far), forgotten after this call."""
        return self.generate_s.pop(step, 0.0)


def _stop_process(process, jobs) -> None:
    """Ask the worker to exit; kill it if it does not within 30 s."""
    if process.is_alive():
        with contextlib.suppress(OSError, ValueError):  # the queue may be closed already
            jobs.put(None)
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def to_wire(value: Any) -> Any:
    """``value`` with every tensor as a numpy array, for a queue.

    A tensor put on a ``torch.multiprocessing`` queue travels as a shared-memory file descriptor that the receiver
    fetches from a thread of the sender; while the worker's main thread samples, that thread waits for the GIL,
    which cost the learner ~8 ms per batch on the toy default. A rollout batch is a few kB of token ids, so
    pickled bytes are faster.
    """
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {key: to_wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_wire(item) for item in value]
    return value


def from_wire(value: Any) -> Any:
    """The inverse of :func:`to_wire`."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {key: from_wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_wire(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------- the worker process
def worker_main(spec: WorkerSpec, ring: WeightRing, jobs, done) -> None:
    """The rollout worker's loop: build the student and sampler, then sample each job with its version's weights.

    Stops at a ``None`` job or when the learner's process is gone. Signals (Ctrl-C, a scheduler's SIGTERM) are left
    to the learner, which finishes its step, checkpoints the rollouts in flight and then stops the worker. An
    exception is sent back with its traceback and ends the worker.
    """
    import multiprocessing

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parent = multiprocessing.parent_process()
    try:
        worker = _RolloutWorker(spec, ring)
        while True:
            try:
                job = jobs.get(timeout=POLL_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if job is None:
                return
            started = time.perf_counter()
            batch = worker.sample(job)
            done.put(("batch", (job.step, job.micro), to_wire(batch.state_dict()), time.perf_counter() - started))
    except BaseException:  # noqa: BLE001 - everything goes back to the learner, which raises it there
        done.put(("error", traceback.format_exc()))


class _RolloutWorker:
    """The worker's student copy, sampler and loaded version."""

    def __init__(self, spec: WorkerSpec, ring: WeightRing) -> None:
        from opd.models.dropout import disable_dropout
        from opd.models.loading import load_model, load_tokenizer
        from opd.models.lora import apply_lora

        torch.set_num_threads(spec.num_threads)
        self.spec, self.ring = spec, ring
        with warnings.catch_warnings():  # the learner has already shown the loading warnings
            warnings.simplefilter("ignore")
            self.tokenizer = load_tokenizer(spec.student_cfg, "student")
            self.model = load_model(spec.student_cfg, "student", torch.device(spec.device))
        if spec.student_cfg.lora.enabled:  # the same adapters as the learner's; their weights come from the ring
            apply_lora(self.model, spec.student_cfg.lora, seed=0)
        disable_dropout(self.model)
        self.model.eval()
        if spec.suppress_tokens:
            self.model.generation_config.suppress_tokens = list(spec.suppress_tokens)
        self.sampler, self.version = spec.sampler, None

    @torch.no_grad()
    def sample(self, job: RolloutJob) -> RolloutBatch:
        if job.version != self.version:
            self.ring.read_into(job.version % len(self.ring.buffers), self.model)
            self.sampler.sync_weights(self.model)  # a vLLM engine mirrors the model (HF: nothing to do)
            self.version = job.version
        torch.manual_seed(job.seed)
        batch = self.sampler.generate(self.model, self.tokenizer, job.examples)
        if self.spec.record_logprobs and batch.sampler_logprobs is None:
            batch.sampler_logprobs = sampled_token_logprobs(self.model, batch, self.spec.vocab_size)
        if self.spec.teacher is not None:  # the teacher is frozen: its scores do not go stale
            batch.teacher_scores = self.spec.teacher.score(batch, "sparse")
        return batch.to("cpu")


def sampled_token_logprobs(model: torch.nn.Module, batch: RolloutBatch, vocab_size: int) -> torch.Tensor:
    """``[B, T]`` log q_old(y_t) of each sampled token under ``model`` at the batch's sampling temperature (0 at
    padding), over the first ``vocab_size`` rows: the distribution the tokens were drawn from."""
    from opd.models.scoring import completion_logits, token_logprobs, trim_vocabulary

    logits = trim_vocabulary(completion_logits(model, batch), vocab_size)
    return token_logprobs(logits, batch.completion_ids, batch.temperature) * batch.completion_mask
